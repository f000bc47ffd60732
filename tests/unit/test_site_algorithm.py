"""The site algorithm: one object per site and run, no framework."""

import numpy as np
import pytest
import torch

from common import wire
from common.config import RunSettings
from common.site_algorithm import SiteAlgorithm, round_seed

TINY = {"model-channels": "8,16", "patch-size": 32, "batch-size": 2, "patches-per-image": 1,
        "num-rounds": 4}


def test_round_seeds_come_from_run_seed_round_and_site():
    assert round_seed(0, 1, "hospital-a") == round_seed(0, 1, "hospital-a")
    assert len({round_seed(0, 1, "hospital-a"), round_seed(0, 1, "hospital-b"),
                round_seed(0, 2, "hospital-a"), round_seed(1, 1, "hospital-a")}) == 4


@pytest.fixture(scope="module")
def start_weights():
    torch.manual_seed(0)
    return SiteAlgorithm(RunSettings.from_run_config(TINY), "init").weights()


def test_train_then_evaluate_with_wire_metrics(synthetic_sites, start_weights):
    algo = SiteAlgorithm(RunSettings.from_run_config(TINY), "hospital-a", synthetic_sites[0],
                         device="cpu")
    weights, metrics = algo.train(start_weights, {wire.SERVER_ROUND: 1})
    assert set(metrics) == set(wire.TRAIN_METRICS)
    assert metrics[wire.NUM_EXAMPLES] == 4 and metrics[wire.TRAIN_STEPS] > 0
    assert any(not torch.equal(weights[k], start_weights[k]) for k in weights)
    assert algo.optimizer_state  # keep-optimizer-state is on by default
    scores = algo.evaluate(weights, {wire.SERVER_ROUND: 1})
    assert set(scores) == set(wire.EVAL_METRICS) and scores[wire.NUM_EXAMPLES] == 2
    assert 0.0 <= scores["dice"] <= 1.0


def test_two_sites_with_the_same_data_draw_different_augmentations(synthetic_sites,
                                                                   start_weights):
    """Flower gives every deployed node partition-id 0; the seed must still
    differ between sites, so the same data and start give different weights."""
    settings = RunSettings.from_run_config(TINY)
    out = [SiteAlgorithm(settings, name, synthetic_sites[0], device="cpu").train(
        start_weights, {wire.SERVER_ROUND: 2})[0] for name in ("hospital-a", "hospital-b")]
    assert any(not torch.equal(out[0][k], out[1][k]) for k in out[0])
    again = SiteAlgorithm(settings, "hospital-a", synthetic_sites[0], device="cpu").train(
        start_weights, {wire.SERVER_ROUND: 2})[0]
    assert all(torch.equal(out[0][k], again[k]) for k in again)  # and are reproducible


def test_a_resumed_run_continues_the_schedule(synthetic_sites, start_weights):
    """Round 3 of a run resumed after 2 rounds is the run's round 3, whatever
    Flower's own round counter says."""
    settings = RunSettings.from_run_config(TINY)
    a = SiteAlgorithm(settings, "h", synthetic_sites[0], device="cpu").train(
        start_weights, {wire.SERVER_ROUND: 3})[0]
    b = SiteAlgorithm(settings, "h", synthetic_sites[0], device="cpu").train(
        start_weights, {wire.SERVER_ROUND: 1, wire.ROUNDS_DONE: 2})[0]
    assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)


def test_a_3d_site_leaves_out_a_series_missing_a_slice_saying_so(synthetic_sites, tmp_path):
    """A training series that lost a slice would be read at its median step,
    its voxels placed where they are not: a 3D run leaves it out, named, with
    the reason; the site's other cases train."""
    import json
    import shutil

    import pydicom

    site = tmp_path / "site"
    shutil.copytree(synthetic_sites[0], site)
    first = json.loads((site / "dataset.json").read_text())["training"][0]["image"]
    series = sorted((site / first).iterdir(),
                    key=lambda f: float(pydicom.dcmread(f).ImagePositionPatient[2]))
    series[5].unlink()
    settings = RunSettings.from_run_config({"model-spatial-dims": 3, "model-channels": "8,16",
                                            "patch-size": 16})
    node = SiteAlgorithm(settings, "site", site, device="cpu")
    cases = node.cases("training")
    assert len(cases) == 3
    (missing,) = node.left_out["training"]
    assert "not evenly spaced" in missing.problem and missing.case_index == 0
    assert missing.category == "unsupported format"  # what may leave the site: the kind
    # the hospital's own check says so before a run: usable (2D), with the reason
    from common.data.check import check_site

    (flagged,) = [c for c in check_site(site).cases if c.note]
    assert flagged.usable and (flagged.split, flagged.index) == ("training", 0)
    assert "not evenly spaced" in flagged.note and "a 3D run leaves it out" in flagged.note
