"""Many sites from one dataset: ``fedseg partition DATASET_DIR OUT --sites N``.

A public dataset (one hospital's, usually) becomes N site folders a
simulation can federate, each with its own ``dataset.json``, training list and
held-out test list. Nothing is copied: each site's ``imagesTr/`` ... hold
symbolic links to the source's files (absolute targets); where the file
system refuses a link, the site's ``dataset.json`` names the source file by
its absolute path instead (the site reader takes both).

The source is read in either form (docs/data.md, "Many sites from one
dataset"):

* Medical Segmentation Decathlon: ``dataset.json`` with a ``training`` list of
  ``{"image", "label"}`` (``labels`` value -> name, ``modality``);
* nnU-Net v2: ``dataset.json`` with ``labels`` name -> value,
  ``channel_names`` and ``file_ending``, and ``imagesTr/<case>_0000.nii.gz``
  + ``labelsTr/<case>.nii.gz`` (or its ``dataset`` key of per-case files);
  a folder of ``imagesTr/`` + ``labelsTr/`` without ``dataset.json`` too.

Cases go to sites by

* ``even`` (default): the cases in a seeded random order, dealt into N
  contiguous bands whose sizes differ by at most one;
* ``skewed``: the cases sorted by the size of their labelled structure (the
  label's voxels that are not background; ties by case id), or by a per-case
  attribute of the source's ``dataset.json`` entries (``by``), and cut into N
  contiguous bands of the same sizes: site 1 holds the smallest structures,
  site N the largest. The seed then only picks each site's test cases.

Each site's test cases: ``test_fraction`` of its cases (rounded, at least one
where the fraction is above 0, never all), picked with the seed.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.config import BACKGROUND, normal_name
from common.data.site import case_key
from common.errors import (
    ConfigError,
    DataError,
    EmptyDatasetError,
    MissingLabelError,
    ShapeMismatchError,
    UnsupportedFormatError,
)

SPLITS = ("even", "skewed")
BY_SIZE = "labelled voxels"
# dataset.json keys each site keeps from the source (besides its own lists)
KEPT_KEYS = ("description", "reference", "licence", "license", "release", "tensorImageSize",
             "modality", "channel_names", "labels", "label_aliases", "file_ending")


@dataclass(frozen=True)
class SourceCase:
    """One labelled case of the source: absolute paths, and the other keys of
    its ``dataset.json`` entry (per-case attributes), kept at its site."""

    case_id: str
    image: Path
    label: Path
    attributes: dict[str, Any] = field(default_factory=dict)


@dataclass
class Source:
    """A dataset read for partitioning. ``form``: ``msd``, ``nnunet`` or
    ``folders`` (imagesTr/labelsTr without dataset.json)."""

    root: Path
    form: str
    name: str
    spec: dict[str, Any]
    cases: list[SourceCase]

    def background_values(self) -> set[int]:
        """The label values that are not a structure: those the map names
        background, else 0."""
        from common.data.labels import parse_label_map

        try:
            names = parse_label_map(self.spec["labels"])
        except (KeyError, DataError):
            return {0}
        values = {v for v, n in names.items() if normal_name(n) == BACKGROUND}
        return values or {0}


@dataclass
class SitePlan:
    """One site: its name and which cases it trains and tests on."""

    name: str
    training: list[SourceCase]
    test: list[SourceCase]
    keys: dict[str, Any] = field(default_factory=dict)  # case_id -> what it was sorted by

    @property
    def cases(self) -> int:
        return len(self.training) + len(self.test)


# --------------------------------------------------------------------- reading


def read_source(dataset_dir: Path) -> Source:
    """The labelled cases of a dataset in MSD or nnU-Net form, sorted by case
    id. Refuses (naming them) cases whose image or label is missing."""
    root = Path(dataset_dir).resolve()
    if not root.is_dir():
        raise EmptyDatasetError(f"dataset folder {dataset_dir} does not exist or is not a folder")
    spec: dict[str, Any] = {}
    datalist = root / "dataset.json"
    if datalist.is_file():
        try:
            spec = json.loads(datalist.read_text())
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot read {datalist}: {exc}") from None
        if not isinstance(spec, dict):
            raise DataError(f"{datalist} is not a JSON object")
    if isinstance(spec.get("training"), list) and spec["training"]:
        form, pairs = "msd", _msd_pairs(root, spec)
    elif isinstance(spec.get("dataset"), dict) and spec["dataset"]:
        form, pairs = "nnunet", _nnunet_listed(root, spec)
    elif (root / "imagesTr").is_dir():
        form, pairs = ("nnunet" if spec else "folders"), _folder_pairs(root, spec)
    elif isinstance(spec.get("training"), list):
        raise EmptyDatasetError(f"dataset folder {root} has no case: the 'training' list of "
                                f"its dataset.json is empty")
    else:
        raise EmptyDatasetError(
            f"dataset folder {root} has no case: neither a dataset.json with a 'training' "
            f"list (Medical Segmentation Decathlon form) nor an imagesTr/ folder (nnU-Net "
            f"form); see docs/data.md")
    if not pairs:
        raise EmptyDatasetError(f"dataset folder {root} has no case (its {form} listing is "
                                f"empty)")
    _check_channels(spec)
    missing_images = [cid for cid, image, _, _ in pairs if not image.exists()]
    if missing_images:
        raise DataError(f"{_some(missing_images)} listed in {root} but the image file is "
                        f"missing")
    no_label = [cid for cid, _, label, _ in pairs if label is None or not label.exists()]
    if no_label:
        raise MissingLabelError(f"{_some(no_label)} in {root} {_has(no_label)} no label "
                                f"file; every case of a site needs one (remove the "
                                f"case from the source's listing, or add its label)")
    cases = _unique_ids(pairs)
    _check_shapes(cases, root)
    name = str(spec.get("name") or root.name)
    return Source(root, form, name, spec, cases)


def _ras_shape(img) -> tuple[int, ...]:
    """A NIfTI's shape in the closest RAS axis order (as the reader turns it),
    singleton axes left out: a label stored in another axis order than its
    image is still the same grid."""
    import nibabel as nib

    from common.data.readers.base import _reorder

    shape = tuple(int(d) for d in img.shape[:3])
    if len(shape) == 3:
        ornt = nib.orientations.io_orientation(img.affine)
        if not np.isnan(ornt).any():
            shape = tuple(int(d) for d in _reorder(shape, ornt))
    return tuple(d for d in shape if d != 1)


def _check_shapes(cases: list[SourceCase], root: Path) -> None:
    """Each NIfTI label has its image's shape, read from the two headers (no
    voxels): a site would leave a mismatched case out, and a skewed split would
    have sorted it by a label that does not fit its image. Other formats are
    checked case by case by ``fedseg site check``."""
    import nibabel as nib

    from common.data.readers import file_kind

    wrong, unreadable = [], []
    for case in cases:
        if file_kind(case.image) != "nifti" or file_kind(case.label) != "nifti":
            continue
        try:
            shapes = [_ras_shape(nib.load(str(p))) for p in (case.image, case.label)]
        except Exception:  # noqa: BLE001 - a damaged header: named below
            unreadable.append(case.case_id)
            continue
        if shapes[0] != shapes[1]:
            wrong.append(f"{case.case_id!r} (image {shapes[0]}, label {shapes[1]})")
    if unreadable:
        raise DataError(f"{_some(unreadable)} in {root}: the NIfTI header of the image or "
                        f"label cannot be read (a damaged or truncated file)")
    if wrong:
        more = f" and {len(wrong) - 5} more" if len(wrong) > 5 else ""
        raise ShapeMismatchError(
            f"{'case' if len(wrong) == 1 else f'{len(wrong)} cases'} in {root} "
            f"{'has' if len(wrong) == 1 else 'have'} a label whose shape is not its "
            f"image's: {', '.join(wrong[:5])}{more}; fix or remove "
            f"{'it' if len(wrong) == 1 else 'them'} in the source")


def _some(ids: list[str], shown: int = 5) -> str:
    more = f" and {len(ids) - shown} more" if len(ids) > shown else ""
    noun = "case" if len(ids) == 1 else f"{len(ids)} cases"
    return f"{noun} " + ", ".join(repr(i) for i in ids[:shown]) + more


def _has(ids: list[str]) -> str:
    return "has" if len(ids) == 1 else "have"


def _one_path(value: Any, what: str) -> str | None:
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, list):
        raise UnsupportedFormatError(
            f"{what} lists {len(value)} image files (channels); fedseg reads one image per "
            f"case (multi-channel inputs are not supported yet)")
    return value if isinstance(value, str) and value else None


def _msd_pairs(root: Path, spec: dict) -> list[tuple[str, Path, Path | None, dict]]:
    pairs = []
    for i, entry in enumerate(spec["training"]):
        if isinstance(entry, str):  # a bare image path: no label
            entry = {"image": entry}
        if not isinstance(entry, dict):
            raise DataError(f"{root / 'dataset.json'}: training entry {i} is not an "
                            f"{{image, label}} object")
        image = _one_path(entry.get("image"), f"training entry {i}")
        if image is None:
            raise DataError(f"{root / 'dataset.json'}: training entry {i} has no 'image' path")
        label = entry.get("label")
        attributes = {k: v for k, v in entry.items() if k not in ("image", "label")}
        pairs.append((case_key(Path(image).name), (root / image).resolve(),
                      (root / label).resolve() if isinstance(label, str) and label else None,
                      attributes))
    return pairs


def _nnunet_listed(root: Path, spec: dict) -> list[tuple[str, Path, Path | None, dict]]:
    """nnU-Net v2's optional ``dataset`` key: case id -> {images: [...], label}."""
    pairs = []
    for cid, entry in spec["dataset"].items():
        if not isinstance(entry, dict):
            raise DataError(f"{root / 'dataset.json'}: dataset entry {cid!r} is not an "
                            f"{{images, label}} object")
        image = _one_path(entry.get("images"), f"dataset entry {cid!r}")
        if image is None:
            raise DataError(f"{root / 'dataset.json'}: dataset entry {cid!r} has no 'images'")
        label = entry.get("label")
        pairs.append((str(cid), (root / image).resolve(),
                      (root / label).resolve() if isinstance(label, str) and label else None,
                      {}))
    return pairs


