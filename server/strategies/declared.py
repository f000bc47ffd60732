"""What a site's reply may bring into the run: the keys the run declared.

The server reads each reply once, where it first arrives
(``SiteRecorder.read``; a secure round's plaintext metrics in
``SiteRecorder.secure_round``), and cuts it there, in place, to what the run
asked for (the names of ``common.wire``):

* records: ``arrays`` (train), ``metrics`` and ``site``, each of its kind;
* metrics: a train reply's training metrics and its scores of the incoming
  model (``global-*``), an evaluate reply's scores; the scores are those of the
  run's ``structures``; Flower's clipping bit under ``client-adaptive`` DP.
  Each a finite number (a score may be NaN: undefined at the site), a case
  count a whole one, not negative;
* the ``site`` record: the public name and the notes of ``wire.SITE_NOTES``,
  as one line of text, at most :data:`NAME_LIMIT` / :data:`TEXT_LIMIT`
  characters (an error reply's cause is cut the same way).

Everything else is dropped before any other part of the server (the update
checks, Flower's aggregation, the run folder) sees it, and a warning names
the site and what was dropped, never the values. The sites scrub what they
send; the server does not rely on it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from logging import WARNING
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.supercore.differential_privacy import KEY_NORM_BIT

from common import wire
from common.config import FOREGROUND, RunSettings

NAME_LIMIT = 64  # characters of a site's public name (a registered name has at most 63)
TEXT_LIMIT = 400  # characters of a note or of a failure's cause
KEYS_LOGGED = 12  # dropped keys named in one warning
KEY_LOGGED = 40  # characters of each

# The records a reply may hold, and their kinds
RECORDS: dict[str, dict[str, type]] = {
    "train": {wire.ARRAYS: ArrayRecord, wire.METRICS: MetricRecord, wire.SITE: ConfigRecord},
    "evaluate": {wire.METRICS: MetricRecord, wire.SITE: ConfigRecord},
}


def bounded(value: Any, limit: int = TEXT_LIMIT) -> str:
    """``value`` as one line of printable text of at most ``limit``
    characters (cut with an ellipsis)."""
    text = str(value)[: 4 * limit]
    text = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _number(value: Any, *, count: bool, undefined: bool) -> float | int | None:
    """``value`` as a metric: a finite number (NaN too where ``undefined`` is
    allowed); a count as a whole number, not negative. None otherwise."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if count:
        return int(value) if math.isfinite(value) and value >= 0 else None
    if math.isfinite(value) or (undefined and math.isnan(value)):
        return float(value)
    return None


@dataclass(frozen=True)
class Declared:
    """The keys a run's replies may carry: set by the run's ``structures``
    (the score keys) and its DP mode (Flower's clipping bit)."""

    structures: tuple[str, ...] = (FOREGROUND,)
    flower_keys: tuple[str, ...] = ()  # train metrics Flower's own client mods add

    @classmethod
    def of(cls, settings: RunSettings) -> Declared:
        return cls(tuple(settings.structure_names),
                   (KEY_NORM_BIT,) if settings.dp == "client-adaptive" else ())

    def metric_keys(self, phase: str) -> frozenset[str]:
        """The metrics a ``train`` or an ``evaluate`` reply may carry."""
        scores = wire.eval_metrics(self.structures)
        if phase == "train":
            return frozenset((*wire.TRAIN_METRICS, *(wire.GLOBAL_PREFIX + k for k in scores),
                              *self.flower_keys))
        return frozenset(scores)

    def metrics(self, phase: str, values: Mapping[str, Any]
                ) -> tuple[dict[str, float | int], list[str]]:
        """The declared metrics of ``values``, each of its kind; and what was
        dropped (names only)."""
        allowed = self.metric_keys(phase)
        kept: dict[str, float | int] = {}
        dropped = []
        for key, value in values.items():
            if key not in allowed:
                dropped.append(f"metric {bounded(key, KEY_LOGGED)}")
                continue
            bare = key.removeprefix(wire.GLOBAL_PREFIX)
            count = bare == wire.NUM_EXAMPLES
            number = _number(value, count=count, undefined=wire.is_score(bare))
            if number is None:
                dropped.append(f"metric {key} (not a {'count' if count else 'finite number'})")
            else:
                kept[key] = number
        return kept, dropped

    @staticmethod
    def notes(values: Mapping[str, Any]) -> tuple[dict[str, str | bool], list[str]]:
        """The site notes (``wire.SITE_NOTES``) of ``values``, as bounded
        text; and what was dropped or cut (names only)."""
        kept: dict[str, str | bool] = {}
        dropped = []
        for key, value in values.items():
            if key not in wire.SITE_NOTES:
                dropped.append(f"site note {bounded(key, KEY_LOGGED)}")
            elif isinstance(value, bool):
                kept[key] = value
            elif not isinstance(value, str):
                dropped.append(f"site note {key} (not text)")
            else:
                kept[key] = bounded(value)
                if len(value) > TEXT_LIMIT:
                    dropped.append(f"site note {key} (cut to {TEXT_LIMIT} characters)")
        return kept, dropped

    def reply(self, msg: Message, phase: str
              ) -> tuple[dict[str, float | int], dict[str, str | bool], list[str]]:
        """Cut ``msg``, a ``train`` or ``evaluate`` reply that is not an
        error, in place to what the run declared: its metrics, its notes and
        what was dropped."""
        content, expected = msg.content, RECORDS[phase]
        dropped = []
        for name in list(content.keys()):
            if not isinstance(content[name], expected.get(name, ())):
                dropped.append(f"record {bounded(name, KEY_LOGGED)}")
                del content[name]
        metrics, lost = self.metrics(phase, content.get(wire.METRICS, {}))
        dropped += lost
        if wire.METRICS in content:
            content[wire.METRICS] = MetricRecord(metrics)
        site = dict(content.get(wire.SITE, {}))
        notes, lost = self.notes({k: v for k, v in site.items() if k != wire.SITE_NAME})
        dropped += lost
        if wire.SITE in content:
            name = ({wire.SITE_NAME: bounded(site[wire.SITE_NAME], NAME_LIMIT)}
                    if wire.SITE_NAME in site else {})
            content[wire.SITE] = ConfigRecord({**name, **notes})
        return metrics, notes, dropped

    def fit_metrics(self, values: Mapping[str, Any]
                    ) -> tuple[dict[str, float | int], dict[str, str | bool], list[str]]:
        """A secure round's plaintext part (the legacy fit result's one flat
        record: the site's name under ``site``, its notes, its train metrics),
        cut the same way: its metrics, its notes and what was dropped."""
        notes, dropped = self.notes({k: v for k, v in values.items() if k in wire.SITE_NOTES})
        metrics, lost = self.metrics("train", {k: v for k, v in values.items()
                                               if k not in wire.SITE_NOTES and k != wire.SITE})
        return metrics, notes, lost + dropped


def log_dropped(what: str, dropped: Sequence[str]) -> None:
    """Warn that ``what`` (a round, a site, a reply) carried more than the run
    declared: the names of what was dropped, at most :data:`KEYS_LOGGED`."""
    if not dropped:
        return
    more = f" and {len(dropped) - KEYS_LOGGED} more" if len(dropped) > KEYS_LOGGED else ""
    log(WARNING, "%s: kept only what the run declared; dropped %s%s", what,
        ", ".join(dropped[:KEYS_LOGGED]), more)
