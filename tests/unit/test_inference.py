"""Using a model at a hospital: ``fedseg predict`` writes what viewers open
(DICOM SEG that an independent validator accepts and highdicom reads back to
the same mask; NIfTI on the source's grid; PNG mask and overlay), and
``fedseg evaluate`` scores a model as the federation does. A model of several
structures writes every one: a segment each, or a label map of class values
with the names beside it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch

from common.config import RunSettings
from common.data.labels import LabelMap, classes_for, parse_label_map
from common.data.readers import read_image, read_label
from common.data.synthetic import ORGAN_LESION, write_site
from common.errors import ConfigError, UnsupportedFormatError
from common.inference import colour, load_model, segment, write_result
from common.model import build_model
from server.simulation import APP_DIR

CONFIG = {"model-channels": "8,16", "patch-size": 32, "test-time-flips": False,
          "mixed-precision": False}
CPU = torch.device("cpu")
LPS_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])  # DICOM patient coordinates (LPS) to NIfTI's (RAS)


def saved_model(folder: Path, **overrides) -> Path:
    """A run folder's ``final_model.pt`` and ``summary.json`` (its settings)."""
    settings = RunSettings.from_run_config({**CONFIG, **overrides})
    torch.manual_seed(0)
    model = build_model(settings.model)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), folder / "final_model.pt")
    (folder / "summary.json").write_text(json.dumps({"config": settings.to_run_config()}))
    return folder / "final_model.pt"


def fedseg(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "server.cli", *args], capture_output=True,
                          text=True, timeout=300, cwd=APP_DIR)


def test_a_dicom_series_gets_a_dicom_seg_that_reads_back_to_the_same_mask(
        tmp_path, synthetic_sites):
    model = load_model(saved_model(tmp_path / "run"))
    series = sorted((synthetic_sites[0] / "imagesTs").iterdir())[0]
    result = segment(model, series, CPU)
    assert 0 < result.mask.sum() < result.mask.size  # a mask worth writing
    (out,) = write_result(model, result, tmp_path / "out")
    image, meta = read_image(series)
    assert np.array_equal(read_label(out, meta)[0], result.mask)  # highdicom reads it back
    seg = pydicom.dcmread(out)
    source = pydicom.dcmread(next(series.iterdir()))
    assert seg.Modality == "SEG" and seg.SegmentationType == "BINARY"
    assert seg.StudyInstanceUID == source.StudyInstanceUID
    assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID
    assert seg.SeriesInstanceUID != source.SeriesInstanceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID
    segment_0 = seg.SegmentSequence[0]
    assert segment_0.SegmentAlgorithmType == "AUTOMATIC"
    algorithm = segment_0.SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmName == "fedseg"
    assert model.sha256[:64] in str(algorithm.AlgorithmParameters)
    assert int(seg.NumberOfFrames) == image.shape[-1]
    (tmp_path / "frac").mkdir()
    (fractional,) = write_result(model, result, tmp_path / "frac", fractional=True)
    assert pydicom.dcmread(fractional).SegmentationType == "FRACTIONAL"
    validator = shutil.which("dciodvfy")
    if validator is None:
        pytest.skip("dciodvfy (dicom3tools, an independent DICOM validator) is not "
                    "installed: apt-get install dicom3tools")
    for path in (out, fractional, next(series.iterdir())):
        report = subprocess.run([validator, str(path)], capture_output=True, text=True)
        errors = [line for line in (report.stdout + report.stderr).splitlines()
                  if line.startswith("Error")]
        assert errors == [], (path.name, errors)


def test_a_real_ct_series_gets_a_valid_seg(tmp_path, dicom_dir):
    series = tmp_path / "ct"
    series.mkdir()
    for f in (dicom_dir / "rtutils_ct_rtstruct" / "mock_data").glob("ct_*.dcm"):
        shutil.copy(f, series / f.name)
    model = load_model(saved_model(tmp_path / "run"))
    result = segment(model, series, CPU)
    (out,) = write_result(model, result, tmp_path)
    assert np.array_equal(read_label(out, result.meta)[0], result.mask)
    validator = shutil.which("dciodvfy")
    if validator:
        report = subprocess.run([validator, str(out)], capture_output=True, text=True)
        assert not [line for line in (report.stdout + report.stderr).splitlines()
                    if line.startswith("Error")]


