"""Labels in the run's classes, whatever their format: PNG/JPEG and NIfTI by
value through the site's label map, DICOM SEG segments and RTSTRUCT ROIs by
name."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from common.data.dicom_values import _attr
from common.data.labels import Classes
from common.data.readers.base import RTSTRUCT_SOP_CLASS, SEG_SOP_CLASS, ImageMeta, file_kind
from common.data.readers.dicom import _dcmread, _on_image_grid
from common.data.readers.nifti import _read_nifti
from common.data.readers.pil import _read_pil
from common.data.readers.seg import _read_seg
from common.data.rtstruct import MAX_FILE_BYTES, read_rtstruct
from common.errors import DataError, UnreadableFileError, UnsupportedFormatError


def read_label(path: Path, image_meta: ImageMeta, classes: Classes | None = None
               ) -> np.ndarray:
    """Read a label as the run's classes: ``1 x spatial`` uint8, 0 background,
    ``i`` the ``i``-th of ``classes.structures``.

    With the site's label map (``classes.value_class``), PNG/JPEG and NIfTI
    labels are read by value through it (:func:`_by_value`); DICOM SEG
    segments by name. Without one (a run of one structure at a site with no
    map), the foreground is: above half the maximum in PNG/JPEG (so {0, 255}
    and JPEG-compressed masks work), non-zero in NIfTI, every segment of a
    DICOM SEG.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"label file not found: {path.name}")
    by_value = classes is not None and classes.value_class is not None
    kind = file_kind(path)
    if kind in ("pil", "nifti"):
        arr = _read_pil(path) if kind == "pil" else _read_nifti(path)[0]
        if arr.size == 0:
            raise UnreadableFileError(f"label {path.name} holds no pixels (shape {arr.shape})")
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise UnreadableFileError(f"label {path.name} holds NaN or infinite values")
        if kind == "pil" and arr.ndim == 3:
            arr = arr.max(axis=-1)
        if by_value:
            return _by_value(arr, path, classes)[None]
        if kind == "pil":
            top = float(arr.max())
            mask = arr > top / 2.0 if top > 0 else np.zeros(arr.shape, bool)
        else:
            integral = arr.dtype.kind in "biu" or bool(np.all(np.mod(arr, 1) == 0))
            mask = arr > 0 if integral else arr > float(arr.max()) / 2.0
    elif kind == "dicom":
        return _read_dicom_label(path, image_meta, classes)
    else:
        raise UnsupportedFormatError(
            f"label {path.name} is a folder; labels are one file (PNG/JPEG, NIfTI, DICOM SEG "
            f"or RTSTRUCT)"
        )
    return mask.astype(np.uint8)[None]


LOSSY_SUFFIXES = (".jpg", ".jpeg")


def _by_value(arr: np.ndarray, path: Path, classes: Classes) -> np.ndarray:
    """A label's values through the site's map.

    * Values must be the map's; others are a data error naming them, except:
    * a map of the two values 0 and 1 read from an 8- or 16-bit image mask
      whose values go beyond 1 stands for the usual 0 / maximum export (0/255):
      the map's 1 is the image's maximum value (255 or 65535);
    * a JPEG mask is lossy, its edges ring: each pixel takes the nearest of the
      map's values (for 0/255 masks: the structure where above 127).
    """
    table = classes.value_class
    assert table is not None
    name = f"label {path.name}"
    if arr.dtype.kind == "f":
        rounded = np.rint(arr)
        if np.abs(arr - rounded).max() > 1e-3:
            worst = float(arr.flat[np.argmax(np.abs(arr - rounded))])
            raise DataError(f"{name} holds fractional values (e.g. {worst:g}); a label "
                            f"map's values are integers")
        arr = rounded.astype(np.int64)
    values = dict(table)
    image_mask = file_kind(path) == "pil"
    if (image_mask and set(values) == {0, 1} and arr.dtype in (np.uint8, np.uint16)
            and int(arr.max()) > 1):
        values = {0: table[0], int(np.iinfo(arr.dtype).max): table[1]}
    if image_mask and path.name.lower().endswith(LOSSY_SUFFIXES):
        keys = np.array(sorted(values), np.int64)
        nearest = np.abs(arr.astype(np.int64)[..., None] - keys).argmin(axis=-1)
        arr = keys[nearest]
    remapped = replace(classes, value_class=values)
    return remapped.classes_of_values(arr, name)


def _read_dicom_label(path: Path, image_meta: ImageMeta, classes: Classes | None
                      ) -> np.ndarray:
    name = path.name
    ds = _dcmread(path)
    sop_class = _attr(ds, "SOPClassUID", name)
    if sop_class == RTSTRUCT_SOP_CLASS:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise UnreadableFileError(f"RTSTRUCT {name} is over {MAX_FILE_BYTES >> 20} MiB; "
                                      f"not read")
        if classes is None or classes.value_class is None:
            raise DataError(
                f"label {name} is an RTSTRUCT: its ROIs are found by name, so the site needs "
                f"a label map ('labels' in dataset.json, e.g. {{\"0\": \"background\", "
                f"\"1\": \"<the ROI's name>\"}}; docs/data.md)")
        volume = read_rtstruct(ds, name, image_meta, classes)  # slices x rows x columns
        return _on_image_grid(volume, image_meta)[None]
    if sop_class != SEG_SOP_CLASS:
        raise UnsupportedFormatError(f"label {name} is DICOM but not a DICOM SEG or RTSTRUCT")
    return _on_image_grid(_read_seg(ds, path, image_meta, classes), image_meta)[None]
