"""Image and label readers: one file or DICOM series folder in, ``(array, meta)`` out.

Arrays are channel-first: images ``C x H x W`` (2D) or ``C x X x Y x Z`` (3D),
float32; labels ``1 x ...`` uint8 in {0, 1}. 3D arrays with a known geometry
(DICOM series, NIfTI) are turned to the closest RAS axis order, so an image and
its label read from different formats line up and the last axis runs
inferior to superior (2D models train on axial slices). 2D images keep their
row/column order.

Readers raise :class:`common.errors.DataError` subclasses, never a library's
exception: the caller adds which case it was.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel import orientations as ornt

from common.errors import (
    DataError,
    ShapeMismatchError,
    UnreadableFileError,
    UnsupportedFormatError,
)

PIL_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
NIFTI_SUFFIXES = (".nii", ".nii.gz")
SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
RTSTRUCT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"


@dataclass
class ImageMeta:
    """What a reader learned about an image besides its pixels."""

    format: str
    spacing: tuple[float, ...]
    # For DICOM series: SOP Instance UIDs in the order of the stored slices, and
    # the axis transform applied, so a DICOM SEG label can be put on the same grid.
    source_uids: list[str] = field(default_factory=list)
    transform: np.ndarray | None = None  # nibabel orientation transform, or None


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


# --------------------------------------------------------------------------- images


def read_image(path: Path) -> tuple[np.ndarray, ImageMeta]:
    """Read one image (file or DICOM series folder). Returns ``(C x spatial, meta)``."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"image file not found: {path.name}")
    kind = file_kind(path)
    if kind == "pil":
        array = _read_pil(path)
        return _channels_first(array).astype(np.float32), ImageMeta("pil", (1.0, 1.0))
    if kind == "nifti":
        data, spacing, transform = _read_nifti(path)
        return data[None].astype(np.float32), ImageMeta("nifti", spacing, transform=transform)
    if kind == "dicom-series":
        return _read_dicom_series(path)
    return _read_dicom_file(path)


