"""A site's label map may name structures the run does not learn (a
radiotherapy structure set lists ten or more ROIs): they are background for
the run, a learned structure wins where one overlaps it, and a structure the
run learns that the map lacks still refuses the site (common/data/labels.py,
docs/data.md "Structures and label maps")."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from common.config import RunSettings
from common.data.check import check_site
from common.data.labels import LabelMap, LabelMapError, classes_for, site_classes
from common.data.readers import read_image, read_label
from common.data.rtstruct import write_rtstruct
from common.data.site import load_site
from common.data.synthetic import ORGAN_LESION, write_site

# A structure set as a planning system exports it: the run learns two of its ROIs
ROIS = ["GTV", "Lung_L", "Heart", "BODY", "Couch", "SpinalCord", "Lung_R", "Esophagus",
        "PTV", "CTV"]
LEARNED = {"GTV": 2, "Lung_L": 1}  # the run's "lung left,gtv": class 1 lung, 2 GTV
SITE_MAP = {"0": "background", "1": "gtv", "2": "lung left", "3": "heart", "4": "body",
            "5": "couch", "6": "spinal cord", "7": "lung right", "8": "esophagus",
            "9": "ptv", "10": "ctv"}
ALIASES = {"lung left": ["Lung_L"], "lung right": ["Lung_R"]}


def run(structures: str) -> RunSettings:
    return RunSettings.from_run_config({"structures": structures})


def roi_masks(slices: int) -> np.ndarray:
    """``ROIs x slices x 64 x 64``: learned ROIs (GTV, Lung_L), unlearned ones
    overlapping them (Heart over part of the GTV, BODY around everything, PTV
    and CTV around the GTV) and unlearned ones beside them (Couch, SpinalCord,
    Lung_R, Esophagus)."""
    boxes = {"GTV": (20, 40, 24, 44), "Lung_L": (6, 16, 6, 30), "Heart": (32, 50, 34, 54),
             "BODY": (2, 58, 2, 62), "Couch": (59, 63, 0, 64), "SpinalCord": (46, 52, 4, 10),
             "Lung_R": (6, 16, 36, 60), "Esophagus": (22, 28, 8, 14), "PTV": (16, 44, 20, 48),
             "CTV": (18, 42, 22, 46)}
    masks = np.zeros((len(ROIS), slices, 64, 64), bool)
    for i, roi in enumerate(ROIS):
        r0, r1, c0, c1 = boxes[roi]
        masks[i, :, r0:r1, c0:c1] = True
    return masks


@pytest.fixture
def rt_site(tmp_path) -> Path:
    """A synthetic radiotherapy site whose RTSTRUCTs hold the ten ROIs above,
    written with fedseg's own writer, and whose map names all ten."""
    site = write_site(tmp_path / "rt", 0, 1, 1, labels=ORGAN_LESION, label_format="rtstruct",
                      slices=2)
    spec = json.loads((site / "dataset.json").read_text())
    for entry in spec["training"] + spec["test"]:
        series = site / entry["image"]
        datasets = [pydicom.dcmread(f) for f in sorted(series.iterdir())]
        # the writer takes the slices in stored order; the reader sorts by position
        datasets.sort(key=lambda ds: float(ds.ImagePositionPatient[2]))
        write_rtstruct(datasets, roi_masks(len(datasets)), ROIS, site / entry["label"])
    spec["labels"], spec["label_aliases"] = SITE_MAP, ALIASES
    (site / "dataset.json").write_text(json.dumps(spec))
    return site


def expected(meta_series: Path) -> np.ndarray:
    """The classes the reader should give, on the reader's grid: the learned
    ROIs' own pixels (GTV over the lung where they would meet), nothing else."""
    _, meta = read_image(meta_series)
    masks = roi_masks(len(meta.source_uids))
    stored = np.zeros(masks.shape[1:], np.uint8)
    for roi, cls in sorted(LEARNED.items(), key=lambda item: item[1]):
        stored[masks[ROIS.index(roi)]] = cls
    from common.data.readers import _on_image_grid

    return _on_image_grid(stored, meta)


