"""Predict's DICOM SEG on real scanner files, and real SEGs cut short.

Every image series and single-file image under ``../shared/data/dicom`` that
fedseg reads gets a DICOM SEG that dciodvfy (dicom3tools, an independent
validator) finds no error in: empty, missing, ISO 2022 and misspelt Specific
Character Sets, retired ACR-NEMA date and time forms, localizer series whose
slices lie in several planes, images whose frame of reference cannot place
them, multi-frame images without per-frame geometry, sources without a study
UID. A DICOM SEG truncated anywhere in its frames is refused as damaged,
naming the file, whichever frames the run would have read."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch

from common.data.readers import read_image, read_label
from common.errors import DataError, UnreadableFileError, UnsupportedFormatError
from common.inference import load_model, segment, write_result
from server.simulation import APP_DIR
from tests.unit.test_inference import dicom_errors, saved_model
from tests.unit.test_label_readers import OVERLAP, SERIES, classes

CPU = torch.device("cpu")
DOCS = {".txt", ".md", ".tsv", ".json", ".dump", ".icc", ".gz"}
# Images fedseg reads that no DICOM SEG can reference: the reason is the error's
NO_SEG = {"pydicom_data/data/JLSN_RGB_ILV0.dcm": "has no SOPInstanceUID"}


def image_series(root: Path, into: Path) -> list[Path]:
    """Every series of two or more grey image files under ``root`` (a series
    folder holds grey slices; the colour files sharing a series UID are one
    image in several encodings), each linked into a folder of its own (real
    archives' folders mix series: dicomdirtests' MR1)."""
    by_uid: dict[str, list[Path]] = {}
    # the same image twice (CT_small.dcm in two folders; MR2_*, US1_*, SC_rgb_* in several
    # encodings, with a UID each): once
    seen = set()
    for f in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix not in DOCS):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(f, stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - not DICOM
            continue
        if "Rows" in ds and "NumberOfFrames" not in ds and ds.get("SamplesPerPixel") == 1 and str(
                ds.get("Modality", "")) != "SEG" and "SeriesInstanceUID" in ds and not (
                seen & (same := {str(ds.get("SOPInstanceUID")), str(ds.SeriesInstanceUID)
                                 + str(ds.get("ImagePositionPatient",
                                              ds.get("InstanceNumber", f.name)))})):
            seen |= same
            by_uid.setdefault(str(ds.SeriesInstanceUID), []).append(f)
    folders = []
    for k, files in enumerate(f for f in by_uid.values() if len(f) > 1):
        folder = into / f"series{k:02d}_{files[0].parent.name}"
        folder.mkdir(parents=True)
        for f in files:
            (folder / f.name).symlink_to(f)
        folders.append(folder)
    return folders


def check_seg(written: list[Path], name: str) -> None:
    assert written, name
    for path in written:
        seg = pydicom.dcmread(path)
        assert seg.Modality == "SEG" and seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"
        assert dicom_errors(path) == [], (name, path.name)


@pytest.mark.slow  # about 35 s on two cores: 90 files and 12 series, each validated
def test_every_real_image_series_and_file_gets_a_valid_seg(tmp_path, dicom_dir):
    model = load_model(saved_model(tmp_path / "run"))
    series = image_series(dicom_dir, tmp_path / "series")
    assert len(series) >= 7  # CT, CT scouts, MR localizers and projections, RT CT
    files = sorted(p for p in dicom_dir.rglob("*") if p.is_file() and p.suffix not in DOCS)
    done, refused = [], {}
    for k, source in enumerate(series + files):
        name = str(source.relative_to(dicom_dir if source in files else tmp_path))
        try:
            result = segment(model, source, CPU)
        except DataError as exc:  # not an image fedseg reads: said clearly (tests/unit/
            refused[name] = str(exc)  # test_readers.py has those)
            continue
        if name in NO_SEG:
            with pytest.raises(UnsupportedFormatError, match=NO_SEG[name]):
                write_result(model, result, tmp_path / "out" / str(k))
            continue
        check_seg(write_result(model, result, tmp_path / "out" / str(k)), name)
        done.append(name)
    assert all(s.name in " ".join(done) for s in series), refused  # every series
    assert len(done) >= 100, refused
    for name in ("emri_small.dcm", "rtdose.dcm", "OBXXXX1A_rle_2frame.dcm", "JPEG2000.dcm",
                 "ExplVR_BigEnd.dcm", "693_UNCR.dcm", "JLSL_08_07_0_1F.dcm", "CT_small.dcm"):
        assert any(n.endswith("/" + name) for n in done), name
    for folder in ("CT2", "CT2N", "CT5N", "MR2", "MR700", "mock_data"):
        assert any(n.endswith("_" + folder) for n in done), folder


def copy_series(src: Path, out: Path, **values) -> Path:
    """A copy of a real series with header values changed (None: removed)."""
    out.mkdir(parents=True)
    for f in sorted(src.iterdir()):
        ds = pydicom.dcmread(f)
        for keyword, value in values.items():
            if value is None:
                delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)
        ds.save_as(out / f.name)
    return out


@pytest.mark.parametrize("charset", ["", None, ["", "ISO 2022 IR 87"], "ISO-IR 100"],
                         ids=["empty", "missing", "iso2022-default-first", "misspelt"])
def test_a_ge_ct_series_with_an_odd_character_set_gets_a_valid_seg(tmp_path, dicom_dir,
                                                                   charset):
    """The GE CT series of the SEG tests (4 axial slices, ISO_IR 100) with its
    Specific Character Set as real archives hold it."""
    series = copy_series(dicom_dir / SERIES, tmp_path / "ct", SpecificCharacterSet=charset,
                         PatientName="Doe^Archibald")
    model = load_model(saved_model(tmp_path / "run"))
    result = segment(model, series, CPU)
    (out,) = write_result(model, result, tmp_path / "out")
    check_seg([out], series.name)
    seg = pydicom.dcmread(out)
    assert str(seg.PatientName) == "Doe^Archibald"
    assert seg.StudyInstanceUID == pydicom.dcmread(next(series.iterdir())).StudyInstanceUID
    assert np.array_equal(read_label(out, result.meta)[0], result.mask)  # reads back


@pytest.mark.slow  # the default suite's 8 minutes
def test_predict_writes_a_seg_for_a_series_with_an_empty_character_set(tmp_path, dicom_dir):
    """The command itself, as a hospital runs it (the issue's failure)."""
    series = copy_series(dicom_dir / SERIES, tmp_path / "ge_ct", SpecificCharacterSet="")
    model = saved_model(tmp_path / "run")
    proc = subprocess.run([sys.executable, "-m", "server.cli", "predict", str(model),
                           str(series), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300, cwd=APP_DIR)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (out,) = (tmp_path / "out").iterdir()
    check_seg([out], series.name)


def test_a_localizer_series_gets_a_seg_per_plane_each_referencing_its_slice(tmp_path,
                                                                           dicom_dir):
    series = dicom_dir / "pydicom_testfiles/test_files/dicomdirtests/98892001/CT2N"  # scout
    model = load_model(saved_model(tmp_path / "run"))
    result = segment(model, series, CPU)
    written = write_result(model, result, tmp_path / "out")
    assert [p.name for p in written] == ["CT2N_seg_1.dcm", "CT2N_seg_2.dcm"]
    assert any("2 planes" in note for note in result.notes)
    check_seg(written, series.name)
    referenced = {pydicom.dcmread(p).ReferencedSeriesSequence[0].ReferencedInstanceSequence[0]
                  .ReferencedSOPInstanceUID for p in written}
    assert referenced == set(result.meta.source_uids)


def test_a_multi_frame_image_without_geometry_gets_a_seg_per_frame_naming_it(tmp_path,
                                                                            dicom_dir):
    source = dicom_dir / "pydicom_data/data/OBXXXX1A_rle_2frame.dcm"  # US cine, 2 frames
    model = load_model(saved_model(tmp_path / "run"))
    result = segment(model, source, CPU)
    written = write_result(model, result, tmp_path / "out")
    assert len(written) == 2
    check_seg(written, source.name)
    real = pydicom.dcmread(source, stop_before_pixels=True)
    for number, path in enumerate(written, start=1):
        ref = pydicom.dcmread(path).SourceImageSequence[0]
        assert ref.ReferencedSOPClassUID == real.SOPClassUID  # its own class, not a stand-in
        assert ref.ReferencedSOPInstanceUID == real.SOPInstanceUID
        assert int(ref.ReferencedFrameNumber) == number


# ---------------------------------------------------------------- truncated SEGs


def cut_seg(dicom_dir: Path, tmp_path: Path, frame: int) -> Path:
    """The real overlap SEG (8 frames of 16 x 16: segment 1 on the CT's 4 slices,
    then segment 2) cut in the middle of ``frame`` (1-based), in tmp_path."""
    raw = (dicom_dir / OVERLAP).read_bytes()
    ds = pydicom.dcmread(dicom_dir / OVERLAP)
    assert list(ds.keys())[-1] == pydicom.tag.Tag("PixelData")  # pixels end the file
    per_frame = len(ds.PixelData) // int(ds.NumberOfFrames)
    start = len(raw) - len(ds.PixelData)
    out = tmp_path / "cut_seg.dcm"
    out.write_bytes(raw[: start + per_frame * (frame - 1) + per_frame // 2])
    return out


def test_a_seg_cut_inside_a_frame_the_run_does_not_use_is_refused_as_damaged(
        tmp_path, dicom_dir):
    _, meta = read_image(dicom_dir / SERIES)
    bone = classes("bone", {1: "bone"}, {"bone": ["first segment"]})
    whole = read_label(dicom_dir / OVERLAP, meta, bone)  # reads whole: segment 2 unused
    assert whole.any()
    cut = cut_seg(dicom_dir, tmp_path, frame=8)  # segment 2's last frame
    with pytest.raises(UnreadableFileError, match=r"DICOM SEG cut_seg\.dcm is damaged"):
        read_label(cut, meta, bone)


def test_a_seg_cut_inside_a_frame_the_run_uses_is_refused_as_damaged(tmp_path, dicom_dir):
    _, meta = read_image(dicom_dir / SERIES)
    cut = cut_seg(dicom_dir, tmp_path, frame=2)
    for structures in (None, classes("bone", {1: "bone"}, {"bone": ["first segment"]})):
        with pytest.raises(UnreadableFileError) as caught:
            read_label(cut, meta, structures)
        message = str(caught.value)
        assert "cut_seg.dcm is damaged" in message and "reshape" not in message
        assert str(tmp_path) not in message  # the file's name, not where it lies


def test_a_compressed_seg_cut_short_is_refused_as_damaged(tmp_path, dicom_dir):
    raw = (dicom_dir / "pydicom_data/data/liver_rle.dcm").read_bytes()
    _, meta = read_image(dicom_dir / SERIES)
    for at in (len(raw) - 20, len(raw) // 2):
        cut = tmp_path / "liver_cut.dcm"
        cut.write_bytes(raw[:at])
        with pytest.raises(UnreadableFileError, match=r"liver_cut\.dcm .*(truncated|damaged)"):
            read_label(cut, meta)
