"""NIfTI images and labels, through nibabel, turned to the closest RAS axis
order."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel import orientations as ornt

from common.data.readers.base import _reorder
from common.data.readers.guards import _DEFLATE_MAX_RATIO, _check_size, _check_spacing
from common.errors import UnreadableFileError, UnsupportedFormatError


def _read_nifti(path: Path) -> tuple[np.ndarray, tuple[float, ...], np.ndarray]:
    name = path.name
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = nib.load(str(path))
            shape = tuple(int(d) for d in img.shape)
            dtype = np.dtype(img.get_data_dtype())
            offset = int(img.dataobj.offset)
            affine = np.asarray(img.affine, dtype=float)
    except MemoryError:
        raise
    except Exception as exc:  # nibabel raises many types for bad headers
        raise UnreadableFileError(
            f"cannot read the NIfTI header of {name} ({type(exc).__name__}: {exc})") from None
    if dtype.fields is not None or dtype.kind not in "biuf":
        raise UnsupportedFormatError(
            f"NIfTI {name} stores {dtype} values (RGB or complex); fedseg reads one grey "
            f"value per voxel")
    _check_size(shape, name, dtype.itemsize)
    stored = math.prod(shape) * dtype.itemsize
    size = path.stat().st_size
    gz = name.lower().endswith(".gz")
    if offset < 0 or offset + stored > (size * _DEFLATE_MAX_RATIO if gz else size):
        raise UnreadableFileError(
            f"the header of NIfTI {name} says its data is {stored:,} bytes from byte {offset}, "
            f"more than the {size:,}-byte {'compressed ' if gz else ''}file can hold: the "
            f"file is truncated or its header corrupt")
    spatial = list(shape[:3]) + [1] * (3 - min(len(shape), 3))
    if any(d != 1 for d in shape[3:]):
        raise UnsupportedFormatError(
            f"NIfTI {name} has shape {shape}: a time series or several channels; fedseg "
            f"reads one 2D or 3D grey image per file")
    keep = [i for i, d in enumerate(spatial) if d != 1]
    if len(keep) < 2:
        raise UnsupportedFormatError(f"NIfTI {name} has shape {shape}; expected 2D or 3D")
    if not np.isfinite(affine).all():
        raise UnreadableFileError(
            f"the orientation (qform / sform) in the header of NIfTI {name} holds NaN or "
            f"infinite numbers")
    # The voxel size is the one the geometry uses: the lengths of the affine's
    # axes (sform, else qform, as nibabel and ITK read them), not pixdim, which
    # a writer may leave at 1 beside an sform that says otherwise.
    zooms = tuple(float(z) for z in nib.affines.voxel_sizes(affine))
    spacing = tuple(zooms[i] for i in keep)
    _check_spacing(spacing, name, "voxel size (from its qform / sform)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            canonical = ornt.io_orientation(affine)
            transform = ornt.ornt_transform(canonical, ornt.axcodes2ornt(("R", "A", "S")))
    except MemoryError:
        raise
    except Exception as exc:
        raise UnsupportedFormatError(
            f"cannot work out the orientation of NIfTI {name} from its header: its axes "
            f"(qform / sform) are degenerate ({exc})") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            data = np.asanyarray(img.dataobj)
    except MemoryError:
        raise
    except Exception as exc:
        raise UnreadableFileError(
            f"cannot read the voxels of NIfTI {name} ({type(exc).__name__}: {exc}); the file "
            f"is truncated or damaged") from None
    # an uncompressed .nii comes memory-mapped: copy it, so no case holds the file open
    data = (np.array(data) if isinstance(data, np.memmap) else np.asarray(data)).reshape(spatial)
    if len(keep) == 3:
        return ornt.apply_orientation(data, transform), _reorder(zooms, transform), transform
    return np.squeeze(data), spacing, transform