def _folder_pairs(root: Path, spec: dict) -> list[tuple[str, Path, Path | None, dict]]:
    ending = spec.get("file_ending") if isinstance(spec.get("file_ending"), str) else None

    def listed(folder: Path) -> list[Path]:
        if not folder.is_dir():
            return []
        return sorted(p for p in folder.iterdir() if not p.name.startswith(".")
                      and (ending is None or p.name.endswith(ending) or p.is_dir()))

    images: dict[str, list[Path]] = {}
    for path in listed(root / "imagesTr"):
        images.setdefault(case_key(path.name), []).append(path)
    labels = {case_key(p.name): p for p in listed(root / "labelsTr")}
    several = sorted(cid for cid, files in images.items() if len(files) > 1)
    if several:
        raise UnsupportedFormatError(
            f"{_some(several)} in {root / 'imagesTr'} {_has(several)} several channel "
            f"files (_0000, _0001, ...); fedseg reads one image per case "
            f"(multi-channel inputs are not supported yet)")
    return [(cid, files[0].resolve(), labels[cid].resolve() if cid in labels else None, {})
            for cid, files in images.items()]


def _check_channels(spec: dict) -> None:
    channels = spec.get("channel_names")
    if isinstance(channels, dict) and len(channels) > 1:
        raise UnsupportedFormatError(
            f"the dataset has {len(channels)} input channels (channel_names: "
            f"{', '.join(map(str, channels.values()))}); fedseg reads one image per case "
            f"(multi-channel inputs are not supported yet)")


