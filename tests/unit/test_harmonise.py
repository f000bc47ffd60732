"""The federated fingerprint and the harmonisation a run fixes from it
(common/data/harmonise.py), without a federation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from common.data.harmonise import (
    Harmonisation,
    Intensity,
    SiteFingerprint,
    combine,
    modality_of,
    site_fingerprint,
    site_modality,
    target_shape,
)
from common.data.site import Case
from common.data.transforms import Preparation, prepare_case
from common.errors import ConfigError, DataError


def ct_case(rng, shape, spacing, offset=0.0, scale=1.0):
    label = np.zeros((1, *shape), np.uint8)
    label[(0, *(slice(n // 4, 3 * n // 4) for n in shape))] = 1
    image = rng.normal(40, 10, (1, *shape)).astype(np.float32)  # soft tissue, HU
    image[label > 0] = rng.normal(300, 50, int(label.sum()))  # contrast-filled, HU
    return image * scale + offset, label, spacing


def test_the_federations_ct_statistics_are_those_of_the_pooled_voxels():
    """Mean and std are exact from the sites' counts, means and stds; the clip
    bounds are the voxel-weighted means of the sites' percentiles."""
    rng = np.random.default_rng(0)
    sites = {f"s{k}": [ct_case(rng, (12, 10, 6 + k), (0.8, 0.8, 2.5)) for _ in range(2 + k)]
             for k in range(3)}
    prints = {name: site_fingerprint(cases, "CT") for name, cases in sites.items()}
    fixed = combine(prints)
    pooled = np.concatenate([img[lbl > 0] for cases in sites.values()
                             for img, lbl, _ in cases]).astype(np.float64)
    ct = fixed.for_modality("CT")
    assert ct.scheme == "ct"
    assert ct.mean == pytest.approx(pooled.mean(), abs=1e-3)
    assert ct.std == pytest.approx(pooled.std(), abs=1e-3)
    low, high = np.percentile(pooled, (0.5, 99.5))
    assert ct.clip[0] == pytest.approx(low, rel=0.05) and ct.clip[1] == pytest.approx(high,
                                                                                      rel=0.05)
    assert fixed.sites == 3


def test_target_spacing_is_the_case_weighted_median_and_nnunets_rule_for_thin_axes():
    def fp(cases, p10, p50, p90=None):
        return SiteFingerprint(cases, "MR", (p10, p50, p90 or p50), ((64,) * 3,) * 3,
                               0, 0.0, 0.0, 0.0, 0.0)

    even = combine({"a": fp(10, (1, 1, 1), (1, 1, 1)), "b": fp(30, (1.5, 1.5, 1.5),
                                                            (1.5, 1.5, 1.5))})
    assert even.spacing == (1.5, 1.5, 1.5)  # b holds three quarters of the cases
    assert even.for_modality("MR") == Intensity()  # MR: per-case z-score
    # anisotropic (5 mm slices against 0.7 mm): the coarse axis takes the 10th percentile
    thick = combine({"a": fp(20, (0.7, 0.7, 3.0), (0.7, 0.7, 5.0))})
    assert thick.spacing == (0.7, 0.7, 3.0)
    assert combine({"a": fp(5, (1, 1, 1), (1, 1, 1))}, "intensity").spacing is None
    assert combine({"a": fp(5, (1, 1, 1), (1, 1, 1))}, "auto", (2.0, 2.0, 2.0)).spacing == \
        (2.0, 2.0, 2.0)
    assert combine({"a": fp(5, (1, 1, 1), (1, 1, 1))}, "off") == Harmonisation()
    with pytest.raises(DataError, match="2D and 3D mixed"):
        combine({"a": fp(5, (1, 1, 1), (1, 1, 1)),
                 "b": SiteFingerprint(5, "MR", ((1, 1),) * 3, ((9, 9),) * 3, 0, 0, 0, 0, 0)})


