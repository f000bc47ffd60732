"""Leave out updates unfit to aggregate, naming the site."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from logging import WARNING

import numpy as np
from flwr.app import Message
from flwr.common.logger import log
from flwr.serverapp.strategy import Strategy

from common import wire
from common.config import FOREGROUND
from common.packing import wire_dtype
from common.privacy.checks import update_problem
from server.strategies.base import UNIFORM_WEIGHT, StrategyWrapper
from server.strategies.recorder import site_name


class UpdateChecks(StrategyWrapper):
    """Leave out train replies that are unfit to aggregate (non-finite values,
    wrong shapes, weights not in the dtype of the run's ``transfer-precision``,
    missing weights or case count); name the site in the log.
    Evaluate replies must carry the scores of the run's ``structures``
    (``wire.eval_metrics``); the recorder has already cut every reply to the
    run's keys (``declared.py``)."""

    def __init__(self, inner: Strategy,
                 on_reject: Callable[[int, str, str], None] | None = None,
                 uniform_weights: bool = False,
                 structures: Sequence[str] = (FOREGROUND,),
                 precision: str = "float32") -> None:
        super().__init__(inner)
        self.on_reject = on_reject
        self.uniform_weights = uniform_weights
        self.eval_keys = wire.eval_metrics(tuple(structures))
        self.precision = precision  # transfer-precision: the dtype updates must arrive in
        self.reference: dict[str, tuple[tuple[int, ...], str]] = {}

    def configure_train(self, server_round, arrays, config, grid):
        # each weight's shape, and its dtype as it travels (common/packing.py)
        self.reference = {k: (tuple(a.shape), wire_dtype(str(a.dtype), self.precision))
                          for k, a in arrays.items()}
        return super().configure_train(server_round, arrays, config, grid)

    def problem(self, msg: Message) -> str | None:
        content = msg.content
        if len(content.array_records) != 1:
            return f"{len(content.array_records)} weight records instead of one"
        if len(content.metric_records) != 1:
            return f"{len(content.metric_records)} metric records instead of one"
        metrics = next(iter(content.metric_records.values()))
        n = metrics.get(wire.NUM_EXAMPLES)
        if not isinstance(n, int | float) or not math.isfinite(n) or n <= 0:
            return "no positive case count (num-examples)"
        missing = [k for k in wire.TRAIN_METRICS if not isinstance(metrics.get(k), int | float)]
        if missing:
            return f"metrics missing ({', '.join(missing)})"
        record = next(iter(content.array_records.values()))
        try:
            update = {k: np.asarray(v.numpy()) for k, v in record.items()}
        except Exception:  # noqa: BLE001 - an undecodable array is a broken update
            return "weights that cannot be decoded"
        return update_problem(update, self.reference)

    def _weigh_uniformly(self, msg: Message) -> None:
        """Under DP every site's update counts the same (the noise is scaled to
        one site's clipped update out of ``num_sampled``)."""
        if self.uniform_weights and not msg.has_error() and msg.content.metric_records:
            next(iter(msg.content.metric_records.values()))[UNIFORM_WEIGHT] = 1

    @staticmethod
    def same_keys(replies: list[Message]) -> list[Message]:
        """Flower aggregates only replies whose metrics have the same keys (and
        stops the run otherwise): keep the keys every reply has. The scores of
        the incoming model (``global-*``, recorded already) never go further."""
        records = [next(iter(m.content.metric_records.values())) for m in replies
                   if not m.has_error() and m.content.metric_records]
        common = set.intersection(*(set(r) for r in records)) if records else set()
        for record in records:
            for key in [k for k in record if k not in common
                        or k.startswith(wire.GLOBAL_PREFIX)]:
                del record[key]
        return replies

    def aggregate_evaluate(self, server_round, replies):
        replies = [m for m in replies if m.has_error() or (
            len(m.content.metric_records) == 1 and all(
                isinstance(next(iter(m.content.metric_records.values())).get(k), int | float)
                for k in self.eval_keys))]
        for msg in replies:  # keys beyond the run's were dropped on arrival (declared.py)
            self._weigh_uniformly(msg)
        return super().aggregate_evaluate(server_round, self.same_keys(replies))

    def aggregate_train(self, server_round, replies):
        kept = []
        for msg in replies:
            if not msg.has_error():
                problem = self.problem(msg)
                if problem is not None:
                    name = site_name(msg)
                    text = f"update from {name} left out: {problem}"
                    log(WARNING, "round %d: %s", server_round, text)
                    if self.on_reject:
                        self.on_reject(server_round, text, name)
                    continue
                self._weigh_uniformly(msg)
            kept.append(msg)
        return super().aggregate_train(server_round, self.same_keys(kept))
