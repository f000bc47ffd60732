"""DICOM image files and series folders, through pydicom: a series' slices in
patient order, turned to the closest RAS axis order, with their geometry (the
space an RTSTRUCT is drawn in)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from nibabel import orientations as ornt

from common.data.dicom_values import _attr, _floats, _int_attr, _show
from common.data.readers.base import (
    LABELMAP_SEG_SOP_CLASS,
    SEG_SOP_CLASS,
    ImageMeta,
    SliceGeometry,
    _reorder,
)
from common.data.readers.guards import (
    _BoundedFile,
    _check_codestreams,
    _check_deflated,
    _check_size,
    _check_spacing,
    _pixel_header,
    _PixelHeader,
)
from common.data.readers.pil import _channels_first
from common.errors import (
    DataError,
    ShapeMismatchError,
    UnreadableFileError,
    UnsupportedFormatError,
)


def _dcmread(path: Path, **kwargs):
    import pydicom
    from pydicom.errors import InvalidDicomError

    def dcmread(**more):
        with warnings.catch_warnings(), _BoundedFile(path) as fp:
            warnings.simplefilter("ignore")
            return pydicom.dcmread(fp, **kwargs, **more)

    name = path.name
    if path.stat().st_size == 0:
        raise UnreadableFileError(f"{name} is an empty file (0 bytes)")
    _check_deflated(path)
    try:
        ds = dcmread()
        if len(ds) == 0:  # pydicom gives up quietly on some cut files: nothing after the meta
            raise UnreadableFileError(f"{name} holds a DICOM file header but no dataset: "
                                      f"the file is truncated or damaged")
        return ds
    except DataError:
        raise
    except InvalidDicomError:
        # Files written without the 128-byte preamble and meta header are still
        # DICOM; accept them when they parse into a dataset with pixel data or a UID.
        try:
            ds = dcmread(force=True)
            if "PixelData" in ds or "SOPClassUID" in ds:
                return ds
        except MemoryError:
            raise
        except Exception:  # noqa: BLE001 - any failure means: not DICOM
            pass
        if path.suffix.lower() in (".dcm", ".dicom"):
            raise UnreadableFileError(
                f"{name} is named as DICOM but is not readable DICOM: no 'DICM' marker at "
                f"byte 128 and no dataset without it (truncated or damaged file?)") from None
        raise UnsupportedFormatError(
            f"{name} is not a DICOM file (no DICM preamble) and its suffix is not "
            f"one of .png .jpg .nii .nii.gz"
        ) from None
    except MemoryError:
        raise
    except Exception as exc:
        raise UnreadableFileError(
            f"cannot parse DICOM file {name} ({type(exc).__name__}: {exc}); the file is "
            f"truncated or damaged") from None


def _has_pixels(ds) -> bool:
    return any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"))


def _pixels(ds, name: str, header: _PixelHeader) -> np.ndarray:
    """Decoded pixels with the modality LUT (rescale slope/intercept) applied:
    an enhanced image's own, frame by frame, from its functional groups
    (where it has them, they are its rescale: an image-level one is ignored)."""
    from pydicom.pixels import apply_modality_lut

    if not _has_pixels(ds):
        raise UnreadableFileError(f"DICOM file {name} holds no pixel data")
    _check_codestreams(ds, header, name)
    groups = _functional_groups(ds, name, header.frames)
    rescales = None
    if groups is not None and header.samples == 1 and any(
            _group_items(groups, k, "PixelValueTransformationSequence", name)
            for k in range(header.frames)):
        rescales = [(_rescale(groups, k, "RescaleSlope", 1.0, name),
                     _rescale(groups, k, "RescaleIntercept", 0.0, name))
                    for k in range(header.frames)]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            stored = ds.pixel_array
            if rescales is not None and stored.shape == header.shape:
                arr = np.asarray(stored, dtype=np.float32).reshape(header.frames, -1)
                for k, (slope, intercept) in enumerate(rescales):
                    arr[k] = arr[k] * np.float32(slope) + np.float32(intercept)
                arr = arr.reshape(header.shape)
            elif header.samples == 1 and stored.shape == header.shape:
                # pydicom rescales in float64: do it a block at a time into float32
                arr = np.empty(stored.shape, np.float32)
                flat, out = stored.reshape(-1), arr.reshape(-1)
                for start in range(0, flat.size, 1 << 22):
                    out[start: start + (1 << 22)] = apply_modality_lut(
                        flat[start: start + (1 << 22)], ds)
            else:
                arr = np.asarray(stored, dtype=np.float32)
            del stored
    except MemoryError:
        raise
    except Exception as exc:
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        ts_name = getattr(ts, "name", "unknown transfer syntax")
        raise UnreadableFileError(
            f"cannot decode the pixel data of {name} ({ts_name}): {exc}"
        ) from None
    if arr.shape != header.shape:
        raise UnreadableFileError(
            f"the pixel data of {name} decoded to shape {arr.shape}, not the "
            f"{header.shape} its header says: the file is corrupt")
    return arr


def _pixel_spacing(ds, name: str, frame: int = 0, groups=None) -> tuple[float, float]:
    value = _value(ds, "PixelSpacing", name, frame, groups)
    if value is None:
        return 1.0, 1.0  # absent or empty: unknown, 1 mm
    values = [value] if isinstance(value, (str, bytes, float, int)) else value
    spacing = _check_spacing(values, name, "PixelSpacing (mm between pixel centres)")
    if len(spacing) != 2:
        raise UnsupportedFormatError(
            f"the PixelSpacing of {name} is {_show(value)}: it must be two numbers "
            f"(row spacing, column spacing); fix the header")
    return spacing[0], spacing[1]


def _read_dicom_file(path: Path) -> tuple[np.ndarray, ImageMeta]:
    return _image_from_dataset(_dcmread(path), path)


def _image_from_dataset(ds, path: Path) -> tuple[np.ndarray, ImageMeta]:
    name = path.name
    if _attr(ds, "SOPClassUID", name) in (SEG_SOP_CLASS, LABELMAP_SEG_SOP_CLASS):
        raise UnsupportedFormatError(f"{name} is a DICOM SEG: a label, not an image")
    if not _has_pixels(ds):
        raise UnreadableFileError(f"DICOM file {name} holds no pixel data")
    header = _pixel_header(ds, name)
    if header.frames > 1 and header.samples > 1:
        raise UnsupportedFormatError(
            f"{name} is a multi-frame colour DICOM; fedseg reads grey volumes")
    arr = _pixels(ds, name, header)
    if header.frames == 1:
        return _channels_first(arr), ImageMeta("dicom", _pixel_spacing(ds, name))
    return _multi_frame_volume(ds, name, arr)


@dataclass(frozen=True)
class _Groups:
    """An enhanced image's functional groups: each frame's own items, and the
    item all frames share (None without one)."""

    per_frame: list
    shared: Any


# where an enhanced image keeps what a classic image holds at its top level
_GROUP_OF = {"ImageOrientationPatient": "PlaneOrientationSequence",
             "ImagePositionPatient": "PlanePositionSequence",
             "PixelSpacing": "PixelMeasuresSequence",
             "SliceThickness": "PixelMeasuresSequence",
             "SpacingBetweenSlices": "PixelMeasuresSequence",
             "RescaleSlope": "PixelValueTransformationSequence",
             "RescaleIntercept": "PixelValueTransformationSequence"}


def _sequence(ds, keyword: str, name: str) -> list:
    """A sequence attribute's items, ``[]`` where absent or empty; a value of
    another kind (a hostile or damaged file) is an error naming it."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    value = _attr(ds, keyword, name)
    if value is None or (isinstance(value, (str, bytes)) and not value.strip()):
        return []
    if not isinstance(value, Sequence) or not all(isinstance(i, Dataset) for i in value):
        raise UnreadableFileError(f"DICOM file {name}: {keyword} is not a sequence of items "
                                  f"(corrupt header?)")
    return list(value)


