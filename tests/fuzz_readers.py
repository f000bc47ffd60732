"""Fuzzing the readers with mutated and truncated files (issue 17, item 5).

* :func:`build_seeds` writes seed cases: synthetic DICOM series with their DICOM
  SEG and NIfTI labels, NIfTI, PNG and JPEG images, and, when ``../shared/data``
  is given, real DICOM files in many transfer syntaxes, a real DICOM SEG with
  its CT series and retina fundus images (paired with labels made to fit).
* :func:`plan` draws, from fixed seeds, which file of which case to mutate and
  how: truncation, byte and bit flips, window overwrites, and hostile header
  values (DICOM attributes set with pydicom, NIfTI header fields, PNG chunks,
  JPEG / JPEG 2000 codestream sizes).
* :func:`run` feeds every mutated case through ``common.data.site.load_case``
  in child processes (an address-space limit, a per-input alarm, a watchdog
  that kills a stuck child and restarts it after the input) and gathers each
  outcome: a case loaded, a data error naming the case, or anything else.

Each input's files are written in a scratch folder outside the project and
deleted after the input is read. ``python tests/fuzz_readers.py child SPEC
SHARD OUT`` is the child.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
GIB = 1 << 30

# ------------------------------------------------------------------------------ seeds


def _png_label(path: Path, shape: tuple[int, int]) -> None:
    from PIL import Image

    arr = np.zeros(shape, np.uint8)
    arr[shape[0] // 4: shape[0] // 2, shape[1] // 4: shape[1] // 2] = 255
    Image.fromarray(arr).save(path)


def _nifti(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> None:
    import nibabel as nib

    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))


def _seed(name, image, label, image_kind, label_kind) -> dict:
    return {"name": name, "case_id": f"case-{name}", "image": str(image), "label": str(label),
            "image_kind": image_kind, "label_kind": label_kind}


def synthetic_seeds(work: Path) -> list[dict]:
    """Seed cases made here: DICOM series + SEG, series + NIfTI, NIfTI, PNG, JPEG."""
    from PIL import Image

    from common.data.synthetic import write_site

    seeds = []
    for site, label_kind in ((0, "seg"), (1, "nifti")):
        folder = write_site(work / f"synthetic-{site}", site, n_train=1, n_test=0, seed=17)
        series = folder / "imagesTr" / "case_tr000"
        label = next((folder / "labelsTr").iterdir())
        seeds.append(_seed(f"synthetic-series-{label_kind}", series, label, "series", label_kind))
    # the SEG against a NIfTI copy of its series (a label without source slices to match)
    from common.data.readers import read_image

    volume, meta = read_image(work / "synthetic-0" / "imagesTr" / "case_tr000")
    _nifti(work / "series.nii.gz", volume[0], np.diag([*meta.spacing, 1.0]))
    seeds.append(_seed("nifti-image-seg-label", work / "series.nii.gz",
                       seeds[0]["label"], "nifti", "seg"))
    # one slice of the series on its own, with a PNG label
    one = sorted((work / "synthetic-0" / "imagesTr" / "case_tr000").iterdir())[0]
    _png_label(work / "slice-label.png", (64, 64))
    seeds.append(_seed("synthetic-slice", one, work / "slice-label.png", "dicom", "pil"))

    rng = np.random.default_rng(17)
    affine = np.diag([-2.0, 1.0, 3.0, 1.0])
    volume = rng.normal(100, 20, (24, 20, 6)).astype(np.int16)
    mask = (volume > 110).astype(np.uint8)
    _nifti(work / "volume.nii.gz", volume, affine)
    _nifti(work / "volume.nii", volume.astype(np.float32), affine)
    _nifti(work / "volume-label.nii.gz", mask, affine)
    seeds.append(_seed("nifti-gz", work / "volume.nii.gz", work / "volume-label.nii.gz",
                       "nifti", "nifti"))
    seeds.append(_seed("nifti-raw", work / "volume.nii", work / "volume-label.nii.gz",
                       "nifti", "nifti"))

    grey = rng.integers(0, 255, (48, 64), dtype=np.uint8)
    Image.fromarray(grey).save(work / "grey.png")
    Image.fromarray(grey.astype(np.uint16) * 200).save(work / "grey16.png")
    Image.fromarray(np.stack([grey, grey[::-1], grey[:, ::-1]], -1)).save(
        work / "rgb.jpg", quality=90)
    _png_label(work / "label.png", (48, 64))
    Image.fromarray((grey > 128).astype(np.uint8)).convert("P").save(work / "label-p.png")
    seeds += [
        _seed("png-grey", work / "grey.png", work / "label.png", "pil", "pil"),
        _seed("png-16bit", work / "grey16.png", work / "label-p.png", "pil", "pil"),
        _seed("jpeg-rgb", work / "rgb.jpg", work / "label.png", "pil", "pil"),
    ]
    return seeds


TF = "pydicom_testfiles/test_files"
PD = "pydicom_data/data"
# real single DICOM images: (name, file); each gets a PNG (2D) or NIfTI (multi-frame) label
REAL_IMAGES = [
    ("ct-uncompressed", f"{TF}/CT_small.dcm"),
    ("mr-rle", f"{TF}/MR_small_RLE.dcm"),
    ("mr-j2k-lossless", f"{TF}/MR_small_jp2klossless.dcm"),
    ("j2k-lossy", f"{TF}/JPEG2000.dcm"),
    ("mr-jpeg-ls", f"{TF}/MR_small_jpeg_ls_lossless.dcm"),
    ("mr-big-endian", f"{TF}/MR_small_bigendian.dcm"),
    ("mr-implicit", f"{TF}/MR_small_implicit.dcm"),
    ("rgb-jpeg-baseline", f"{TF}/SC_rgb_jpeg_dcmtk.dcm"),
    ("rgb-rle", f"{TF}/SC_rgb_rle.dcm"),
    ("rgb-odd", f"{TF}/SC_rgb_small_odd.dcm"),
    ("deflated", f"{TF}/image_dfl.dcm"),
    ("jpeg-lossless", f"{PD}/JPGLosslessP14SV1_1s_1f_8b.dcm"),
    ("multiframe", f"{PD}/emri_small.dcm"),
    ("multiframe-rle", f"{PD}/emri_small_RLE.dcm"),
    ("multiframe-j2k", f"{PD}/emri_small_jpeg_2k_lossless.dcm"),
    ("enhanced-ct", f"{PD}/eCT_Supplemental.dcm"),  # functional groups
    ("highdicom-ct", "highdicom_seg/test_files/ct_image.dcm"),
]
REAL_SEGS = [
    ("seg-binary", "highdicom_seg/test_files/seg_image_ct_binary.dcm"),
    ("seg-overlap", "highdicom_seg/test_files/seg_image_ct_binary_overlap.dcm"),
    ("seg-fractional", "highdicom_seg/test_files/seg_image_ct_true_fractional.dcm"),
]
CT2 = f"{TF}/dicomdirtests/77654033/CT2"


def real_seeds(work: Path, dicom: Path, retina: Path | None) -> list[dict]:
    """Seed cases from the real files (read in place; only labels are written here)."""
    from common.data.readers import read_image

    seeds = []
    for name, rel in REAL_IMAGES:
        image, _ = read_image(dicom / rel)  # a seed that does not load is a test bug
        spatial = image.shape[1:]
        if len(spatial) == 2:
            label = work / f"{name}-label.png"
            _png_label(label, spatial)
            seeds.append(_seed(name, dicom / rel, label, "dicom", "pil"))
        else:
            label = work / f"{name}-label.nii.gz"
            mask = np.zeros(spatial, np.uint8)
            mask[: spatial[0] // 2] = 1
            _nifti(label, mask)
            seeds.append(_seed(name, dicom / rel, label, "dicom", "nifti"))
    # the CT series the highdicom SEGs reference, as a folder of links to the real slices
    series = work / "ct2"
    series.mkdir()
    for f in sorted((dicom / CT2).iterdir()):
        (series / f.name).symlink_to(f)
    for name, rel in REAL_SEGS:
        seeds.append(_seed(name, series, dicom / rel, "series", "seg"))
    if retina is not None:
        chase, stare = retina / "chase_db1", retina / "stare"
        seeds.append(_seed("chase", chase / "Image_01L.jpg", chase / "Image_01L_1stHO.png",
                           "pil", "pil"))
        entry = json.loads((stare / "dataset.json").read_text())["training"][0]
        seeds.append(_seed("stare", stare / entry["image"], stare / entry["label"], "pil", "pil"))
    return seeds


def build_seeds(work: Path, dicom: Path | None = None, retina: Path | None = None) -> list[dict]:
    """Synthetic seeds, or (given ``dicom``) the seeds made from the real files."""
    work.mkdir(parents=True, exist_ok=True)
    return synthetic_seeds(work) if dicom is None else real_seeds(work, dicom, retina)


# -------------------------------------------------------------------------- mutations

BYTE_MUTATIONS = ["truncate", "truncate", "flip_bytes", "flip_bits", "overwrite",
                  "fill_window", "header_flips", "huge_length", "insert", "delete"]
SEMANTIC = {
    "dicom": ["dicom_attr", "dicom_attr", "dicom_attr", "dicom_attrs", "codestream"],
    "seg": ["dicom_attr", "seg_attr", "seg_attr", "seg_attrs", "dicom_attrs"],
    "nifti": ["nifti_header", "nifti_header", "nifti_header", "nifti_headers"],
    "png": ["png_chunk", "png_chunk", "png_chunk"],
    "jpeg": ["codestream", "codestream"],
}


def file_kind(path: str, label_kind: str | None = None) -> str:
    name = path.lower()
    if name.endswith((".nii", ".nii.gz")):
        return "nifti"
    if name.endswith(".png"):
        return "png"
    if name.endswith((".jpg", ".jpeg")):
        return "jpeg"
    return "seg" if label_kind == "seg" else "dicom"


def plan(seeds: list[dict], per_target: int, master: int = 17) -> list[dict]:
    """Inputs: each seed unmutated once, then ``per_target`` mutations of its image
    (one slice, for a series) and of its label, half byte-level, half semantic."""
    inputs = []
    for s_index, seed in enumerate(seeds):
        inputs.append({"seed": seed["name"], "target": "none", "mutation": "none", "rng": 0})
        for target in ("image", "label"):
            kind = file_kind(seed[target], seed["label_kind"] if target == "label" else None)
            rng = np.random.default_rng([master, s_index, target == "label"])
            for n in range(per_target):
                table = BYTE_MUTATIONS if n % 2 == 0 else SEMANTIC[kind]
                inputs.append({"seed": seed["name"], "target": target,
                               "mutation": str(table[rng.integers(len(table))]),
                               "rng": int(rng.integers(1 << 31))})
    for i, item in enumerate(inputs):
        item["i"] = i
    return inputs


def byte_mutation(data: bytes, how: str, rng: np.random.Generator) -> bytes:
    buf = bytearray(data)
    n = len(buf)
    if how == "truncate":
        r = rng.random()
        if r < 0.1 or n == 0:
            return b""
        if r < 0.3:
            return bytes(buf[: max(0, n - int(rng.integers(1, min(n, 64) + 1)))])
        return bytes(buf[: int(rng.integers(0, n))])
    if n == 0:
        return data
    if how == "flip_bytes":
        for pos in rng.integers(0, n, int(rng.integers(1, 17))):
            buf[pos] = int(rng.integers(256))
    elif how == "flip_bits":
        for pos in rng.integers(0, n, int(rng.integers(1, 9))):
            buf[pos] ^= 1 << int(rng.integers(8))
    elif how == "header_flips":  # the first KiB holds the headers that steer a reader
        top = min(n, 1024)
        for pos in rng.integers(0, top, int(rng.integers(1, 9))):
            buf[pos] = int(rng.choice([0, 0xFF, 0x7F, 0x80, int(rng.integers(256))]))
    elif how in ("overwrite", "fill_window"):
        size = int(rng.integers(4, 257))
        pos = int(rng.integers(0, n))
        fill = (rng.integers(0, 256, size, dtype=np.uint8).tobytes() if how == "overwrite"
                else bytes([int(rng.choice([0, 0xFF]))]) * size)
        buf[pos: pos + size] = fill[: n - pos]
    elif how == "huge_length":  # a length or size field claiming gigabytes
        top = min(n, 2048) if rng.random() < 0.7 else n
        pos = int(rng.integers(0, max(1, top - 4)))
        value = int(rng.choice([0x7FFFFFF0, 0xFFFFFFF0, 0x40000000, 0xFFFFFFFF]))
        buf[pos: pos + 4] = struct.pack(str(rng.choice(["<I", ">I"])), value)[: n - pos]
    elif how == "insert":
        pos = int(rng.integers(0, n))
        buf[pos:pos] = rng.integers(0, 256, int(rng.integers(1, 65)), dtype=np.uint8).tobytes()
    elif how == "delete":
        pos = int(rng.integers(0, n))
        del buf[pos: pos + int(rng.integers(1, 65))]
    return bytes(buf)


# DICOM attributes a hostile or broken writer gets wrong: (keyword, value, VR to write
# it with when the value does not fit the attribute's own VR).
BIG = 65535
DICOM_ATTRS = [
    ("Rows", 0, None), ("Rows", BIG, None), ("Rows", 1, None), ("Rows", -1, "SL"),
    ("Rows", "abc", "LO"), ("Rows", [64, 64], None),
    ("Columns", 0, None), ("Columns", BIG, None), ("Columns", 3, None), ("Columns", -5, "SS"),
    ("BitsAllocated", 0, None), ("BitsAllocated", 1, None), ("BitsAllocated", 7, None),
    ("BitsAllocated", 12, None), ("BitsAllocated", 33, None), ("BitsAllocated", 64, None),
    ("BitsAllocated", BIG, None), ("BitsStored", 0, None), ("BitsStored", 40, None),
    ("HighBit", 200, None), ("HighBit", 0, None),
    ("NumberOfFrames", "100000", None), ("NumberOfFrames", "-1", None),
    ("NumberOfFrames", "abc", None), ("NumberOfFrames", "0", None),
    ("NumberOfFrames", "2147483647", None), ("NumberOfFrames", "1e9", None),
    ("NumberOfFrames", "", None), ("NumberOfFrames", "2", None),
    ("SamplesPerPixel", 0, None), ("SamplesPerPixel", 2, None), ("SamplesPerPixel", 3, None),
    ("SamplesPerPixel", 4, None), ("SamplesPerPixel", BIG, None),
    ("PixelSpacing", ["abc", "def"], None), ("PixelSpacing", ["nan", "inf"], None),
    ("PixelSpacing", ["0", "0"], None), ("PixelSpacing", ["-1", "1"], None),
    ("PixelSpacing", ["1"], None), ("PixelSpacing", ["1", "2", "3"], None),
    ("PixelSpacing", ["1e400", "1"], None), ("PixelSpacing", "", None),
    ("PhotometricInterpretation", "FOO", None),
    ("PhotometricInterpretation", "PALETTE COLOR", None),
    ("PhotometricInterpretation", "YBR_FULL_422", None),
    ("PhotometricInterpretation", "MONOCHROME1", None),
    ("PhotometricInterpretation", "RGB", None), ("PhotometricInterpretation", "", None),
    ("TransferSyntaxUID", "1.2.840.10008.1.2.4.90", None),  # JPEG 2000 lossless
    ("TransferSyntaxUID", "1.2.840.10008.1.2.4.50", None),  # JPEG baseline
    ("TransferSyntaxUID", "1.2.840.10008.1.2.5", None),  # RLE
    ("TransferSyntaxUID", "1.2.840.10008.1.2.2", None),  # explicit big endian
    ("TransferSyntaxUID", "1.2.840.10008.1.2", None),  # implicit little endian
    ("TransferSyntaxUID", "1.2.840.10008.1.2.1", None),  # explicit little endian
    ("TransferSyntaxUID", "1.2.840.10008.1.2.1.99", None),  # deflated
    ("TransferSyntaxUID", "1.2.3.4.5", None),
    ("PixelRepresentation", 1, None), ("PixelRepresentation", 2, None),
    ("PixelRepresentation", BIG, None), ("PlanarConfiguration", 1, None),
    ("PlanarConfiguration", 7, None),
    ("RescaleSlope", "nan", None), ("RescaleSlope", "inf", None), ("RescaleSlope", "1e308", None),
    ("RescaleSlope", "abc", None), ("RescaleIntercept", "abc", None),
    ("RescaleSlope", ["1", "2"], None),
    ("ImageOrientationPatient", ["a", "b", "c", "d", "e", "f"], None),
    ("ImageOrientationPatient", [0, 0, 0, 0, 0, 0], None),
    ("ImageOrientationPatient", [1, 0, 0], None),
    ("ImageOrientationPatient", ["nan", 0, 0, 0, 1, 0], None),
    ("ImageOrientationPatient", [1, 0, 0, 1, 0, 0], None),
    ("ImagePositionPatient", ["x", "y", "z"], None), ("ImagePositionPatient", [0, 0], None),
    ("ImagePositionPatient", ["nan", "inf", "-inf"], None),
    ("SliceThickness", "abc", None), ("InstanceNumber", "abc", None),
    ("InstanceNumber", "", None), ("InstanceNumber", "99999999999999999999", None),
    ("SOPInstanceUID", None, None), ("SOPInstanceUID", "", None),
    ("SOPClassUID", "1.2.840.10008.5.1.4.1.1.66.4", None), ("SOPClassUID", None, None),
    ("SeriesInstanceUID", "1.2.3.999", None), ("SeriesInstanceUID", None, None),
    ("Rows", None, None), ("Columns", None, None), ("BitsAllocated", None, None),
    ("PhotometricInterpretation", None, None), ("SamplesPerPixel", None, None),
    ("PixelData", None, None), ("PixelData", b"", None), ("PixelData", b"\x00", None),
    ("PixelData", "double", None), ("FloatPixelData", b"\x00" * 64, None),
    ("ModalityLUTSequence", [], None), ("VOILUTFunction", "SIGMOID", None),
]
SEG_ATTRS = [
    ("SegmentSequence", None, None), ("SegmentSequence", [], None),
    ("PerFrameFunctionalGroupsSequence", None, None),
    ("PerFrameFunctionalGroupsSequence", "drop_last", None),
    ("PerFrameFunctionalGroupsSequence", "drop_first_half", None),
    ("PerFrameFunctionalGroupsSequence", "empty_items", None),
    ("SharedFunctionalGroupsSequence", None, None),
    ("ReferencedSeriesSequence", None, None), ("ReferencedSeriesSequence", [], None),
    ("SegmentationType", "FOO", None), ("SegmentationType", "FRACTIONAL", None),
    ("SegmentationType", "LABELMAP", None),
    ("MaximumFractionalValue", 0, None), ("SegmentationFractionalType", "FOO", None),
    ("NumberOfFrames", "100000", None), ("NumberOfFrames", "1", None),
    ("NumberOfFrames", "0", None), ("NumberOfFrames", "abc", None),
    ("Rows", BIG, None), ("Columns", BIG, None), ("Rows", 0, None),
    ("BitsAllocated", 8, None), ("BitsAllocated", 16, None), ("BitsAllocated", 64, None),
    ("DimensionIndexSequence", None, None), ("DimensionOrganizationSequence", None, None),
    ("frame:ReferencedSegmentNumber", 99, None), ("frame:ReferencedSegmentNumber", 0, None),
    ("frame:ReferencedSOPInstanceUID", "1.2.3.4", None),
    ("frame:ReferencedSOPInstanceUID", None, None),
    ("frame:DimensionIndexValues", [9999, 9999], None),
    ("frame:DimensionIndexValues", None, None),
    ("frame:ImagePositionPatient", ["nan", "x", "1"], None),
    ("frame:ImagePositionPatient", None, None),
    ("frame:DerivationImageSequence", None, None),
    ("frame:SegmentIdentificationSequence", None, None),
    ("shared:PixelSpacing", ["0", "0"], None), ("shared:PixelSpacing", ["abc", "1"], None),
    ("shared:ImageOrientationPatient", [0, 0, 0, 0, 0, 0], None),
    ("shared:PixelMeasuresSequence", None, None),
    ("shared:PlaneOrientationSequence", None, None),
    ("segment:SegmentNumber", 7, None), ("segment:SegmentNumber", 0, None),
    ("segment:SegmentedPropertyTypeCodeSequence", None, None),
    ("FrameOfReferenceUID", "1.2.3", None), ("FrameOfReferenceUID", None, None),
    ("SOPInstanceUID", None, None), ("SeriesInstanceUID", "1.2.3.999", None),
]


def _set(ds, keyword: str, value, vr: str | None) -> None:
    from pydicom.datadict import dictionary_VR, tag_for_keyword
    from pydicom.dataelem import DataElement

    if value is None:
        if keyword in ds:
            delattr(ds, keyword)
        return
    tag = tag_for_keyword(keyword)
    vr = (vr or dictionary_VR(tag)).split(" or ")[0]
    if vr == "SQ":
        value = list(value)
    elif value == "double" and keyword == "PixelData":
        value = ds.PixelData + ds.PixelData
    elif vr in ("DS", "IS") and not _numeric(value):
        vr = "LO"  # pydicom will not write "abc" as a number; the bytes are the same
    ds[tag] = DataElement(tag, vr, value)


def _numeric(value) -> bool:
    try:
        [float(v) for v in (value if isinstance(value, list) else [value])]
    except (TypeError, ValueError):
        return False
    return True


def _seg_set(ds, spec: str, value, vr, rng) -> None:
    from pydicom.sequence import Sequence

    where, _, keyword = spec.partition(":")
    if not keyword:  # a top-level attribute, or an edit of a whole sequence
        if isinstance(value, str) and spec.endswith("Sequence"):
            seq = ds.get(spec)
            if seq is not None and len(seq):
                items = list(seq)
                if value == "drop_last":
                    items = items[:-1]
                elif value == "drop_first_half":
                    items = items[len(items) // 2:]
                elif value == "empty_items":
                    from pydicom.dataset import Dataset

                    items = [Dataset() for _ in items]
                ds[spec].value = Sequence(items)
            return
        _set(ds, spec, value, vr)
        return
    if where == "frame":
        groups = list(ds.get("PerFrameFunctionalGroupsSequence", []))
        targets = [groups[int(rng.integers(len(groups)))]] if groups else []
    elif where == "shared":
        targets = list(ds.get("SharedFunctionalGroupsSequence", []))
    else:
        segs = list(ds.get("SegmentSequence", []))
        targets = segs[:1]
    for item in targets:
        for found in list(_find(item, keyword)):
            _set(found, keyword, value, vr)
        if where == "shared" and keyword.endswith("Sequence") and value is None:
            _set(item, keyword, None, None)


def _find(ds, keyword: str):
    """Datasets (``ds`` or nested in it) that hold ``keyword``."""
    if keyword in ds:
        yield ds
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value:
                yield from _find(item, keyword)


def dicom_mutation(data: bytes, how: str, rng: np.random.Generator, seg: bool) -> bytes:
    """Hostile attribute values set with pydicom (with its value checks off while it
    writes them; the readers then run with pydicom's settings as they were)."""
    from pydicom import config

    if how == "codestream":
        return codestream_mutation(data, rng)
    saved = config.settings.reading_validation_mode, config.settings.writing_validation_mode
    config.settings.reading_validation_mode = config.IGNORE
    config.settings.writing_validation_mode = config.IGNORE
    try:
        return _dicom_mutation(data, how, rng, seg)
    finally:
        (config.settings.reading_validation_mode,
         config.settings.writing_validation_mode) = saved


def _dicom_mutation(data: bytes, how: str, rng: np.random.Generator, seg: bool) -> bytes:
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(data), force=True)
    if how in ("dicom_attrs", "seg_attrs"):
        count = int(rng.integers(2, 5))
    else:
        count = 1
    table = SEG_ATTRS if how.startswith("seg") else DICOM_ATTRS
    new_syntax = None
    for _ in range(count):
        keyword, value, vr = table[int(rng.integers(len(table)))]
        if keyword == "TransferSyntaxUID":
            new_syntax = value
        elif seg or ":" in keyword or keyword.endswith("Sequence"):
            _seg_set(ds, keyword, value, vr, rng)
        else:
            _set(ds, keyword, value, vr)
    out = io.BytesIO()
    try:
        ds.save_as(out, enforce_file_format=False)
    except ValueError:  # native pixel data set under a compressed syntax: write it anyway
        new_syntax = new_syntax or ds.file_meta.TransferSyntaxUID
        ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
        out = io.BytesIO()
        ds.save_as(out, enforce_file_format=False)
    data = out.getvalue()
    if new_syntax is not None:  # a wrong transfer syntax: new file meta, same body
        data = _with_syntax(data, new_syntax)
    return data