def _unique_ids(pairs: list[tuple[str, Path, Path | None, dict]]) -> list[SourceCase]:
    """Cases sorted by id; an id two images share (same file name in two
    folders) becomes ``id-2``, ``id-3`` ... in the order of their paths."""
    pairs = sorted(pairs, key=lambda p: (p[0], str(p[1])))
    seen: dict[str, int] = {}
    cases = []
    for cid, image, label, attributes in pairs:
        seen[cid] = seen.get(cid, 0) + 1
        unique = cid if seen[cid] == 1 else f"{cid}-{seen[cid]}"
        assert label is not None
        cases.append(SourceCase(unique, image, label, attributes))
    return cases


def labelled_voxels(case: SourceCase, background: set[int]) -> int:
    """How many voxels of the case's label belong to a structure (are not
    background). NIfTI labels with nibabel; any other with the project's
    readers (the label's foreground as a one-structure run reads it)."""
    from common.data.readers import file_kind

    try:
        if file_kind(case.label) == "nifti":
            import nibabel as nib

            arr = np.asanyarray(nib.load(str(case.label)).dataobj)
            if arr.dtype.kind == "f":
                arr = np.rint(arr)
            return int(np.count_nonzero(~np.isin(arr, list(background))))
        from common.data.readers import read_image, read_label

        _, meta = read_image(case.image)
        return int(np.count_nonzero(read_label(case.label, meta)))
    except DataError as exc:
        raise DataError(f"cannot measure the labelled structure: {exc}",
                        case=case.case_id) from None
    except Exception as exc:  # a damaged file: name the case, not a traceback
        raise DataError(f"cannot read label {case.label} ({type(exc).__name__}: {exc})",
                        case=case.case_id) from None