def _functional_groups(ds, name: str, frames: int | None = None) -> _Groups | None:
    """The functional groups of an enhanced image (Enhanced CT, MR, PET, legacy
    converted...), None for a classic image; ``frames``: the image's frames,
    which the per-frame items must match one for one."""
    per_frame = _sequence(ds, "PerFrameFunctionalGroupsSequence", name)
    shared = _sequence(ds, "SharedFunctionalGroupsSequence", name)
    if not per_frame and not shared:
        return None
    if per_frame and frames is not None and len(per_frame) != frames:
        raise UnreadableFileError(
            f"DICOM file {name}: PerFrameFunctionalGroupsSequence holds {len(per_frame)} "
            f"items for its {frames} frames (NumberOfFrames): the file is damaged")
    return _Groups(per_frame, shared[0] if shared else None)


def _group_items(groups: _Groups, frame: int, sequence: str, name: str) -> list:
    """Functional group ``sequence``'s items for ``frame`` (from 0), nearest
    first: the frame's own, then the one all frames share."""
    own = [groups.per_frame[frame]] if frame < len(groups.per_frame) else []
    return [item for holder in own + ([groups.shared] if groups.shared is not None else [])
            for item in _sequence(holder, sequence, name)[:1]]


def _group_value(groups: _Groups | None, frame: int, keyword: str, name: str):
    """``keyword`` for ``frame`` from an enhanced image's functional groups, the
    frame's own group first, attribute by attribute; None where none says."""
    for item in _group_items(groups, frame, _GROUP_OF[keyword], name) if groups else []:
        value = _attr(item, keyword, name)
        if value is not None and not (isinstance(value, str) and not value.strip()):
            return value
    return None