def _split_meta(data: bytes):
    """``(file meta dataset, the bytes after it)`` of a DICOM file."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filereader import _read_file_meta_info, read_preamble

    fp = DicomBytesIO(data)
    read_preamble(fp, False)
    meta = _read_file_meta_info(fp)
    return meta, data[fp.tell():]


def deflated_body(data: bytes) -> bytes:
    """The (deflated) data set of a DICOM file, after its file meta."""
    return _split_meta(data)[1]


def _with_syntax(data: bytes, syntax: str) -> bytes:
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_file_meta_info

    meta, body = _split_meta(data)
    meta.TransferSyntaxUID = syntax
    out = DicomBytesIO()
    out.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(out, meta, enforce_standard=False)
    return out.getvalue() + body


def codestream_mutation(data: bytes, rng: np.random.Generator) -> bytes:
    """Claim a huge, zero or odd image size in a JPEG / JPEG-LS SOF or a JPEG 2000
    SIZ marker (in a JPEG file or in the codestream inside a DICOM file)."""
    buf = bytearray(data)
    sizes = [0, 1, 0xFFFF, 0x7FFF, 40000]
    hits = []
    for marker in (b"\xff\xc0", b"\xff\xc1", b"\xff\xc2", b"\xff\xc3", b"\xff\xf7"):
        start = 0
        while (pos := buf.find(marker, start)) >= 0:
            hits.append(("sof", pos))
            start = pos + 2
    pos = buf.find(b"\xff\x4f\xff\x51")  # J2K SOC then SIZ
    if pos >= 0:
        hits.append(("siz", pos + 2))
    if not hits:
        return byte_mutation(data, "header_flips", rng)
    kind, pos = hits[int(rng.integers(len(hits)))]
    if kind == "sof" and pos + 10 <= len(buf):
        # FFCx, length(2), precision(1), height(2), width(2), components(1)
        choice = int(rng.integers(4))
        if choice == 0:
            struct.pack_into(">HH", buf, pos + 5, int(rng.choice(sizes)), int(rng.choice(sizes)))
        elif choice == 1:
            buf[pos + 9] = int(rng.choice([0, 2, 4, 255]))
        elif choice == 2:
            buf[pos + 4] = int(rng.choice([0, 1, 7, 12, 16, 255]))
        else:
            struct.pack_into(">HH", buf, pos + 5, 0xFFFF, 0xFFFF)
            buf[pos + 9] = 4
    elif kind == "siz" and pos + 42 <= len(buf):
        # FF51, Lsiz(2), Rsiz(2), Xsiz(4), Ysiz(4), XOsiz(4), YOsiz(4), XTsiz, YTsiz, ..., Csiz(2)
        choice = int(rng.integers(4))
        if choice == 3:  # 1 x 1 pixel tiles: millions of tiles
            struct.pack_into(">II", buf, pos + 22, 1, 1)
        elif choice == 0:
            struct.pack_into(">II", buf, pos + 6, 0x7FFFFFFF, 0x7FFFFFFF)
        elif choice == 1:
            struct.pack_into(">II", buf, pos + 6, int(rng.choice([0, 1, 100000])),
                             int(rng.choice([0, 1, 100000])))
        else:
            struct.pack_into(">H", buf, pos + 38, int(rng.choice([0, 3, 16384])))
    return bytes(buf)


# NIfTI-1 header fields: (name, struct format, offset, hostile values)
NIFTI_FIELDS = [
    ("dim", "<8h", 40, [(3, 32767, 32767, 32767, 1, 1, 1, 1), (7, 2, 2, 2, 2, 2, 2, 2),
                        (3, 0, 64, 8, 1, 1, 1, 1), (3, -5, 64, 8, 1, 1, 1, 1),
                        (0, 0, 0, 0, 0, 0, 0, 0), (8, 1, 1, 1, 1, 1, 1, 1),
                        (-1, 4, 4, 4, 1, 1, 1, 1), (3, 1, 1, 1, 1, 1, 1, 1),
                        (4, 24, 20, 6, 3000, 1, 1, 1), (3, 24, 20, 32000, 1, 1, 1, 1),
                        (1, 480, 1, 1, 1, 1, 1, 1), (2, 24, 120, 1, 1, 1, 1, 1)]),
    ("datatype", "<h", 70, [(0,), (1,), (128,), (2304,), (1792,), (32,), (255,), (32767,),
                            (-1,), (16,), (64,), (1536,)]),
    ("bitpix", "<h", 72, [(0,), (7,), (-8,), (128,)]),
    ("pixdim", "<8f", 76, [(1, float("nan"), 1, 1, 0, 0, 0, 0), (1, float("inf"), 1, 1, 0, 0, 0, 0),
                           (1, 0, 0, 0, 0, 0, 0, 0), (-1, -2, 1, 1, 0, 0, 0, 0),
                           (1, 3e38, 3e38, 3e38, 0, 0, 0, 0)]),
    ("vox_offset", "<f", 108, [(1e30,), (-1,), (float("nan"),), (1e9,), (353,), (0,),
                               (2147483647.0,)]),
    ("scl_slope", "<f", 112, [(float("nan"),), (float("inf"),), (0,), (3e38,)]),
    ("scl_inter", "<f", 116, [(float("inf"),), (float("nan"),), (-3e38,)]),
    ("qform_code", "<h", 252, [(1,), (-7,), (32767,)]),
    ("sform_code", "<h", 254, [(0,), (1,), (-3,)]),
    ("quatern", "<6f", 256, [(2, 2, 2, 0, 0, 0), (float("nan"), 0, 0, 0, 0, 0),
                             (0, 0, 0, float("inf"), 0, 0)]),
    ("srow", "<12f", 280, [(0,) * 12, (float("nan"),) * 12, (1, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0),
                           (float("inf"), 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0)]),
    ("magic", "<4s", 344, [(b"n+2\x00",), (b"ni1\x00",), (b"\x00\x00\x00\x00",)]),
    ("sizeof_hdr", "<i", 0, [(540,), (0,), (1 << 30,)]),
    ("extension", "<ii", 352, [(0x7FFFFFF0, 6), (-16, 6), (0, 6), (24, 0x7FFFFFFF)]),
]


def nifti_mutation(data: bytes, how: str, rng: np.random.Generator, gz: bool) -> bytes:
    raw = bytearray(gzip.decompress(data) if gz else data)
    count = 1 if how == "nifti_header" else int(rng.integers(2, 4))
    for _ in range(count):
        _name, fmt, offset, values = NIFTI_FIELDS[int(rng.integers(len(NIFTI_FIELDS)))]
        value = values[int(rng.integers(len(values)))]
        if _name == "extension":  # an extension header claiming a hostile size
            raw[348:352] = b"\x01\x00\x00\x00"
            raw[352:352] = struct.pack(fmt, *value) + bytes(16)
            offset = struct.unpack_from("<f", raw, 108)[0]
            struct.pack_into("<f", raw, 108, offset + 24 if np.isfinite(offset) else 376)
            continue
        struct.pack_into(fmt, raw, offset, *value)
    return gzip.compress(bytes(raw), mtime=0) if gz else bytes(raw)


def png_mutation(data: bytes, rng: np.random.Generator) -> bytes:
    """Hostile PNG chunks: claimed size, depth, colour type, broken or missing chunks,
    a decompression bomb; CRCs fixed so the decoder gets past them."""
    sig, body = data[:8], data[8:]
    chunks = []
    pos = 0
    while pos + 8 <= len(body):
        length, ctype = struct.unpack(">I4s", body[pos: pos + 8])
        chunks.append([ctype, body[pos + 8: pos + 8 + length]])
        pos += 12 + length

    def chunk(ctype: bytes, payload: bytes, crc: bool = True) -> bytes:
        c = zlib.crc32(ctype + payload) if crc else 0xDEADBEEF
        return struct.pack(">I", len(payload)) + ctype + payload + struct.pack(">I", c)

    ihdr = bytearray(chunks[0][1])
    choice = int(rng.integers(10))
    extra = b""
    if choice == 0:  # huge or zero size
        w, h = (int(v) for v in rng.choice([0, 1, 20000, 100000, 0x7FFFFFFF], 2))
        struct.pack_into(">II", ihdr, 0, w, h)
    elif choice == 1:
        ihdr[8] = int(rng.choice([0, 3, 32, 255]))  # bit depth
    elif choice == 2:
        ihdr[9] = int(rng.choice([1, 5, 7, 255]))  # colour type
    elif choice == 3:
        ihdr[10:13] = bytes([1, 1, 1])  # compression, filter, interlace methods
    elif choice == 4:  # corrupt image data with a valid CRC
        idat = [c for c in chunks if c[0] == b"IDAT"]
        if idat:
            d = bytearray(idat[0][1])
            for p in rng.integers(0, max(1, len(d)), 8):
                if len(d):
                    d[p] = int(rng.integers(256))
            idat[0][1] = bytes(d)
    elif choice == 5:
        chunks = [c for c in chunks if c[0] != b"IDAT"]
    elif choice == 6:
        chunks = [c for c in chunks if c[0] not in (b"IEND", b"PLTE")]
    elif choice == 7:  # a chunk claiming 2 GiB (PNG chunks are at most 2**31 - 1 bytes)
        payload = chunk(b"IDAT", b"")
        extra = struct.pack(">I", 0x7FFFFFFF) + payload[4:]
        chunks = [c for c in chunks if c[0] != b"IEND"]
    elif choice == 8:  # decompression bomb: 12000 x 12000 grey (or palette) zeros, small file
        struct.pack_into(">IIBB", ihdr, 0, 12000, 12000, 8, 3 if ihdr[9] == 3 else 0)
        comp, block = zlib.compressobj(1), bytes(1 << 20)
        stream = b"".join(comp.compress(block) for _ in range(12001 * 12000 >> 20))
        stream += comp.compress(bytes(12001 * 12000 % (1 << 20))) + comp.flush()
        chunks = [c for c in chunks if c[0] != b"IDAT"]
        chunks.insert(1, [b"IDAT", stream])
    else:  # 1-pixel image with valid data, or claim interlacing
        ihdr[12] = 1
    chunks[0][1] = bytes(ihdr)
    out = sig + b"".join(chunk(c, p, crc=choice != 3 or rng.random() < 0.5) for c, p in chunks)
    return out + extra


def mutate(seed: dict, target: str, how: str, rng_seed: int, folder: Path):
    """Write the input's files into ``folder``; returns ``(image, label, note)``."""
    rng = np.random.default_rng(rng_seed)
    image, label = Path(seed["image"]), Path(seed["label"])
    note = ""
    if target == "none":
        return image, label, note
    src = image if target == "image" else label
    if target == "image" and seed["image_kind"] == "series":
        slices = sorted(p for p in src.iterdir() if p.is_file())
        pick = int(rng.integers(len(slices)))
        dest_dir = folder / "series"
        dest_dir.mkdir()
        for k, s in enumerate(slices):
            if k != pick:
                (dest_dir / s.name).symlink_to(s.resolve())
        src, dest = slices[pick], dest_dir / slices[pick].name
        image, note = dest_dir, f"slice {pick} ({src.name})"
    else:
        dest = folder / src.name
        if target == "image":
            image = dest
        else:
            label = dest
    data = src.read_bytes()
    kind = file_kind(src.name, seed["label_kind"] if target == "label" else None)
    if how in BYTE_MUTATIONS:
        if kind == "nifti" and src.name.endswith(".gz") and rng.random() < 0.5:
            out = gzip.compress(byte_mutation(gzip.decompress(data), how, rng), mtime=0)
            note += " (inside the gzip stream)"
        else:
            out = byte_mutation(data, how, rng)
    elif kind in ("dicom", "seg"):
        out = dicom_mutation(data, how, rng, seg=kind == "seg")
    elif kind == "nifti":
        out = nifti_mutation(data, how, rng, gz=src.name.endswith(".gz"))
    elif kind == "png":
        out = png_mutation(data, rng)
    else:
        out = codestream_mutation(data, rng)
    dest.write_bytes(out)
    return image, label, note.strip()


