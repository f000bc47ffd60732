"""A server step size for fedavg, fedprox and fednova (``server-learning-rate``).

With ``eta`` the run's model moves ``eta`` times the way the aggregate points:
``x + eta * (aggregate - x)``, ``x`` the model the round sent (FedOpt with
plain SGD at the server, Reddi et al. 2021, "Adaptive Federated
Optimization"; ``eta = 1`` is FedAvg as it is). Sites that hold alike data
each move the model about the same way in a round, so their mean moves it
about as far as one site's data would, while a pooled model trained on all of
it moves as far as all the sites in turn; a step above 1 makes up part of
that (docs/benchmarks.md, the hippocampus table).

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
        self.sent: dict[int, ArrayRecord] = {}  # round -> the model it sent

    def configure_train(self, server_round, arrays, config, grid):
        self.sent = {server_round: arrays}
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round, replies):
        arrays, metrics = super().aggregate_train(server_round, replies)
        start = self.sent.pop(server_round, None)
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
