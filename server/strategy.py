"""The server's strategy: Flower's FedAvg and DP wrappers, plus fedseg's own
wrappers for what a coordinator needs around them.

Everything here follows Flower's own pattern for features (the DP wrappers take
any strategy): a wrapper delegates every step to the strategy inside it and
only looks at, or filters, the messages going out and coming back, so Flower's
round loop runs as it is. From the outside in:

* ``SiteRecorder``: per-site metrics, failures and bytes of each round;
* ``PrivacyBudget``: counts DP releases and stops before the budget is exceeded;
* ``UpdateChecks``: leaves out replies with non-finite values, wrong shapes or
  missing weights, naming the site;
* Flower's DP wrapper (server- or client-side, fixed or adaptive clipping), when on;
* Flower's ``FedAvg``, weighted by training cases (uniformly under DP).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from logging import WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAdam,
    FedAvg,
    FedProx,
    Strategy,
)

from common import wire
from common.config import RunSettings
from common.errors import FedsegError, parse_error_reason
from common.metrics import combine
from common.privacy.accounting import PrivacyLedger
from common.privacy.checks import update_problem
from common.training import learning_rate_at
from server.secagg import SecAggPlusFedAvg, SecureRound
from server.wire import audit, content_bytes

UNIFORM_WEIGHT = "dp-unit-weight"
REGISTRY_ENV = "FEDSEG_REGISTRY"


class PrivacyBudgetExhausted(FedsegError):
    kind = "privacy budget exhausted"


def registered_names() -> dict[int, str]:
    """Node id -> hospital name from the coordinator's registry
    (``$FEDSEG_REGISTRY``, set by ``fedseg superlink``): the name a hospital
    was registered under, known before it ever replies."""
    import json
    import os

    path = os.environ.get(REGISTRY_ENV)
    if not path:
        return {}
    try:
        entries = json.loads(Path(path).read_text())
        return {int(e["node_id"]): str(name) for name, e in entries.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def site_name(msg: Message, known: dict[int, str] | None = None) -> str:
    """The public name of the site that ``msg`` is the reply of: the name it
    was registered under, else the name in its reply (an error reply carries
    it in its reason), else the name it gave before, else its node id."""
    node = msg.metadata.src_node_id
    known = known if known is not None else {}
    if node not in known:
        known.update(registered_names())
    if msg.has_content() and wire.SITE in msg.content.config_records:
        name = str(msg.content.config_records[wire.SITE].get(wire.SITE_NAME, node))
    elif msg.has_error():
        name = parse_error_reason(msg.error.reason)[0] or ""
    else:
        name = ""
    if node in known:
        return known[node]
    if name:
        known[node] = name
        return name
    return f"node-{node}"


def aggregate_site_metrics(records: list[RecordDict], weighted_by_key: str) -> MetricRecord:
    """Evaluation metrics across sites, weighted by case count; a metric
    undefined at a site (NaN) is left out rather than averaged in."""
    sites = [dict(next(iter(r.metric_records.values()))) for r in records]
    out = combine(sites)
    return MetricRecord({k: float(v) for k, v in out.items()})


class StrategyWrapper(Strategy):
    """Delegates every step to ``inner``; subclasses override what they watch."""

    def __init__(self, inner: Strategy) -> None:
        self.inner = inner

    def summary(self) -> None:
        self.inner.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        return self.inner.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.inner.aggregate_train(server_round, replies)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round, replies)


@dataclass
class RoundRecord:
    """What one round brought back, per site."""

    train: dict[str, dict[str, float]] = field(default_factory=dict)
    evaluate: dict[str, dict[str, float]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    failed: set[str] = field(default_factory=set)  # sites with a failure this round
    aggregated: bool = False  # the round produced a new global model
    bytes_down: int = 0
    bytes_up: int = 0

    @property
    def trained(self) -> list[str]:
        """Sites whose update went into this round's model."""
        return sorted(set(self.train) - self.failed) if self.aggregated else []


