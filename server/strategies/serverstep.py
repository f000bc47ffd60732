"""A server step size for fedavg, fedprox and fednova (``server-learning-rate``).

With ``eta`` the run's model moves ``eta`` times the way the aggregate points:
``x + eta * (aggregate - x)``, ``x`` the model the round sent (FedOpt with
plain SGD at the server, Reddi et al. 2021, "Adaptive Federated
Optimization"; ``eta = 1`` is FedAvg as it is). Flower's FedAvgM has the
same step, but only as its own strategy; this one steps fedprox and fednova
too. Measured on the hippocampus sites (docs/benchmarks.md), a step of 2 made
FedAvg worse (0.810 against about 0.84 mean Dice): the sites' Adam updates do
not stretch, so the default stays 1.

It sits outside everything that aggregates (update checks, DP, SecAgg+,
the robust rules): it only rescales what they released, so a DP run's
guarantee is unchanged (post-processing) and a rejected update stays out."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord

from server.strategies.base import StrategyWrapper


class ServerStep(StrategyWrapper):
    def __init__(self, inner, eta: float) -> None:
        super().__init__(inner)
        self.eta = eta
        self.sent: tuple[int, ArrayRecord] | None = None  # the round and the model it sent

    def configure_train(self, server_round, arrays, config, grid):
        self.sent = (server_round, arrays)
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round, replies):
        arrays, metrics = super().aggregate_train(server_round, replies)
        sent, self.sent = self.sent, None
        start = sent[1] if sent and sent[0] == server_round else None
        if arrays is None or start is None or self.eta == 1.0:
            return arrays, metrics
        return step(start, arrays, self.eta), metrics


def step(start: ArrayRecord, aggregate: ArrayRecord, eta: float) -> ArrayRecord:
    """``start + eta * (aggregate - start)`` for floating-point weights, in
    their own dtype; anything else (counters) as aggregated."""
    out = {}
    for key, array in aggregate.items():
        new = array.numpy()
        old = start[key].numpy() if key in start else None
        if old is None or not np.issubdtype(new.dtype, np.floating) or old.shape != new.shape:
            out[key] = array
            continue
        moved = old.astype(np.float64) + eta * (new.astype(np.float64) - old)
        out[key] = Array(moved.astype(new.dtype, copy=False))
    return ArrayRecord(out)