def test_nifti_gets_a_label_map_on_the_sources_grid(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.normal(size=(40, 36, 5)).astype(np.float32)
    data[10:20, 8:30, :] += 4
    affine = np.diag([-0.8, -0.8, 2.5, 1.0])  # LPS-like: flipped against RAS
    affine[:3, 3] = (12, -30, 5)
    src = tmp_path / "scan.nii.gz"
    scan = nib.Nifti1Image(data, affine)
    scan.set_qform(affine, code=1)  # scanner-anatomical, as a converter writes it
    scan.set_sform(affine, code=1)
    nib.save(scan, str(src))
    model = load_model(saved_model(tmp_path / "run"))
    result = segment(model, src, CPU)
    (out,) = write_result(model, result, tmp_path)
    written = nib.load(str(out))
    assert written.shape == data.shape and np.allclose(written.affine, affine)
    # in the space the source names, not nibabel's default (no qform, sform "aligned")
    assert (int(written.header["qform_code"]), int(written.header["sform_code"])) == (1, 1)
    _, meta = read_image(src)
    assert np.array_equal(read_label(out, meta)[0], result.mask)  # same voxels, same place


def test_png_gets_a_mask_and_an_overlay(tmp_path):
    from PIL import Image

    img = np.zeros((48, 64, 3), np.uint8)
    img[10:30, 20:40] = (200, 60, 40)
    src = tmp_path / "fundus.png"
    Image.fromarray(img).save(src)
    model = load_model(saved_model(tmp_path / "run", **{"input-channels": "rgb"}))
    mask, overlay = write_result(model, segment(model, src, CPU), tmp_path)
    assert np.asarray(Image.open(mask)).shape == (48, 64)
    assert set(np.unique(np.asarray(Image.open(mask)))) <= {0, 255}
    drawn = np.asarray(Image.open(overlay))
    assert drawn.shape[1:] == (64, 3) and drawn.shape[0] > 48  # the legend below the image
    drawn = drawn[:48]
    outside = np.asarray(Image.open(mask)) == 0  # the image as read, not as normalised
    assert np.array_equal(drawn[outside], (img / 200 * 255).astype(np.uint8)[outside])


def test_the_overlay_has_a_legend_naming_each_structure_in_its_colour(tmp_path):
    """Below the image (left as drawn), a box of each structure's colour
    beside its name: a model of several structures, then one."""
    from PIL import Image

    site = write_site(tmp_path / "site", 0, 1, 1, labels=ORGAN_LESION, image_format="png")
    source = next((site / "imagesTs").iterdir())
    for folder, overrides, colours in (("two", TWO, [colour(1), colour(2)]),
                                       ("one", {}, [(255, 0, 0)])):
        model = load_model(saved_model(tmp_path / folder, **overrides))
        result = segment(model, source, CPU)
        overlay = write_result(model, result, tmp_path / folder / "out")[1]
        drawn = np.asarray(Image.open(overlay).convert("RGB"))
        height = result.mask.shape[0]
        legend = drawn[height:]
        assert legend.shape[0] >= 10 and (legend == 255).all(axis=-1).mean() > 0.5
        for rgb in colours:  # each structure's box, in the strip below the image
            assert (legend == np.array(rgb, np.uint8)).all(axis=-1).sum() >= 25, rgb
        assert (legend < 80).all(axis=-1).sum() > 4 * len(colours) * 10  # names written


def test_a_model_that_does_not_fit_its_settings_or_its_input_is_refused(tmp_path):
    path = saved_model(tmp_path / "run")
    (tmp_path / "run" / "summary.json").write_text(json.dumps(
        {"config": {**CONFIG, "model-channels": "8,16,32"}}))
    with pytest.raises(ConfigError, match="does not match the U-Net its settings describe"):
        load_model(path)
    lone = tmp_path / "lone" / "final_model.pt"
    lone.parent.mkdir()
    shutil.copy(path, lone)
    with pytest.raises(ConfigError, match="no run settings beside it"):
        load_model(lone)
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ConfigError, match="not a fedseg model") as info:
        load_model(tmp_path / "notes.txt")
    assert "weights_only=False" not in str(info.value)  # torch's advice runs foreign code
    (tmp_path / "run" / "summary.json").write_text("{ cut")
    with pytest.raises(ConfigError, match="summary.json .* cannot be read"):
        load_model(path)
    nan = saved_model(tmp_path / "nan")
    weights = torch.load(nan, weights_only=True)
    next(iter(weights.values())).fill_(float("nan"))
    torch.save(weights, nan)
    with pytest.raises(ConfigError, match="NaN or infinite weights"):
        load_model(nan)
    weights[next(iter(weights))] = "not a tensor"
    torch.save(weights, nan)
    with pytest.raises(ConfigError, match="does not match the U-Net"):
        load_model(nan)
    model3d = load_model(saved_model(tmp_path / "run3d", **{"model-spatial-dims": 3}))
    from PIL import Image

    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "flat.png")
    with pytest.raises(UnsupportedFormatError, match="is 2D; the model is 3D"):
        segment(model3d, tmp_path / "flat.png", CPU)