class SiteRecorder(StrategyWrapper):
    """Record per-site metrics, failures and bytes of each round.

    With ``FEDSEG_AUDIT_DIR`` set in the server's environment, every reply is
    also kept there as received (see ``server.wire.audit``).
    """

    def __init__(self, inner: Strategy) -> None:
        super().__init__(inner)
        self.rounds: dict[int, RoundRecord] = {}
        self.names: dict[int, str] = {}  # node id -> public site name
        self.pending: set[int] = set()  # nodes sent a message in the phase in flight
        # Which rounds the sites score the global model in (``evaluate-every``)
        self.evaluate_due: Callable[[int], bool] = lambda server_round: True

    def round(self, server_round: int) -> RoundRecord:
        return self.rounds.setdefault(server_round, RoundRecord())

    def note_failure(self, server_round: int, text: str, site: str | None = None) -> None:
        rec = self.round(server_round)
        rec.failures.append(text)
        if site is not None:
            rec.failed.add(site)

    def secure_round(self, server_round: int, result: SecureRound) -> None:
        """A SecAgg+ round's traffic and per-site numbers (its messages bypass
        ``configure_train``/``aggregate_train``)."""
        rec = self.round(server_round)
        rec.train.update(result.sites)
        rec.bytes_down += result.bytes_down
        rec.bytes_up += result.bytes_up
        if result.halted:
            rec.failures.append("train: the secure round halted (too few sites answered to "
                                "unmask the sum); the model is unchanged this round")
        elif result.failures:
            rec.failures.append(f"train: {result.failures} site(s) dropped out of the secure "
                                f"round; the aggregate is of the others")

    def _sent(self, server_round: int, messages: Iterable[Message]) -> list[Message]:
        messages = list(messages)
        self.round(server_round).bytes_down += sum(content_bytes(m.content) for m in messages)
        self.pending = {m.metadata.dst_node_id for m in messages}
        return messages

    def _received(self, server_round: int, replies: Iterable[Message], phase: str
                  ) -> list[Message]:
        replies = list(replies)
        rec = self.round(server_round)
        pending, self.pending = self.pending, set()
        lost = []  # what the SuperLink says for nodes it lost (the reply is its own)
        for msg in replies:
            node = msg.metadata.src_node_id
            if pending and node not in pending:
                if msg.has_error():
                    lost.append(parse_error_reason(msg.error.reason)[1])
                continue
            pending.discard(node)
            name = site_name(msg, self.names)
            audit(server_round, phase, msg)
            if msg.has_error():
                reason = parse_error_reason(msg.error.reason)[1]
                self.note_failure(server_round, f"{phase} at {name}: {reason}", name)
                log(WARNING, "round %d: %s failed at %s: %s", server_round, phase, name,
                    reason)
                continue
            rec.bytes_up += content_bytes(msg.content)
            metrics = next(iter(msg.content.metric_records.values()), {})
            values = {k: int(v) if k == wire.NUM_EXAMPLES else float(v) for k, v in metrics.items()
                      if isinstance(v, int | float) and k != UNIFORM_WEIGHT}
            (rec.train if phase == "train" else rec.evaluate)[name] = values
        why = f" ({'; '.join(sorted(set(lost)))})" if lost else ""
        for node in sorted(pending):  # sent, never answered by the node itself
            name = self.names.get(node) or registered_names().get(node, f"node-{node}")
            self.note_failure(server_round, f"{phase} at {name}: no reply{why}", name)
            log(WARNING, "round %d: no %s reply from %s", server_round, phase, name)
        return replies

    def configure_train(self, server_round, arrays, config, grid):
        return self._sent(server_round, super().configure_train(server_round, arrays, config,
                                                                grid))

    def aggregate_train(self, server_round, replies):
        arrays, metrics = super().aggregate_train(
            server_round, self._received(server_round, replies, "train"))
        self.round(server_round).aggregated = arrays is not None
        return arrays, metrics

    def configure_evaluate(self, server_round, arrays, config, grid):
        if not self.evaluate_due(server_round):
            return []
        return self._sent(server_round, super().configure_evaluate(server_round, arrays,
                                                                   config, grid))

    def aggregate_evaluate(self, server_round, replies):
        return super().aggregate_evaluate(server_round,
                                          self._received(server_round, replies, "evaluate"))


class UpdateChecks(StrategyWrapper):
    """Leave out train replies that are unfit to aggregate (non-finite values,
    wrong shapes, missing weights or case count); name the site in the log."""

    def __init__(self, inner: Strategy,
                 on_reject: Callable[[int, str, str], None] | None = None,
                 uniform_weights: bool = False) -> None:
        super().__init__(inner)
        self.on_reject = on_reject
        self.uniform_weights = uniform_weights
        self.reference: dict[str, tuple[tuple[int, ...], str]] = {}

    def configure_train(self, server_round, arrays, config, grid):
        self.reference = {k: (tuple(a.shape), str(a.dtype)) for k, a in arrays.items()}
        return super().configure_train(server_round, arrays, config, grid)

    def problem(self, msg: Message) -> str | None:
        content = msg.content
        if len(content.array_records) != 1:
            return f"{len(content.array_records)} weight records instead of one"
        if len(content.metric_records) != 1:
            return f"{len(content.metric_records)} metric records instead of one"
        n = next(iter(content.metric_records.values())).get(wire.NUM_EXAMPLES)
        if not isinstance(n, int | float) or not math.isfinite(n) or n <= 0:
            return "no positive case count (num-examples)"
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

    def aggregate_evaluate(self, server_round, replies):
        replies = list(replies)
        for msg in replies:
            self._weigh_uniformly(msg)
        return super().aggregate_evaluate(server_round, replies)

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
        return super().aggregate_train(server_round, kept)


class PrivacyBudget(StrategyWrapper):
    """Count DP releases (rounds that produced a new global model) and refuse
    to start a round whose release would exceed the epsilon budget."""

    def __init__(self, inner: Strategy, ledger: PrivacyLedger) -> None:
        super().__init__(inner)
        self.ledger = ledger

    def configure_train(self, server_round, arrays, config, grid):
        if not self.ledger.next_round_fits():
            raise PrivacyBudgetExhausted(
                f"the next round would raise epsilon from {self.ledger.epsilon:.3f} to "
                f"{self.ledger.epsilon_after(self.ledger.releases + 1):.3f}, over the budget "
                f"of {self.ledger.max_epsilon} (delta {self.ledger.delta})")
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round, replies):
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is not None:
            self.ledger.releases += 1
        return arrays, metrics


