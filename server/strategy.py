"""The server's strategy: Flower's FedAvg, wrapped to record each site's numbers.

The wrapper follows Flower's own pattern for features (the DP wrappers take any
strategy): it delegates every step to the inner strategy and only looks at the
messages going out and coming back, so Flower's round loop is used as it is.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from logging import WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Strategy

from common.config import RunSettings
from common.metrics import METRICS, combine


def content_bytes(content: RecordDict) -> int:
    """Payload bytes of a message: arrays, metrics and configs."""
    return sum(record.count_bytes() for record in content.values())


def site_name(msg: Message) -> str:
    """The site's public name from its reply, else its node id."""
    if msg.has_content() and "site" in msg.content.config_records:
        return str(msg.content.config_records["site"].get("name", msg.metadata.src_node_id))
    return f"node-{msg.metadata.src_node_id}"


def aggregate_site_metrics(records: list[RecordDict], weighted_by_key: str) -> MetricRecord:
    """Evaluation metrics across sites, weighted by case count; a metric
    undefined at a site (NaN) is left out rather than averaged in."""
    sites = [dict(next(iter(r.metric_records.values()))) for r in records]
    out = combine(sites)
    return MetricRecord({k: float(v) for k, v in out.items()})


@dataclass
class RoundRecord:
    """What one round brought back, per site."""

    train: dict[str, dict[str, float]] = field(default_factory=dict)
    evaluate: dict[str, dict[str, float]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    bytes_down: int = 0
    bytes_up: int = 0


class SiteRecorder(Strategy):
    """Wrap a strategy; record per-site metrics, failures and bytes of each round."""

    def __init__(self, inner: Strategy) -> None:
        self.inner = inner
        self.rounds: dict[int, RoundRecord] = {}

    def _round(self, server_round: int) -> RoundRecord:
        return self.rounds.setdefault(server_round, RoundRecord())

    def _sent(self, server_round: int, messages: Iterable[Message]) -> list[Message]:
        messages = list(messages)
        self._round(server_round).bytes_down += sum(content_bytes(m.content) for m in messages)
        return messages

    def _received(self, server_round: int, replies: Iterable[Message], phase: str) -> list[Message]:
        replies = list(replies)
        rec = self._round(server_round)
        for msg in replies:
            name = site_name(msg)
            if msg.has_error():
                rec.failures.append(f"{phase} at {name}: {msg.error.reason}")
                log(WARNING, "round %d: %s failed at %s: %s", server_round, phase, name,
                    msg.error.reason)
                continue
            rec.bytes_up += content_bytes(msg.content)
            metrics = {k: int(v) if k == "num-examples" else float(v)
                       for k, v in msg.content["metrics"].items()}
            (rec.train if phase == "train" else rec.evaluate)[name] = metrics
        return replies

    def summary(self) -> None:
        self.inner.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self._sent(server_round,
                          self.inner.configure_train(server_round, arrays, config, grid))

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.inner.aggregate_train(
            server_round, self._received(server_round, replies, "train"))

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self._sent(server_round,
                          self.inner.configure_evaluate(server_round, arrays, config, grid))

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(
            server_round, self._received(server_round, replies, "evaluate"))


def build_strategy(settings: RunSettings) -> SiteRecorder:
    """FedAvg weighted by each site's number of training cases."""
    inner = FedAvg(
        fraction_train=settings.fraction_train,
        fraction_evaluate=settings.fraction_evaluate,
        min_train_nodes=settings.min_nodes,
        min_evaluate_nodes=settings.min_nodes if settings.fraction_evaluate > 0 else 0,
        min_available_nodes=settings.min_nodes,
        weighted_by_key="num-examples",
        evaluate_metrics_aggr_fn=aggregate_site_metrics,
    )
    return SiteRecorder(inner)


def mean_of(values: dict[str, dict[str, float]], key: str) -> float:
    """Case-weighted mean of one metric over sites (NaN when no site has it)."""
    pairs = [(m[key], m.get("num-examples", 1.0)) for m in values.values()
             if key in m and math.isfinite(m[key])]
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total else math.nan


__all__ = ["METRICS", "RoundRecord", "SiteRecorder", "build_strategy", "mean_of"]
