"""A site's label map against the run's structures (common/data/labels.py),
and labels read by value through it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.config import RunSettings
from common.data.check import check_site
from common.data.labels import LabelMap, LabelMapError, classes_for, parse_label_map
from common.data.site import read_site
from common.errors import ConfigError, DataError


def run(structures: str = "") -> RunSettings:
    return RunSettings(structures=structures)


def test_both_label_map_forms_read_the_same():
    msd = parse_label_map({"0": "background", "1": "liver", "2": "lesion"})
    nnunet = parse_label_map({"background": 0, "liver": 1, "lesion": 2})
    assert msd == nnunet == {0: "background", 1: "liver", 2: "lesion"}


@pytest.mark.parametrize("spec, says", [
    ({}, "non-empty mapping"),
    ({"background": 0, "liver": [1, 2]}, "nnU-Net region"),
    ({"0": "background", "one": "liver"}, "not an integer"),
    ({"0": "background", "1": ""}, "has no name"),
])
def test_a_malformed_label_map_says_what_is_wrong(spec, says):
    with pytest.raises(LabelMapError, match=says):
        parse_label_map(spec)


def test_a_sites_map_is_matched_by_name_not_value():
    site = LabelMap({0: "background", 7: "Lesion", 3: "LIVER"})
    classes = classes_for(site, run("liver,lesion"))
    assert classes.structures == ("liver", "lesion")
    assert classes.value_class == {0: 0, 3: 1, 7: 2}  # the run's order, the site's values
    labels = classes.classes_of_values(np.array([0, 3, 7, 3]), "label x")
    assert labels.tolist() == [0, 1, 2, 1]
    with pytest.raises(DataError, match=r"value\(s\) 5, which the label map"):
        classes.classes_of_values(np.array([0, 5]), "label x")


@pytest.mark.parametrize("site, structures, says, named", [
    ({0: "background", 1: "liver", 2: "tumour"}, "liver,lesion", "has no 'lesion'", "lesion"),
    ({0: "background", 1: "liver", 2: "lesion"}, "", "2 structures", None),
    ({1: "liver"}, "liver", "no 'background'", None),
])
def test_a_map_that_disagrees_is_refused_naming_the_structure(site, structures, says, named):
    with pytest.raises(LabelMapError, match=says) as err:
        classes_for(LabelMap(site), run(structures))
    # what may reach the server names the run's structure only, never the site's
    scrubbed = err.value.scrubbed()
    assert "does not fit the run's structures" in scrubbed
    assert ("tumour" not in scrubbed and "kidney" not in scrubbed)
    assert (named in scrubbed) if named else "structure '" not in scrubbed


def test_a_structure_the_run_does_not_learn_is_background():
    """A map may name more than the run learns (tests/unit/test_unlearned_structures.py):
    kidney's value is background for a liver and lesion run."""
    classes = classes_for(LabelMap({0: "background", 1: "liver", 2: "lesion", 3: "kidney"}),
                          run("liver,lesion"))
    assert classes.value_class == {0: 0, 1: 1, 2: 2, 3: 0} and classes.unlearned == ("kidney",)
    assert classes.classes_of_values(np.array([3, 1, 2]), "label x").tolist() == [0, 1, 2]


def test_a_named_run_needs_a_map_at_every_site():
    with pytest.raises(LabelMapError, match="no label map.*liver, lesion"):
        classes_for(None, run("liver,lesion"))
    assert classes_for(None, run()).value_class is None  # one structure: read as before


def test_the_structures_setting_is_checked():
    with pytest.raises(ConfigError, match="twice"):
        run("liver, LIVER")
    with pytest.raises(ConfigError, match="background is always class 0"):
        run("background,liver")
    assert run("liver , lesion").model.out_channels == 3
    assert run().model.out_channels == 2 and run().structure_names == ("foreground",)


def dark_site(root: Path, n: int = 4, labels: dict | None = None) -> Path:
    """PNG cases whose structure (a ring, like a cell membrane) is the dark
    value 0 of the mask and the background 255; the image shows the ring bright."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:64, :64]
    entries = []
    for i in range(n):
        cy, cx, r = rng.integers(24, 40), rng.integers(24, 40), rng.integers(10, 18)
        dist = np.hypot(yy - cy, xx - cx)
        ring = np.abs(dist - r) < 2.5
        image = (40 + 150 * ring + rng.normal(0, 12, ring.shape)).clip(0, 255)
        Image.fromarray(image.astype(np.uint8)).save(root / f"img{i}.png")
        Image.fromarray(np.where(ring, 0, 255).astype(np.uint8)).save(root / f"mask{i}.png")
        entries.append({"image": f"img{i}.png", "label": f"mask{i}.png"})
    spec = {"labels": labels or {"0": "membrane", "255": "background"},
            "training": entries[: n - 1], "test": entries[n - 1:]}
    (root / "dataset.json").write_text(json.dumps(spec))
    return root


def test_a_dark_structure_is_read_the_right_way_round(tmp_path):
    site = dark_site(tmp_path)
    case = read_site(site, "training", classes=classes_for(
        LabelMap({0: "membrane", 255: "background"}), run())).cases[0]
    mask = np.asarray(Image.open(site / "mask0.png"))
    assert (case.label[0] == (mask == 0)).all()
    assert 0 < case.label.mean() < 0.3  # the ring, not the background


def test_a_mask_value_outside_the_map_is_named(tmp_path):
    site = dark_site(tmp_path, labels={"0": "background", "1": "membrane"})
    Image.fromarray(np.full((64, 64), 128, np.uint8)).save(site / "mask1.png")
    check = check_site(site)
    (bad,) = [c for c in check.cases if not c.usable]
    assert bad.index == 1 and "value(s) 128" in bad.problem and "0 background" in bad.problem


def test_a_site_whose_map_disagrees_is_refused_before_any_case(tmp_path):
    site = dark_site(tmp_path)
    check = check_site(site, settings=run("membrane,nucleus"))
    assert not check.can_join and not check.cases
    assert "has no 'nucleus'" in check.split_errors["training"]


def test_a_dark_structure_is_learned_when_the_map_says_so(tmp_path):
    """The issue's inverted-membrane site: with the map, the model learns the
    dark-valued structure (Dice on it high), not its background."""
    from common.site_algorithm import SiteAlgorithm

    site = dark_site(tmp_path, n=5)
    settings = RunSettings.from_run_config({
        "model-channels": "8,16,32", "patch-size": 32, "batch-size": 8,
        "patches-per-image": 4, "learning-rate": 0.01, "num-rounds": 1, "local-epochs": 25,
        "test-time-flips": False, "mixed-precision": False})
    algo = SiteAlgorithm(settings, "dark", site, device="cpu")
    untrained = algo.evaluate(None)["dice"]
    algo.train(None, {"server-round": 1})
    trained = algo.evaluate(None)["dice"]
    assert trained > 0.6 and trained > untrained + 0.2, (untrained, trained)
