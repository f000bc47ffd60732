"""Image and label readers: one file or DICOM series folder in, ``(array, meta)`` out.

Arrays are channel-first: images ``C x H x W`` (2D) or ``C x X x Y x Z`` (3D),
float32; labels ``1 x ...`` uint8 in {0, 1}. 3D arrays with a known geometry
(DICOM series, NIfTI) are turned to the closest RAS axis order, so an image and
its label read from different formats line up and the last axis runs
inferior to superior (2D models train on axial slices). 2D images keep their
row/column order.

Readers raise :class:`common.errors.DataError` subclasses, never a library's
exception: the caller adds which case it was. Damaged or hostile files are
refused before decoding where their headers can be checked: an image or label
may hold at most :data:`MAX_VALUES` values (voxels x channels) and
:data:`MAX_BYTES` bytes of stored pixel data, and a header must agree with the
data the file holds (a NIfTI header with its file size, a DICOM header with the
size of the JPEG / JPEG 2000 image inside), so a corrupt size field cannot make
a reader allocate gigabytes or decode for minutes.
"""

from __future__ import annotations

import io
import math
import os
import struct
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel import orientations as ornt

from common.config import FOREGROUND
from common.data.labels import Classes
from common.errors import (
    DataError,
    ShapeMismatchError,
    UnreadableFileError,
    UnsupportedFormatError,
)

PIL_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
# what Pillow may parse such a file as (not every format it knows: EPS, PDF, ...)
PIL_FORMATS = ("PNG", "JPEG", "MPO", "BMP", "TIFF")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
LABELMAP_SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.7"  # a SEG too: never an image
RTSTRUCT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"
DEFLATED_SYNTAX = "1.2.840.10008.1.2.1.99"

# Size limits, checked from the headers before any pixel is decoded.
# MAX_VALUES: voxels x channels of one image or label: 2**28, 1 GiB as float32
# (a 512 x 512 x 1024 CT, a 16384 x 16384 grey image). MAX_BYTES: stored bytes of
# one file's pixel data once out of gzip / deflate: 1 GiB (MAX_VALUES at 32 bits,
# half of it at 64). Reading an image at the limits takes about 2 GiB of memory.
MAX_VALUES = 1 << 28
MAX_BYTES = 1 << 30
# deflate (gzip, deflated DICOM) cannot expand data more than 1032-fold
_DEFLATE_MAX_RATIO = 1032


@dataclass(frozen=True)
class SliceGeometry:
    """Where a DICOM series' slices lie in patient space (mm), the space an
    RTSTRUCT's contours are drawn in."""

    positions: np.ndarray  # S x 3: ImagePositionPatient of each slice, in stored order
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


def _check_size(dims: tuple[int, ...], name: str, itemsize: int = 1,
                shown: str | None = None) -> None:
    """Refuse, before decoding, an image whose header claims no pixels or too many."""
    shown = shown or " x ".join(str(d) for d in dims)
    if any(d <= 0 for d in dims):
        raise UnreadableFileError(
            f"the header of {name} says the image is {shown}: no pixels (corrupt header?)")
    values = math.prod(dims)
    if values > MAX_VALUES or values * itemsize > MAX_BYTES:
        raise UnsupportedFormatError(
            f"the header of {name} says the image is {shown} = {values:,} values "
            f"({values * itemsize / 2**30:.3g} GiB stored); fedseg reads at most "
            f"{MAX_VALUES:,} values and {MAX_BYTES >> 30} GiB per image: if the size is real, "
            f"crop or resample the image, otherwise the header is corrupt")


class _BoundedFile(io.BufferedReader):
    """A file whose ``read(n)`` never asks for more than what is left of it: pydicom
    reads an element, and Pillow a PNG chunk, by its length field, and a corrupt
    length of gigabytes would otherwise allocate gigabytes before the read comes
    up short."""

    def __init__(self, path: Path) -> None:
        super().__init__(io.FileIO(str(path), "rb"))
        self._size = os.fstat(self.fileno()).st_size

    def read(self, size: int | None = -1) -> bytes:
        if size is not None and size > 0:
            size = min(size, max(0, self._size - self.tell()))
            if size == 0:
                return b""
        return super().read(size)