def _value(ds, keyword: str, name: str, frame: int = 0, groups=None):
    """An attribute that locates or scales the pixels: from an enhanced image's
    functional groups for ``frame`` (:func:`_group_value`), else (a classic
    image) from its top level; None where absent or empty."""
    value = _group_value(groups if groups is not None else _functional_groups(ds, name),
                         frame, keyword, name)
    if value is None:
        value = _attr(ds, keyword, name)
    return None if isinstance(value, str) and not value.strip() else value


def _rescale(groups: _Groups, frame: int, keyword: str, default: float, name: str) -> float:
    value = _group_value(groups, frame, keyword, name)
    if value is None:
        return default
    number = float(_floats([value], 1, f"{keyword} (functional group of frame {frame + 1})",
                           name)[0])
    if abs(number) > 1e9:
        raise UnreadableFileError(f"DICOM file {name}: the {keyword} of frame {frame + 1} is "
                                  f"{number:g}, not a rescale (corrupt header?)")
    return number


def _multi_frame_volume(ds, name: str, arr: np.ndarray) -> tuple[np.ndarray, ImageMeta]:
    """A grey multi-frame image (``arr``: frames x rows x columns, rescaled) as
    one volume.

    An enhanced image (CT, MR, PET...) holds its geometry in functional
    groups, shared or per frame: frames with a plane position and
    orientation are put in position order and turned to the closest RAS
    axis order, as a series' slices are (:func:`_read_dicom_series`);
    ``meta.frames`` says which stored frame each slice is. Frames without a
    geometry stay in stored order as the last axis."""
    frames = arr.shape[0]
    groups = _functional_groups(ds, name, frames)
    spacings = [_pixel_spacing(ds, name, k, groups) for k in (range(frames) if groups else [0])]
    row_sp, col_sp = spacings[0]
    orientations = positions = None
    if groups is not None:
        orientations = [_orientation(ds, name, k, groups) for k in range(frames)]
        positions = [_position(ds, name, k, groups) for k in range(frames)]
    if (orientations is None or any(o is None for o in orientations)
            or any(p is None for p in positions)):
        # no plane geometry: frames in stored order become the last (slice) axis
        value = (_value(ds, "SpacingBetweenSlices", name, 0, groups)
                 or _value(ds, "SliceThickness", name, 0, groups)) if groups else None
        thickness = 1.0 if value is None else _check_spacing([value], name, "slice spacing")[0]
        return np.moveaxis(arr, 0, -1)[None], ImageMeta("dicom", (row_sp, col_sp, thickness))
    depth = [float(np.dot(np.cross(o[:3], o[3:]), p))
             for o, p in zip(orientations, positions, strict=True)]
    problem = _not_one_volume(orientations, depth, f"multi-frame image {name}")
    if problem is None and any(np.abs(np.subtract(sp, spacings[0])).max() > 1e-3 * max(sp)
                               for sp in spacings):
        problem = (f"the frames of multi-frame image {name} differ in pixel spacing "
                   f"(PixelMeasuresSequence: {min(spacings)} to {max(spacings)} mm), not one "
                   f"volume")
    order = np.argsort(depth, kind="stable")
    volume, transform, spacing = _as_volume(arr[order], orientations[order[0]],
                                            (row_sp, col_sp), np.sort(depth))
    meta = ImageMeta(
        "dicom", spacing, source_uids=[_instance_uid(ds, name)], transform=transform,
        geometry=_geometry([positions[i] for i in order], [orientations[i] for i in order],
                           (row_sp, col_sp), *arr.shape[1:]),
        not_a_volume=problem, frames=tuple(int(i) + 1 for i in order))
    return volume[None], meta


