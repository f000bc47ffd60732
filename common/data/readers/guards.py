"""Hostile-file guards: what is checked from a file's headers before any pixel
is decoded, so that a corrupt size field cannot make a reader allocate
gigabytes or decode for minutes.

The limits are the package's :data:`common.data.readers.MAX_VALUES` and
:data:`common.data.readers.MAX_BYTES`, read when a file is checked (one place
to change them)."""

from __future__ import annotations

import io
import math
import os
import struct
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

from common.data.dicom_values import _attr, _int_attr, _show
from common.data.readers.base import DEFLATED_SYNTAX
from common.errors import DataError, UnreadableFileError, UnsupportedFormatError

# deflate (gzip, deflated DICOM) cannot expand data more than 1032-fold
_DEFLATE_MAX_RATIO = 1032


def _limits() -> tuple[int, int]:
    """``(MAX_VALUES, MAX_BYTES)`` as the package holds them now."""
    package = sys.modules[__package__]
    return package.MAX_VALUES, package.MAX_BYTES


def _check_size(dims: tuple[int, ...], name: str, itemsize: int = 1,
                shown: str | None = None) -> None:
    """Refuse, before decoding, an image whose header claims no pixels or too many."""
    shown = shown or " x ".join(str(d) for d in dims)
    if any(d <= 0 for d in dims):
        raise UnreadableFileError(
            f"the header of {name} says the image is {shown}: no pixels (corrupt header?)")
    values = math.prod(dims)
    max_values, max_bytes = _limits()
    if values > max_values or values * itemsize > max_bytes:
        raise UnsupportedFormatError(
            f"the header of {name} says the image is {shown} = {values:,} values "
            f"({values * itemsize / 2**30:.3g} GiB stored); fedseg reads at most "
            f"{max_values:,} values and {max_bytes >> 30} GiB per image: if the size is real, "
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


def _check_deflated(path: Path) -> None:
    """pydicom inflates a deflated DICOM file whole when it opens it: refuse one that
    would inflate to more than ``MAX_BYTES`` (a deflate bomb) first."""
    try:
        from pydicom.filereader import _read_file_meta_info, read_preamble

        with open(path, "rb") as fp:
            read_preamble(fp, False)
            syntax = _read_file_meta_info(fp).get("TransferSyntaxUID")
            if syntax != DEFLATED_SYNTAX:
                return
            inflater = zlib.decompressobj(-zlib.MAX_WBITS)
            max_bytes = _limits()[1]
            total = 0
            while (chunk := fp.read(1 << 20)) and not inflater.eof:
                while chunk and not inflater.eof:
                    total += len(inflater.decompress(chunk, 1 << 24))
                    if total > max_bytes:
                        raise UnsupportedFormatError(
                            f"deflated DICOM file {path.name} inflates to more than "
                            f"{max_bytes >> 30} GiB, more than fedseg reads (a corrupt or "
                            f"hostile file?)")
                    chunk = inflater.unconsumed_tail
    except DataError:
        raise
    except Exception:  # noqa: BLE001 - no readable file meta: dcmread says what is wrong
        return


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