def test_a_3d_model_refuses_a_series_that_is_not_one_even_volume(tmp_path, synthetic_sites,
                                                                 dicom_dir):
    model3d = load_model(saved_model(tmp_path / "run3d", **{"model-spatial-dims": 3}))
    radial = dicom_dir / "pydicom_testfiles/test_files/dicomdirtests/98892003/MR700"
    with pytest.raises(UnsupportedFormatError, match="lie in 7 planes.*the model is 3D"):
        segment(model3d, radial, CPU)
    whole = sorted((synthetic_sites[0] / "imagesTs").iterdir())[0]
    gap = tmp_path / "gap"
    shutil.copytree(whole, gap)
    slices = sorted(gap.iterdir(), key=lambda f: float(pydicom.dcmread(f).ImagePositionPatient[2]))
    slices[3].unlink()  # a slice lost on the way out of the archive
    with pytest.raises(UnsupportedFormatError, match="not evenly spaced: .* between slices 3 "
                                                     "and 4"):
        segment(model3d, gap, CPU)
    assert segment(model3d, whole, CPU).mask.shape == (64, 64, 8)  # the whole series is read
    assert segment(load_model(saved_model(tmp_path / "run2d")), gap, CPU).mask.shape == (
        64, 64, 7)  # a 2D model reads it slice by slice


@pytest.mark.slow  # with the drills: keeps the default suite under 8 min (issue 27 added ~70 s)
def test_predict_and_evaluate_from_the_command_line(tmp_path, synthetic_sites):
    model = saved_model(tmp_path / "run")
    series = sorted((synthetic_sites[0] / "imagesTs").iterdir())
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not a nifti")
    proc = fedseg("predict", str(model), *map(str, series), str(broken), "--out",
                  str(tmp_path / "out"))
    assert proc.returncode == 1, proc.stdout + proc.stderr  # one input failed, named
    assert "broken.nii.gz" in proc.stdout and "1 of 3 input(s) not segmented" in proc.stdout
    assert "(voxels: foreground " in proc.stdout  # per structure: the run named none
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        f"{s.name}_seg.dcm" for s in series]
    again = fedseg("predict", str(model), str(series[0]), "--out", str(tmp_path / "out"))
    assert again.returncode == 2 and "does not overwrite" in again.stdout
    csv = tmp_path / "scores.csv"
    proc = fedseg("evaluate", str(model), str(synthetic_sites[0]), "--csv", str(csv))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = csv.read_text().splitlines()
    assert rows[0] == "case,dice,iou,hd95,sensitivity,specificity,note" and rows[-1].startswith(
        "mean,") and len(rows) == 2 + len(series)
    again = fedseg("evaluate", str(model), str(synthetic_sites[0]), "--csv", str(csv))
    said = " ".join(again.stdout.split())
    assert again.returncode == 2 and "exists; give a new file name" in said
    assert csv.read_text().splitlines() == rows  # nothing overwritten


@pytest.mark.parametrize("name", ["pydicom_testfiles/test_files/CT_small.dcm",
                                  "pydicom_testfiles/test_files/SC_rgb_rle.dcm",
                                  "pydicom_data/data/eCT_Supplemental.dcm"])
