"""What a site's label values mean, and how they become the run's classes.

A site says what its labels hold in ``dataset.json``'s ``labels``, in the
MONAI / Medical Segmentation Decathlon form (``{"0": "background", "1":
"liver", "2": "lesion"}``, value to name) or nnU-Net v2's (``{"background": 0,
"liver": 1}``, name to value). The run names the structures its model learns
(run setting ``structures``); class ``i`` of the model is the ``i``-th of
them, 0 is background. Names are compared, not numbers: two sites may give
liver different values, never different names. A site whose map lacks one of
the run's structures is refused, naming the structure, before any case is
read; nothing is remapped behind the hospital's back.

A site's map may also name structures the run does not learn (a radiotherapy
structure set's body, couch and organs at risk): they are background for this
run. Where one overlaps a structure the run learns (SEG segments and RTSTRUCT
ROIs may overlap; a value map holds one value per voxel), the learned
structure wins: an unlearned segment or ROI is left out, so it takes nothing
from a learned one. They are not left out of the loss: MONAI's
``DiceCELoss`` has no ignore index (docs/data.md).

Where labels are names rather than values (DICOM SEG segments, RTSTRUCT
ROIs), a structure is found by its name in the map, the run's name, or one of
the site's spellings in ``dataset.json``'s ``label_aliases`` (``{"lung left":
["Lt Lung", "Lung_L", "LUNG LEFT"]}``); case, spaces, ``_`` and ``-`` do not
count.

A run that names no structure learns one, each site's single foreground:
through its map when it has one (so a mask whose structure is the dark value
0 is read the right way round), else as before maps existed: non-zero in
NIfTI and DICOM SEG, above half the maximum in PNG/JPEG.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common.config import BACKGROUND, FOREGROUND, RunSettings, normal_name
from common.errors import DataError

log = logging.getLogger(__name__)

LABELS_KEY = "labels"
ALIASES_KEY = "label_aliases"


class LabelMapError(DataError):
    """A site's label map is missing, malformed or disagrees with the run's
    structures. The whole site is refused, not a case."""

    def __init__(self, problem: str, *, structure: str | None = None) -> None:
        super().__init__(problem)
        self.structure = structure  # the run's structure at fault, when one is

    @property
    def category(self) -> str:
        # the run's own structure names may leave the site (they came from the
        # run config); the site's names and values stay
        about = f" (structure {self.structure!r})" if self.structure else ""
        return f"the site's label map does not fit the run's structures{about}"


class StructureMissingError(DataError):
    """A case's DICOM SEG or RTSTRUCT holds no segment or ROI for one of the
    run's structures: the case is left out, never read as if it were absent."""

    def __init__(self, problem: str, *, structure: str) -> None:
        super().__init__(problem)
        self.structure = structure

    @property
    def category(self) -> str:
        return f"label has no {self.structure!r}"  # the run's name, not the site's


@dataclass(frozen=True)
class LabelMap:
    """A site's ``dataset.json`` ``labels``: file value -> name, plus its
    spellings for names (``label_aliases``)."""

    names: dict[int, str]
    aliases: dict[str, tuple[str, ...]] = field(default_factory=dict)  # normal name -> spellings

    def describe(self) -> str:
        return ", ".join(f"{v} {n}" for v, n in sorted(self.names.items()))


def _value(raw: object, where: str) -> int:
    if isinstance(raw, bool):
        raise LabelMapError(f"{where}: label value {raw!r} is not an integer")
    if isinstance(raw, int):
        return raw
    if isinstance(raw, str) and raw.strip().lstrip("-").isdigit():
        return int(raw.strip())
    if isinstance(raw, list):
        raise LabelMapError(f"{where}: {raw!r} is an nnU-Net region (several values for one "
                            "name); fedseg reads one value per structure")
    raise LabelMapError(f"{where}: label value {raw!r} is not an integer")


def parse_label_map(spec: object, where: str = "dataset.json") -> dict[int, str]:
    """``labels`` in either form -> ``{value: name}``."""
    if not isinstance(spec, Mapping) or not spec:
        raise LabelMapError(f"{where}: 'labels' must be a non-empty mapping such as "
                            '{"0": "background", "1": "liver"}')
    out: dict[int, str] = {}
    for key, val in spec.items():
        key_is_value = isinstance(key, str) and key.strip().lstrip("-").isdigit()
        value, name = (_value(key, where), val) if key_is_value else (_value(val, where), key)
        if not isinstance(name, str) or not name.strip():
            raise LabelMapError(f"{where}: label {value} has no name")
        if value in out:
            raise LabelMapError(f"{where}: label value {value} is named twice "
                                f"({out[value]!r}, {name!r})")
        out[value] = name.strip()
    return out


