"""FedNova's aggregation on hand-made replies, against the formula."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord

from server.strategies.fednova import FedNova
from tests.unit.strategies.messages import NoGrid, reply

pytestmark = pytest.mark.usefixtures("task_identity")


def test_fednova_normalises_each_update_by_its_local_steps():
    """Global weights 0. Site A (2 cases, 10 steps) moved +1 per step, site B
    (1 case, 5 steps) -1 per step. FedNova: tau_eff = 2/3*10 + 1/3*5 = 25/3,
    step = tau_eff * (2/3*1 + 1/3*(-1)) = 25/9. FedAvg would give 2/3*10 - 1/3*5 = 5,
    pulled towards the site that took more steps."""
    strategy = FedNova(min_available_nodes=1, min_train_nodes=1)
    global_arrays = ArrayRecord({"w": Array(np.zeros(3, dtype=np.float32))})
    sent = list(strategy.configure_train(1, global_arrays, ConfigRecord(), NoGrid()))
    assert len(sent) == 2
    arrays, _ = strategy.aggregate_train(1, [reply(10.0, 2, 10), reply(-5.0, 1, 5)])
    np.testing.assert_allclose(arrays["w"].numpy(), 25 / 9, rtol=1e-5)