def test_a_single_dicom_file_single_or_multi_frame_gets_a_valid_seg(tmp_path, dicom_dir,
                                                                    name):
    model = load_model(saved_model(tmp_path / "run"))
    source = dicom_dir / name
    result = segment(model, source, CPU)
    (out,) = write_result(model, result, tmp_path / "out")
    seg, src = pydicom.dcmread(out), pydicom.dcmread(source)
    referenced = seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0]
    assert referenced.ReferencedSOPInstanceUID == src.SOPInstanceUID
    frames = 1 if result.mask.ndim == 2 else result.mask.shape[-1]
    assert int(seg.NumberOfFrames) == frames
    if result.meta.frames:  # an enhanced image: where highdicom places the SEG's frames
        import highdicom as hd

        assert {int(f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedFrameNumber)
                for f in seg.PerFrameFunctionalGroupsSequence} == {1, 2}
        volume = hd.seg.Segmentation.from_dataset(seg).get_volume(combine_segments=True)
        placed = nib.as_closest_canonical(nib.Nifti1Image(
            np.asarray(volume.array).astype(np.uint8), LPS_RAS @ volume.affine))
        assert np.array_equal(np.asanyarray(placed.dataobj), result.mask)
    else:
        stored = seg.pixel_array.reshape(frames, *seg.pixel_array.shape[-2:])
        expected = result.mask[None] if result.mask.ndim == 2 else np.moveaxis(result.mask, -1, 0)
        assert np.array_equal(stored.astype(np.uint8), expected)
    validator = shutil.which("dciodvfy")
    if validator:
        report = subprocess.run([validator, str(out)], capture_output=True, text=True)
        assert not [line for line in (report.stdout + report.stderr).splitlines()
                    if line.startswith("Error")], name


def test_an_enhanced_image_whose_frames_each_repeat_the_orientation_gets_one_seg(tmp_path,
                                                                               dicom_dir):
    """Some scanners write the plane orientation into every frame's own group
    instead of the shared one: still one volume, so one SEG, not a SEG a frame
    saying the frames cannot be placed."""
    import copy

    ds = pydicom.dcmread(dicom_dir / "pydicom_data/data/eCT_Supplemental.dcm")
    shared = ds.SharedFunctionalGroupsSequence[0]
    orientation = shared.PlaneOrientationSequence
    del shared.PlaneOrientationSequence
    for frame in ds.PerFrameFunctionalGroupsSequence:
        frame.PlaneOrientationSequence = copy.deepcopy(orientation)
    ds.save_as(tmp_path / "perframe.dcm")
    model = load_model(saved_model(tmp_path / "run"))
    result = segment(model, tmp_path / "perframe.dcm", CPU)
    written = write_result(model, result, tmp_path / "out")
    assert [p.name for p in written] == ["perframe_seg.dcm"] and result.notes == []
    seg = pydicom.dcmread(written[0])
    assert seg.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0] \
        .ImageOrientationPatient == orientation[0].ImageOrientationPatient
    assert dicom_errors(written[0]) == []  # skips without the validator


# --------------------------------------------------------------- several structures

TWO = {"structures": "organ,lesion"}


def dicom_errors(path: Path) -> list[str]:
    """dciodvfy's errors about ``path``; skips the test when it is not installed."""
    validator = shutil.which("dciodvfy")
    if validator is None:
        pytest.skip("dciodvfy (dicom3tools, an independent DICOM validator) is not "
                    "installed: apt-get install dicom3tools")
    report = subprocess.run([validator, str(path)], capture_output=True, text=True)
    return [line for line in (report.stdout + report.stderr).splitlines()
            if line.startswith("Error")]


def test_a_multi_structure_model_writes_a_dicom_seg_segment_per_structure(tmp_path):
    import highdicom as hd
    from nibabel import orientations as ornt

    site = write_site(tmp_path / "site", 0, 1, 1, labels=ORGAN_LESION, label_format="nifti")
    model = load_model(saved_model(tmp_path / "run", **TWO))
    series = next((site / "imagesTs").iterdir())
    result = segment(model, series, CPU)
    assert result.probabilities.shape == (3, *result.mask.shape)
    assert np.allclose(result.probabilities.sum(axis=0), 1, atol=1e-4)
    assert set(np.unique(result.mask)) == {0, 1, 2}  # untrained, but every class somewhere
    (out,) = write_result(model, result, tmp_path / "out")
    (frac,) = write_result(model, result, tmp_path / "frac", fractional=True)

    seg = hd.seg.segread(out)
    assert seg.SegmentationType == "BINARY" and seg.number_of_segments == 2
    for number, name in ((1, "organ"), (2, "lesion")):
        described = seg.get_segment_description(number)
        assert described.segment_label == name
        assert name in described.SegmentDescription
        assert described.segmented_property_type.value == "85756007"  # SCT Tissue
        assert described.algorithm_type.value == "AUTOMATIC"
    _, meta = read_image(series)
    pixels = seg.get_pixels_by_source_instance(  # slices x rows x columns x segments
        source_sop_instance_uids=meta.source_uids, combine_segments=False,
        ignore_spatial_locations=True)
    for k, number in enumerate((1, 2)):  # back on the reader's grid: the same voxels
        on_grid = ornt.apply_orientation(np.transpose(pixels[..., k], (2, 1, 0)),
                                         meta.transform)
        assert np.array_equal(on_grid, result.mask == number), number
    assert np.array_equal(read_label(out, meta)[0], result.mask > 0)  # any segment

    fractional = hd.seg.segread(frac)
    assert fractional.SegmentationType == "FRACTIONAL" and fractional.number_of_segments == 2
    probabilities = fractional.get_pixels_by_source_instance(
        source_sop_instance_uids=meta.source_uids, combine_segments=False,
        ignore_spatial_locations=True)
    for k in range(2):
        on_grid = ornt.apply_orientation(np.transpose(probabilities[..., k], (2, 1, 0)),
                                         meta.transform)
        assert np.abs(on_grid - result.probabilities[k + 1]).max() <= 1 / 255 + 1e-6
    for path in (out, frac):
        assert dicom_errors(path) == [], path.name