def test_under_a_robust_rule_a_site_overstating_its_counts_moves_nothing():
    """The attack: one hospital of four reports a million cases scanned at
    0.3 mm and 10^12 CT foreground voxels around 5000 HU. Weighted by what
    sites report (the default, ``aggregation = mean``), it sets the spacing
    and the CT scale; counting each site once (a robust ``aggregation``), the
    medians stay among the honest sites' values."""
    def fp(cases, spacing, voxels, mean, std, low, high):
        return SiteFingerprint(cases, "CT", ((spacing,) * 3,) * 3, ((64.0,) * 3,) * 3,
                               voxels, mean, std, low, high)

    honest = {"a": fp(20, 1.0, 10**6, 100.0, 50.0, -20.0, 250.0),
              "b": fp(30, 1.2, 2 * 10**6, 120.0, 60.0, -10.0, 280.0),
              "c": fp(25, 0.9, 10**6, 90.0, 40.0, -30.0, 230.0)}
    liar = {**honest, "d": fp(10**6, 0.3, 10**12, 5000.0, 1.0, 4990.0, 5010.0)}
    steered = combine(liar)
    assert steered.spacing == (0.3, 0.3, 0.3)
    assert steered.for_modality("CT").mean == pytest.approx(5000.0, abs=1.0)
    for prints in (honest, liar):
        robust = combine(prints, each_site_once=True)
        ct = robust.for_modality("CT")
        assert robust.spacing in ((0.9,) * 3, (1.0,) * 3)
        assert 90.0 <= ct.mean <= 120.0 and 40.0 <= ct.std <= 60.0
        assert -30.0 <= ct.clip[0] <= -10.0 and 230.0 <= ct.clip[1] <= 280.0
    assert combine(liar, each_site_once=True).spacing == (0.9,) * 3  # the lower middle of four
    assert combine(honest, each_site_once=True).spacing == (1.0,) * 3


@pytest.mark.parametrize(("key", "value", "words"), [
    ("fg-mean", math.nan, "'fg-mean' must be a finite number"),
    ("fg-std", -1.0, "'fg-std' must be a finite number from 0"),
    ("cases", 0, "'cases' must be a finite number from 1"),
    ("spacing-p50", [1.0, -2.0, 1.0], "'spacing-p50' must be 2 or 3 numbers"),
    ("spacing-p50", [1.0] * 50, "'spacing-p50' must be 2 or 3 numbers"),
    ("size-p90", "big", "'size-p90' must be 2 or 3 numbers"),
    ("spacing-p10", [1.0, 1.0], "must have one length"),
])
def test_a_broken_or_hostile_fingerprint_is_refused_naming_the_key(key, value, words):
    good = SiteFingerprint(4, "MR", ((1.0, 1.0, 1.0),) * 3, ((32.0,) * 3,) * 3, 100, 1.0, 2.0,
                           -3.0, 5.0).to_metrics()
    assert SiteFingerprint.from_metrics(good, "MR").cases == 4
    with pytest.raises(DataError, match=words):
        SiteFingerprint.from_metrics({**good, key: value}, "MR")
    with pytest.raises(DataError, match="modality must be one of"):
        SiteFingerprint.from_metrics(good, "ultrasound")


@pytest.mark.parametrize("text", [
    "{}x", '{"spacing": [0, 1, 1]}', '{"spacing": [1, 1, 1], "extra": 1}',
    '{"intensity": {"CT": {"scheme": "ct", "clip": [1, 0], "mean": 0, "std": 1}}}',
    '{"intensity": {"CT": {"scheme": "ct", "clip": [0, 1], "mean": 0, "std": 0}}}',
    '{"intensity": {"PET": {"scheme": "zscore"}}}', '{"intensity": {"CT": {"scheme": "x"}}}',
    "[" * 5000,
])
def test_a_malformed_harmonisation_from_the_server_is_refused(text):
    with pytest.raises(ConfigError, match="harmonisation"):
        Harmonisation.from_wire(text)