def _read_pil(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            if img.mode in ("P", "PA", "RGBA", "LA", "CMYK", "YCbCr"):
                img = img.convert("RGB" if img.mode != "LA" else "L")
            elif img.mode == "1":
                img = img.convert("L")
            return np.asarray(img)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise UnreadableFileError(f"cannot decode {path.name} as an image: {exc}") from None


def _channels_first(array: np.ndarray) -> np.ndarray:
    if array.ndim == 2:
        return array[None]
    if array.ndim == 3 and array.shape[-1] in (3, 4):
        return np.moveaxis(array[..., :3], -1, 0)
    raise UnsupportedFormatError(f"2D image with unexpected shape {array.shape}")


def _read_nifti(path: Path) -> tuple[np.ndarray, tuple[float, ...], np.ndarray]:
    try:
        img = nib.load(str(path))
        canonical = ornt.io_orientation(img.affine)
        transform = ornt.ornt_transform(canonical, ornt.axcodes2ornt(("R", "A", "S")))
        data = np.asanyarray(img.dataobj)
    except Exception as exc:  # nibabel raises many types for bad files
        raise UnreadableFileError(f"cannot read {path.name} as NIfTI: {exc}") from None
    data = np.squeeze(data)
    if data.ndim == 3:
        data = ornt.apply_orientation(data, transform)
        zooms = img.header.get_zooms()[:3]
        return data, _reorder(zooms, transform), transform
    if data.ndim == 2:
        return data, tuple(float(z) for z in img.header.get_zooms()[:2]), transform
    raise UnsupportedFormatError(f"NIfTI {path.name} has shape {data.shape}; expected 2D or 3D")


def _reorder(zooms, transform: np.ndarray) -> tuple[float, ...]:
    out = [0.0] * len(transform)
    for src, (dst, _flip) in enumerate(transform):
        out[int(dst)] = float(zooms[src])
    return tuple(out)


def _dcmread(path: Path, **kwargs):
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return pydicom.dcmread(path, **kwargs)
    except InvalidDicomError:
        # Files written without the 128-byte preamble and meta header are still
        # DICOM; accept them when they parse into a dataset with pixel data or a UID.
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(path, force=True, **kwargs)
            if "PixelData" in ds or "SOPClassUID" in ds:
                return ds
        except Exception:  # noqa: BLE001 - any failure means: not DICOM
            pass
        raise UnsupportedFormatError(
            f"{path.name} is not a DICOM file (no DICM preamble) and its suffix is not "
            f"one of .png .jpg .nii .nii.gz"
        ) from None
    except Exception as exc:
        raise UnreadableFileError(f"cannot parse DICOM file {path.name}: {exc}") from None


def _pixels(ds, name: str) -> np.ndarray:
    """Decoded pixels with the modality LUT (rescale slope/intercept) applied."""
    from pydicom.pixels import apply_modality_lut

    if "PixelData" not in ds and "FloatPixelData" not in ds:
        raise UnreadableFileError(f"DICOM file {name} holds no pixel data")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            arr = ds.pixel_array
            if ds.get("SamplesPerPixel", 1) == 1:
                arr = apply_modality_lut(arr, ds)
    except Exception as exc:
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        ts_name = getattr(ts, "name", "unknown transfer syntax")
        raise UnreadableFileError(
            f"cannot decode the pixel data of {name} ({ts_name}): {exc}"
        ) from None
    return np.asarray(arr, dtype=np.float32)


def _read_dicom_file(path: Path) -> tuple[np.ndarray, ImageMeta]:
    return _image_from_dataset(_dcmread(path), path)


def _image_from_dataset(ds, path: Path) -> tuple[np.ndarray, ImageMeta]:
    if ds.get("SOPClassUID") == SEG_SOP_CLASS:
        raise UnsupportedFormatError(f"{path.name} is a DICOM SEG: a label, not an image")
    arr = _pixels(ds, path.name)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    rgb = ds.get("SamplesPerPixel", 1) > 1
    spacing = tuple(float(s) for s in ds.get("PixelSpacing", [1.0, 1.0]))
    if frames == 1:
        return _channels_first(arr), ImageMeta("dicom", spacing)
    if rgb:
        raise UnsupportedFormatError(
            f"{path.name} is a multi-frame colour DICOM; fedseg reads grey volumes"
        )
    # Multi-frame: frames become the last (slice) axis.
    return np.moveaxis(arr, 0, -1)[None], ImageMeta("dicom", spacing + (1.0,))


def _is_image_class(ds) -> bool:
    """Whether the dataset's SOP class (or its file meta's) is an image storage class."""
    meta = getattr(ds, "file_meta", None)
    uids = [ds.get("SOPClassUID"), meta.get("MediaStorageSOPClassUID") if meta else None]
    return any("Image Storage" in getattr(uid, "name", "") for uid in uids)


def _slice_position(ds) -> float | None:
    try:
        iop = np.array(ds.ImageOrientationPatient, dtype=float)
        ipp = np.array(ds.ImagePositionPatient, dtype=float)
    except (AttributeError, ValueError, TypeError):
        return None
    return float(np.dot(np.cross(iop[:3], iop[3:]), ipp))


def _read_dicom_series(folder: Path) -> tuple[np.ndarray, ImageMeta]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    datasets = []
    for f in files:
        try:
            ds = _dcmread(f)
        except UnsupportedFormatError:
            continue  # DICOMDIR-less folders often hold a README or similar; skip non-DICOM
        if "PixelData" in ds:
            datasets.append((f, ds))
        elif "Rows" in ds or _is_image_class(ds):
            # an image slice whose pixels are gone (a truncated file), not a non-image file
            raise UnreadableFileError(
                f"{f.name} in series {folder.name} has no pixel data (truncated file?)")
    if not datasets:
        raise UnreadableFileError(f"folder {folder.name} holds no DICOM image with pixel data")
    series = {str(ds.get("SeriesInstanceUID", "")) for _, ds in datasets}
    if len(series) > 1:
        raise DataError(
            f"folder {folder.name} mixes {len(series)} DICOM series; put one series per folder"
        )
    shapes = {(int(ds.Rows), int(ds.Columns)) for _, ds in datasets}
    if len(shapes) > 1:
        raise ShapeMismatchError(f"slices in {folder.name} differ in size: {sorted(shapes)}")
    positions = [_slice_position(ds) for _, ds in datasets]
    if all(p is not None for p in positions):
        order = np.argsort(positions, kind="stable")
    else:
        order = np.argsort([int(ds.get("InstanceNumber", i)) for i, (_, ds) in enumerate(datasets)])
    datasets = [datasets[i] for i in order]
    if len(datasets) == 1:
        f, ds = datasets[0]
        arr, meta = _image_from_dataset(ds, f)  # already read: no second pass
        meta.source_uids = [str(ds.SOPInstanceUID)]
        return arr, meta
    stack = np.stack([_pixels(ds, f.name) for f, ds in datasets])  # slices x rows x cols
    if stack.ndim != 3:
        raise UnsupportedFormatError(f"series {folder.name} is not a grey volume")
    first = datasets[0][1]
    row_sp, col_sp = (float(s) for s in first.get("PixelSpacing", [1.0, 1.0]))
    sorted_pos = [p for p in (_slice_position(ds) for _, ds in datasets) if p is not None]
    slice_sp = float(np.median(np.diff(sorted_pos))) if len(sorted_pos) > 1 else 1.0
    volume = np.transpose(stack, (2, 1, 0))  # columns x rows x slices (i, j, k)
    transform = _dicom_transform(first)
    volume = ornt.apply_orientation(volume, transform)
    spacing = _reorder((col_sp, row_sp, abs(slice_sp) or 1.0), transform)
    meta = ImageMeta(
        "dicom-series",
        spacing,
        source_uids=[str(ds.SOPInstanceUID) for _, ds in datasets],
        transform=transform,
    )
    return volume[None].astype(np.float32), meta


def _dicom_transform(ds) -> np.ndarray:
    """Orientation transform from DICOM (i=column, j=row, k=slice) to RAS order."""
    try:
        iop = np.array(ds.ImageOrientationPatient, dtype=float)
    except (AttributeError, ValueError, TypeError):
        return np.array([[0.0, 1.0], [1.0, 1.0], [2.0, 1.0]])  # no geometry: keep axes
    col_dir, row_dir = iop[:3], iop[3:]  # direction of increasing i, of increasing j
    normal = np.cross(col_dir, row_dir)
    lps = np.column_stack([col_dir, row_dir, normal])
    ras = lps * np.array([[-1.0], [-1.0], [1.0]])
    affine = np.eye(4)
    affine[:3, :3] = ras
    return ornt.ornt_transform(ornt.io_orientation(affine), ornt.axcodes2ornt(("R", "A", "S")))


# --------------------------------------------------------------------------- labels


def read_label(path: Path, image_meta: ImageMeta) -> np.ndarray:
    """Read a label and binarise it. Returns ``1 x spatial`` uint8 in {0, 1}.

    8-bit images (PNG/JPEG) are foreground where above half their maximum, so
    {0, 255} masks and JPEG-compressed masks work; NIfTI and DICOM SEG are
    foreground where non-zero (all segments merged).
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"label file not found: {path.name}")
    kind = file_kind(path)
    if kind == "pil":
        arr = _read_pil(path)
        if arr.ndim == 3:
            arr = arr.max(axis=-1)
        arr = arr.astype(np.float32)
        top = float(arr.max())
        mask = arr > top / 2.0 if top > 0 else np.zeros(arr.shape, bool)
    elif kind == "nifti":
        arr, _spacing, _transform = _read_nifti(path)
        integral = np.all(np.mod(arr, 1) == 0)
        mask = arr > 0 if integral else arr > float(arr.max()) / 2.0
    elif kind == "dicom":
        mask = _read_seg(path, image_meta)
    else:
        raise UnsupportedFormatError(
            f"label {path.name} is a folder; labels are one file (PNG/JPEG, NIfTI or DICOM SEG)"
        )
    return mask.astype(np.uint8)[None]


def _read_seg(path: Path, image_meta: ImageMeta) -> np.ndarray:
    import highdicom as hd

    ds = _dcmread(path)
    if ds.get("SOPClassUID") == RTSTRUCT_SOP_CLASS:
        raise UnsupportedFormatError(
            f"label {path.name} is an RTSTRUCT (contours); export the label as DICOM SEG "
            f"or NIfTI"
        )
    if ds.get("SOPClassUID") != SEG_SOP_CLASS:
        raise UnsupportedFormatError(f"label {path.name} is DICOM but not a DICOM SEG")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            seg = hd.seg.Segmentation.from_dataset(ds, copy=False)
            if image_meta.source_uids:
                referenced = {uid for _, _, uid in seg.get_source_image_uids()}
                if not referenced & set(image_meta.source_uids):
                    raise UnsupportedFormatError(
                        f"DICOM SEG {path.name} does not reference any slice of its image "
                        f"series: it belongs to another series"
                    )
                pixels = seg.get_pixels_by_source_instance(
                    source_sop_instance_uids=image_meta.source_uids,
                    combine_segments=False,
                    ignore_spatial_locations=True,
                    assert_missing_frames_are_empty=True,
                )  # slices x rows x cols x segments, in the image's slice order
            else:
                pixels = seg.get_volume(combine_segments=False).array
            pixels = np.asarray(pixels).any(axis=-1)  # all segments: one foreground
    except DataError:
        raise
    except Exception as exc:
        raise UnreadableFileError(
            f"cannot read DICOM SEG {path.name} against its image: {exc}"
        ) from None
    if image_meta.transform is not None and pixels.ndim == 3:
        volume = np.transpose(pixels, (2, 1, 0))
        if len(image_meta.source_uids) > 1:
            return ornt.apply_orientation(volume, image_meta.transform)
        return volume
    return np.squeeze(pixels)


def check_pair(image: np.ndarray, label: np.ndarray) -> None:
    """Raise :class:`ShapeMismatchError` unless image and label share a grid."""
    if image.shape[1:] != label.shape[1:]:
        raise ShapeMismatchError(
            f"image is {tuple(image.shape[1:])} but label is {tuple(label.shape[1:])}"
        )