def test_a_multi_structure_nifti_is_a_label_map_named_beside_it(tmp_path):
    site = write_site(tmp_path / "site", 1, 1, 1, labels=ORGAN_LESION, image_format="nifti")
    model = load_model(saved_model(tmp_path / "run", **TWO))
    source = next((site / "imagesTs").iterdir())
    result = segment(model, source, CPU)
    out, names = write_result(model, result, tmp_path / "out")
    assert names.name == "case_ts000_labels.json"
    spec = json.loads(names.read_text())
    assert spec["labels"] == {"0": "background", "1": "organ", "2": "lesion"}
    assert spec["model-sha256"] == model.sha256
    written = nib.load(str(out))
    assert written.shape == nib.load(str(source)).shape
    assert written.header.get_intent()[0] == "label"
    assert b"1=organ 2=lesion" in written.header["descrip"].item()
    # the result reads back as a site's label, through the map beside it
    _, meta = read_image(source)
    classes = classes_for(LabelMap(parse_label_map(spec["labels"])),
                          RunSettings.from_run_config(TWO))
    assert np.array_equal(read_label(out, meta, classes)[0], result.mask)


def test_a_multi_structure_png_gets_a_label_map_and_a_coloured_overlay(tmp_path):
    from PIL import Image

    site = write_site(tmp_path / "site", 0, 1, 1, labels=ORGAN_LESION, image_format="png")
    model = load_model(saved_model(tmp_path / "run", **TWO))
    source = next((site / "imagesTs").iterdir())
    result = segment(model, source, CPU)
    mask, overlay, names = write_result(model, result, tmp_path / "out")
    values = np.asarray(Image.open(mask))
    assert np.array_equal(values, result.mask) and set(np.unique(values)) == {0, 1, 2}
    assert json.loads(names.read_text())["labels"]["2"] == "lesion"
    rgb = np.asarray(Image.open(overlay)).astype(np.float32)[:values.shape[0]]  # not legend
    grey = (result.image[0] / result.image.max() * 255)[..., None]
    expected = {0: grey}  # the image itself, and each class blended with its colour
    expected.update({n: 0.55 * grey + 0.45 * np.array(colour(n), np.float32) for n in (1, 2)})
    for number, want in expected.items():
        where = values == number
        assert np.abs(rgb[where] - np.broadcast_to(want, rgb.shape)[where]).max() <= 1.0


def test_the_command_line_counts_each_structure_and_refuses_a_label_for_several(
        tmp_path, capsys):
    import argparse

    from client.cli import cmd_predict

    site = write_site(tmp_path / "site", 0, 1, 1, labels=ORGAN_LESION, image_format="nifti")
    model = saved_model(tmp_path / "run", **TWO)
    source = next((site / "imagesTs").iterdir())

    def predict(out: str, label: str | None = None) -> int:
        return cmd_predict(argparse.Namespace(model=str(model), inputs=[str(source)],
                                              out=str(tmp_path / out), fractional=False,
                                              label=label, device="cpu"))

    assert predict("out") == 0
    counts = segment(load_model(model), source, CPU).voxels()
    printed = " ".join(capsys.readouterr().out.split())
    assert f"(voxels: organ {counts['organ']}, lesion {counts['lesion']})" in printed
    with pytest.raises(ConfigError, match="structures' names"):
        predict("other", label="liver")