# ----------------------------------------------------------------------------- child


class InputTimeout(BaseException):
    """An input ran past its alarm (a BaseException so no reader swallows it)."""


def _outcome(result, case_id: str, index: int, names: tuple[str, ...]) -> dict:
    from common.data.site import Case
    from common.errors import DataError

    if isinstance(result, Case):
        bad = []
        if result.image.dtype != np.float32 or not np.isfinite(result.image).all():
            bad.append("image not finite float32")
        if result.label.dtype != np.uint8 or not set(np.unique(result.label)) <= {0, 1}:
            bad.append("label not uint8 in {0, 1}")
        if result.image.shape[1:] != result.label.shape[1:] or result.image.size == 0:
            bad.append(f"shapes {result.image.shape} / {result.label.shape}")
        if len(result.spacing) != result.image.ndim - 1 or not all(
                np.isfinite(s) and s > 0 for s in result.spacing):
            bad.append(f"spacing {result.spacing}")
        if bad:
            return {"outcome": "other", "type": "BadCase", "message": "; ".join(bad)}
        return {"outcome": "loaded", "shape": list(result.image.shape)}
    exc = result
    info = {"type": type(exc).__name__, "message": str(exc)[:400]}
    if isinstance(exc, DataError):
        cause = exc.__cause__
        if cause is not None and not isinstance(cause, DataError):
            return {**info, "outcome": "boundary", "cause": type(cause).__name__,
                    "cause_message": str(cause)[:300]}
        if exc.case != case_id or exc.case_index != index or case_id not in str(exc):
            return {**info, "outcome": "other", "why": "error does not name the case"}
        if any(text in exc.scrubbed() for text in (case_id, *names)):
            return {**info, "outcome": "other", "why": "scrubbed text names the case or a file"}
        return {**info, "outcome": "data_error", "category": exc.category}
    return {**info, "outcome": "other"}


