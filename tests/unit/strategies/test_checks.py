"""Update checks: broken or hostile updates are left out, the site named."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from common.privacy.checks import update_problem
from server.strategies.checks import UpdateChecks

pytestmark = pytest.mark.usefixtures("task_identity")

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
                          "metrics": MetricRecord({"num-examples": n, "train-loss": 0.5,
                                                   "train-seconds": 1.0, "train-steps": 3}),
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