def _read_pil(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DecompressionBombWarning: sizes checked here
            with _BoundedFile(path) as fp, Image.open(fp, formats=PIL_FORMATS) as img:
                width, height = img.size
                to_rgb = img.mode in ("P", "PA", "RGBA", "CMYK", "YCbCr")
                bands = 3 if to_rgb else len(img.getbands())  # the channels it is read with
                _check_size((height, width, bands), path.name,
                            shown=f"{width} x {height} pixels x {bands} channel(s)")
                if to_rgb or img.mode == "LA":
                    img = img.convert("RGB" if img.mode != "LA" else "L")
                elif img.mode == "1":
                    img = img.convert("L")
                return np.asarray(img)
    except DataError:
        raise
    except MemoryError:
        raise
    except Image.DecompressionBombError as exc:
        raise UnsupportedFormatError(
            f"{path.name} claims a size over Pillow's decompression-bomb limit ({exc}); "
            f"if the size is real, downsample the image, otherwise the file is corrupt"
        ) from None
    except Exception as exc:  # Pillow raises OSError, SyntaxError, EOFError, ValueError, ...
        raise UnreadableFileError(
            f"cannot decode {path.name} as an image ({type(exc).__name__}: {exc}); "
            f"the file is damaged or not the image format its suffix says"
        ) from None


def _channels_first(array: np.ndarray) -> np.ndarray:
    if array.ndim == 2:
        return array[None]
    if array.ndim == 3 and array.shape[-1] in (3, 4):
        return np.moveaxis(array[..., :3], -1, 0)
    raise UnsupportedFormatError(f"2D image with unexpected shape {array.shape}")


def _read_nifti(path: Path) -> tuple[np.ndarray, tuple[float, ...], np.ndarray]:
    name = path.name
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = nib.load(str(path))
            shape = tuple(int(d) for d in img.shape)
            dtype = np.dtype(img.get_data_dtype())
            offset = int(img.dataobj.offset)
            zooms = tuple(float(z) for z in img.header.get_zooms())
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
    spacing = tuple(zooms[i] if i < len(zooms) else 1.0 for i in keep)
    _check_spacing(spacing, name, "pixdim (voxel size)")
    if not np.isfinite(affine).all():
        raise UnreadableFileError(
            f"the orientation (qform / sform) in the header of NIfTI {name} holds NaN or "
            f"infinite numbers")
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


def _check_spacing(spacing, name: str, what: str) -> tuple[float, ...]:
    try:
        values = tuple(float(s) for s in spacing)
    except (TypeError, ValueError):
        values = ()
    if not values or not all(math.isfinite(v) and v > 0 for v in values):
        raise UnsupportedFormatError(
            f"the {what} of {name} is {_show(spacing)}: it must be positive numbers of mm; "
            f"fix the header")
    return values


def _show(value) -> str:
    text = repr(list(value) if isinstance(value, (list, tuple)) else value)
    return text if len(text) <= 80 else text[:77] + "..."


def _reorder(zooms, transform: np.ndarray) -> tuple[float, ...]:
    out = [0.0] * len(transform)
    for src, (dst, _flip) in enumerate(transform):
        out[int(dst)] = float(zooms[src])
    return tuple(out)


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


def _check_deflated(path: Path) -> None:
    """pydicom inflates a deflated DICOM file whole when it opens it: refuse one that
    would inflate to more than :data:`MAX_BYTES` (a deflate bomb) first."""
    try:
        from pydicom.filereader import _read_file_meta_info, read_preamble

        with open(path, "rb") as fp:
            read_preamble(fp, False)
            syntax = _read_file_meta_info(fp).get("TransferSyntaxUID")
            if syntax != DEFLATED_SYNTAX:
                return
            inflater = zlib.decompressobj(-zlib.MAX_WBITS)
            total = 0
            while (chunk := fp.read(1 << 20)) and not inflater.eof:
                while chunk and not inflater.eof:
                    total += len(inflater.decompress(chunk, 1 << 24))
                    if total > MAX_BYTES:
                        raise UnsupportedFormatError(
                            f"deflated DICOM file {path.name} inflates to more than "
                            f"{MAX_BYTES >> 30} GiB, more than fedseg reads (a corrupt or "
                            f"hostile file?)")
                    chunk = inflater.unconsumed_tail
    except DataError:
        raise
    except Exception:  # noqa: BLE001 - no readable file meta: dcmread says what is wrong
        return


_MISSING = object()


def _attr(ds, keyword: str, name: str, default=None):
    """A DICOM attribute's value. pydicom parses a value when it is first read, so a
    damaged value fails here, with the attribute named."""
    try:
        return ds.get(keyword, default)
    except MemoryError:
        raise
    except Exception as exc:
        raise UnreadableFileError(
            f"DICOM file {name}: the value of {keyword} cannot be parsed ({exc})") from None


def _int_attr(ds, keyword: str, name: str, default=_MISSING, *, allowed=None, low: int = 1,
              high: int | None = None) -> int:
    """A whole-number DICOM attribute, checked against its allowed values."""
    value = _attr(ds, keyword, name, _MISSING)
    if value is _MISSING or value is None or (isinstance(value, str) and not value.strip()):
        if default is _MISSING:
            raise UnreadableFileError(f"DICOM file {name} has no {keyword}, which an image needs")
        return default
    number = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = int(value)
    elif isinstance(value, float) and value.is_integer():
        number = int(value)
    elif isinstance(value, str) and value.strip().lstrip("+-").isdigit():
        number = int(value.strip())
    if (number is None or (allowed is not None and number not in allowed) or number < low
            or (high is not None and number > high)):
        expected = (f"one of {sorted(allowed)}" if allowed is not None else
                    f"a whole number from {low}" + (f" to {high}" if high is not None else ""))
        raise UnreadableFileError(
            f"DICOM file {name}: {keyword} is {_show(value)}, not {expected} (corrupt header?)")
    return number


def _floats(value, count: int, keyword: str, name: str) -> np.ndarray:
    try:
        values = np.array([float(v) for v in value], dtype=float)
    except (TypeError, ValueError):
        values = np.array([])
    if values.shape != (count,) or not np.isfinite(values).all():
        raise UnreadableFileError(
            f"DICOM file {name}: {keyword} is {_show(value)}, not {count} numbers "
            f"(corrupt header?)")
    return values


@dataclass(frozen=True)
class _PixelHeader:
    """The image pixel attributes, checked, before any pixel is decoded."""

    rows: int
    columns: int
    frames: int
    samples: int
    bits: int

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape pydicom decodes the pixel data to."""
        return (((self.frames,) if self.frames > 1 else ()) + (self.rows, self.columns)
                + ((self.samples,) if self.samples > 1 else ()))


def _pixel_header(ds, name: str) -> _PixelHeader:
    rows = _int_attr(ds, "Rows", name, high=65535)
    columns = _int_attr(ds, "Columns", name, high=65535)
    samples = _int_attr(ds, "SamplesPerPixel", name, 1, allowed={1, 3})
    bits = _int_attr(ds, "BitsAllocated", name, allowed={1, 8, 16, 32, 64})
    frames = max(1, _int_attr(ds, "NumberOfFrames", name, 1, low=0))  # 0: pydicom reads 1
    _int_attr(ds, "PixelRepresentation", name, 0, allowed={0, 1}, low=0)
    header = _PixelHeader(rows, columns, frames, samples, bits)
    shown = f"{rows} x {columns} pixels" + (f" x {frames} frames" if frames > 1 else "") + (
        f" x {samples} samples" if samples > 1 else "")
    _check_size((rows, columns, frames, samples), name, max(1, bits // 8), shown)
    return header


_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF,
             0xF7}  # SOF0-15 (JPEG) and SOF55 (JPEG-LS)


def _codestream_size(data) -> tuple[int, int, int, int] | None:
    """``(rows, columns, components, tiles)`` from the header of a JPEG, JPEG-LS or
    JPEG 2000 codestream, or None where no such header is found."""
    data = memoryview(data)
    if bytes(data[:2]) == b"\xff\xd8":
        pos = 2
        while pos + 4 <= len(data):
            if data[pos] != 0xFF:
                return None
            marker = data[pos + 1]
            if marker == 0xFF:  # fill byte
                pos += 1
                continue
            if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a segment
                pos += 2
                continue
            if marker in _JPEG_SOF:
                if pos + 10 > len(data):
                    return None
                rows, columns = struct.unpack(">HH", data[pos + 5: pos + 9])
                return rows, columns, data[pos + 9], 1
            length = struct.unpack(">H", data[pos + 2: pos + 4])[0]
            if marker == 0xDA or length < 2:  # a scan before any frame header
                return None
            pos += 2 + length
        return None
    pos = 0
    if bytes(data[4:8]) == b"jP  ":  # JP2 file format: find the codestream box
        while pos + 8 <= len(data):
            length, box = struct.unpack(">I4s", data[pos: pos + 8])
            if box == b"jp2c":
                pos += 8
                break
            if length == 1 and pos + 16 <= len(data):
                length = struct.unpack(">Q", data[pos + 8: pos + 16])[0]
            if length < 8:
                return None
            pos += length
    if bytes(data[pos: pos + 4]) != b"\xff\x4f\xff\x51" or pos + 42 > len(data):
        return None
    x, y, x0, y0, tx, ty, tx0, ty0 = struct.unpack(">8I", data[pos + 8: pos + 40])
    components = struct.unpack(">H", data[pos + 40: pos + 42])[0]
    if tx == 0 or ty == 0 or x <= x0 or y <= y0 or tx0 > x0 or ty0 > y0:
        return 0, 0, components, 0
    tiles = math.ceil((x - tx0) / tx) * math.ceil((y - ty0) / ty)
    return y - y0, x - x0, components, tiles


def _check_codestreams(ds, header: _PixelHeader, name: str) -> None:
    """Compare the image size in each JPEG / JPEG-LS / JPEG 2000 frame's own header with
    the DICOM header before decoding: a decoder allocates what its codestream claims."""
    from pydicom.encaps import generate_frames
    from pydicom.uid import UID

    meta = getattr(ds, "file_meta", None)
    syntax = _attr(meta, "TransferSyntaxUID", name) if meta is not None else None
    try:
        encapsulated = bool(UID(str(syntax)).is_encapsulated) if syntax else False
    except ValueError:  # not a transfer syntax pydicom knows: decoding will say so
        encapsulated = False
    if not encapsulated or "PixelData" not in ds:
        return
    try:
        offsets = (_attr(ds, "ExtendedOffsetTable", name),
                   _attr(ds, "ExtendedOffsetTableLengths", name))
        frames = generate_frames(_attr(ds, "PixelData", name), number_of_frames=header.frames,
                                 extended_offsets=offsets if all(offsets) else None)
        for index, frame in enumerate(frames):
            if index >= header.frames:
                break
            size = _codestream_size(frame)
            if size is None:
                continue  # RLE, or no header found: the decoder checks it
            rows, columns, components, tiles = size
            if (rows, columns, components) != (header.rows, header.columns, header.samples):
                raise UnreadableFileError(
                    f"frame {index + 1} of {name} holds a {rows} x {columns} image with "
                    f"{components} components, but the DICOM header says {header.rows} x "
                    f"{header.columns} with {header.samples}: the file is corrupt")
            if not 1 <= tiles <= 65535:
                raise UnreadableFileError(
                    f"frame {index + 1} of {name} is a JPEG 2000 image with {tiles} tiles "
                    f"(at most 65535 are valid): the file is corrupt")
    except DataError:
        raise
    except MemoryError:
        raise
    except Exception as exc:  # pydicom's fragment parsing on broken encapsulation
        raise UnreadableFileError(
            f"the compressed pixel data of {name} is not well formed ({exc})") from None


def _has_pixels(ds) -> bool:
    return any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"))


def _pixels(ds, name: str, header: _PixelHeader) -> np.ndarray:
    """Decoded pixels with the modality LUT (rescale slope/intercept) applied."""
    from pydicom.pixels import apply_modality_lut

    if not _has_pixels(ds):
        raise UnreadableFileError(f"DICOM file {name} holds no pixel data")
    _check_codestreams(ds, header, name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            stored = ds.pixel_array
            if header.samples == 1 and stored.shape == header.shape:
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


def _pixel_spacing(ds, name: str) -> tuple[float, float]:
    value = _attr(ds, "PixelSpacing", name)
    if value is None or (isinstance(value, str) and not value.strip()):
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
    spacing = _pixel_spacing(ds, name)
    arr = _pixels(ds, name, header)
    if header.frames == 1:
        return _channels_first(arr), ImageMeta("dicom", spacing)
    # Multi-frame: frames become the last (slice) axis.
    return np.moveaxis(arr, 0, -1)[None], ImageMeta("dicom", spacing + (1.0,))


def _is_image_class(ds, name: str) -> bool:
    """Whether the dataset's SOP class (or its file meta's) is an image storage class."""
    meta = getattr(ds, "file_meta", None)
    uids = [_attr(ds, "SOPClassUID", name),
            _attr(meta, "MediaStorageSOPClassUID", name) if meta is not None else None]
    return any("Image Storage" in str(getattr(uid, "name", "")) for uid in uids)


def _orientation(ds, name: str) -> np.ndarray | None:
    """ImageOrientationPatient (row then column direction cosines), checked; None if
    absent (no geometry)."""
    value = _attr(ds, "ImageOrientationPatient", name)
    if value is None or (isinstance(value, str) and not value.strip()):
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


def _position(ds, name: str) -> np.ndarray | None:
    """ImagePositionPatient, checked; None if absent."""
    value = _attr(ds, "ImagePositionPatient", name)
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    values = [value] if isinstance(value, (str, bytes, float, int)) else value
    return _floats(values, 3, "ImagePositionPatient", name)


def _slice_position(ds, name: str, iop: np.ndarray | None) -> float | None:
    ipp = _position(ds, name) if iop is not None else None
    if iop is None or ipp is None:
        return None
    return float(np.dot(np.cross(iop[:3], iop[3:]), ipp))


def _geometry(datasets: list, orientations: list, rows: int, columns: int
              ) -> SliceGeometry | None:
    """The slices' geometry (``datasets``: ``(path, dataset)`` in stored order),
    when every slice has one and they share an orientation; else None."""
    positions = [_position(ds, f.name) for f, ds in datasets]
    if any(p is None for p in positions) or any(o is None for o in orientations):
        return None
    if any(np.abs(o - orientations[0]).max() > 1e-3 for o in orientations):
        return None
    f, first = datasets[0]
    return SliceGeometry(np.array(positions), orientations[0],
                         _pixel_spacing(first, f.name), (rows, columns))


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
            meta.geometry = _geometry(datasets, [_orientation(ds, f.name)], *arr.shape[1:])
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
    row_sp, col_sp = _pixel_spacing(first, first_file.name)
    sorted_pos = sorted(p for p in positions if p is not None)
    slice_sp = float(np.median(np.diff(sorted_pos))) if len(sorted_pos) > 1 else 1.0
    volume = np.transpose(stack, (2, 1, 0))  # columns x rows x slices (i, j, k)
    transform = _dicom_transform(orientations[order[0]])
    volume = ornt.apply_orientation(volume, transform)
    spacing = _reorder((col_sp, row_sp, abs(slice_sp) or 1.0), transform)
    meta = ImageMeta(
        "dicom-series",
        spacing,
        source_uids=[_instance_uid(ds, f.name) for f, ds in datasets],
        transform=transform,
        geometry=_geometry(datasets, [orientations[i] for i in order], rows, columns),
    )
    return volume[None].astype(np.float32), meta


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
    remapped = Classes(classes.structures, values, classes.spellings, classes.map_text)
    return remapped.classes_of_values(arr, name)


def _read_dicom_label(path: Path, image_meta: ImageMeta, classes: Classes | None
                      ) -> np.ndarray:
    name = path.name
    ds = _dcmread(path)
    sop_class = _attr(ds, "SOPClassUID", name)
    if sop_class == RTSTRUCT_SOP_CLASS:
        from common.data.rtstruct import MAX_FILE_BYTES, read_rtstruct

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


# A FRACTIONAL segment's voxel is in the structure where its value (0 to 1) is at least this
SEG_FRACTION = 0.5


def _segment_names(segment) -> list[str]:
    """What a SEG segment goes by: its label, then its coded type's meaning and
    ``<scheme>:<code>`` (``SCT:10200004``), when present."""
    names = [str(getattr(segment, "SegmentLabel", "") or "").strip()]
    for code in getattr(segment, "SegmentedPropertyTypeCodeSequence", None) or []:
        names.append(str(getattr(code, "CodeMeaning", "") or "").strip())
        value = str(getattr(code, "CodeValue", "") or "").strip()
        scheme = str(getattr(code, "CodingSchemeDesignator", "") or "").strip()
        if value and scheme:
            names.append(f"{scheme}:{value}")
    return [n for n in names if n] or [f"segment {getattr(segment, 'SegmentNumber', '?')}"]


def _segment_classes(segments, classes: Classes | None, name: str) -> dict[int, int]:
    """Segment number -> the run's class (:func:`common.data.labels.classes_of_named`).

    Without a label map (a run of one structure at a site that has none), every
    segment is the foreground, as before maps existed. A run of one unnamed
    structure takes a SEG's only segment whatever its name."""
    from common.data.labels import classes_of_named

    numbers = [_int_attr(s, "SegmentNumber", name, low=1, high=65535) for s in segments]
    if len(set(numbers)) != len(numbers):
        raise UnreadableFileError(f"DICOM SEG {name} numbers two segments the same")
    if classes is None or classes.value_class is None:
        return dict.fromkeys(numbers, 1)
    found = {n: _segment_names(s) for n, s in zip(numbers, segments, strict=True)}
    unnamed = classes.structures == (FOREGROUND,)  # the run named no structure
    if len(found) == 1 and unnamed and not any(
            classes.class_of_name(n) for n in found[numbers[0]]):
        return {numbers[0]: 1}
    return classes_of_named(found, classes, f"DICOM SEG {name}", "segment")


