"""A hospital's data folder: which cases it holds, and loading them.

Two layouts (see docs/data.md):

* ``dataset.json`` in the MONAI / Medical Segmentation Decathlon form, with
  ``training`` and ``test`` lists of ``{"image": ..., "label": ...}`` and paths
  relative to the folder;
* without it, or where it lists no cases (an nnU-Net ``dataset.json`` holds
  the label map only), ``imagesTr/`` + ``labelsTr/`` (and ``imagesTs/`` +
  ``labelsTs/``), paired by file name (suffixes and an nnU-Net ``_0000``
  channel tag ignored).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.data.labels import Classes
from common.data.readers import check_pair, read_image, read_label
from common.errors import (
    DataError,
    EmptyDatasetError,
    MissingLabelError,
    UnreadableFileError,
    UnsupportedFormatError,
)

log = logging.getLogger(__name__)

SPLITS = {"training": ("imagesTr", "labelsTr"), "test": ("imagesTs", "labelsTs")}
_SUFFIXES = (".nii.gz", ".nii", ".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm")


@dataclass(frozen=True)
class CaseRef:
    """Where one case's image and label are. ``case_id`` stays at the site."""

    case_id: str
    image: Path
    label: Path | None


@dataclass
class Case:
    """One loaded case: ``image`` C x spatial float32, ``label`` 1 x spatial uint8.

    ``prepared``: how the image was made model-ready (a
    ``common.data.transforms.Preparation``: channels, target spacing,
    intensity scheme), or None for the image as read."""

    case_id: str
    image: np.ndarray
    label: np.ndarray
    spacing: tuple[float, ...]
    prepared: Any = None  # common.data.transforms.Preparation
    # A case resampled for the model: its label and spacing as read, to score on
    # that grid (kept for test cases only; None: not resampled, or not kept)
    source: tuple[np.ndarray, tuple[float, ...]] | None = None
    # A DICOM series or multi-frame image that is not one evenly spaced stack:
    # why (read slice by slice; a 3D model leaves it out), else None
    not_a_volume: str | None = None

    @property
    def spatial_dims(self) -> int:
        return self.image.ndim - 1


def case_key(name: str) -> str:
    """File or folder name without its suffix and nnU-Net channel tag."""
    lower = name.lower()
    for suffix in _SUFFIXES:
        if lower.endswith(suffix):
            name = name[: -len(suffix)]
            break
    if len(name) > 5 and name[-5] == "_" and name[-4:].isdigit():
        name = name[:-5]
    return name


