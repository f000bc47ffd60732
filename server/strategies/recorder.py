"""Per-site metrics, failures and bytes of each round, each site by its
public name."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from logging import WARNING
from pathlib import Path
from typing import Any

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from common import wire
from common.config import normal_name
from common.data.labels import structure_disagreement
from common.errors import FedsegError, parse_error_reason
from common.metrics import combine
from server.prompt_grid import DelegatingGrid
from server.strategies.base import StrategyWrapper
from server.strategies.declared import NAME_LIMIT, Declared, bounded, log_dropped
from server.strategies.secagg import SecureRound
from server.wire import audit, content_bytes

REGISTRY_ENV = "FEDSEG_REGISTRY"


class TooFewSites(FedsegError):
    """Fewer than ``min-nodes`` sites connected within ``node-wait``: the run
    stops (its last round's checkpoint is kept; ``--resume`` goes on)."""

    kind = "too few sites"


class SitesDisagree(FedsegError):
    """The sites learn different tasks: in a run that names no structure,
    their label maps name different ones (``wire.STRUCTURE``). The run stops;
    it is fixed by naming the structure, in a new run."""

    kind = "configuration error"


STRUCTURES_HOW = "the run setting 'structures', --config structures=NAME"


def said_structure(value: Any) -> str | None:
    """A reply's ``wire.STRUCTURE`` as the server compares it: text only,
    one bounded line, case, spaces, ``_`` and ``-`` not counting; None for
    anything else."""
    if not isinstance(value, str):
        return None
    return normal_name(bounded(value, NAME_LIMIT)) or None


def check_structures(said: Iterable[tuple[str, str]]) -> str | None:
    """The one structure of ``said`` ((site, structure) pairs), None if
    empty; SitesDisagree naming each site's where they hold more than one."""
    said = list(said)
    problem = structure_disagreement(said, STRUCTURES_HOW)
    if problem:
        raise SitesDisagree(problem)
    return said[0][1] if said else None


def wait_for_sites(grid, needed: int, limit: float, what: str) -> int:
    """Wait up to ``limit`` seconds for ``needed`` connected sites (Flower's
    own wait has no limit); the number connected, or :class:`TooFewSites`."""
    deadline = time.monotonic() + limit
    while (n := len(list(grid.get_node_ids()))) < needed:
        if time.monotonic() >= deadline:
            raise TooFewSites(f"{n} of the {needed} sites needed (min-nodes) were connected "
                              f"{what}, after waiting {limit:.0f} s (node-wait)")
        time.sleep(min(1.0, max(0.05, deadline - time.monotonic())))
    return n


class OneNodeList(DelegatingGrid):
    """``grid`` for one configure step, in which Flower's strategies read the
    connected nodes twice: once to size the sample (``fraction-train`` x
    connected), once to draw it. A site that connects between the two reads
    made a draw of n from n + 1, so at ``fraction-train`` 1 a connected site
    sat the round out. Here the second read gives the first one's list while
    each node on it is still connected (a node come since joins next round);
    any other read is live, as is everything else."""

    def __init__(self, inner: Grid) -> None:
        super().__init__(inner)
        self._first: list[int] | None = None
        self._reads = 0

    def get_node_ids(self) -> Iterable[int]:
        live = list(self.inner.get_node_ids())
        self._reads += 1
        if self._reads == 1:
            self._first = live
        elif self._reads == 2 and self._first is not None and set(self._first) <= set(live):
            return list(self._first)
        return live


def registered_names() -> dict[int, str]:
    """Node id -> hospital name from the coordinator's registry
    (``$FEDSEG_REGISTRY``, set by ``fedseg superlink``): the name a hospital
    was registered under, known before it ever replies."""
    path = os.environ.get(REGISTRY_ENV)
    if not path:
        return {}
    try:
        entries = json.loads(Path(path).read_text())
        return {int(e["node_id"]): str(name) for name, e in entries.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}

def public_name(node: int, reported: Any, known: dict[int, str]) -> str:
    """The public name of ``node``: the name it was registered under, else
    the first name it gave (``reported`` now, cut to ``NAME_LIMIT``
    characters), else its node id. ``known``: the names given so far."""
    if node not in known:
        known.update(registered_names())
    if node in known:
        return known[node]
    name = bounded(reported, NAME_LIMIT) if reported else ""
    if name:
        known[node] = name
        return name
    return f"node-{node}"

def site_name(msg: Message, known: dict[int, str] | None = None) -> str:
    """The public name of the site that ``msg`` is the reply of
    (:func:`public_name`; an error reply carries the name in its reason)."""
    reported = None
    if msg.has_content() and wire.SITE in msg.content.config_records:
        reported = msg.content.config_records[wire.SITE].get(wire.SITE_NAME)
    elif msg.has_error():
        reported = parse_error_reason(msg.error.reason)[0]
    return public_name(msg.metadata.src_node_id, reported, {} if known is None else known)

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
    failed: set[str] = field(default_factory=set)  # sites with a failure this round
    left_out: set[str] = field(default_factory=set)  # sites whose update did not count
    cases_left_out: dict[str, str] = field(default_factory=dict)  # site -> unusable cases
    # node -> (site, wire.STRUCTURE said), in a run that learns each site's structure
    structures: dict[int, tuple[str, str]] = field(default_factory=dict)
    aggregated: bool = False  # the round produced a new global model
    bytes_down: int = 0
    bytes_up: int = 0

    @property
    def trained(self) -> list[str]:
        """Sites whose update went into this round's model."""
        return sorted(set(self.train) - self.left_out) if self.aggregated else []

class SiteRecorder(StrategyWrapper):
    """Record per-site metrics, failures and bytes of each round.

    One message a round: the train message of round r asks the sites to score
    the model they receive (round r-1's) first (``evaluate-incoming``); those
    scores, in the train replies as ``global-*``, are recorded as round r-1's
    evaluation. Only the call's last round sends evaluate messages, so its
    model is scored too.

    Every reply is first cut to what the run declared (``declared``, see
    ``server/strategies/declared.py``), in place, before anything else reads
    it. With ``FEDSEG_AUDIT_DIR`` set in the server's environment, every reply
    is also kept there as received (see ``server.wire.audit``).
    """

    def __init__(self, inner: Strategy, declared: Declared | None = None) -> None:
        super().__init__(inner)
        self.declared = declared or Declared()
        self.rounds: dict[int, RoundRecord] = {}
        self.names: dict[int, str] = {}  # node id -> public site name
        self.pending: set[int] = set()  # nodes sent a message in the phase in flight
        self.privacy: Any = None  # the DP account (epsilon, releases), set by the factory
        # Which rounds the sites score the global model in (``evaluate-every``)
        self.evaluate_due: Callable[[int], bool] = lambda server_round: True
        self.last_round = 0  # this call's last round (0: unknown; every round evaluates)
        self.min_nodes = 0  # sites a round waits for (at most node_wait seconds); 0: Flower's
        self.node_wait = 300.0
        self.max_short_rounds = 3  # rounds in a row under min-nodes replies before a stop
        self.short_rounds = 0
        self.local_models: dict[str, ArrayRecord] = {}  # cross-site: shareable, by site
        self.keep_every = 0  # every N rounds the sites keep the global model (keep-model-every)
        self.dp_sampled = 0  # under DP: the sites sampled each round, all of which must answer
        self.rounds_done = 0  # rounds of a resumed run before this call
        # A run that names no structure learns each site's one (wire.STRUCTURE): whether
        # this run does; the one its sites learn (from the fingerprint, the run folder of
        # a resumed run, else the first round aggregated with sites that said it); the
        # nodes left out for naming another (their updates and scores do not count)
        self.site_structures = False
        self.structure: str | None = None
        self.excluded: set[int] = set()

    def round(self, server_round: int) -> RoundRecord:
        return self.rounds.setdefault(server_round, RoundRecord())

    def note_failure(self, server_round: int, text: str, site: str | None = None,
                     train: bool = True) -> None:
        """Record a failure; ``train``: the site's update did not count."""
        rec = self.round(server_round)
        rec.failures.append(text)
        if site is not None:
            rec.failed.add(site)
            if train:
                rec.left_out.add(site)

    def scores_of_incoming(self, server_round: int, site: str, values: dict[str, float]
                           ) -> dict[str, float]:
        """Move a train reply's scores of the incoming model (``global-*``) to
        the previous round's evaluation; the train metrics are what is left."""
        scores = {k.removeprefix(wire.GLOBAL_PREFIX): v for k, v in values.items()
                  if k.startswith(wire.GLOBAL_PREFIX)}
        if scores:
            self.round(server_round - 1).evaluate[site] = scores
        return {k: v for k, v in values.items() if not k.startswith(wire.GLOBAL_PREFIX)}

    def scoring_failed(self, server_round: int, site: str, reason: str) -> None:
        """A site trained in ``server_round`` but could not score the model it
        received: a failure of the previous round's evaluation."""
        self.note_failure(server_round - 1, f"evaluate at {site}: {reason}", site, train=False)
        log(WARNING, "round %d: evaluate failed at %s: %s", server_round - 1, site, reason)

    def cases_left_out(self, server_round: int, site: str, text: Any) -> None:
        """A site left unusable cases out of its reply (its own log names
        them; the server gets counts and kinds)."""
        if not text:
            return
        rec = self.round(server_round)
        if rec.cases_left_out.get(site) != str(text):
            log(WARNING, "round %d: %s left out unusable cases: %s", server_round, site, text)
        rec.cases_left_out[site] = str(text)

    def read(self, msg: Message, phase: str, when: str
             ) -> tuple[str, dict[str, float | int], dict[str, str | bool]]:
        """A ``train`` or ``evaluate`` reply that is not an error, cut in
        place to what the run declared: the site's public name, its metrics
        and its notes. ``when``: the round, for the warning if any was cut."""
        name = site_name(msg, self.names)
        metrics, notes, dropped = self.declared.reply(msg, phase)
        log_dropped(f"{when}: {name}'s {phase} reply", dropped)
        return name, metrics, notes

    def secure_round(self, server_round: int, result: SecureRound) -> None:
        """A SecAgg+ round's traffic and per-site numbers (its messages bypass
        ``configure_train``/``aggregate_train``): each site's plaintext
        metrics, cut to what the run declared."""
        rec = self.round(server_round)
        for node, values in sorted(result.replies.items()):
            site = public_name(node, values.get(wire.SITE), self.names)
            metrics, notes, dropped = self.declared.fit_metrics(values)
            log_dropped(f"round {server_round}: {site}'s secure train reply", dropped)
            rec.train[site] = self.scores_of_incoming(server_round, site, metrics)
            if wire.EVALUATE_ERROR in notes:
                self.scoring_failed(server_round, site, str(notes[wire.EVALUATE_ERROR]))
            self.cases_left_out(server_round, site, notes.get(wire.LEFT_OUT))
            self.said(server_round, node, site, notes)
        # the secure sum holds every site's update: one that learns another structure
        # cannot be left out of it, so the run stops
        self.other_structures(server_round, secure=True)
        if not result.halted:
            self.fix_structure(rec)
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
                    lost.append(bounded(parse_error_reason(msg.error.reason)[1]))
                elif msg.has_content():  # not recorded, but cut all the same
                    self.read(msg, phase, f"round {server_round}")
                continue
            pending.discard(node)
            audit(server_round, phase, msg)  # as received
            if msg.has_error():
                name = site_name(msg, self.names)
                reason = bounded(parse_error_reason(msg.error.reason)[1])
                self.note_failure(server_round, f"{phase} at {name}: {reason}", name,
                                  train=phase == "train")
                log(WARNING, "round %d: %s failed at %s: %s", server_round, phase, name,
                    reason)
                continue
            rec.bytes_up += content_bytes(msg.content)  # as received
            name, values, notes = self.read(msg, phase, f"round {server_round}")
            if phase == "train":
                rec.train[name] = self.scores_of_incoming(server_round, name, values)
                if notes.get(wire.SHARE_LOCAL) and wire.ARRAYS in msg.content:
                    # its latest local model, copied before aggregation consumes it
                    self.local_models[name] = ArrayRecord(
                        {k: Array(a.numpy().copy())
                         for k, a in msg.content[wire.ARRAYS].items()})
                if wire.EVALUATE_ERROR in notes:
                    self.scoring_failed(server_round, name, str(notes[wire.EVALUATE_ERROR]))
                self.said(server_round, node, name, notes)
            elif node in self.excluded:  # it learns another task: its scores say nothing
                self.note_failure(server_round, f"evaluate at {name} not counted: it was "
                                  f"left out for the structure its label map names", name,
                                  train=False)
            else:
                rec.evaluate[name] = values
            self.cases_left_out(server_round, name, notes.get(wire.LEFT_OUT))
        why = f" ({'; '.join(sorted(set(lost)))})" if lost else ""
        for node in sorted(pending):  # sent, never answered by the node itself
            name = self.names.get(node) or registered_names().get(node, f"node-{node}")
            self.note_failure(server_round, f"{phase} at {name}: no reply{why}", name,
                              train=phase == "train")
            log(WARNING, "round %d: no %s reply from %s", server_round, phase, name)
        return replies

    def configure_train(self, server_round, arrays, config, grid):
        if self.min_nodes:
            wait_for_sites(grid, self.min_nodes, self.node_wait,
                           f"for round {self.rounds_done + server_round}")
        incoming = self.rounds_done + server_round - 1  # the run's round of ``arrays``
        config = ConfigRecord({**dict(config), wire.EVALUATE_INCOMING:
                               incoming >= 1 and self.evaluate_due(server_round - 1)})
        if self.keep_every and incoming >= 1 and incoming % self.keep_every == 0:
            config[wire.KEEP_MODEL] = True  # the sites keep the model of round ``incoming``
        return self._sent(server_round, super().configure_train(server_round, arrays, config,
                                                                OneNodeList(grid)))

    def said(self, server_round: int, node: int, site: str, notes: dict) -> None:
        """Record the structure a train reply said (``wire.STRUCTURE``), in a
        run that learns each site's; anything else is not read."""
        structure = said_structure(notes.get(wire.STRUCTURE))
        if self.site_structures and structure:
            self.round(server_round).structures[node] = (site, structure)

    def other_structures(self, server_round: int, secure: bool = False) -> set[int]:
        """The nodes of this round whose label map names another structure
        than the run's, each recorded as a failure whose update and scores do
        not count (its scores of the incoming model are dropped here, its
        later evaluate replies on arrival). Before the run's structure is
        known, sites of this round that differ among themselves stop the run
        (:class:`SitesDisagree`), as does any that differs in a ``secure``
        round (its update is in the sum); the round's one structure becomes
        the run's in :meth:`aggregate_train`, once the round is aggregated."""
        said = self.round(server_round).structures
        run = self.structure or check_structures(said.values())
        others = {node for node, (_, structure) in said.items() if structure != run}
        if others and secure:
            raise SitesDisagree(
                f"{', '.join(f'{said[n][0]} {said[n][1]!r}' for n in sorted(others))}: the "
                f"label map names another structure than the run's sites learn ({run!r}), and "
                f"a secure round cannot leave one site's update out of its sum; the run names "
                f"none: name it with {STRUCTURES_HOW}")
        for node in sorted(others):
            site, structure = said[node]
            text = (f"update from {site} left out: its label map names {structure!r}, the "
                    f"structure the run's sites learn is {run!r} (the run names none: name "
                    f"it with {STRUCTURES_HOW})")
            self.note_failure(server_round, text, site)
            self.round(server_round - 1).evaluate.pop(site, None)  # scored another task
            log(WARNING, "round %d: %s", server_round, text)
        self.excluded |= others
        return others

    def fix_structure(self, rec: RoundRecord) -> None:
        """After an aggregated round, the run's structure where none was
        fixed yet: the one its sites said (they agree, or the round stopped)."""
        if self.structure is None and rec.structures:
            self.structure = next(iter(rec.structures.values()))[1]

    def aggregate_train(self, server_round, replies):
        replies = self._received(server_round, replies, "train")
        others = self.other_structures(server_round)
        if others:
            replies = [m for m in replies if m.metadata.src_node_id not in others]
        rec = self.round(server_round)
        counted = set(rec.train) - {rec.structures[n][0] for n in others}
        answered = len(counted)  # replies, or a secure round's sites, that count
        if self.min_nodes and answered < self.min_nodes:
            return self.short_round(server_round, answered, self.min_nodes, "min-nodes")
        if self.dp_sampled and answered < self.dp_sampled:  # Flower's DP wrappers refuse it
            return self.short_round(server_round, answered, self.dp_sampled,
                                    "DP: its noise is calibrated to every sampled site")
        self.short_rounds = 0
        arrays, metrics = super().aggregate_train(server_round, replies)
        rec.aggregated = arrays is not None
        if rec.aggregated:
            self.fix_structure(rec)
        return arrays, metrics

    def short_round(self, server_round: int, answered: int, needed: int, rule: str
                    ) -> tuple[None, None]:
        """Fewer than ``needed`` sites answered (within ``round-timeout``): the
        round is skipped and the model unchanged; after ``max-short-rounds``
        such rounds in a row the run stops (:class:`TooFewSites`, resumable)."""
        self.short_rounds += 1
        why = (f"{answered} of the {needed} sites needed ({rule}) answered "
               f"round {self.rounds_done + server_round}")
        self.round(server_round).failures.append(
            f"round skipped: {why}; the model is unchanged")
        log(WARNING, "round %d skipped: %s", server_round, why)
        if self.short_rounds >= self.max_short_rounds:
            raise TooFewSites(f"{why}: {self.short_rounds} rounds in a row with too few "
                              f"replies (max-short-rounds {self.max_short_rounds})")
        return None, None

    def configure_evaluate(self, server_round, arrays, config, grid):
        # Scored with the next round's train message, except the last round's
        if not self.evaluate_due(server_round) or (self.last_round
                                                   and server_round < self.last_round):
            return []
        if self.min_nodes:
            try:
                wait_for_sites(grid, self.min_nodes, self.node_wait, "to score the final model")
            except TooFewSites as exc:
                self.note_failure(server_round, f"evaluate skipped: {exc}")
                log(WARNING, "round %d: evaluate skipped: %s", server_round, exc)
                return []
        # the final model: each site keeps a copy (none of a run that never aggregated:
        # its model is the initial one)
        aggregated = self.rounds_done > 0 or any(r.aggregated for r in self.rounds.values())
        if server_round == self.last_round and aggregated:
            scored = self.round(server_round - 1).evaluate or {}
            dice = combine(list(scored.values())).get("dice") if scored else None
            config = ConfigRecord({**dict(config), wire.KEEP_MODEL: True,
                                   **({wire.FEDERATION_DICE: float(dice)}
                                      if dice is not None else {})})
        return self._sent(server_round, super().configure_evaluate(server_round, arrays,
                                                                   config, OneNodeList(grid)))

    def aggregate_evaluate(self, server_round, replies):
        replies = self._received(server_round, replies, "evaluate")
        return super().aggregate_evaluate(server_round, [
            m for m in replies if m.metadata.src_node_id not in self.excluded])