_NATIVE_SYNTAXES = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2",
                    DEFLATED_SYNTAX}  # pixel data stored as is (after inflating the file)


def _check_seg_complete(ds, header: _PixelHeader, name: str) -> None:
    """Every frame of a SEG is in the file, whichever frames the run reads: a
    file cut short is damaged even where the cut falls in frames of a segment
    the run does not learn, or of slices its image does not have."""
    from pydicom.encaps import generate_frames
    from pydicom.uid import UID

    meta = getattr(ds, "file_meta", None)
    syntax = _attr(meta, "TransferSyntaxUID", name) if meta is not None else None
    try:
        encapsulated = bool(UID(str(syntax)).is_encapsulated) if syntax else False
    except ValueError:
        encapsulated = False
    data = _attr(ds, "PixelData", name)
    shown = f"{header.frames} frame(s) of {header.rows} x {header.columns} pixels"
    if syntax and str(syntax) not in _NATIVE_SYNTAXES and not encapsulated:
        return  # a syntax pydicom does not know (deflated frames): decoding says so
    if not encapsulated:
        bits = header.rows * header.columns * header.frames * header.samples * header.bits
        need = (bits + 7) // 8
        if data is None or len(data) < need:
            raise UnreadableFileError(
                f"DICOM SEG {name} is damaged (truncated?): its pixel data holds "
                f"{0 if data is None else len(data)} bytes, but its {shown} need {need}")
        return
    try:
        found = sum(1 for _ in generate_frames(data, number_of_frames=header.frames))
    except Exception as exc:  # noqa: BLE001 - pydicom's fragment parsing of a cut file
        raise UnreadableFileError(
            f"DICOM SEG {name} is damaged (truncated?): its compressed frames do not "
            f"parse ({type(exc).__name__}: {exc})") from None
    if found < header.frames:
        raise UnreadableFileError(
            f"DICOM SEG {name} is damaged (truncated?): it holds {found} of its {shown}")