def _aliases(spec: object, where: str) -> dict[str, tuple[str, ...]]:
    if spec is None:
        return {}
    if not isinstance(spec, Mapping) or not all(
            isinstance(v, list) and all(isinstance(s, str) for s in v) for v in spec.values()):
        raise LabelMapError(f'{where}: \'{ALIASES_KEY}\' must map a name to a list of '
                            'spellings, e.g. {"lung left": ["Lt Lung", "Lung_L"]}')
    return {normal_name(k): tuple(normal_name(s) for s in v) for k, v in spec.items()}


def read_label_map(site_dir: Path) -> LabelMap | None:
    """The site's label map, or None when it has none (no ``dataset.json`` or
    no ``labels`` in it)."""
    path = Path(site_dir) / "dataset.json"
    if not path.is_file():
        return None
    try:
        spec = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
    if not isinstance(spec, dict) or LABELS_KEY not in spec:
        return None
    return LabelMap(parse_label_map(spec[LABELS_KEY]), _aliases(spec.get(ALIASES_KEY),
                                                                "dataset.json"))


@dataclass(frozen=True)
class Classes:
    """How one site's labels become the run's classes.

    ``structures``: the run's, in class order (class ``i + 1`` is
    ``structures[i]``). ``value_class``: file value -> class, or None where
    the site has no map (one structure, read as before maps existed).
    ``spellings``: per structure, the normal names a SEG segment or RTSTRUCT
    ROI may carry for it. ``unlearned``: the names in the site's map that the
    run does not learn; their values are class 0 (background)."""

    structures: tuple[str, ...]
    value_class: dict[int, int] | None = None
    spellings: tuple[frozenset[str], ...] = ()
    map_text: str = ""  # the site's map in words, for its own messages
    # the map's structures the run does not learn (read as background), as the map names them
    unlearned: tuple[str, ...] = ()

    @property
    def num_classes(self) -> int:
        return 1 + len(self.structures)

    def class_of_name(self, name: str) -> int | None:
        """The class a segment or ROI called ``name`` is, or None."""
        key = normal_name(name)
        for i, names in enumerate(self.spellings):
            if key in names:
                return i + 1
        return None

    def classes_of_values(self, values: np.ndarray, what: str) -> np.ndarray:
        """Integer label values -> class indices (uint8); a DataError naming the
        values the map lacks."""
        assert self.value_class is not None
        found, inverse = np.unique(values, return_inverse=True)
        unknown = [int(v) for v in found if int(v) not in self.value_class]
        if unknown:
            shown = ", ".join(map(str, unknown[:8])) + (" ..." if len(unknown) > 8 else "")
            raise DataError(f"{what} holds the value(s) {shown}, which the label map "
                            f"({self.map_text}) does not have")
        table = np.array([self.value_class[int(v)] for v in found], np.uint8)
        return table[inverse].reshape(values.shape)


def classes_of_named(found: Mapping[int, Sequence[str]], classes: Classes, what: str,
                     kind: str) -> dict[int, int]:
    """The segments or ROIs of one label file -> the run's classes, by name.

    ``found``: each one's number -> the names it goes by, its own label
    first (then, for a SEG segment, its coded type's meaning and
    ``<scheme>:<code>``, e.g. ``SCT:10200004``). A name matches as
    :meth:`Classes.class_of_name` says (the map's name, the run's, the site's
    ``label_aliases``). Every structure of the run must be found, else a
    :class:`StructureMissingError` naming it and what the file holds; those
    that match no structure are left out and logged here, at the site.
    ``kind``: ``segment`` or ``ROI``, for messages."""
    out: dict[int, int] = {}
    for number, names in found.items():
        match = next((c for c in map(classes.class_of_name, names) if c is not None), None)
        if match is not None:
            out[number] = match
    held = "; ".join(f"{n} {names[0]!r}" for n, names in found.items()) or "none"
    for i, structure in enumerate(classes.structures):
        if i + 1 not in out.values():
            raise StructureMissingError(
                f"{what} has no {kind} for {structure!r} (its {kind}s: {held}): name it as "
                f"the site's label map does, or add its spelling to 'label_aliases' in "
                f"dataset.json (docs/data.md)", structure=structure)
    ignored = [f"{n} {found[n][0]!r}" for n in found if n not in out]
    if ignored:
        log.info("%s: %s(s) %s match no structure of the run (%s); left out (background "
                 "where no structure of the run is drawn)", what, kind,
                 ", ".join(ignored), ", ".join(classes.structures))
    return out


def legacy(structures: tuple[str, ...] = (FOREGROUND,)) -> Classes:
    return Classes(structures, None, (frozenset({normal_name(structures[0])}),))


