"""Several structures per case: synthetic sites that draw them (an organ and
lesions inside it) with their label map, and a U-Net that learns each of
them, in 2D and in 3D, also on volumes thinner than a patch."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from common.config import RunSettings
from common.data.labels import LabelMapError, site_classes
from common.data.readers import read_image
from common.data.site import load_site
from common.data.synthetic import ORGAN_LESION, scanner_for, structures_phantom, write_site
from common.inference import load_model, segment, write_result
from common.metrics import case_metrics
from common.site_algorithm import SiteAlgorithm
from common.training import predict

CPU = torch.device("cpu")
TWO = "organ,lesion"


def settings(dims: int, **more) -> RunSettings:
    """A small U-Net that learns two structures in seconds on a 2-core CPU."""
    return RunSettings.from_run_config({
        "structures": TWO, "model-spatial-dims": dims, "model-channels": "8,16,32",
        "patch-size": 32, "learning-rate": 0.01, "lr-schedule": "constant", "num-rounds": 1,
        "test-time-flips": False, "mixed-precision": False, **more})


def dice_per_structure(algo: SiteAlgorithm) -> dict[int, float]:
    """Mean Dice of each class over the site's test cases (one class against
    the rest, as the per-case metrics score one structure)."""
    scores: dict[int, list[float]] = {1: [], 2: []}
    for case in algo.cases("test"):
        pred = predict(algo.model, case.image, algo.settings, algo.device)
        for k, values in scores.items():
            values.append(case_metrics(pred == k, case.label == k, case.spacing)["dice"])
    return {k: float(np.mean(v)) for k, v in scores.items()}


# ------------------------------------------------------------------ synthetic sites


@pytest.mark.parametrize("image_format, dims", [("nifti", 3), ("png", 2), ("dicom", 3)])
def test_a_synthetic_site_draws_an_organ_with_lesions_inside_and_says_its_map(
        tmp_path, image_format, dims):
    own = "nifti" if image_format == "dicom" else None  # NIfTI and PNG images: their own
    site = write_site(tmp_path / "site", 2, 2, 1, labels=ORGAN_LESION,
                      image_format=image_format, label_format=own)
    spec = json.loads((site / "dataset.json").read_text())
    assert spec["labels"] == {"0": "background", "1": "organ", "2": "lesion"}
    contrast = scanner_for(2).lesion_contrast
    for case in load_site(site, "training", site_classes(site, settings(dims))):
        assert case.spatial_dims == dims and set(np.unique(case.label)) == {0, 1, 2}
        image, label = case.image[0], case.label[0]
        body = image[label == 0]
        tissue = body[body > np.percentile(body, 60)].mean()  # not the air around it
        organ, lesion = image[label == 1].mean(), image[label == 2].mean()
        assert organ > tissue  # the organ is brighter than the tissue around it
        assert (lesion - organ) * np.sign(contrast) > 0  # lesions: the scanner's contrast


def test_three_structures_nest_and_lie_side_by_side():
    _, classes = structures_phantom(np.random.default_rng(1), scanner_for(0), 3)
    assert set(np.unique(classes)) == {0, 1, 2, 3}
    organ_x = np.nonzero(np.isin(classes, (1, 2)))[2]
    lesion_x = np.nonzero(classes == 2)[2]
    neighbour_x = np.nonzero(classes == 3)[2]
    assert organ_x.min() <= lesion_x.min() and lesion_x.max() <= organ_x.max()  # inside
    assert neighbour_x.mean() > organ_x.max() - 3  # beside it, not within


def test_a_site_map_can_use_other_values_or_names(tmp_path):
    site = write_site(tmp_path / "values", 0, 1, 1, image_format="nifti",
                      labels={0: "background", 10: "organ", 20: "lesion"})
    import nibabel as nib

    stored = np.asarray(nib.load(str(next((site / "labelsTr").iterdir()))).dataobj)
    assert set(np.unique(stored)) == {0, 10, 20}  # the map's values in the files...
    (case,) = load_site(site, "training", site_classes(site, settings(3)))
    assert set(np.unique(case.label)) == {0, 1, 2}  # ...read as the run's classes
    renamed = write_site(tmp_path / "renamed", 0, 1, 1, image_format="nifti",
                         labels={0: "background", 1: "organ", 2: "tumour"})
    with pytest.raises(LabelMapError, match="has no 'lesion'"):
        site_classes(renamed, settings(3))


def test_dicom_labels_name_each_structure(tmp_path):
    """A multi-segment DICOM SEG and an RTSTRUCT, one segment or ROI per structure,
    named as the map names it (the readers match them by name)."""
    import pydicom

    seg_site = write_site(tmp_path / "seg", 0, 1, 1, labels=ORGAN_LESION, label_format="seg")
    seg = pydicom.dcmread(next((seg_site / "labelsTr").iterdir()))
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["organ", "lesion"]
    rt_site = write_site(tmp_path / "rt", 0, 1, 1, labels=ORGAN_LESION, label_format="rtstruct")
    rt = pydicom.dcmread(next((rt_site / "labelsTr").iterdir()))
    assert [r.ROIName for r in rt.StructureSetROISequence] == ["organ", "lesion"]
    validator = shutil.which("dciodvfy")  # an independent validator, where installed
    labels = [*(seg_site / "labelsTr").iterdir(), *(rt_site / "labelsTr").iterdir()]
    for path in (labels if validator else ()):
        report = subprocess.run([validator, str(path)], capture_output=True, text=True)
        assert not [line for line in (report.stdout + report.stderr).splitlines()
                    if line.startswith(("Error", "Warning"))], path.name


# ------------------------------------------------------------------ learning


def learns(site: Path, dims: int, batch: int) -> tuple[float, dict, float, dict]:
    """Headline Dice and each structure's, before and after one call of 8 local
    epochs (4 patches per image) on ``site``."""
    torch.manual_seed(0)
    algo = SiteAlgorithm(settings(dims, **{"batch-size": batch, "patches-per-image": 4,
                                           "local-epochs": 8}), site.name, site, device=CPU)
    before, before_each = algo.evaluate(None)["dice"], dice_per_structure(algo)
    algo.train(None, {"server-round": 1})
    return before, before_each, algo.evaluate(None)["dice"], dice_per_structure(algo)


def test_a_3d_model_learns_two_structures_on_ct_volumes(tmp_path):
    """Four thin CT volumes (64 x 64 x 8, padded to the 32-voxel patch), 32
    steps: Dice of the organ and of the lesion inside it both rise from the
    untrained model's (organ 0.63-0.79, lesion 0.49-0.67 over three seeds)."""
    site = write_site(tmp_path / "ct", 0, 4, 2, labels=ORGAN_LESION, image_format="nifti")
    before, before_each, after, after_each = learns(site, 3, batch=4)
    assert after > 0.7 and after > before + 0.3, (before, after)
    assert after_each[1] > 0.5 and after_each[1] > before_each[1] + 0.3, (
        before_each, after_each)
    assert after_each[2] > 0.3 and after_each[2] > before_each[2] + 0.25, (
        before_each, after_each)