def _read_seg(ds, path: Path, image_meta: ImageMeta, classes: Classes | None) -> np.ndarray:
    """The SEG's segments as the run's classes: ``slices x rows x columns`` (or
    ``rows x columns``) uint8 on the image's stored grid. Segments of the same
    class are joined; where segments of two classes overlap, the class later
    in the run's ``structures`` wins (list a structure after the one that
    contains it: ``liver,lesion``)."""
    import highdicom as hd

    name = path.name
    if not _has_pixels(ds):
        raise UnreadableFileError(f"DICOM SEG {name} holds no pixel data: the file is "
                                  f"damaged (truncated?) or not a segmentation")
    header = _pixel_header(ds, name)
    _check_seg_complete(ds, header, name)
    segments = _attr(ds, "SegmentSequence", name)
    if not segments:
        raise UnreadableFileError(f"DICOM SEG {name} describes no segment (SegmentSequence)")
    # the label is read as slices x rows x columns x segments before segments merge
    slices = len(image_meta.source_uids) or header.frames
    _check_size((slices, header.rows, header.columns, len(segments)), name,
                shown=f"{slices} slices of {header.rows} x {header.columns} pixels x "
                      f"{len(segments)} segments")
    _check_codestreams(ds, header, name)
    segment_class = _segment_classes(segments, classes, name)
    numbers = sorted(segment_class)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            seg = hd.seg.Segmentation.from_dataset(ds, copy=False)
            if image_meta.source_uids:
                referenced = {uid for _, _, uid in seg.get_source_image_uids()}
                if not referenced & set(image_meta.source_uids):
                    raise UnsupportedFormatError(
                        f"DICOM SEG {name} does not reference any slice of its image "
                        f"series: it belongs to another series"
                    )
                pixels = seg.get_pixels_by_source_instance(
                    source_sop_instance_uids=image_meta.source_uids,
                    segment_numbers=numbers,
                    combine_segments=False,
                    ignore_spatial_locations=True,
                    assert_missing_frames_are_empty=True,
                )  # slices x rows x cols x segments, in the image's slice order
            else:
                pixels = seg.get_volume(segment_numbers=numbers, combine_segments=False).array
    except DataError:
        raise
    except MemoryError:
        raise
    except Exception as exc:
        raise UnreadableFileError(
            f"cannot read DICOM SEG {name} against its image ({type(exc).__name__}: {exc})"
        ) from None
    pixels = np.asarray(pixels)
    inside = pixels >= SEG_FRACTION if pixels.dtype.kind == "f" else pixels > 0
    out = np.zeros(inside.shape[:-1], np.uint8)
    for cls in sorted(set(segment_class.values())):  # later structures over earlier ones
        members = [k for k, n in enumerate(numbers) if segment_class[n] == cls]
        out[inside[..., members].any(axis=-1)] = cls
    return out


def _on_image_grid(pixels: np.ndarray, image_meta: ImageMeta) -> np.ndarray:
    """A DICOM label read on its image's stored grid (``slices x rows x
    columns``) onto the grid the image reader returned (see :func:`_read_dicom_series`)."""
    if image_meta.transform is not None and pixels.ndim == 3:
        volume = np.transpose(pixels, (2, 1, 0))
        if len(image_meta.source_uids) > 1:
            volume = ornt.apply_orientation(volume, image_meta.transform)
        return np.ascontiguousarray(volume)  # no negative strides: torch takes it as is
    return np.ascontiguousarray(np.squeeze(pixels))


def check_pair(image: np.ndarray, label: np.ndarray) -> None:
    """Raise :class:`ShapeMismatchError` unless image and label share a grid."""
    if image.shape[1:] != label.shape[1:]:
        raise ShapeMismatchError(
            f"image is {tuple(image.shape[1:])} but label is {tuple(label.shape[1:])}"
        )