def _as_volume(stack: np.ndarray, orientation: np.ndarray | None,
               pixel_spacing: tuple[float, float], depth) -> tuple:
    """Slices in position order (``slices x rows x columns``) as a volume in the
    closest RAS axis order: ``(volume, transform, spacing)``, the slice
    spacing the median step between ``depth`` (sorted positions along the
    normal), 1 mm without two."""
    slice_sp = float(np.median(np.diff(depth))) if len(depth) > 1 else 1.0
    volume = np.transpose(stack, (2, 1, 0))  # columns x rows x slices (i, j, k)
    transform = _dicom_transform(orientation)
    spacing = _reorder((pixel_spacing[1], pixel_spacing[0], abs(slice_sp) or 1.0), transform)
    return ornt.apply_orientation(volume, transform), transform, spacing


def _is_image_class(ds, name: str) -> bool:
    """Whether the dataset's SOP class (or its file meta's) is an image storage class."""
    meta = getattr(ds, "file_meta", None)
    uids = [_attr(ds, "SOPClassUID", name),
            _attr(meta, "MediaStorageSOPClassUID", name) if meta is not None else None]
    return any("Image Storage" in str(getattr(uid, "name", "")) for uid in uids)


def _orientation(ds, name: str, frame: int = 0, groups=None) -> np.ndarray | None:
    """ImageOrientationPatient (row then column direction cosines), checked; None if
    absent (no geometry). Of ``frame`` for an enhanced image (:func:`_value`)."""
    value = _value(ds, "ImageOrientationPatient", name, frame, groups)
    if value is None:
        return None
    values = [value] if isinstance(value, (str, bytes, float, int)) else value
    iop = _floats(values, 6, "ImageOrientationPatient", name)
    row, col = iop[:3], iop[3:]
    if (abs(np.linalg.norm(row) - 1) > 0.05 or abs(np.linalg.norm(col) - 1) > 0.05
            or abs(float(np.dot(row, col))) > 0.05):
        raise UnsupportedFormatError(
            f"the ImageOrientationPatient of {name} is {_show(value)}: not two unit vectors "
            f"at right angles, so the slice geometry is unknown; fix the header")
    return iop


def _position(ds, name: str, frame: int = 0, groups=None) -> np.ndarray | None:
    """ImagePositionPatient, checked; None if absent. Of ``frame`` for an
    enhanced image (:func:`_value`)."""
    value = _value(ds, "ImagePositionPatient", name, frame, groups)
    if value is None:
        return None
    values = [value] if isinstance(value, (str, bytes, float, int)) else value
    return _floats(values, 3, "ImagePositionPatient", name)


def _slice_position(ds, name: str, iop: np.ndarray | None) -> float | None:
    ipp = _position(ds, name) if iop is not None else None
    if iop is None or ipp is None:
        return None
    return float(np.dot(np.cross(iop[:3], iop[3:]), ipp))