def dp_wrapper(settings: RunSettings, inner: Strategy, num_sampled: int) -> Strategy:
    """Flower's DP wrapper for ``settings.dp`` around ``inner``."""
    z, c = settings.dp_noise_multiplier, settings.dp_clipping_norm
    stddev = settings.dp_clipped_count_stddev or max(num_sampled / 20, z)
    if settings.dp == "server-fixed":
        return DifferentialPrivacyServerSideFixedClipping(inner, z, c, num_sampled)
    if settings.dp == "client-fixed":
        return DifferentialPrivacyClientSideFixedClipping(inner, z, c, num_sampled)
    if settings.dp == "server-adaptive":
        return DifferentialPrivacyServerSideAdaptiveClipping(
            inner, z, num_sampled, initial_clipping_norm=c, clipped_count_stddev=stddev)
    if settings.dp == "client-adaptive":
        return DifferentialPrivacyClientSideAdaptiveClipping(
            inner, z, num_sampled, initial_clipping_norm=c, clipped_count_stddev=stddev)
    return inner


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


class ScheduledFedAdam(FedAdam):
    """Flower's FedAdam whose server learning rate follows the sites' schedule
    (``lr-schedule``): Adam's normalised step would otherwise stay ``eta`` in
    size while the sites' updates shrink, and the model would never settle."""

    def __init__(self, settings: RunSettings, rounds_done: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.settings = settings
        self.rounds_done = rounds_done

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        done = (self.rounds_done + server_round - 1) / self.settings.num_rounds
        self.eta = (self.settings.fedadam_eta * learning_rate_at(done, self.settings)
                    / self.settings.learning_rate)
        return super().aggregate_train(server_round, replies)


def build_strategy(settings: RunSettings, num_sampled: int | None = None,
                   ledger: PrivacyLedger | None = None, rounds_done: int = 0) -> SiteRecorder:
    """FedAvg weighted by each site's training cases (uniformly under DP),
    with DP, update checks, the privacy budget and per-site records around it.

    ``num_sampled``: nodes per round, which Flower's DP wrappers need to scale
    the noise (defaults to ``min-nodes``). ``rounds_done``: rounds of a resumed
    run already behind (Flower counts this call's rounds from 1 again).
    """
    dp_on = settings.dp != "off"
    fedavg_args = dict(
        fraction_train=settings.fraction_train,
        fraction_evaluate=settings.fraction_evaluate,
        min_train_nodes=settings.min_nodes,
        min_evaluate_nodes=settings.min_nodes if settings.fraction_evaluate > 0 else 0,
        min_available_nodes=settings.min_nodes,
        weighted_by_key=UNIFORM_WEIGHT if dp_on else wire.NUM_EXAMPLES,
        evaluate_metrics_aggr_fn=aggregate_site_metrics,
    )
    fedavg: FedAvg
    if settings.secure_aggregation:
        fedavg = SecAggPlusFedAvg(
            proximal_mu=settings.fedprox_mu if settings.strategy == "fedprox" else 0.0,
            clipping_range=settings.secagg_clipping_range,
            max_weight=settings.secagg_max_weight,
            reconstruction_threshold=settings.secagg_reconstruction_threshold,
            timeout=settings.secagg_timeout, **fedavg_args)
    elif settings.strategy == "fedprox":
        fedavg = FedProx(proximal_mu=settings.fedprox_mu, **fedavg_args)
    elif settings.strategy == "fednova":
        fedavg = FedNova(**fedavg_args)
    elif settings.strategy == "fedadam":
        fedavg = ScheduledFedAdam(settings, rounds_done, eta=settings.fedadam_eta,
                                  tau=settings.fedadam_tau, **fedavg_args)
    else:
        fedavg = FedAvg(**fedavg_args)
    checks = UpdateChecks(dp_wrapper(settings, fedavg, num_sampled or settings.min_nodes),
                          uniform_weights=dp_on)
    outer: Strategy = checks
    if dp_on:
        outer = PrivacyBudget(checks, ledger or PrivacyLedger(
            settings.dp_noise_multiplier, settings.dp_delta, settings.dp_max_epsilon))
    recorder = SiteRecorder(outer)
    recorder.evaluate_due = lambda r: ((rounds_done + r) % settings.evaluate_every == 0
                                       or rounds_done + r == settings.num_rounds)
    checks.on_reject = recorder.note_failure
    if isinstance(fedavg, SecAggPlusFedAvg):
        fedavg.on_round = recorder.secure_round
    return recorder


def mean_of(values: dict[str, dict[str, float]], key: str) -> float:
    """Case-weighted mean of one metric over sites (NaN when no site has it)."""
    pairs = [(m[key], m.get(wire.NUM_EXAMPLES, 1.0)) for m in values.values()
             if key in m and math.isfinite(m[key])]
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total else math.nan