def test_a_harmonisation_survives_the_wire_and_the_run_folder():
    fixed = Harmonisation((1.0, 1.0, 3.0), {"CT": Intensity("ct", (-100.0, 400.0), 50.0, 80.0),
                                            "MR": Intensity()}, 3)
    assert Harmonisation.from_wire(fixed.to_wire()) == fixed
    assert Harmonisation.from_dict(json.loads(json.dumps(fixed.to_dict()))) == fixed
    assert "target spacing 1 x 1 x 3 mm" in fixed.describe()
    assert "CT: clip -100.0..400.0" in fixed.describe()


def test_a_case_is_resampled_to_the_target_and_keeps_its_source_grid_for_scoring():
    rng = np.random.default_rng(1)
    image, label, spacing = ct_case(rng, (30, 20, 10), (1.0, 1.5, 3.0))
    case = Case("c", image, label, spacing)
    prep = Preparation("grey", (1.5, 1.5, 1.5), Intensity("ct", (0.0, 200.0), 100.0, 50.0))
    ready = prepare_case(case, prep, keep_source=True)
    assert ready.image.shape == (1, 20, 20, 20) and ready.label.shape == (1, 20, 20, 20)
    assert ready.spacing == (1.5, 1.5, 1.5)
    assert set(np.unique(ready.label)) == {0, 1}  # nearest neighbour: still a label map
    assert ready.image.max() == pytest.approx(2.0) and ready.image.min() >= -2.0  # clipped
    assert ready.source[0] is label and ready.source[1] == spacing
    assert prepare_case(ready, prep) is ready  # prepared once
    same = prepare_case(Case("d", image, label, (1.5, 1.5, 1.5)), prep, keep_source=True)
    assert same.image.shape == image.shape and same.source is None  # nothing to resample
    assert target_shape((10, 10), (1.0, 1.0), (1.005, 0.996)) is None
    with pytest.raises(DataError, match="2 axes cannot take a target spacing of 3"):
        target_shape((10, 10), (1.0, 1.0), (1.0, 1.0, 1.0))


def test_ct_keeps_its_hounsfield_scale_across_sites_where_z_scoring_would_not():
    """Two CT cases of the same tissue, one with twice the labelled volume of
    contrast: the CT scheme maps equal HU to equal inputs; a per-case z-score
    does not."""
    rng = np.random.default_rng(2)
    small = ct_case(rng, (16, 16, 8), (1.0, 1.0, 1.0))
    large_label = np.zeros_like(small[1])
    large_label[0, 2:14, 2:14, 1:7] = 1
    large_image = np.where(large_label > 0, 300.0, 40.0).astype(np.float32)
    ct = Intensity("ct", (-100.0, 500.0), 200.0, 100.0)
    a = prepare_case(Case("a", np.full_like(small[0], 40.0), small[1], (1, 1, 1)),
                     Preparation("grey", None, ct))
    b = prepare_case(Case("b", large_image, large_label, (1, 1, 1)), Preparation("grey", None, ct))
    assert a.image[0, 0, 0, 0] == pytest.approx(b.image[0, 0, 0, 0]) == pytest.approx(-1.6)
    za = prepare_case(Case("a", np.where(small[1] > 0, 300.0, 40.0).astype(np.float32),
                           small[1], (1, 1, 1)), "grey")
    zb = prepare_case(Case("b", large_image, large_label, (1, 1, 1)), "grey")
    assert abs(za.image[0, 0, 0, 0] - zb.image[0, 0, 0, 0]) > 0.3


@pytest.mark.parametrize(("name", "modality"), [
    ("CT", "CT"), ("MRI", "MR"), ("T2", "MR"), ("FLAIR", "MR"), ("MR", "MR"), ("US", "other"),
    ("", "other"), (None, "other"),
])
def test_modality_names_as_datasets_write_them(name, modality):
    assert modality_of(name) == modality