def _geometry(positions: list, orientations: list, pixel_spacing: tuple[float, float],
              rows: int, columns: int) -> SliceGeometry | None:
    """The slices' geometry (``positions``: each slice's ImagePositionPatient,
    in position order), when every slice has one and they share an
    orientation; else None."""
    if any(p is None for p in positions) or any(o is None for o in orientations):
        return None
    if any(np.abs(o - orientations[0]).max() > 1e-3 for o in orientations):
        return None
    return SliceGeometry(np.array(positions), orientations[0], pixel_spacing, (rows, columns))


def _read_dicom_series(folder: Path) -> tuple[np.ndarray, ImageMeta]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    datasets = []
    for f in files:
        try:
            ds = _dcmread(f)
        except UnsupportedFormatError:
            continue  # DICOMDIR-less folders often hold a README or similar; skip non-DICOM
        if _has_pixels(ds):
            datasets.append((f, ds))
        elif "Rows" in ds or _is_image_class(ds, f.name):
            # an image slice whose pixels are gone (a truncated file), not a non-image file
            raise UnreadableFileError(
                f"{f.name} in series {folder.name} has no pixel data (truncated file?)")
    if not datasets:
        raise UnreadableFileError(f"folder {folder.name} holds no DICOM image with pixel data")
    series = {str(_attr(ds, "SeriesInstanceUID", f.name, "")) for f, ds in datasets}
    if len(series) > 1:
        raise DataError(
            f"folder {folder.name} mixes {len(series)} DICOM series; put one series per folder"
        )
    if len(datasets) == 1:
        f, ds = datasets[0]
        arr, meta = _image_from_dataset(ds, f)  # already read: no second pass
        meta.source_uids = [_instance_uid(ds, f.name)]
        if arr.ndim == 3:  # one grey slice (rows x columns)
            meta.geometry = _geometry([_position(ds, f.name)], [_orientation(ds, f.name)],
                                      _pixel_spacing(ds, f.name), *arr.shape[1:])
        return arr, meta
    headers = [_pixel_header(ds, f.name) for f, ds in datasets]
    shapes = {(h.rows, h.columns) for h in headers}
    if len(shapes) > 1:
        raise ShapeMismatchError(f"slices in {folder.name} differ in size: {sorted(shapes)}")
    for (f, _), h in zip(datasets, headers, strict=True):
        if h.frames > 1 or h.samples > 1:
            raise UnsupportedFormatError(
                f"{f.name} in series {folder.name} is a multi-frame or colour image; a series "
                f"folder holds one grey slice per file")
    rows, columns = shapes.pop()
    _check_size((len(datasets), rows, columns), folder.name,
                shown=f"{len(datasets)} slices of {rows} x {columns} pixels")
    orientations = [_orientation(ds, f.name) for f, ds in datasets]
    positions = [_slice_position(ds, f.name, iop)
                 for (f, ds), iop in zip(datasets, orientations, strict=True)]
    # a 3D model refuses a series that is not one volume
    problem = _not_one_volume(orientations, positions, f"series {folder.name}")
    if all(p is not None for p in positions):
        order = np.argsort(positions, kind="stable")
    else:
        order = np.argsort([_int_attr(ds, "InstanceNumber", f.name, i, low=-(1 << 31))
                            for i, (f, ds) in enumerate(datasets)], kind="stable")
    datasets = [datasets[i] for i in order]
    headers = [headers[i] for i in order]
    stack = np.empty((len(datasets), rows, columns), np.float32)  # slices x rows x cols
    for k, ((f, ds), h) in enumerate(zip(datasets, headers, strict=True)):
        stack[k] = _pixels(ds, f.name, h)
    first_file, first = datasets[0]
    pixel_spacing = _pixel_spacing(first, first_file.name)
    volume, transform, spacing = _as_volume(stack, orientations[order[0]], pixel_spacing,
                                            sorted(p for p in positions if p is not None))
    meta = ImageMeta(
        "dicom-series",
        spacing,
        source_uids=[_instance_uid(ds, f.name) for f, ds in datasets],
        transform=transform,
        geometry=_geometry([_position(ds, f.name) for f, ds in datasets],
                           [orientations[i] for i in order], pixel_spacing, rows, columns),
        not_a_volume=problem,
    )
    return volume[None].astype(np.float32), meta