def child(spec_path: str, shard: int, out_path: str) -> None:
    import resource
    import signal
    import traceback
    import warnings

    spec = json.loads(Path(spec_path).read_text())
    limit = int(spec["address_space"])
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    sys.path.insert(0, str(ROOT))
    warnings.simplefilter("ignore")
    import logging

    logging.disable(logging.CRITICAL)
    from common.data.site import CaseRef, load_case

    def on_alarm(signum, frame):
        raise InputTimeout

    signal.signal(signal.SIGALRM, on_alarm)
    seeds = {s["name"]: s for s in spec["seeds"]}
    done = set(spec.get("skip", {}).get(str(shard), []))
    scratch = Path(spec["scratch"]) / f"shard-{shard}"
    with open(out_path, "a", buffering=1) as out:
        for item in spec["inputs"]:
            if item["i"] % spec["shards"] != shard or item["i"] in done:
                continue
            out.write(json.dumps({"start": item["i"]}) + "\n")
            seed = seeds[item["seed"]]
            folder = scratch / f"input-{item['i']}"
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            row = dict(item)
            t0 = time.perf_counter()
            try:
                image, label, row["note"] = mutate(seed, item["target"], item["mutation"],
                                                   item["rng"], folder)
            except Exception as exc:  # the mutation itself did not apply: not an input
                row.update(outcome="skipped", type=type(exc).__name__, message=str(exc)[:200])
            else:
                ref = CaseRef(seed["case_id"], image, label)
                signal.alarm(int(spec["per_input_s"]))
                result = None  # a timed-out read leaves none: a hang, not a crash
                try:
                    try:
                        result = load_case(ref, item["i"])
                    except InputTimeout:
                        raise
                    except BaseException as exc:  # noqa: BLE001 - every outcome is recorded
                        result = exc
                    finally:
                        signal.alarm(0)
                    names = (Path(image).name, Path(label).name)
                    row.update(_outcome(result, seed["case_id"], item["i"], names))
                    if row["outcome"] in ("other", "boundary") and isinstance(
                            result, BaseException):
                        cause = result.__cause__ if row["outcome"] == "boundary" else result
                        row["where"] = traceback.format_exception(cause)[-2][:600]
                except InputTimeout:
                    row.update(outcome="hang", type="InputTimeout",
                               message=f"no outcome within {spec['per_input_s']} s")
                del result
            row["seconds"] = round(time.perf_counter() - t0, 3)
            row["maxrss_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            shutil.rmtree(folder, ignore_errors=True)
            out.write(json.dumps(row) + "\n")


# ---------------------------------------------------------------------------- parent


def run(seeds: list[dict], inputs: list[dict], scratch: Path, *, shards: int = 2,
        per_input_s: int = 10, total_s: float = 240, address_space: int = 3 * GIB) -> dict:
    """Feed ``inputs`` through the readers in ``shards`` child processes; returns a
    report: counts, data errors by category, and every other outcome."""
    scratch.mkdir(parents=True, exist_ok=True)
    spec = {"seeds": seeds, "inputs": inputs, "shards": shards, "per_input_s": per_input_s,
            "address_space": address_space, "scratch": str(scratch), "skip": {}}
    rows: dict[int, dict] = {}
    started: dict[int, float] = {}
    deadline = time.monotonic() + total_s
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    procs: dict[int, subprocess.Popen] = {}
    outs = {k: scratch / f"results-{k}.jsonl" for k in range(shards)}
    read_upto = dict.fromkeys(range(shards), 0)
    current: dict[int, int | None] = dict.fromkeys(range(shards))
    restarts = 0

    def launch(k: int) -> None:
        spec["skip"] = {str(j): sorted(i for i in rows if i % shards == j) for j in range(shards)}
        spec_path = scratch / f"spec-{k}.json"
        spec_path.write_text(json.dumps(spec))
        with open(scratch / f"stderr-{k}.txt", "ab") as stderr:
            procs[k] = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "child", str(spec_path), str(k),
                 str(outs[k])], env=env, cwd=str(ROOT), stdout=subprocess.DEVNULL,
                stderr=stderr)
        started[k] = time.monotonic()

    def collect(k: int) -> None:
        if not outs[k].exists():
            return
        with open(outs[k]) as fh:
            fh.seek(read_upto[k])
            while True:
                line = fh.readline()
                if not line.endswith("\n"):
                    break
                read_upto[k] = fh.tell()
                row = json.loads(line)
                if "start" in row:
                    current[k] = row["start"]
                    started[k] = time.monotonic()
                else:
                    rows[row["i"]] = row
                    current[k] = None

    for k in range(shards):
        launch(k)
    timed_out = False
    while procs:
        time.sleep(0.05)
        for k in list(procs):
            collect(k)
            proc = procs[k]
            stuck = time.monotonic() - started[k] > per_input_s + 15
            if proc.poll() is None and not stuck and time.monotonic() < deadline:
                continue
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            collect(k)
            if time.monotonic() >= deadline:
                timed_out = True
                del procs[k]
                continue
            lost = current[k]
            if lost is not None:  # the child died or stuck on this input
                item = inputs[lost]
                why = "hang" if stuck else "crash"
                rows[lost] = {**item, "outcome": why, "type": why,
                              "message": f"child {'stuck' if stuck else 'died'} "
                                         f"(exit {proc.returncode}) on this input"}
                current[k] = None
                restarts += 1
                launch(k)
            else:
                del procs[k]
    return summarise(rows, inputs, timed_out, restarts, address_space)


