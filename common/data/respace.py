"""A site as another scanner would have given it: every NIfTI case resampled
to another voxel spacing (``fedseg site resample``).

What harmonisation is measured against (docs/benchmarks.md): one site of a
federation whose volumes come at, say, 1.5 x 1.5 x 3 mm while the others are
at 1 mm. Images are resampled linearly, label maps by nearest neighbour
(MONAI's ``Resize``, as a run's own resampling); the affine keeps its
directions and origin, its voxel sizes become the new spacing. The site's
``dataset.json`` (or ``imagesTr/``-style folders) is written again beside the
new files, every other key kept, and what was done is recorded in it under
``resampled``. The source folder is only read.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from common.data.harmonise import resize
from common.data.site import SPLITS, list_cases
from common.errors import ConfigError, DataError


def _resampled(path: Path, out: Path, spacing: Sequence[float], labels: bool) -> tuple:
    import nibabel as nib

    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj)
    except Exception as exc:  # noqa: BLE001 - any unreadable file, named
        raise DataError(f"cannot read {path.name} as NIfTI: {exc}") from None
    if data.ndim != len(spacing):
        raise DataError(f"{path.name} has {data.ndim} axes; --spacing gives {len(spacing)}")
    zooms = tuple(float(z) for z in nib.affines.voxel_sizes(img.affine)[:data.ndim])
    shape = tuple(max(1, round(n * z / t)) for n, z, t in zip(data.shape, zooms, spacing,
                                                            strict=True))
    source = data.astype(np.int32 if labels else np.float32, copy=False)
    moved = resize(source[None], shape, labels=labels)[0]
    affine = img.affine.copy()
    for axis, (z, t) in enumerate(zip(zooms, spacing, strict=True)):
        affine[:3, axis] *= t / z
    dtype = data.dtype if labels else np.float32
    out.parent.mkdir(parents=True, exist_ok=True)
    new = nib.Nifti1Image(moved.astype(dtype), affine)
    new.header.set_zooms(tuple(spacing))
    nib.save(new, str(out))
    return zooms, shape


def resample_site(source: Path, out: Path, spacing: Sequence[float],
                  on_case: Callable[[str, int, int], None] | None = None) -> dict:
    """Write ``source``'s NIfTI cases at ``spacing`` (mm per array axis) into
    ``out`` (a new folder); ``on_case(split, done, total)`` after each case.
    Returns what ``dataset.json`` records under ``resampled``."""
    source, out = Path(source).resolve(), Path(out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} exists and is not empty; give a new folder")
    spec_path = source / "dataset.json"
    spec = json.loads(spec_path.read_text()) if spec_path.is_file() else None
    entries: dict[str, list[dict[str, str]]] = {}
    zooms_seen = set()
    for split in SPLITS:
        try:
            refs = list_cases(source, split)
        except DataError:
            continue
        entries[split] = []
        for i, ref in enumerate(refs):
            paths = [(ref.image, False)] + ([(ref.label, True)] if ref.label else [])
            written = {}
            for path, is_label in paths:
                if not str(path).lower().endswith((".nii", ".nii.gz")):
                    raise ConfigError(f"{path.name}: fedseg site resample writes NIfTI "
                                      f"sites only")
                rel = path.relative_to(source) if path.is_relative_to(source) else \
                    Path(SPLITS[split][int(is_label)]) / path.name
                zooms, _ = _resampled(path, out / rel, spacing, is_label)
                zooms_seen.add(tuple(round(z, 4) for z in zooms))
                written["label" if is_label else "image"] = f"./{rel.as_posix()}"
            entries[split].append(written)
            if on_case:
                on_case(split, i + 1, len(refs))
    if not entries:
        raise ConfigError(f"{source} holds no case to resample")
    record = {"from": str(source), "spacing": list(spacing),
              "source_spacings": sorted(list(z) for z in zooms_seen)}
    written_spec = {**(spec or {}), **entries, "resampled": record}
    out.mkdir(parents=True, exist_ok=True)
    (out / "dataset.json").write_text(json.dumps(written_spec, indent=1) + "\n")
    return record
