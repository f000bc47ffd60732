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
HALF = {"w": ((2, 3), "float16"), "b": ((3,), "float16")}  # transfer-precision float16


def zeros(*shape: int, dtype=np.float32) -> np.ndarray:
    return np.zeros(shape, dtype)


@pytest.mark.parametrize(
    ("update", "reference", "problem"),
    [
        ({"w": zeros(2, 3), "b": zeros(3)}, REFERENCE, None),
        ({"w": np.full((2, 3), np.nan, np.float32), "b": zeros(3)}, REFERENCE,
         "NaN or infinite"),
        ({"w": zeros(3, 2), "b": zeros(3)}, REFERENCE, "has shape (3, 2), expected (2, 3)"),
        ({"w": zeros(2, 3)}, REFERENCE, "missing 1 weight"),
        ({"w": zeros(2, 3), "b": zeros(3), "x": zeros(1)}, REFERENCE, "unexpected"),
        # exactly the dtype the run's transfer-precision sends, nothing else
        ({"w": zeros(2, 3, dtype=np.float16), "b": zeros(3)}, REFERENCE,
         "weight 'w' arrived as float16; the run's weights travel as float32"),
        ({"w": zeros(2, 3, dtype=np.float64), "b": zeros(3)}, REFERENCE, "arrived as float64"),
        ({"w": zeros(2, 3, dtype=np.float16), "b": zeros(3, dtype=np.float16)}, HALF, None),
        ({"w": zeros(2, 3, dtype=np.float16), "b": zeros(3)}, HALF,
         "weight 'b' arrived as float32; the run's weights travel as float16"),
        ({"w": np.full((2, 3), np.inf, np.float16), "b": zeros(3, dtype=np.float16)}, HALF,
         "NaN or infinite"),
    ],
)
def test_update_problems(update, reference, problem):
    found = update_problem(update, reference)
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