# Slice planes further apart than this (in direction cosines, about 0.6 degrees)
# are different planes, not one stack written with rounded numbers.
_PLANE_TOLERANCE = 0.01
# Gaps between neighbouring slices may differ from their median by this share,
# or by _GAP_SLACK mm (positions written to 0.1 mm: a 0.625 mm series has gaps of
# 0.6 and 0.7), before the series counts as uneven (a slice missing, mixed spacings).
_GAP_TOLERANCE = 0.1
_GAP_SLACK = 0.15


def _not_one_volume(orientations: list, positions: list, what: str) -> str | None:
    """Why a series' slices are not one evenly spaced volume, or None if they
    are (or have no geometry to tell): slices in several planes (a localiser,
    a radial series), two at one place (several echoes or times in one
    series), or a step between neighbours unlike the rest (a slice missing)."""
    planes: list[np.ndarray] = []
    for o in (o for o in orientations if o is not None):
        if not any(np.abs(o - p).max() <= _PLANE_TOLERANCE for p in planes):
            planes.append(o)
    if len(planes) > 1:
        return (f"the slices of {what} lie in {len(planes)} planes "
                f"(ImageOrientationPatient): a localiser, radial or multi-plane series, not "
                f"one volume")
    if any(p is None for p in positions) or len(positions) < 2:
        return None
    gaps = np.diff(np.sort(np.asarray(positions, dtype=float)))
    step = float(np.median(gaps))
    same = int((gaps <= 1e-3 * max(step, 1.0)).sum())
    if same:
        return (f"{what} holds {same + 1} or more slices at one position "
                f"(several echoes, phases or times in one image?), not one volume")
    worst = int(np.argmax(np.abs(gaps - step)))
    if abs(gaps[worst] - step) > max(_GAP_TOLERANCE * step, _GAP_SLACK):
        return (f"the slices of {what} are not evenly spaced: {gaps[worst]:.3g} mm "
                f"between slices {worst + 1} and {worst + 2} (in position order) against "
                f"{step:.3g} mm between most (a slice missing, or mixed spacings)")
    return None


def _instance_uid(ds, name: str) -> str:
    uid = str(_attr(ds, "SOPInstanceUID", name) or "").strip()
    if not uid:
        raise UnreadableFileError(
            f"DICOM file {name} has no SOPInstanceUID, which every DICOM image needs")
    return uid


def _dicom_transform(iop: np.ndarray | None) -> np.ndarray:
    """Orientation transform from DICOM (i=column, j=row, k=slice) to RAS order."""
    if iop is None:
        return np.array([[0.0, 1.0], [1.0, 1.0], [2.0, 1.0]])  # no geometry: keep axes
    col_dir, row_dir = iop[:3], iop[3:]  # direction of increasing i, of increasing j
    normal = np.cross(col_dir, row_dir)
    lps = np.column_stack([col_dir, row_dir, normal])
    ras = lps * np.array([[-1.0], [-1.0], [1.0]])
    affine = np.eye(4)
    affine[:3, :3] = ras
    return ornt.ornt_transform(ornt.io_orientation(affine), ornt.axcodes2ornt(("R", "A", "S")))


# --------------------------------------------------------------------------- labels


def _on_image_grid(pixels: np.ndarray, image_meta: ImageMeta) -> np.ndarray:
    """A DICOM label read on its image's slices in position order (``slices x
    rows x columns``) onto the grid the image reader returned (see
    :func:`_read_dicom_series`, :func:`_multi_frame_volume`)."""
    if image_meta.transform is not None and pixels.ndim == 3:
        volume = ornt.apply_orientation(np.transpose(pixels, (2, 1, 0)), image_meta.transform)
        return np.ascontiguousarray(volume)  # no negative strides: torch takes it as is
    return np.ascontiguousarray(np.squeeze(pixels))