def summarise(rows: dict[int, dict], inputs: list[dict], timed_out: bool, restarts: int,
              address_space: int) -> dict:
    done = [rows[i] for i in sorted(rows)]
    mutated = [r for r in done if r["mutation"] != "none" and r["outcome"] != "skipped"]
    categories: dict[str, int] = {}
    for r in mutated:
        if r["outcome"] == "data_error":
            categories[r["category"]] = categories.get(r["category"], 0) + 1
    worst = max(done, key=lambda r: r.get("maxrss_kb", 0), default={})
    slowest = max(done, key=lambda r: r.get("seconds", 0), default={})
    return {
        "planned": len(inputs),
        "finished": len(done),
        "timed_out": timed_out,
        "restarts": restarts,
        "mutated": len(mutated),
        "loaded": sum(r["outcome"] == "loaded" for r in mutated),
        "data_errors": sum(r["outcome"] == "data_error" for r in mutated),
        "categories": dict(sorted(categories.items())),
        "skipped": [r for r in done if r["outcome"] == "skipped"],
        "unmutated_not_loaded": [r for r in done
                                 if r["mutation"] == "none" and r["outcome"] != "loaded"],
        "other": [r for r in done if r["outcome"] in ("other", "boundary", "crash")],
        "hangs": [r for r in done if r["outcome"] == "hang"],
        "memory_errors": [r for r in done if "MemoryError" in (r.get("type", ""),
                                                               r.get("cause", ""))
                          or "memory" in (r.get("message", "") + r.get("cause_message", "")
                                          ).lower()],
        "peak_rss_bytes": worst.get("maxrss_kb", 0) * 1024,
        "peak_rss_input": {k: worst.get(k) for k in ("i", "seed", "target", "mutation")},
        "slowest_s": slowest.get("seconds", 0),
        "slowest_input": {k: slowest.get(k) for k in ("i", "seed", "target", "mutation")},
        "address_space": address_space,
    }


def describe(report: dict) -> str:
    cats = ", ".join(f"{n} {c}" for c, n in report["categories"].items())
    return (f"{report['mutated']} mutated inputs: {report['loaded']} loaded, "
            f"{report['data_errors']} data errors ({cats}), {len(report['other'])} other, "
            f"{len(report['hangs'])} hangs; peak RSS {report['peak_rss_bytes'] / 2**20:.0f} MiB "
            f"of a {report['address_space'] / 2**30:.0f} GiB address-space limit; slowest input "
            f"{report['slowest_s']:.2f} s")


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "child":
        child(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    else:
        sys.exit("usage: fuzz_readers.py child SPEC SHARD OUT")