# -------------------------------------------------------------------- planning


def band_sizes(n: int, sites: int) -> list[int]:
    """``n`` cases in ``sites`` bands whose sizes differ by at most one (the
    first ``n % sites`` sites one more)."""
    return [n // sites + (1 if i < n % sites else 0) for i in range(sites)]


def held_out_count(n: int, fraction: float) -> int:
    """A site's test cases: ``fraction`` of ``n`` rounded half up, at least one
    when the fraction is above 0, always leaving one to train on."""
    if fraction <= 0 or n < 2:
        return 0
    return min(n - 1, max(1, math.floor(fraction * n + 0.5)))


def site_names(sites: int, names: Sequence[str] | None) -> list[str]:
    if names is None:
        return [f"site-{i + 1}" for i in range(sites)]
    names = [n.strip() for n in names]
    if len(names) != sites:
        raise ConfigError(f"--names gives {len(names)} name(s) for {sites} sites")
    for name in names:
        if not name or name in (".", "..") or "/" in name or "\\" in name:
            raise ConfigError(f"site name {name!r} is not a folder name (no '/', not '.' "
                              f"or '..', not empty)")
        if name.lower() == "partition.json" or name.startswith("."):
            raise ConfigError(f"site name {name!r} is taken: OUT/partition.json sums up "
                              f"the sites, and a name starting with '.' is hidden")
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ConfigError(f"--names gives {', '.join(dup)} more than once")
    return names


def _sort_keys(source: Source, by: str | None,
               progress: Callable[[int, int], None] | None) -> dict[str, Any]:
    """case_id -> the value the skewed split sorts by."""
    if by is None:
        background = source.background_values()
        keys = {}
        for i, case in enumerate(source.cases):
            keys[case.case_id] = labelled_voxels(case, background)
            if progress is not None:
                progress(i + 1, len(source.cases))
        return keys
    if source.form != "msd":
        raise ConfigError(f"--by {by}: the dataset lists no per-case attributes (it is in "
                          f"{source.form} form; attributes are keys of the entries of an "
                          f"MSD dataset.json 'training' list)")
    lacking = [c.case_id for c in source.cases if by not in c.attributes]
    if lacking:
        have = sorted({k for c in source.cases for k in c.attributes})
        raise ConfigError(f"--by {by}: {_some(lacking)} of {len(source.cases)} "
                          f"{_has(lacking)} no {by!r} in the dataset.json entry (the "
                          f"entries' attributes: {', '.join(have) or 'none'})")
    values = {c.case_id: c.attributes[by] for c in source.cases}
    numbers = all(isinstance(v, int | float) and not isinstance(v, bool)
                  for v in values.values())
    if not numbers and not all(isinstance(v, str) for v in values.values()):
        raise ConfigError(f"--by {by}: its values must all be numbers or all be text "
                          f"(found {sorted({type(v).__name__ for v in values.values()})})")
    if numbers:
        odd = [cid for cid, v in values.items()
               if isinstance(v, float) and not math.isfinite(v)]  # an int is finite
        if odd:
            raise ConfigError(f"--by {by}: {_some(odd)} {_has(odd)} a value that is not a "
                              f"finite number (NaN or infinite), which has no place in "
                              f"an order")
    return values


def plan(source: Source, sites: int, split: str = "even", seed: int = 0,
         test_fraction: float = 0.2, names: Sequence[str] | None = None,
         by: str | None = None,
         progress: Callable[[int, int], None] | None = None) -> list[SitePlan]:
    """Which cases each site trains and tests on (nothing is written)."""
    check_options(sites, split, test_fraction, by, seed)
    n = len(source.cases)
    if sites > n:
        raise ConfigError(f"cannot make {sites} sites from {n} case{'s' * (n != 1)} "
                          f"(each site needs one); ask for at most {n}")
    labels = site_names(sites, names)
    rng = np.random.default_rng(seed)
    keys: dict[str, Any] = {}
    if split == "even":
        order = [source.cases[i] for i in rng.permutation(n)]
    else:
        keys = _sort_keys(source, by, progress)
        order = sorted(source.cases, key=lambda c: (keys[c.case_id], c.case_id))
    plans, start = [], 0
    for name, size in zip(labels, band_sizes(n, sites), strict=True):
        band = sorted(order[start:start + size], key=lambda c: c.case_id)
        start += size
        held = set(rng.permutation(size)[:held_out_count(size, test_fraction)].tolist())
        plans.append(SitePlan(
            name,
            training=[c for i, c in enumerate(band) if i not in held],
            test=[c for i, c in enumerate(band) if i in held],
            keys={c.case_id: keys[c.case_id] for c in band} if keys else {}))
    return plans


def check_options(sites: int, split: str, test_fraction: float, by: str | None,
                  seed: int = 0) -> None:
    if not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"--seed must be a whole number of 0 or more, not {seed}")
    if sites < 1:
        raise ConfigError(f"--sites must be at least 1, not {sites}")
    if split not in SPLITS:
        raise ConfigError(f"--split must be one of {', '.join(SPLITS)}, not {split!r}")
    if not 0 <= test_fraction < 1:
        raise ConfigError(f"--test-fraction must be at least 0 and below 1, not "
                          f"{test_fraction}")
    if by is not None and split != "skewed":
        raise ConfigError("--by goes with --split skewed (an even split sorts by nothing)")


