"""Images, whatever their format, and the check that a label shares its image's
grid."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from common.data.readers.base import ImageMeta, file_kind
from common.data.readers.dicom import _read_dicom_file, _read_dicom_series
from common.data.readers.nifti import _read_nifti
from common.data.readers.pil import _channels_first, _read_pil
from common.errors import DataError, ShapeMismatchError, UnreadableFileError


def read_image(path: Path) -> tuple[np.ndarray, ImageMeta]:
    """Read one image (file or DICOM series folder). Returns ``(C x spatial, meta)``."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"image file not found: {path.name}")
    kind = file_kind(path)
    if kind == "pil":
        array = _read_pil(path)
        image, meta = _channels_first(array).astype(np.float32), ImageMeta("pil", (1.0, 1.0))
    elif kind == "nifti":
        data, spacing, transform = _read_nifti(path)
        image = data[None]
        if image.dtype != np.float32 or any(step < 0 for step in image.strides):
            image = image.astype(np.float32)  # (a float32 volume is not copied again)
        meta = ImageMeta("nifti", spacing, transform=transform)
    elif kind == "dicom-series":
        image, meta = _read_dicom_series(path)
    else:
        image, meta = _read_dicom_file(path)
    if image.size == 0:
        raise UnreadableFileError(f"image {path.name} holds no pixels (shape {image.shape})")
    return image, meta


def check_pair(image: np.ndarray, label: np.ndarray) -> None:
    """Raise :class:`ShapeMismatchError` unless image and label share a grid."""
    if image.shape[1:] != label.shape[1:]:
        raise ShapeMismatchError(
            f"image is {tuple(image.shape[1:])} but label is {tuple(label.shape[1:])}"
        )
