from __future__ import annotations

from logging import WARNING

import numpy as np
from flwr.app import Array, ArrayRecord
from flwr.common.logger import log
from flwr.serverapp.strategy import FedAvg

from common import wire


class FedNova(FedAvg):
    """FedNova (Wang et al. 2020, "Tackling the objective inconsistency problem
    in heterogeneous federated optimization"): sites that take different numbers
    of local steps (a site with twice the cases takes twice the steps in the
    same local epochs) have their updates normalised by their step counts
    before the case-weighted average, then scaled by the weighted mean step
    count. Plain FedAvg would count a large site twice, once in its weight and
    again in the length of its update, and drift towards it.

    Written as a transformation of the replies ahead of Flower's FedAvg: site
    ``i``'s model ``x_i`` becomes ``x + (tau_eff / tau_i) (x_i - x)``, whose
    case-weighted average is FedNova's step from the global model ``x``.
    """

    def configure_train(self, server_round, arrays, config, grid):
        self.sent = {k: np.asarray(a.numpy()) for k, a in arrays.items()}
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        ok = [m for m in replies if not m.has_error()]
        weights, steps = [], []
        for msg in ok:
            metrics = next(iter(msg.content.metric_records.values()))
            weights.append(float(metrics[self.weighted_by_key]))
            steps.append(float(metrics.get(wire.TRAIN_STEPS, 0)))
        if ok and min(steps) > 0:
            tau_eff = sum(w * t for w, t in zip(weights, steps, strict=True)) / sum(weights)
            for msg, tau in zip(ok, steps, strict=True):
                key = next(iter(msg.content.array_records))
                record = msg.content.array_records[key]
                scaled = {}
                for name, array in record.items():
                    x_i, x = np.asarray(array.numpy()), self.sent[name]
                    scaled[name] = (x + (tau_eff / tau) * (x_i - x)).astype(x_i.dtype) \
                        if np.issubdtype(x_i.dtype, np.floating) else x_i
                msg.content.array_records[key] = ArrayRecord(
                    {n: Array(a) for n, a in scaled.items()})
        elif ok:
            log(WARNING, "round %d: a site sent no train-steps; FedNova falls back to FedAvg",
                server_round)
        return super().aggregate_train(server_round, replies)