# --------------------------------------------------------------------- writing


def _place(target: Path, link: Path, site_dir: Path) -> tuple[str, bool]:
    """A symbolic link ``link`` -> ``target`` (absolute), its path relative to
    the site as the entry; where the file system refuses links, the target's
    absolute path as the entry. Returns (entry, linked)."""
    link.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.symlink(target, link, target_is_directory=target.is_dir())
    except (OSError, NotImplementedError):
        return str(target), False
    return link.relative_to(site_dir).as_posix(), True


def _link_names(cases: list[SourceCase]) -> dict[tuple[str, str], str]:
    """(case id, image|label) -> the file name the case's file takes at its
    site: an image its source name, except where two cases' images share a
    name (one name in two source folders): then the case id with the name's
    tail (``.nii.gz``, ``_0000.nii.gz``), case ids being unique. A label
    always takes its case id with its own tail, so it sits beside its image's
    name and no two labels meet (the Decathlon's and nnU-Net's labels are
    named so already)."""
    names = {}
    counts: dict[str, int] = {}
    for case in cases:
        counts[case.image.name] = counts.get(case.image.name, 0) + 1
    for case in cases:
        image, label = case.image.name, case.label.name
        if counts[image] > 1 or case_key(image) != case.case_id:
            image = case.case_id + image[len(case_key(image)):]
        names[case.case_id, "image"] = image
        names[case.case_id, "label"] = case.case_id + label[len(case_key(label)):]
    return names


def _summary_range(values: list[Any]) -> dict[str, Any]:
    if not values:
        return {}
    if not all(isinstance(v, int | float) for v in values):
        return {"min": min(values), "max": max(values)}
    try:
        median = statistics.median(values)
    except OverflowError:  # two middle ints too large for a float's halving
        median = statistics.median_low(values)
    if isinstance(median, float) and median.is_integer():
        median = int(median)
    return {"min": min(values), "median": median, "max": max(values)}