def classes_for(label_map: LabelMap | None, settings: RunSettings) -> Classes:
    """The run's classes at a site with ``label_map``; LabelMapError naming
    the structure when they do not fit (see the module's text)."""
    run = settings.structure_names
    if label_map is None:
        if settings.named_structures:
            example = ", ".join(f'"{i + 1}": "{n}"' for i, n in enumerate(run))
            raise LabelMapError(
                f"the site has no label map, and the run learns {', '.join(run)}: add "
                f'"labels": {{"0": "background", {example}}} to its dataset.json '
                f"(docs/data.md)", structure=run[0])
        return legacy()
    by_name: dict[str, list[int]] = {}
    for value, name in label_map.names.items():
        by_name.setdefault(normal_name(name), []).append(value)
    background = by_name.pop(BACKGROUND, None)
    if background is None:
        raise LabelMapError("the site's label map has no 'background' entry "
                            f"({label_map.describe()}): say which value is background")
    site_names = {normal_name(label_map.names[v[0]]): label_map.names[v[0]]
                  for v in by_name.values()}
    if settings.named_structures:
        wanted = [normal_name(n) for n in run]
        for key, name in zip(wanted, run, strict=True):
            if key not in by_name:
                raise LabelMapError(
                    f"the site's label map has no {name!r}, which the run learns "
                    f"(its map: {label_map.describe()}; the run's structures: "
                    f"{', '.join(run)}); name it as the run does", structure=name)
        unlearned = [site_names[k] for k in by_name if k not in wanted]
        order = wanted
    else:
        if len(by_name) != 1:
            raise LabelMapError(
                f"the site's label map has {len(by_name)} structures "
                f"({', '.join(site_names.values()) or 'none'}) and the run names none, so "
                f"it cannot tell which one to learn: name it (or them) with the run setting "
                f"'structures'; the map's others are then read as background")
        unlearned = []
        order = list(by_name)  # the site's one structure is the run's "foreground"
    value_class = dict.fromkeys(background, 0)
    for key in by_name:
        if key not in order:  # a structure the run does not learn: background
            value_class.update(dict.fromkeys(by_name[key], 0))
    for i, key in enumerate(order):
        value_class.update(dict.fromkeys(by_name[key], i + 1))
    spellings = tuple(
        frozenset({key, normal_name(name), *label_map.aliases.get(key, ()),
                   *label_map.aliases.get(normal_name(name), ())})
        for key, name in zip(order, run, strict=True))
    if unlearned:
        log.info("the site's label map names %s, which the run does not learn (%s): read as "
                 "background", ", ".join(map(repr, unlearned)), ", ".join(run))
    return Classes(tuple(run), value_class, spellings, label_map.describe(), tuple(unlearned))


def site_classes(site_dir: Path, settings: RunSettings) -> Classes:
    """:func:`classes_for` with the map in the site's ``dataset.json``."""
    return classes_for(read_label_map(site_dir), settings)


def structure_disagreement(own: Mapping[str, str | None] | Iterable[tuple[str, str | None]],
                           how: str) -> str | None:
    """Where the run names no structure, each site learns its label map's one
    structure as the run's one class: sites whose maps name different ones
    (``membrane`` at one, ``vessel`` at another) would train one model on two
    tasks. ``own``: each site's structure (:func:`scored_at_site`; None: no
    map, or not said), as a mapping or as (site, structure) pairs (two nodes
    may give one name). The message naming each site's, or None where they
    agree. ``how``: how this user names the run's structure."""
    pairs = own.items() if isinstance(own, Mapping) else own
    named = sorted((site, name) for site, name in pairs if name)
    if len({name for _, name in named}) < 2:
        return None
    by_name: dict[str, list[str]] = {}
    for site, name in named:
        by_name.setdefault(name, []).append(site)
    said = "; ".join(f"{', '.join(sites)} {name!r}" for name, sites in sorted(by_name.items()))
    return (f"the sites' label maps name different structures ({said}) and the run names "
            f"none, so each site's would be learned as one: name the structure with {how} "
            f"(as each site's map names it, or its label_aliases spell it)")


def scored_at_site(site_dir: Path, settings: RunSettings) -> tuple[str | None, str]:
    """What a run learns and scores at a site: the site's own name for it
    where the run names no structure (its map's one structure; None without a
    map), and a description in the site's words, for reports
    (``vessel = value 0``; ``Anterior = 1, Posterior = 2``;
    ``foreground = any value but 0 (no label map)``)."""
    label_map = read_label_map(site_dir)
    classes = classes_for(label_map, settings)
    if classes.value_class is None:
        return None, f"{classes.structures[0]} = any value but 0 (no label map)"
    words = []
    own = None
    for index, run_name in enumerate(classes.structures, start=1):
        values = sorted(v for v, c in classes.value_class.items() if c == index)
        name = label_map.names[values[0]] if label_map and values else run_name
        if not settings.named_structures:
            own = normal_name(name)
        words.append(f"{name} = value{'s' * (len(values) > 1)} "
                     f"{', '.join(map(str, values))}")
    return own, "; ".join(words)