def test_a_2d_model_learns_two_structures_on_images(tmp_path):
    site = write_site(tmp_path / "png", 1, 12, 4, labels=ORGAN_LESION, image_format="png")
    before, before_each, after, after_each = learns(site, 2, batch=8)
    assert after > 0.6 and after > before + 0.3, (before, after)
    for k in (1, 2):  # over three seeds: organ 0.67-0.85, lesion 0.59-0.80
        assert after_each[k] > 0.45 and after_each[k] > before_each[k] + 0.3, (
            k, before_each, after_each)


def test_a_volume_thinner_than_the_patch_is_padded_in_training_and_inference(tmp_path):
    """Five slices, a 32-voxel 3D patch: one training step, a prediction on
    the volume's own grid, a score, and a label map written on the source's."""
    import nibabel as nib

    site = write_site(tmp_path / "thin", 1, 1, 1, labels=ORGAN_LESION, image_format="nifti",
                      slices=5)
    s = settings(3, **{"batch-size": 2, "patches-per-image": 2})
    torch.manual_seed(0)
    algo = SiteAlgorithm(s, "thin", site, device=CPU)
    _, metrics = algo.train(None, {"server-round": 1})
    assert metrics["train-steps"] == 1
    (case,) = algo.cases("test")
    assert case.image.shape == (1, 64, 64, 5)
    assert predict(algo.model, case.image, s, CPU).shape == (1, 64, 64, 5)
    assert 0 <= algo.evaluate(None)["dice"] <= 1
    run = tmp_path / "run"
    run.mkdir()
    torch.save(algo.weights(), run / "final_model.pt")
    (run / "summary.json").write_text(json.dumps({"config": s.to_run_config()}))
    model = load_model(run / "final_model.pt")
    source = next((site / "imagesTs").iterdir())
    result = segment(model, source, CPU)
    out, _ = write_result(model, result, tmp_path / "out")
    assert nib.load(str(out)).shape == nib.load(str(source)).shape == (64, 64, 5)
    assert result.mask.shape == read_image(Path(source))[0].shape[1:]