def list_cases(site_dir: Path, split: str) -> list[CaseRef]:
    """The cases of ``split`` (``training`` or ``test``) in a site folder."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    site_dir = Path(site_dir)
    if not site_dir.is_dir():
        raise EmptyDatasetError(f"site folder {site_dir} does not exist or is not a folder")
    datalist = site_dir / "dataset.json"
    spec = _read_datalist(datalist) if datalist.is_file() else None
    # an nnU-Net dataset.json (labels and channel names, no lists) leaves the
    # cases to the folders beside it
    if spec is not None and (not isinstance(spec, dict) or split in spec
                             or not (site_dir / SPLITS[split][0]).is_dir()):
        refs = _from_datalist(site_dir, datalist, spec, split)
    elif (site_dir / SPLITS[split][0]).is_dir():
        refs = _from_folders(site_dir, *SPLITS[split])
    else:
        raise EmptyDatasetError(
            f"site folder {site_dir} has no dataset.json and no {SPLITS[split][0]}/ folder; "
            f"see docs/data.md for the layout"
        )
    if not refs:
        raise EmptyDatasetError(f"site folder {site_dir} holds no {split} case")
    return refs


def _read_datalist(datalist: Path) -> Any:
    try:
        return json.loads(datalist.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read {datalist}: {exc}") from None


def _from_datalist(site_dir: Path, datalist: Path, spec: Any, split: str) -> list[CaseRef]:
    entries = spec.get(split, []) if isinstance(spec, dict) else None
    if not isinstance(entries, list):
        raise DataError(f"{datalist}: '{split}' must be a list of {{image, label}} entries")
    refs = []
    for i, entry in enumerate(entries):
        if isinstance(entry, str):  # Decathlon test lists hold bare image paths
            entry = {"image": entry}
        image = entry.get("image") if isinstance(entry, dict) else None
        if isinstance(image, list):
            image = image[0] if len(image) == 1 else image
        if not isinstance(image, str):
            raise DataError(
                f"{datalist}: {split} entry {i} needs one 'image' path (multi-channel "
                f"inputs are not supported yet)",
                case_index=i,
            )
        label = entry.get("label")
        refs.append(
            CaseRef(
                case_id=case_key(Path(image).name),
                image=(site_dir / image).resolve(),
                label=(site_dir / label).resolve() if isinstance(label, str) else None,
            )
        )
    return refs


def _from_folders(site_dir: Path, images: str, labels: str) -> list[CaseRef]:
    label_dir = site_dir / labels
    label_files = (
        {case_key(p.name): p for p in label_dir.iterdir() if not p.name.startswith(".")}
        if label_dir.is_dir()
        else {}
    )
    refs = []
    for image in sorted((site_dir / images).iterdir()):
        if image.name.startswith("."):
            continue
        key = case_key(image.name)
        refs.append(CaseRef(case_id=key, image=image, label=label_files.get(key)))
    return refs


def load_case(ref: CaseRef, index: int, classes: Classes | None = None, *,
              volumes: bool = False) -> Case:
    """Read and check one case; errors name the case (locally) and its index.

    The readers raise only :class:`DataError`; should a library's exception still
    get out of one (a file damaged in a way no reader check foresaw), it becomes
    an :class:`UnreadableFileError` for this case, chained to the original, rather
    than an error that stops the whole site. ``classes``: how the site's label
    values become the run's classes (``common.data.labels``); None: one
    structure, the site read without a label map. ``volumes``: for a 3D model,
    which refuses a DICOM series that is not one evenly spaced stack (a
    localiser, a slice missing); a 2D model reads such a series slice by slice."""
    try:
        try:
            if ref.label is None:
                raise MissingLabelError("no label file for this image")
            image, meta = read_image(ref.image)
            if volumes and meta.not_a_volume:
                raise UnsupportedFormatError(
                    f"{meta.not_a_volume}; a 3D model reads one stack of evenly spaced "
                    f"parallel slices")
            label = read_label(ref.label, meta, classes)
            check_pair(image, label)
            if not np.isfinite(image).all():
                raise DataError("image holds NaN or infinite values")
        except DataError:
            raise
        except Exception as exc:  # last resort: KeyboardInterrupt / SystemExit pass
            raise UnreadableFileError(
                f"reading this case's files failed unexpectedly ({type(exc).__name__}: "
                f"{exc}); the image or label file is damaged or in a form fedseg does not "
                f"read: check that it opens in a viewer") from exc
    except DataError as exc:
        exc.case, exc.case_index = ref.case_id, index
        exc.args = (f"case {ref.case_id!r}: {exc.problem}",)
        raise
    return Case(ref.case_id, image, label, meta.spacing, not_a_volume=meta.not_a_volume)


def load_site(site_dir: Path, split: str, classes: Classes | None = None) -> list[Case]:
    """Load every case of a split; the first bad case stops the load with its
    error (for tools that want all or nothing; a site's rounds use
    :func:`read_site`)."""
    refs = list_cases(site_dir, split)
    cases = [load_case(ref, i, classes) for i, ref in enumerate(refs)]
    log.info("loaded %d %s cases from %s", len(cases), split, site_dir)
    return cases


@dataclass
class SiteRead:
    """The usable cases of a split, and the cases left out with their errors."""

    split: str
    cases: list[Case]
    left_out: list[DataError]



def read_site(site_dir: Path, split: str,
              on_case: Callable[[CaseRef, int, Case | DataError], None] | None = None,
              keep: bool = True, classes: Classes | None = None,
              load: Callable[[CaseRef, int, Classes | None], Case] = load_case) -> SiteRead:
    """Load the cases of a split, leaving out each case that cannot be used
    (with a warning in this site's log naming it and why) rather than failing
    the whole split; :class:`NoUsableCaseError` when none is left.
    ``on_case(ref, index, case or error)`` after each case (progress, tables);
    ``keep=False``: only check, holding no case in memory (``cases`` empty).
    ``load``: how one case is read (default :func:`load_case`; the prepared
    copies on disk, ``common.data.store``, read through it too)."""
    refs = list_cases(site_dir, split)
    cases: list[Case] = []
    usable = 0
    left_out: list[DataError] = []
    for i, ref in enumerate(refs):
        try:
            case = load(ref, i, classes)
        except DataError as exc:
            log.warning("%s case left out: %s", split, exc)
            left_out.append(exc)
            if on_case is not None:
                on_case(ref, i, exc)
            continue
        usable += 1
        if keep:
            cases.append(case)
        if on_case is not None:
            on_case(ref, i, case)
    if not usable:
        raise NoUsableCaseError(split, left_out)
    log.info("read %d %s cases from %s (%d left out)", usable, split, site_dir,
             len(left_out))
    return SiteRead(split, cases, left_out)


def left_out_summary(errors: list[DataError]) -> str:
    """What may leave the site about cases left out: how many, and of which
    kinds (``2 (missing label), 1 (unreadable file)``); never a name."""
    kinds: dict[str, int] = {}
    for exc in errors:
        kinds[exc.category] = kinds.get(exc.category, 0) + 1
    return ", ".join(f"{n} ({kind})" for kind, n in sorted(kinds.items()))


class NoUsableCaseError(EmptyDatasetError):
    """Every case of a split was left out."""

    def __init__(self, split: str, left_out: list[DataError]) -> None:
        first = f"; first: {left_out[0]}" if left_out else ""
        super().__init__(f"no usable {split} case: all {len(left_out)} left out{first}")
        self.split, self.left_out = split, left_out

    @property
    def category(self) -> str:
        return (f"no usable {self.split} case: {len(self.left_out)} left out, "
                f"{left_out_summary(self.left_out)}")