def test_a_sites_modality_comes_from_its_dataset_json_then_its_dicom(tmp_path,
                                                                    synthetic_sites):
    (tmp_path / "dataset.json").write_text(json.dumps({"modality": {"0": "MRI"}}))
    assert site_modality(tmp_path) == "MR"
    (tmp_path / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}}))
    assert site_modality(tmp_path) == "CT"
    from common.data.site import list_cases

    first = list_cases(synthetic_sites[1], "training")[0].image  # a DICOM CT series
    assert site_modality(synthetic_sites[1], first) == "CT"


def test_predict_on_a_real_ct_series_of_another_spacing_lies_on_its_grid_and_validates(
        tmp_path, dicom_dir):
    """A CT-harmonised model (target 1.3 x 1.3 x 4 mm, HU clipped and scaled)
    on the real GE CT series: resampled for the model, the result brought
    back onto the series' own grid, written as a DICOM SEG dciodvfy accepts."""
    import torch

    from common.data.readers import read_image, read_label
    from common.inference import load_model, segment, write_result
    from tests.unit.test_inference import saved_model
    from tests.unit.test_label_readers import SERIES
    from tests.unit.test_real_dicom import check_seg

    path = saved_model(tmp_path / "run")
    summary = json.loads((path.parent / "summary.json").read_text())
    fixed = Harmonisation((1.3, 1.3, 4.0), {"CT": Intensity("ct", (-1000.0, 1000.0), 0.0, 300.0)},
                          3)
    summary["harmonisation"] = fixed.to_dict()
    (path.parent / "summary.json").write_text(json.dumps(summary))
    model = load_model(path)
    series = dicom_dir / SERIES
    assert model.harmonisation == fixed and model.input_modality(series) == "CT"
    image, meta = read_image(series)
    assert target_shape(image.shape[1:], meta.spacing, fixed.spacing) is not None  # resampled
    result = segment(model, series, torch.device("cpu"))
    assert result.mask.shape == image.shape[1:]  # on the series' own grid
    (out,) = write_result(model, result, tmp_path / "out")
    check_seg([out], series.name)
    assert np.array_equal(read_label(out, result.meta)[0], result.mask)


def test_a_target_spacing_that_would_blow_a_case_up_is_refused_not_resampled():
    """A coordinator (or a lying site's fingerprint) asks for 0.01 mm voxels:
    the site refuses the case, naming why, rather than fill its memory."""
    rng = np.random.default_rng(3)
    image, label, spacing = ct_case(rng, (20, 20, 10), (1.0, 1.0, 2.0))
    with pytest.raises(DataError, match="times its voxels"):
        prepare_case(Case("c", image, label, spacing), Preparation("grey", (0.01, 0.01, 0.01)))
    assert target_shape((20, 20, 10), (1.0, 1.0, 2.0), (1.0, 1.0, 1.0)) == (20, 20, 20)


def test_a_nodes_next_run_on_unchanged_files_reuses_its_fingerprint(synthetic_sites,
                                                                   monkeypatch, tmp_path):
    """The fingerprint decodes the whole training split: a node's next run on
    the same files takes the one it has; a changed file makes it read again."""
    import shutil

    import common.data.site as site_module
    from common.config import RunSettings
    from common.site_algorithm import SiteAlgorithm

    folder = shutil.copytree(synthetic_sites[0], tmp_path / "site")
    reads = []
    real = site_module.read_site
    monkeypatch.setattr(site_module, "read_site",
                        lambda *a, **k: reads.append(1) or real(*a, **k))
    settings = RunSettings()
    first = SiteAlgorithm(settings, "a", folder, device="cpu").fingerprint()
    again = SiteAlgorithm(settings, "a", folder, device="cpu").fingerprint()
    assert again == first and len(reads) == 1
    case = next((folder / "imagesTr").iterdir())
    touched = next(case.iterdir()) if case.is_dir() else case
    import os

    os.utime(touched, ns=(1, 1))
    SiteAlgorithm(settings, "a", folder, device="cpu").fingerprint()
    assert len(reads) == 2
