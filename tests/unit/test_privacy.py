"""Privacy hooks without a federation: accounting, update checks, client clipping."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from dp_accounting import dp_event, rdp
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp.strategy import FedAvg

from client.app import app as client_app
from common.config import RunSettings
from common.errors import ConfigError
from common.model import build_model
from common.privacy.accounting import PrivacyLedger
from common.privacy.checks import update_problem
from server.strategy import UpdateChecks

pytestmark = pytest.mark.usefixtures("task_identity")


def independent_epsilon(z: float, rounds: int, delta: float) -> float:
    accountant = rdp.RdpAccountant()
    for _ in range(rounds):
        accountant.compose(dp_event.GaussianDpEvent(z))
    return accountant.get_epsilon(delta)


@pytest.mark.parametrize("z", [0.8, 1.5])
def test_ledger_epsilon_is_dp_accountings(z):
    ledger = PrivacyLedger(noise_multiplier=z, delta=1e-5)
    for rounds in (1, 2, 5):
        assert ledger.epsilon_after(rounds) == pytest.approx(independent_epsilon(z, rounds, 1e-5))
    assert ledger.epsilon == 0.0


def test_budget_allows_exactly_the_rounds_that_fit():
    eps = [independent_epsilon(1.0, n, 1e-5) for n in (1, 2, 3, 4)]
    ledger = PrivacyLedger(1.0, 1e-5, max_epsilon=(eps[2] + eps[3]) / 2)
    assert ledger.rounds_within_budget() == 3
    ledger.releases = 3
    assert not ledger.next_round_fits()


def test_dp_settings_are_checked():
    with pytest.raises(ConfigError, match="secure aggregation"):
        RunSettings.from_run_config({"dp": "server-fixed", "secure-aggregation": True})
    with pytest.raises(ConfigError, match="'dp' must be one of off"):
        RunSettings.from_run_config({"dp": "local"})
    with pytest.raises(ConfigError, match="needs differential privacy"):
        RunSettings.from_run_config({"dp-max-epsilon": 3.0})


REFERENCE = {"w": ((2, 3), "float32"), "b": ((3,), "float32")}


@pytest.mark.parametrize(
    ("update", "problem"),
    [
        ({"w": np.zeros((2, 3)), "b": np.zeros(3)}, None),
        ({"w": np.full((2, 3), np.nan), "b": np.zeros(3)}, "NaN or infinite"),
        ({"w": np.zeros((3, 2)), "b": np.zeros(3)}, "has shape (3, 2), expected (2, 3)"),
        ({"w": np.zeros((2, 3))}, "missing 1 weight"),
        ({"w": np.zeros((2, 3)), "b": np.zeros(3), "x": np.zeros(1)}, "unexpected"),
    ],
)
def test_update_problems(update, problem):
    found = update_problem(update, REFERENCE)
    assert (found is None) if problem is None else (problem in found)


def reply(name: str, arrays: dict[str, np.ndarray], n: int = 4) -> Message:
    request = Message(content=RecordDict({}), dst_node_id=1, message_type=MessageType.TRAIN)
    content = RecordDict({"arrays": ArrayRecord([], keep_input=True) if not arrays else
                          ArrayRecord({k: _array(v) for k, v in arrays.items()}),
                          "metrics": MetricRecord({"num-examples": n}),
                          "site": ConfigRecord({"name": name})})
    return Message(content, reply_to=request)


def _array(v: np.ndarray):
    from flwr.app import Array

    return Array(np.asarray(v, dtype=np.float32))


def test_broken_updates_are_left_out_and_the_site_named():
    rejected = []
    checks = UpdateChecks(FedAvg(), on_reject=lambda r, text, site: rejected.append(text))
    checks.reference = REFERENCE
    good = {"w": np.ones((2, 3)), "b": np.ones(3)}
    replies = [
        reply("good-a", good),
        reply("good-b", {"w": 3 * np.ones((2, 3)), "b": 3 * np.ones(3)}),
        reply("nan-site", {"w": np.full((2, 3), np.inf), "b": np.ones(3)}),
        reply("shape-site", {"w": np.ones((6,)), "b": np.ones(3)}),
        reply("missing-site", {"w": np.ones((2, 3))}),
    ]
    arrays, _ = checks.aggregate_train(1, replies)
    np.testing.assert_allclose(arrays["w"].numpy(), 2 * np.ones((2, 3)))  # only the good two
    assert [t.split(" left out")[0] for t in rejected] == [
        "update from nan-site", "update from shape-site", "update from missing-site"]


def test_client_side_clipping_bounds_the_update_norm(synthetic_sites):
    clip = 0.05
    run_config = {"dp": "client-fixed", "learning-rate": 0.01, "local-epochs": 1}
    settings = RunSettings.from_run_config(run_config)
    torch.manual_seed(0)
    model = build_model(settings.model)
    sent = ArrayRecord(model.state_dict())
    msg = Message(content=RecordDict({"arrays": sent, "config": ConfigRecord(
        {"server-round": 1, "clipping_norm": clip})}), dst_node_id=7,
        message_type=MessageType.TRAIN)
    ctx = Context(run_id=1, node_id=7, node_config={"data-dir": str(synthetic_sites[0])},
                  state=RecordDict(), run_config=run_config)
    out = client_app(msg, ctx)  # mods and handler, as Flower calls them
    assert not out.has_error()
    new = out.content["arrays"].to_numpy_ndarrays()
    old = sent.to_numpy_ndarrays()
    norm = math.sqrt(sum(float(np.sum((a - b) ** 2)) for a, b in zip(new, old, strict=True)))
    assert 0 < norm <= clip * (1 + 1e-5)