def partition(dataset_dir: Path, out: Path, sites: int, *, split: str = "even",
              seed: int = 0, test_fraction: float = 0.2, names: Sequence[str] | None = None,
              by: str | None = None,
              progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Write ``sites`` site folders under ``out`` from the dataset at
    ``dataset_dir`` and ``out/partition.json``; returns what partition.json
    holds. Everything is checked before anything is written; ``out`` must be
    absent or empty."""
    check_options(sites, split, test_fraction, by, seed)
    out = Path(out)
    if out.is_symlink() and not out.exists():
        raise ConfigError(f"output folder {out} is a symbolic link to nothing; give a new "
                          f"folder")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output folder {out} is a file, not a folder; give a new folder "
                          f"(nothing is overwritten)")
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"output folder {out} exists and is not empty; give a new folder "
                          f"(nothing is overwritten)")
    source = read_source(Path(dataset_dir))
    if out.resolve().is_relative_to(source.root):
        raise ConfigError(f"output folder {out} is inside the dataset {source.root}; give "
                          f"a folder outside it (the source is only read)")
    plans = plan(source, sites, split, seed, test_fraction, names, by, progress)
    by_name = None if split == "even" else (by or BY_SIZE)
    recipe = {"source": str(source.root), "source_name": source.name,
              "source_form": source.form, "split": split, "by": by_name, "seed": seed,
              "test_fraction": test_fraction}

    # Written into a hidden folder and moved into place at the end: a failure
    # half-way leaves no half-written OUT behind. An OUT that exists (empty: a
    # mount point, a folder with its own owner and mode) is kept, and the
    # hidden folder made inside it; otherwise it is made beside OUT and renamed.
    final = out.resolve()
    inside = final.is_dir()
    try:
        if not inside:
            final.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=".partial-" if inside else f".{final.name}.partial-",
                                     dir=final if inside else final.parent))
        umask = os.umask(0)
        os.umask(umask)
        work.chmod(0o777 & ~umask)  # as mkdir would make it, not mkdtemp's owner-only
    except OSError as exc:
        raise ConfigError(f"cannot create output folder {final}: "
                          f"{exc.strerror or exc}") from None
    try:
        result = _write(source, plans, work, recipe, by, sites)
        _move_into_place(work, final, inside)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)  # links and lists only: no source file
        raise
    return result


def _move_into_place(work: Path, final: Path, inside: bool) -> None:
    """The written sites become OUT: renamed to it, or moved up into it where
    it existed; refused where something else wrote OUT meanwhile."""
    try:
        if not inside:
            work.rename(final)
            return
        others = [p.name for p in final.iterdir() if p != work]
        if others:
            raise FileExistsError(f"it now holds {', '.join(sorted(others)[:3])}")
        moved: list[Path] = []
        try:
            for entry in work.iterdir():
                entry.rename(final / entry.name)
                moved.append(final / entry.name)
        except OSError:
            for path in moved:  # ours: site folders of links, partition.json
                (shutil.rmtree(path, ignore_errors=True) if path.is_dir() and
                 not path.is_symlink() else path.unlink(missing_ok=True))
            raise
        work.rmdir()
    except OSError as exc:
        raise ConfigError(f"output folder {final} was written by something else while the "
                          f"sites were being written ({exc.strerror or exc}); nothing of "
                          f"this partition is left in it: give a new folder") from None


def _write(source: Source, plans: list[SitePlan], out: Path, recipe: dict[str, Any],
           by: str | None, sites: int) -> dict[str, Any]:
    kept = {k: source.spec[k] for k in KEPT_KEYS if k in source.spec}
    if "modality" not in kept and "channel_names" in kept:
        kept["modality"] = kept["channel_names"]  # the Decathlon's name for it
    link_names = _link_names(source.cases)
    linked = referenced = 0
    summaries = []
    for index, site in enumerate(plans):
        site_dir = out / site.name
        site_dir.mkdir()
        lists: dict[str, list[dict[str, Any]]] = {}
        for split_name, cases, folders in (("training", site.training, ("imagesTr", "labelsTr")),
                                           ("test", site.test, ("imagesTs", "labelsTs"))):
            entries = []
            for case in cases:
                entry: dict[str, Any] = {}
                for key, path, folder in (("image", case.image, folders[0]),
                                          ("label", case.label, folders[1])):
                    link = site_dir / folder / link_names[case.case_id, key]
                    entry[key], ok = _place(path, link, site_dir)
                    linked, referenced = linked + ok, referenced + (not ok)
                entry.update(case.attributes)
                entries.append(entry)
            lists[split_name] = entries
        spec = {"name": f"{source.name} {site.name}",
                "description": (f"{site.name}: site {index + 1} of {sites} partitioned from "
                                f"{source.name} ({source.root}) by fedseg partition"),
                **{k: v for k, v in kept.items() if k != "description"},
                "partition": {**recipe, "site": index + 1, "sites": sites,
                              "site_name": site.name}}
        if "description" in kept:
            spec["source_description"] = kept["description"]
        spec.update(numTraining=len(site.training), numTest=len(site.test), **lists)
        (site_dir / "dataset.json").write_text(json.dumps(spec, indent=1) + "\n")
        summary: dict[str, Any] = {"name": site.name, "folder": site.name, "site": index + 1,
                                   "cases": site.cases, "training": len(site.training),
                                   "test": len(site.test)}
        if site.keys:
            summary["labelled_voxels" if by is None else "by_range"] = _summary_range(
                list(site.keys.values()))
        summaries.append(summary)
    files = ("symlinks" if not referenced else "absolute paths" if not linked
             else "symlinks and absolute paths")
    result = {**recipe, "cases": len(source.cases), "num_sites": sites, "files": files,
              "sites": summaries}
    (out / "partition.json").write_text(json.dumps(result, indent=1) + "\n")
    return result