def test_an_rtstruct_of_ten_rois_reads_as_the_runs_two_structures(rt_site, caplog):
    classes = site_classes(rt_site, run("lung left,gtv"))
    assert set(classes.unlearned) == {"heart", "body", "couch", "spinal cord", "lung right",
                                      "esophagus", "ptv", "ctv"}
    spec = json.loads((rt_site / "dataset.json").read_text())
    entry = spec["training"][0]
    image, meta = read_image(rt_site / entry["image"])
    with caplog.at_level(logging.INFO, logger="common.data.labels"):
        label = read_label(rt_site / entry["label"], meta, classes)
    assert label.shape == image.shape
    want = expected(rt_site / entry["image"])
    assert set(np.unique(label)) == {0, 1, 2}
    # the learned ROIs whole, where Heart, BODY, PTV and CTV overlap them too
    assert np.array_equal(label[0], want)
    masks = {roi: m for roi, m in zip(ROIS, roi_masks(2), strict=True)}
    assert (masks["Heart"] & masks["GTV"]).any() and (masks["Heart"] & ~masks["GTV"]).any()
    # unlearned ROIs beside the learned ones are background
    assert int(label.sum()) == int(want.sum())
    assert "match no structure of the run" in caplog.text and "'Heart'" in caplog.text


def test_the_same_site_serves_a_run_of_other_structures(rt_site):
    """One map for every run: the same files read as 'heart' alone, the GTV
    and BODY that contain or cross it being background."""
    (case, *_) = load_site(rt_site, "training", site_classes(rt_site, run("heart")))
    masks = roi_masks(2)
    assert int((case.label == 1).sum()) == int(masks[ROIS.index("Heart")].sum())
    assert set(np.unique(case.label)) == {0, 1}


def test_site_check_says_unlearned_structures_are_background(rt_site):
    check = check_site(rt_site, settings=run("lung left,gtv"))
    assert check.can_join and check.all_usable, check.summary()
    summary = check.summary()
    assert "not learned by this run, so read as background:" in summary
    assert "'heart'" in summary and "'couch'" in summary and "refus" not in summary
    (case,) = [c for c in check.cases if c.split == "training"]
    assert set(case.structures) == {"lung left", "gtv"} and case.note == ""


def test_a_structure_the_run_learns_and_the_map_lacks_still_refuses_the_site(rt_site):
    check = check_site(rt_site, settings=run("gtv,liver"))
    assert not check.can_join and not check.cases
    problem = check.split_errors["training"]
    assert "has no 'liver', which the run learns" in problem
    with pytest.raises(LabelMapError) as err:
        site_classes(rt_site, run("gtv,liver"))
    assert err.value.scrubbed() == ("fedseg data error (the site's label map does not fit "
                                    "the run's structures (structure 'liver'))")


def test_a_nifti_site_whose_map_lists_extra_labels(tmp_path):
    """dataset.json names organ, lesion (inside the organ) and neighbour; a run
    of organ and neighbour reads lesion voxels as background (a value map holds
    one structure per voxel, docs/data.md), a value outside the map is still
    an error."""
    site = write_site(tmp_path / "nii", 0, 2, 1, labels={**ORGAN_LESION, 3: "neighbour"},
                      image_format="nifti")
    spec = json.loads((site / "dataset.json").read_text())
    classes = site_classes(site, run("organ,neighbour"))
    assert classes.unlearned == ("lesion",)
    assert classes.value_class == {0: 0, 1: 1, 2: 0, 3: 2}
    for entry, case in zip(spec["training"], load_site(site, "training", classes),
                           strict=True):
        stored = np.asarray(nib.load(str(site / entry["label"])).dataobj)
        assert (stored == 2).any()  # the file holds lesions
        # the reader's grid is the file's turned to RAS: compare counts per value
        got = np.bincount(case.label.ravel(), minlength=3)
        assert got[1] == (stored == 1).sum() and got[2] == (stored == 3).sum()
        assert got[0] == (stored == 0).sum() + (stored == 2).sum()
    check = check_site(site, settings=run("organ,neighbour"))
    assert check.all_usable and "'lesion'" in check.summary()
    # a value the map does not name is still refused, naming it
    entry = spec["training"][0]
    img = nib.load(str(site / entry["label"]))
    data = np.asarray(img.dataobj).copy()
    data[0, 0, 0] = 9
    nib.save(nib.Nifti1Image(data, img.affine), str(site / entry["label"]))
    check = check_site(site, settings=run("organ,neighbour"))
    (bad,) = [c for c in check.cases if not c.usable]
    assert "value(s) 9" in bad.problem


def test_a_run_of_no_named_structure_still_needs_one_structure_in_the_map():
    with pytest.raises(LabelMapError, match="2 structures.*name it"):
        classes_for(LabelMap({0: "background", 1: "liver", 2: "heart"}), run(""))
