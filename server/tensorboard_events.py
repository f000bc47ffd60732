"""A run's metrics as TensorBoard event files, in the run folder beside
``metrics.jsonl`` and ``report.html``: ``tensorboard --logdir runs/`` shows
every run, one TensorBoard run per folder.

Each round is one step (the round number), written when its line is added to
``metrics.jsonl`` (:meth:`server.runs.RunFolder.append_row`), from that line,
so the two never disagree. Tags (a value the round lacks, e.g. Dice in a round
the sites did not score, is not written):

* ``dice/mean``: the headline, across sites; ``dice_site/<site>``: each
  site's; ``dice_structure/<structure>``: across sites, per structure;
* ``overall/<score>``: every other score across sites (``iou``, ``hd95``
  in mm, ``sensitivity``, ``specificity``; ``overall/hd95/<structure>``...
  with several structures);
* ``train/loss`` (case-weighted across sites), ``train_loss_site/<site>``;
* ``round/seconds``, ``round/bytes_up``, ``round/bytes_down``,
  ``round/sites_trained``, ``round/failures``;
* ``privacy/epsilon`` (and ``privacy/releases``) when differential privacy is on.

A resumed run opens a new event file that purges every step from its first
round on (TensorBoard's ``purge_step``): rounds the stopped run wrote past its
last checkpoint are dropped, as they are from ``metrics.jsonl``, so no step is
shown twice.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from common import wire


def scalars(row: dict[str, Any], structures: tuple[str, ...]) -> Iterator[tuple[str, float]]:
    """``(tag, value)`` of one ``metrics.jsonl`` line, finite numbers only."""
    overall = row.get("overall") or {}
    yield "dice/mean", row.get("dice_mean")
    for site, dice in (row.get("dice") or {}).items():
        yield f"dice_site/{site}", dice
    for structure in structures:
        key = (wire.structure_key("dice", structure) if len(structures) > 1 else "dice")
        yield f"dice_structure/{structure}", overall.get(key)
    for key, value in overall.items():
        if key != "dice" and wire.is_score(key):
            yield f"overall/{key}", value
    yield "train/loss", row.get("train_loss")
    for site, loss in (row.get("train_loss_sites") or {}).items():
        yield f"train_loss_site/{site}", loss
    yield "round/seconds", row.get("seconds")
    yield "round/bytes_up", row.get("bytes_up")
    yield "round/bytes_down", row.get("bytes_down")
    yield "round/sites_trained", len(row.get("trained") or [])
    yield "round/failures", len(row.get("failures") or [])
    if row.get("epsilon") is not None:
        yield "privacy/epsilon", row["epsilon"]
        yield "privacy/releases", row.get("dp_releases")


class EventLog:
    """The run folder's TensorBoard writer, opened at the first round it writes."""

    def __init__(self, folder: Path, structures: tuple[str, ...], first_step: int) -> None:
        self.folder, self.structures, self.first_step = Path(folder), structures, first_step
        self._writer = None

    def add_round(self, row: dict[str, Any]) -> None:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            # a resumed run: TensorBoard drops what earlier files hold from here on
            self._writer = SummaryWriter(
                log_dir=str(self.folder),
                purge_step=self.first_step if self.first_step > 1 else None)
        step = int(row["round"])
        for tag, value in scalars(row, self.structures):
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if math.isfinite(value):
                self._writer.add_scalar(tag, float(value), global_step=step)
        self._writer.flush()  # a stopped run's rounds are on disk

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
