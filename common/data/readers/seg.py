"""DICOM SEG labels, through highdicom: segments found by name in the site's
label map, read onto the image series' stored grid."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from pydicom.multival import MultiValue

from common.config import FOREGROUND
from common.data.dicom_values import _attr, _int_attr
from common.data.labels import Classes, classes_of_named
from common.data.readers.base import DEFLATED_SYNTAX, ImageMeta
from common.data.readers.dicom import _has_pixels, _sequence
from common.data.readers.guards import (
    _check_codestreams,
    _check_size,
    _pixel_header,
    _PixelHeader,
)
from common.errors import DataError, UnreadableFileError, UnsupportedFormatError

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


def _check_frame_references(ds, image_uid: str, frames: tuple[int, ...], name: str) -> None:
    """Each frame of a SEG drawn on a multi-frame image names one of its
    frames (ReferencedFrameNumber): a frame that names none, or one the
    image does not have, would be read as an empty slice without a word."""
    named: set[int] = set()
    for item in _sequence(ds, "PerFrameFunctionalGroupsSequence", name):
        for derivation in _sequence(item, "DerivationImageSequence", name):
            for source in _sequence(derivation, "SourceImageSequence", name):
                if str(_attr(source, "ReferencedSOPInstanceUID", name, "")).strip() != image_uid:
                    continue
                value = _attr(source, "ReferencedFrameNumber", name)
                values = [] if value in (None, "") else (
                    list(value) if isinstance(value, (list, tuple, MultiValue)) else [value])
                if not values:
                    raise UnsupportedFormatError(
                        f"DICOM SEG {name} references its multi-frame image without saying "
                        f"which frame (ReferencedFrameNumber): it cannot be placed on it")
                named.update(int(v) for v in values)
    outside = sorted(named - set(frames))
    if outside or not named:
        raise UnsupportedFormatError(
            f"DICOM SEG {name} references frame(s) {outside[:5]} of its image, which has "
            f"frames 1 to {len(frames)}: it was drawn on another image" if outside else
            f"DICOM SEG {name} references no frame of its multi-frame image")


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
    frames = image_meta.frames  # one multi-frame image: its frames in position order
    slices = len(frames) if frames else len(image_meta.source_uids) or header.frames
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
                how = {"segment_numbers": numbers, "combine_segments": False,
                       "ignore_spatial_locations": True, "assert_missing_frames_are_empty": True}
                if frames:
                    _check_frame_references(ds, image_meta.source_uids[0], frames, name)
                    pixels = seg.get_pixels_by_source_frame(
                        source_sop_instance_uid=image_meta.source_uids[0],
                        source_frame_numbers=list(frames), **how)
                else:
                    pixels = seg.get_pixels_by_source_instance(
                        source_sop_instance_uids=image_meta.source_uids, **how)
                # slices x rows x cols x segments, in the image's slice order
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
