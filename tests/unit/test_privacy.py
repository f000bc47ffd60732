"""Privacy hooks without a federation: accounting, update checks, client clipping."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from dp_accounting import dp_event, rdp
from flwr.app import (
    ConfigRecord,
    Context,
    Message,
    MessageType,
    RecordDict,
)

from client.app import app as client_app
from common.config import RunSettings
from common.errors import ConfigError
from common.model import build_model
from common.privacy.accounting import PrivacyLedger
from server.runs import packed_arrays

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


def test_client_side_clipping_bounds_the_update_norm(synthetic_sites):
    clip = 0.05
    run_config = {"dp": "client-fixed", "learning-rate": 0.01, "local-epochs": 1}
    settings = RunSettings.from_run_config(run_config)
    torch.manual_seed(0)
    model = build_model(settings.model)
    sent = packed_arrays(model.state_dict())
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
