"""What every reader shares: the formats' names and classes, and what a reader
returns besides pixels (:class:`ImageMeta`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

PIL_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
# what Pillow may parse such a file as (not every format it knows: EPS, PDF, ...)
PIL_FORMATS = ("PNG", "JPEG", "MPO", "BMP", "TIFF")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
LABELMAP_SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.7"  # a SEG too: never an image
RTSTRUCT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"
DEFLATED_SYNTAX = "1.2.840.10008.1.2.1.99"


@dataclass(frozen=True)
class SliceGeometry:
    """Where a DICOM series' slices lie in patient space (mm), the space an
    RTSTRUCT's contours are drawn in."""

    positions: np.ndarray  # S x 3: ImagePositionPatient of each slice, in position order
    orientation: np.ndarray  # ImageOrientationPatient: row direction, then column direction
    spacing: tuple[float, float]  # PixelSpacing: between rows, between columns
    shape: tuple[int, int]  # rows, columns


@dataclass
class ImageMeta:
    """What a reader learned about an image besides its pixels."""

    format: str
    spacing: tuple[float, ...]
    # For DICOM series: SOP Instance UIDs in the order of the stored slices, and
    # the axis transform applied, so a DICOM SEG label can be put on the same grid.
    source_uids: list[str] = field(default_factory=list)
    transform: np.ndarray | None = None  # nibabel orientation transform, or None
    # For DICOM series with a geometry: the stored slices in patient space (RTSTRUCT)
    geometry: SliceGeometry | None = None
    # For DICOM series: why the slices are not one evenly spaced volume (several
    # planes, slices at one place, a slice missing), or None. A 2D model reads
    # such a series slice by slice; a 3D model cannot.
    not_a_volume: str | None = None
    # For one multi-frame DICOM image with a plane geometry (enhanced CT, MR...):
    # the stored frame number (from 1) of each slice, in position order
    frames: tuple[int, ...] | None = None


def file_kind(path: Path) -> str:
    """``dicom-series`` (a folder), ``nifti``, ``pil`` or ``dicom``."""
    if path.is_dir():
        return "dicom-series"
    name = path.name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if path.suffix.lower() in PIL_SUFFIXES:
        return "pil"
    return "dicom"




def _reorder(zooms, transform: np.ndarray) -> tuple[float, ...]:
    out = [0.0] * len(transform)
    for src, (dst, _flip) in enumerate(transform):
        out[int(dst)] = float(zooms[src])
    return tuple(out)
