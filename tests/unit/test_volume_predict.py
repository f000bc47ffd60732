"""Predictions on volumes (issue 27 item 5): ``fedseg predict`` with a 3D
two-structure (hippocampus) model, run as a user would, writes a NIfTI label
map on the source's own grid, and for the same case as a DICOM MR image series
a DICOM SEG that an independent validator accepts, that references the
series' slices and that holds, voxel for voxel, what the NIfTI holds.
``fedseg evaluate`` scores a held-out folder whose cases are all listed
under ``training`` (a Decathlon folder) with ``--split``.

The hippocampus case is read in place from ../shared/data/hippocampus (the
test is skipped when it is absent); what the test derives from it is written
under pytest's tmp_path only."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from nibabel import orientations as ornt

from common.config import RunSettings
from common.data.labels import LabelMap, classes_for, parse_label_map
from common.data.readers import read_image, read_label
from tests.conftest import SHARED
from tests.unit.test_inference import dicom_errors, fedseg, saved_model

HIPPOCAMPUS = SHARED / "hippocampus"
STRUCTURES = ("Anterior", "Posterior")
LABELS = {"0": "background", "1": "Anterior", "2": "Posterior"}
MODEL_3D = {"model-spatial-dims": 3, "structures": ",".join(STRUCTURES),
            "model-channels": "8,16", "patch-size": 16}
# A left-handed, permuted storage order (sagittal slices stacked towards the
# patient's left): the same voxels as the case, stored the way many scanners
# export them, so any flip or axis swap between the NIfTI and the DICOM
# paths shows.
REORIENTED = ("A", "S", "L")
LPS = np.diag([-1.0, -1.0, 1.0])  # RAS (NIfTI) <-> LPS (DICOM patient coordinates)


# ------------------------------------------------------------------- writing a series


def write_mr_series(nifti: Path, folder: Path, seed: str) -> list[Path]:
    """``nifti`` (integer voxel values) as a DICOM MR image series, one file a
    slice (MR Image Storage), in ``folder``; the files in slice order (the
    NIfTI's third axis). Column ``c`` and row ``r`` of file ``k`` is voxel
    ``(c, r, k)``, placed in patient space (LPS) where the NIfTI's affine (RAS)
    puts it: both files describe the same voxels at the same places."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    img = nib.load(str(nifti))
    data = np.asanyarray(img.dataobj)
    assert data.ndim == 3 and np.array_equal(data, np.rint(data)) and data.min() >= 0
    voxels = data.astype(np.uint16)
    affine = LPS @ img.affine[:3]  # voxel (i, j, k, 1) -> LPS mm
    axes, origin = affine[:, :3], affine[:, 3]
    spacing = np.linalg.norm(axes, axis=0)
    cosines = axes / spacing
    assert np.allclose(cosines.T @ cosines, np.eye(3), atol=1e-6), "an oblique-sheared affine"

    def uid(*parts: object) -> str:
        return generate_uid(entropy_srcs=[seed, *map(str, parts)])

    study, series, frame = uid("study"), uid("series"), uid("frame")
    folder.mkdir(parents=True)
    files = []
    for k in range(voxels.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = uid("slice", k)
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        # patient, study, series, equipment
        ds.PatientName, ds.PatientID = f"TEST^{nifti.name.split('.')[0]}", "FEDSEG-TEST"
        ds.PatientBirthDate, ds.PatientSex = "", "O"
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = "20260101"
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = ds.AcquisitionTime = "120000"
        ds.AccessionNumber, ds.StudyID, ds.ReferringPhysicianName = "", "1", ""
        ds.Modality, ds.SeriesNumber, ds.SeriesDescription = "MR", 3, "T1 MPRAGE"
        ds.PatientPosition, ds.BodyPartExamined = "HFS", "BRAIN"
        ds.Manufacturer, ds.ManufacturerModelName = "fedseg test", "from NIfTI"
        ds.DeviceSerialNumber, ds.SoftwareVersions = "none", "fedseg"
        ds.PositionReferenceIndicator = ""
        # general image, image plane: where voxel (c, r, k) is
        ds.InstanceNumber, ds.AcquisitionNumber = k + 1, 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
        ds.ImageOrientationPatient = [float(f"{v:.6f}") for v in
                                      (*cosines[:, 0], *cosines[:, 1])]
        position = origin + k * axes[:, 2]
        ds.ImagePositionPatient = [float(f"{v:.6f}") for v in position]
        ds.SliceLocation = float(f"{np.dot(np.cross(cosines[:, 0], cosines[:, 1]), position):.6f}")
        ds.PixelSpacing = [float(spacing[1]), float(spacing[0])]  # between rows, columns
        ds.SliceThickness = ds.SpacingBetweenSlices = float(spacing[2])
        # MR image module: a 3D T1-weighted MPRAGE
        ds.ScanningSequence, ds.SequenceVariant = ["GR", "IR"], ["SK", "SP", "MP"]
        ds.ScanOptions, ds.MRAcquisitionType = "", "3D"  # type 2: no option
        ds.SequenceName, ds.AngioFlag = "*tfl3d1", "N"
        ds.RepetitionTime, ds.EchoTime, ds.InversionTime = 2300.0, 2.98, 900.0
        ds.EchoTrainLength, ds.EchoNumbers, ds.NumberOfAverages = 1, 1, 1.0
        ds.FlipAngle, ds.MagneticFieldStrength = 9.0, 3.0
        ds.ImagedNucleus, ds.ImagingFrequency = "1H", 123.25
        # image pixel: stored values are the voxel values (no rescale)
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = int(voxels.shape[1]), int(voxels.shape[0])
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = np.ascontiguousarray(voxels[:, :, k].T).tobytes()
        path = folder / f"MR{k + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


def enhanced_mr(files: list[Path], out: Path, seed: str) -> Path:
    """The MR series ``files`` as one enhanced multi-frame MR image (highdicom's
    legacy conversion: the geometry in functional groups, no image-level
    PixelSpacing or ImagePositionPatient), its frames then stored out of
    position order (every other slice from the far end, then the rest) with a
    rescale in the functional groups (stored values 100 up, intercept -100),
    as scanners and archives write them."""
    import highdicom as hd
    from pydicom.uid import generate_uid

    image = hd.legacy.LegacyConvertedEnhancedMRImage(
        [pydicom.dcmread(f) for f in files],
        series_instance_uid=generate_uid(entropy_srcs=[seed, "series"]), series_number=30,
        sop_instance_uid=generate_uid(entropy_srcs=[seed, "image"]), instance_number=1)
    assert "PixelSpacing" not in image and "ImagePositionPatient" not in image
    frames = image.pixel_array
    assert frames.ndim == 3 and int(frames.max()) < 65535 - 100
    order = list(range(len(frames)))[::-2] + list(range(len(frames)))[-2::-2]
    image.PixelData = (frames[order] + 100).astype(frames.dtype).tobytes()
    per_frame = image.PerFrameFunctionalGroupsSequence
    image.PerFrameFunctionalGroupsSequence = [per_frame[k] for k in order]
    rescale = image.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence[0]
    rescale.RescaleSlope, rescale.RescaleIntercept = 1, -100
    image.save_as(out, enforce_file_format=True)
    return out


def scanner_case(source: Path, out: Path, codes: tuple[str, str, str] | None = None) -> Path:
    """The case's voxels as a scanner stores them (whole numbers), with its
    header and affine; ``codes``: stored in that axis order instead (the
    same voxels at the same places in patient space)."""
    img = nib.load(str(source))
    data = np.rint(np.asanyarray(img.dataobj)).astype(np.int16)
    copy = nib.Nifti1Image(data, img.affine, img.header)
    copy.set_data_dtype(np.int16)
    if codes is not None:
        copy = copy.as_reoriented(ornt.ornt_transform(ornt.io_orientation(img.affine),
                                                      ornt.axcodes2ornt(codes)))
        assert nib.aff2axcodes(copy.affine) == codes
    nib.save(copy, str(out))
    return out


# ------------------------------------------------------------------- predict, once


@pytest.fixture(scope="module")
def predicted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One hippocampus case read in place, the same voxels as integer NIfTIs
    (stored as the case is, and reoriented) and as DICOM MR series, all
    segmented by one ``fedseg predict`` with an untrained (seeded, so
    deterministic) tiny 3D model of the two structures."""
    if not HIPPOCAMPUS.is_dir():
        pytest.skip(f"real data not available: {HIPPOCAMPUS} is absent (MSD Task04 "
                    f"hippocampus, see ../shared/data/README.md)")
    first = json.loads((HIPPOCAMPUS / "dataset.json").read_text())["training"][0]
    source = (HIPPOCAMPUS / first["image"]).resolve()
    case = source.name.split(".")[0]
    tmp = tmp_path_factory.mktemp("volumes")
    model = saved_model(tmp / "run", **MODEL_3D)
    variants = {}
    for tag, codes in (("stored", None), ("".join(REORIENTED), REORIENTED)):
        nifti = scanner_case(source, tmp / f"{case}_{tag}.nii.gz", codes)
        series = tmp / f"{case}_{tag}_MR"
        variants[tag] = {"nifti": nifti, "series": series,
                         "files": write_mr_series(nifti, series, f"{case}-{tag}"),
                         "nifti_out": tmp / "out" / f"{nifti.name[:-7]}_seg.nii.gz",
                         "seg": tmp / "out" / f"{series.name}_seg.dcm"}
    enhanced = variants["".join(REORIENTED)]  # the same slices as one enhanced MR file
    enhanced["enhanced"] = enhanced_mr(enhanced["files"], tmp / f"{case}_eMR.dcm", case)
    enhanced["enhanced_seg"] = tmp / "out" / f"{case}_eMR_seg.dcm"
    inputs = [source] + [v[k] for v in variants.values() for k in ("nifti", "series")]
    inputs.append(enhanced["enhanced"])
    proc = fedseg("predict", str(model), *map(str, inputs), "--out", str(tmp / "out"),
                  "--device", "cpu")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return {"source": source, "case": case, "model": model, "out": tmp / "out",
            "variants": variants, "stdout": " ".join(proc.stdout.split())}


def label_map(path: Path) -> np.ndarray:
    return np.asanyarray(nib.load(str(path)).dataobj)


def test_a_volume_gets_a_label_map_on_the_sources_grid(predicted):
    source = nib.load(str(predicted["source"]))
    out = predicted["out"] / f"{predicted['case']}_seg.nii.gz"
    written = nib.load(str(out))
    assert written.shape == source.shape
    assert np.array_equal(written.affine, source.affine)  # exactly: the source's own grid
    assert written.header.get_intent()[0] == "label"
    values = label_map(out)
    assert set(np.unique(values)) == {0, 1, 2}, "both structures drawn somewhere"
    names = json.loads((predicted["out"] / f"{predicted['case']}_labels.json").read_text())
    assert names["labels"] == LABELS
    assert f"(voxels: Anterior {(values == 1).sum()}, Posterior {(values == 2).sum()})" \
        in predicted["stdout"]
    # the same voxels rounded to whole numbers (as a scanner stores them) segment alike
    stored = predicted["variants"]["stored"]
    assert (label_map(stored["nifti_out"]) == values).mean() > 0.99
    # and stored in another axis order, the same label map on that file's grid
    other = predicted["variants"]["".join(REORIENTED)]
    reoriented = nib.load(str(other["nifti_out"]))
    assert reoriented.shape == nib.load(str(other["nifti"])).shape
    assert np.array_equal(reoriented.affine, nib.load(str(other["nifti"])).affine)
    as_stored = nib.as_closest_canonical(reoriented)  # back to the case's own (RAS) order
    assert np.allclose(as_stored.affine, written.affine)
    assert np.array_equal(np.asanyarray(as_stored.dataobj), label_map(stored["nifti_out"]))


@pytest.mark.parametrize("tag", ["stored", "".join(REORIENTED)])
def test_an_mr_series_gets_a_seg_of_both_structures_referencing_its_slices(predicted, tag):
    import highdicom as hd

    variant = predicted["variants"][tag]
    seg = hd.seg.segread(variant["seg"])
    mr = [pydicom.dcmread(f) for f in variant["files"]]
    assert seg.Modality == "SEG" and seg.SegmentationType == "BINARY"
    assert seg.number_of_segments == 2
    assert [seg.get_segment_description(n).segment_label for n in (1, 2)] == list(STRUCTURES)
    assert seg.StudyInstanceUID == mr[0].StudyInstanceUID
    assert seg.FrameOfReferenceUID == mr[0].FrameOfReferenceUID
    assert seg.SeriesInstanceUID != mr[0].SeriesInstanceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == mr[0].SeriesInstanceUID
    slices = {ds.SOPInstanceUID for ds in mr}
    assert {uid for _, _, uid in seg.get_source_image_uids()} == slices
    assert {r.ReferencedSOPInstanceUID for r in
            seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence} == slices
    assert int(seg.NumberOfFrames) == len(mr) * 2  # a frame per slice and segment


@pytest.mark.parametrize("tag", ["stored", "".join(REORIENTED)])
def test_the_seg_holds_the_nifti_label_map_voxel_for_voxel(predicted, tag):
    import highdicom as hd

    variant = predicted["variants"][tag]
    nifti_out = nib.load(str(variant["nifti_out"]))
    expected = np.asanyarray(nifti_out.dataobj)  # on the NIfTI's stored grid
    seg = hd.seg.segread(variant["seg"])
    # 1. by the series as written: frame k's row r, column c is voxel (c, r, k)
    uids = [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
            for f in variant["files"]]
    frames = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids,
                                               combine_segments=True)
    assert np.array_equal(np.transpose(frames, (2, 1, 0)), expected)
    # 2. in patient space, by the SEG's own geometry (highdicom's volume, LPS)
    volume = seg.get_volume(combine_segments=True)
    as_nifti = nib.Nifti1Image(np.asarray(volume.array).astype(np.uint8),
                               np.diag([-1.0, -1.0, 1.0, 1.0]) @ volume.affine)
    canonical, ours = nib.as_closest_canonical(as_nifti), nib.as_closest_canonical(nifti_out)
    assert np.allclose(canonical.affine, ours.affine, atol=1e-4)
    assert np.array_equal(np.asanyarray(canonical.dataobj), np.asanyarray(ours.dataobj))
    # 3. through fedseg's own readers (the series' grid against the NIfTI's): as a
    # site reading the SEG back as a label would
    settings = RunSettings.from_run_config(MODEL_3D)
    classes = classes_for(LabelMap(parse_label_map(LABELS)), settings)
    _, series_meta = read_image(variant["series"])
    _, nifti_meta = read_image(variant["nifti"])
    assert np.array_equal(read_label(variant["seg"], series_meta, classes),
                          read_label(variant["nifti_out"], nifti_meta, classes))


def test_an_enhanced_mr_image_reads_as_its_series_and_gets_a_seg_on_its_frames(predicted):
    """One enhanced multi-frame MR file (geometry and rescale in functional
    groups, frames out of position order) is the same volume as the series it
    was made from, and its SEG, which references its frames, reads back as
    the NIfTI label map of the same voxels, by fedseg's readers and by where
    highdicom places it in patient space."""
    import highdicom as hd

    variant = predicted["variants"]["".join(REORIENTED)]
    series, series_meta = read_image(variant["series"])
    image, meta = read_image(variant["enhanced"])
    assert np.array_equal(image, series)  # rescaled, in position order, in RAS axis order
    assert meta.spacing == series_meta.spacing
    assert np.array_equal(meta.transform, series_meta.transform)
    assert sorted(meta.frames) == list(range(1, len(meta.frames) + 1))
    assert list(meta.frames) != sorted(meta.frames)  # the frames were out of order
    source = pydicom.dcmread(variant["enhanced"], stop_before_pixels=True)
    seg = hd.seg.segread(variant["enhanced_seg"])
    assert {uid for _, _, uid in seg.get_source_image_uids()} == {source.SOPInstanceUID}
    assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID
    settings = RunSettings.from_run_config(MODEL_3D)
    classes = classes_for(LabelMap(parse_label_map(LABELS)), settings)
    _, nifti_meta = read_image(variant["nifti"])
    expected = read_label(variant["nifti_out"], nifti_meta, classes)
    assert np.array_equal(read_label(variant["enhanced_seg"], meta, classes), expected)
    volume = seg.get_volume(combine_segments=True)
    placed = nib.as_closest_canonical(nib.Nifti1Image(
        np.asarray(volume.array).astype(np.uint8), np.diag([-1.0, -1.0, 1.0, 1.0]) @ volume.affine))
    ours = nib.as_closest_canonical(nib.load(str(variant["nifti_out"])))
    assert np.allclose(placed.affine, ours.affine, atol=1e-4)
    assert np.array_equal(np.asanyarray(placed.dataobj), np.asanyarray(ours.dataobj))
    assert dicom_errors(variant["enhanced_seg"]) == []  # skips without the validator


def test_the_seg_and_the_mr_series_pass_an_independent_validator(predicted):
    """dciodvfy (dicom3tools): the SEGs without an error, the MR slices this
    test writes without an error or a warning (a proper MR Image IOD)."""
    for variant in predicted["variants"].values():
        assert dicom_errors(variant["seg"]) == [], variant["seg"].name  # skips without it
        for path in (variant["files"][0], variant["files"][-1]):
            report = subprocess.run([shutil.which("dciodvfy"), str(path)],
                                    capture_output=True, text=True)
            lines = (report.stdout + report.stderr).splitlines()
            assert lines[0] == "MRImage", lines  # the IOD it was checked against
            assert [line for line in lines if line.startswith(("Error", "Warning"))] == []


# ------------------------------------------------------------------- evaluate --split


def heldout_folder(folder: Path, training: int, test: int = 0, unlabelled_test: int = 0
                   ) -> Path:
    """A small held-out folder of 3D NIfTI cases with the two structures, in
    the Decathlon's form: ``training`` lists labelled cases, ``test`` the
    labelled ``test`` ones and ``unlabelled_test`` bare image paths (as the
    Decathlon's own test lists do)."""
    rng = np.random.default_rng(len(str(folder)))
    spec: dict = {"name": "held out", "labels": LABELS, "numTraining": training}
    for split, n in (("training", training), ("test", test + unlabelled_test)):
        if not n:
            continue
        spec[split] = []
        for i in range(n):
            label = np.zeros((24, 20, 16), np.uint8)
            label[4 + i:10 + i, 5:15, 3:12], label[13:20, 4:14 - i, 4:13] = 1, 2
            image = rng.normal(300, 30, label.shape) + 400 * (label == 1) + 800 * (label == 2)
            stem = f"{split}_{i:03d}"
            for sub, values in (("images", image.astype(np.int16)), ("labels", label)):
                path = folder / f"{sub}{'Tr' if split == 'training' else 'Ts'}" / f"{stem}.nii.gz"
                path.parent.mkdir(parents=True, exist_ok=True)
                nib.save(nib.Nifti1Image(values, np.diag([-1.0, -1.0, 1.5, 1.0])), str(path))
            entry = {"image": f"./images{'Tr' if split == 'training' else 'Ts'}/{stem}.nii.gz",
                     "label": f"./labels{'Tr' if split == 'training' else 'Ts'}/{stem}.nii.gz"}
            spec[split].append(entry["image"] if split == "test" and i >= test else entry)
    (folder / "dataset.json").write_text(json.dumps(spec, indent=1))
    return folder


@pytest.fixture(scope="module")
def model_3d(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return saved_model(tmp_path_factory.mktemp("model3d") / "run", **MODEL_3D)


def evaluate(capsys, model: Path, folder: Path, csv: Path, *options: str
             ) -> tuple[int, str, list[str]]:
    """``fedseg evaluate`` as typed: exit code, what it printed, the CSV's case column."""
    from common.wire import score_keys
    from server.cli import main

    if csv.exists():
        csv.unlink()
    code = main(["evaluate", str(model), str(folder), "--csv", str(csv), "--device", "cpu",
                 *options])
    printed = capsys.readouterr()
    text = " ".join((printed.out + printed.err).split())
    assert "Traceback" not in text, text
    if not csv.exists():
        return code, text, []
    rows = csv.read_text().splitlines()
    assert rows[0] == ",".join(("case", *score_keys(STRUCTURES), "note"))
    assert rows[-1].startswith("mean,")
    return code, text, [row[0] for row in csv_rows(csv)[1:-1]
                        if not row[-1].startswith("left out")]  # the scored ones


def csv_rows(path: Path) -> list[list[str]]:
    import csv

    with open(path, newline="") as fh:
        return list(csv.reader(fh))


def test_evaluate_scores_a_held_out_folder_whose_cases_are_all_under_training(
        tmp_path, capsys, model_3d):
    folder = heldout_folder(tmp_path / "heldout", training=3)
    csv = tmp_path / "scores.csv"
    code, text, cases = evaluate(capsys, model_3d, folder, csv)
    assert code != 0 and not cases  # the default, test, lists nothing: a clear refusal
    assert "lists no test case" in text and "--split training" in text, text
    code, text, cases = evaluate(capsys, model_3d, folder, csv, "--split", "training")
    assert code == 0, text
    assert cases == ["training_000", "training_001", "training_002"]
    assert "(training cases)" in text
    code, _, all_cases = evaluate(capsys, model_3d, folder, csv, "--split", "all")
    assert code == 0 and all_cases == cases


def test_evaluate_split_chooses_among_training_and_test_cases(tmp_path, capsys, model_3d):
    csv = tmp_path / "scores.csv"
    both = heldout_folder(tmp_path / "both", training=2, test=1)
    assert evaluate(capsys, model_3d, both, csv)[::2] == (0, ["test_000"])
    assert evaluate(capsys, model_3d, both, csv, "--split", "all")[::2] == (
        0, ["training_000", "training_001", "test_000"])
    # the Decathlon's own form: a test list of unlabelled images, none to score
    decathlon = heldout_folder(tmp_path / "decathlon", training=2, unlabelled_test=1)
    code, text, cases = evaluate(capsys, model_3d, decathlon, csv)
    assert code != 0 and not cases
    assert "no usable test case" in text and "--split training" in text, text
    code, _, cases = evaluate(capsys, model_3d, decathlon, csv, "--split", "all")
    assert code == 0 and cases == ["training_000", "training_001"]  # the unlabelled left out
    nothing = tmp_path / "empty"  # no case anywhere: said so, with no --split to suggest
    nothing.mkdir()
    (nothing / "dataset.json").write_text(json.dumps({"labels": LABELS, "training": []}))
    code, text, _ = evaluate(capsys, model_3d, nothing, csv, "--split", "all")
    assert code != 0 and "holds no training case" in text and "--split" not in text, text
    # an empty folder, or one listing no case and no label map: the folder's
    # lack is said, not the label map's
    bare = tmp_path / "bare"
    bare.mkdir()
    code, text, _ = evaluate(capsys, model_3d, bare, csv)
    assert code == 2 and "has no dataset.json" in text and "label map" not in text, text
    (bare / "dataset.json").write_text(json.dumps({"training": [], "test": []}))
    code, text, _ = evaluate(capsys, model_3d, bare, csv, "--split", "all")
    assert code == 2 and "label map" not in text and "no" in text, text


def test_evaluate_says_which_cases_it_could_not_score_and_fails(tmp_path, capsys, model_3d):
    folder = heldout_folder(tmp_path / "mixed", training=4)
    (folder / "imagesTr" / "training_001.nii.gz").write_bytes(b"\x1f\x8b truncated")
    nib.save(nib.Nifti1Image(np.zeros((24, 20, 15), np.uint8), np.diag([-1.0, -1.0, 1.5, 1.0])),
             str(folder / "labelsTr" / "training_002.nii.gz"))
    csv = tmp_path / "scores.csv"
    code, text, cases = evaluate(capsys, model_3d, folder, csv, "--split", "training")
    assert code == 1, text  # scores written, and the exit code says not all could be
    assert cases == ["training_000", "training_003"]
    assert "2 of 4 training cases scored, 2 left out" in text, text
    rows = {r[0]: r[-1] for r in csv_rows(csv)[1:]}
    assert rows["training_001"].startswith("left out: cannot read the NIfTI header of "
                                           "training_001.nii.gz")
    assert rows["training_002"].startswith("left out: ") and "(24, 20, 15)" in rows[
        "training_002"]
    assert rows["mean"] == "mean of 2 scored case(s)"
    # a labelled training case whose label is gone is a case not scored: exit 1
    (folder / "labelsTr" / "training_003.nii.gz").unlink()
    code, text, cases = evaluate(capsys, model_3d, folder, csv, "--split", "training")
    assert code == 1 and cases == ["training_000"], text
    # a CSV that cannot be written is refused before any scoring, not after it
    from server.cli import main

    code = main(["evaluate", str(model_3d), str(folder), "--csv",
                 str(tmp_path / "nowhere" / "s.csv"), "--split", "training"])
    printed = capsys.readouterr()
    assert code == 2 and "folder" in printed.out and "does not exist" in printed.out
    assert "Traceback" not in printed.out + printed.err and "left out" not in printed.out
