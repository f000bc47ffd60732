"""Check a hospital's data folder before it joins: read every case as a round
would (decode, pair image and label, compare grids, look at the label) and
say, case by case, what is usable and what is not and why.

``fedseg site check DIR`` prints it; ``fedseg node`` runs it at start and
does not join without a usable training case; the site worker reads the
folder the same way when a run starts (``common.data.site.read_site``) and
leaves unusable cases out with a warning. Everything here stays at the site.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common.config import BACKGROUND, RunSettings, normal_name
from common.data.labels import Classes, read_label_map, site_classes
from common.data.site import SPLITS, Case, CaseRef, NoUsableCaseError, list_cases, read_site
from common.errors import DataError, EmptyDatasetError


@dataclass(frozen=True)
class CaseCheck:
    """One case's verdict."""

    split: str
    index: int
    case_id: str
    usable: bool
    problem: str = ""  # why not usable (the site's own words, may name files)
    shape: tuple[int, ...] = ()  # channels x spatial
    foreground: float | None = None  # fraction of label voxels that are foreground
    note: str = ""  # usable, but worth a look
    structures: dict[str, float] = field(default_factory=dict)  # several: each one's fraction

    def shown_foreground(self) -> str:
        """The foreground in words: a percentage, per structure when several."""
        if self.foreground is None:
            return ""
        if len(self.structures) > 1:
            return ", ".join(f"{n} {100 * f:.1f}%" for n, f in self.structures.items())
        return f"{100 * self.foreground:.1f}%"


@dataclass
class SiteCheck:
    """Every case of a site folder, and what stops a split altogether."""

    site_dir: Path
    cases: list[CaseCheck] = field(default_factory=list)
    split_errors: dict[str, str] = field(default_factory=dict)  # split -> why none is read
    unlearned: tuple[str, ...] = ()  # the map's structures the run does not learn: background

    def usable(self, split: str) -> int:
        return sum(c.usable for c in self.cases if c.split == split)

    def total(self, split: str) -> int:
        return sum(c.split == split for c in self.cases)

    @property
    def can_join(self) -> bool:
        """A node needs at least one usable training case."""
        return self.usable("training") > 0

    @property
    def all_usable(self) -> bool:
        return not self.split_errors and all(c.usable for c in self.cases)

    def summary(self) -> str:
        parts = []
        for split in SPLITS:
            if split in self.split_errors:
                parts.append(f"{split}: {self.split_errors[split]}")
            else:
                left = self.total(split) - self.usable(split)
                parts.append(f"{self.usable(split)} of {self.total(split)} {split} cases "
                             f"usable" + (f" ({left} left out)" if left else ""))
        if self.unlearned:
            parts.append(f"not learned by this run, so read as background: "
                         f"{', '.join(map(repr, self.unlearned))}")
        return "; ".join(parts)


def count_cases(site_dir: Path) -> int:
    """How many cases a check will read (for progress), 0 where a split has none."""
    total = 0
    for split in SPLITS:
        try:
            total += len(list_cases(site_dir, split))
        except DataError:
            pass
    return total


def _verdict(split: str, ref: CaseRef, index: int, outcome: Case | DataError,
             classes: Classes) -> CaseCheck:
    if isinstance(outcome, DataError):
        return CaseCheck(split, index, ref.case_id, False, problem=outcome.problem)
    label = outcome.label
    fg = float(np.count_nonzero(label)) / max(1, label.size)
    present = set(np.unique(label).tolist())
    absent = [n for i, n in enumerate(classes.structures) if i + 1 not in present]
    flat = getattr(outcome, "not_a_volume", None)
    if flat:
        note = (f"{flat}: a 2D run reads it slice by slice, a 3D run leaves it out "
                f"(export the whole series, one plane a folder)")
    elif fg == 0:
        note = "label has no foreground"
    elif len(classes.structures) > 1 and absent:
        note = "label has no " + ", ".join(absent)
    else:
        note = ""
    counts = np.bincount(label.ravel(), minlength=1 + len(classes.structures))
    each = {n: float(counts[i + 1]) / max(1, label.size)
            for i, n in enumerate(classes.structures)}
    return CaseCheck(split, index, ref.case_id, True, shape=tuple(outcome.image.shape),
                     foreground=fg, note=note, structures=each)


def own_structures(site_dir: Path) -> RunSettings:
    """Settings of a run that learns what the site's label map names (one
    structure where it has no map or names one)."""
    label_map = read_label_map(site_dir)
    if label_map is None:
        return RunSettings()
    names = list(dict.fromkeys(n for n in label_map.names.values()
                               if normal_name(n) != BACKGROUND))
    return RunSettings(structures=",".join(names) if len(names) > 1 else "")


def check_site(site_dir: Path, on_case: Callable[[CaseCheck], None] | None = None,
               settings: RunSettings | None = None) -> SiteCheck:
    """Read every case of ``site_dir`` as a run of ``settings`` would (its
    ``structures`` against the site's label map; default: the structures the
    site's own map names); ``on_case`` after each (progress)."""
    result = SiteCheck(Path(site_dir))
    try:
        classes = site_classes(site_dir, settings or own_structures(site_dir))
    except DataError as exc:  # the map itself: no case can be read as the run's
        for split in SPLITS:
            result.split_errors[split] = exc.problem
        return result
    result.unlearned = classes.unlearned
    for split in SPLITS:
        def record(ref: CaseRef, index: int, outcome: Case | DataError,
                   split: str = split) -> None:
            verdict = _verdict(split, ref, index, outcome, classes)
            result.cases.append(verdict)
            if on_case is not None:
                on_case(verdict)

        try:
            read_site(site_dir, split, on_case=record, keep=False, classes=classes)
        except NoUsableCaseError:
            pass  # every case is in the table with its reason
        except EmptyDatasetError as exc:
            result.split_errors[split] = exc.problem
        except DataError as exc:  # e.g. an unreadable dataset.json
            result.split_errors[split] = str(exc)
    return result
