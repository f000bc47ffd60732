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

One module per format (:mod:`.pil`, :mod:`.nifti`, :mod:`.dicom`, :mod:`.seg`;
RTSTRUCT is :mod:`common.data.rtstruct`), the checks made before decoding in
:mod:`.guards`, what they share in :mod:`.base`; :func:`read_image` and
:func:`read_label` pick the reader by the file's kind.
"""

from __future__ import annotations

from common.data.readers.base import (
    DEFLATED_SYNTAX,
    LABELMAP_SEG_SOP_CLASS,
    NIFTI_SUFFIXES,
    PIL_FORMATS,
    PIL_SUFFIXES,
    RTSTRUCT_SOP_CLASS,
    SEG_SOP_CLASS,
    ImageMeta,
    SliceGeometry,
    file_kind,
)
from common.data.readers.dicom import _dcmread, _on_image_grid
from common.data.readers.image import check_pair, read_image
from common.data.readers.label import LOSSY_SUFFIXES, read_label
from common.data.readers.seg import SEG_FRACTION

# Size limits, checked from the headers before any pixel is decoded (.guards reads
# them here when it checks a file, so setting them here changes every reader).
# MAX_VALUES: voxels x channels of one image or label: 2**28, 1 GiB as float32
# (a 512 x 512 x 1024 CT, a 16384 x 16384 grey image). MAX_BYTES: stored bytes of
# one file's pixel data once out of gzip / deflate: 1 GiB (MAX_VALUES at 32 bits,
# half of it at 64). Reading an image at the limits takes about 2 GiB of memory.
MAX_VALUES = 1 << 28
MAX_BYTES = 1 << 30

__all__ = [
    "DEFLATED_SYNTAX", "LABELMAP_SEG_SOP_CLASS", "LOSSY_SUFFIXES", "MAX_BYTES", "MAX_VALUES",
    "NIFTI_SUFFIXES", "PIL_FORMATS", "PIL_SUFFIXES", "RTSTRUCT_SOP_CLASS", "SEG_FRACTION",
    "SEG_SOP_CLASS", "ImageMeta", "SliceGeometry", "_dcmread", "_on_image_grid", "check_pair",
    "file_kind", "read_image", "read_label",
]
