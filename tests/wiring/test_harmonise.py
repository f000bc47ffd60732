"""A run's harmonisation through the real ServerApp and ClientApp on the
in-process grid: the fingerprint query at the start, the target spacing every
message carries, the run folder, the sites' model cards, and predict
bringing its result back onto each input's own grid."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from client.app import simulated_site_state
from common import wire
from common.data.synthetic import ORGAN_LESION, write_site
from server.runs import read_metrics
from tests.grid import federation, run_server

TINY = {"model-channels": "8,16", "patch-size": 32, "batch-size": 2, "patches-per-image": 1,
        "num-rounds": 2, "min-nodes": 3, "test-time-flips": False, "mixed-precision": False,
        "structures": "organ,lesion"}


def respace(folder: Path, spacing: tuple[float, float, float]) -> None:
    """Every NIfTI of a site rewritten at ``spacing`` mm (the same voxels: a
    scanner of another voxel size)."""
    for path in folder.rglob("*.nii.gz"):
        img = nib.load(str(path))
        affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj), affine), str(path))


@pytest.fixture(scope="module")
def spaced_sites(tmp_path_factory):
    """Three NIfTI hospitals of 3, 3 and 4 training cases, scanned at three
    voxel sizes (array order: columns, rows, slices)."""
    root = tmp_path_factory.mktemp("spaced")
    sites = []
    for k, (spacing, n_train) in enumerate((((1.5, 1.5, 3.0), 3), ((1.0, 1.0, 2.0), 3),
                                            ((0.8, 0.8, 2.5), 4))):
        folder = write_site(root / f"h{k}", k, n_train, 1, seed=3, labels=ORGAN_LESION,
                            image_format="nifti", slices=6)
        respace(folder, spacing)
        sites.append((f"hospital-{'abc'[k]}", folder))
    return sites


def run(sites, tmp_path, name, **overrides):
    grid = federation(sites, {**TINY, "run-name": name, **overrides})
    return grid, run_server(grid, tmp_path), read_metrics(tmp_path / name)


def test_the_run_fixes_a_target_spacing_from_fingerprints_and_every_message_carries_it(
        spaced_sites, tmp_path, monkeypatch):
    from common.data.harmonise import Harmonisation
    from common.inference import load_model, segment

    monkeypatch.setenv("FEDSEG_HOME", str(tmp_path / "home"))
    grid, summary, rows = run(spaced_sites, tmp_path, "spaced")
    assert summary["rounds_completed"] == 2 and summary["problems"] == []
    saved = json.loads((tmp_path / "spaced" / "harmonisation.json").read_text())
    assert set(saved["fingerprints"]) == {"hospital-a", "hospital-b", "hospital-c"}
    assert [saved["fingerprints"][s]["cases"] for s in sorted(saved["fingerprints"])] == [3, 3, 4]
    # the case-weighted median of the sites' medians, axis by axis: hospital-b's
    # 1.0 (3 + 3 of 10 cases at or below it reach half) on the first two axes,
    # 2.5 on the third
    fixed = Harmonisation.from_dict(saved["harmonisation"])
    assert fixed.spacing == (1.0, 1.0, 2.5)
    assert summary["harmonisation"] == saved["harmonisation"]
    queries = [m for m in grid.sent if m.metadata.message_type == "query"]
    assert len(queries) == 3 and all(
        m.content[wire.CONFIG][wire.QUERY] == wire.FINGERPRINT for m in queries)
    rounds = [m for m in grid.sent if m.metadata.message_type in ("train", "evaluate")]
    assert rounds and all(Harmonisation.from_wire(m.content[wire.CONFIG][wire.HARMONISATION])
                          == fixed for m in rounds)
    assert grid.sent.index(queries[-1]) < grid.sent.index(rounds[0])  # before any training
    # the sites' kept models and the run's carry it: predict resamples by it and back
    card = json.loads((simulated_site_state("hospital-a", spaced_sites[0][1]) / "models"
                       / "spaced" / "model-card.json").read_text())
    assert Harmonisation.from_dict(card["harmonisation"]) == fixed
    model = load_model(tmp_path / "spaced" / "final_model.pt")
    assert model.harmonisation == fixed
    source = spaced_sites[0][1] / "imagesTs" / "case_ts000.nii.gz"  # 1.5 x 1.5 x 3 mm
    result = segment(model, source, torch.device("cpu"))
    assert result.mask.shape == nib.load(str(source)).shape  # on the source's own grid
    assert result.probabilities.shape == (3, *result.mask.shape)


def test_under_a_robust_rule_a_site_overstating_its_cases_does_not_set_the_spacing(
        spaced_sites, tmp_path, monkeypatch):
    """The attack through the real apps: hospital-c (0.8 x 0.8 x 2.5 mm, 4
    cases) reports 1000 cases. Weighted by that claim it would set the run's
    spacing to its own (unit test: test_harmonise.py); under ``aggregation =
    median`` each site counts once and the run keeps the honest sites' median."""
    from common.data.harmonise import Harmonisation
    from common.site_algorithm import SiteAlgorithm

    honest = SiteAlgorithm.fingerprint

    def overstated(self):
        fingerprint = honest(self)
        return (dataclasses.replace(fingerprint, cases=1000) if self.site == "hospital-c"
                else fingerprint)

    monkeypatch.setattr(SiteAlgorithm, "fingerprint", overstated)
    _, summary, _ = run(spaced_sites, tmp_path, "liar", aggregation="median",
                        **{"num-rounds": 1})
    assert summary["rounds_completed"] == 1
    saved = json.loads((tmp_path / "liar" / "harmonisation.json").read_text())
    assert saved["fingerprints"]["hospital-c"]["cases"] == 1000  # the claim reached the server
    assert Harmonisation.from_dict(saved["harmonisation"]).spacing == (1.0, 1.0, 2.5)


def test_harmonise_off_asks_no_fingerprint_and_sends_no_instruction(spaced_sites, tmp_path):
    grid, summary, _ = run(spaced_sites, tmp_path, "off", harmonise="off")
    assert summary["rounds_completed"] == 2 and summary["harmonisation"] is None
    assert not [m for m in grid.sent if m.metadata.message_type == "query"]
    assert all(wire.HARMONISATION not in m.content[wire.CONFIG] for m in grid.sent)
    assert not (tmp_path / "off" / "harmonisation.json").exists()


@pytest.mark.slow  # the default suite's 8 minutes
def test_a_resumed_run_keeps_the_harmonisation_of_its_start(spaced_sites, tmp_path):
    run(spaced_sites, tmp_path, "resumed")
    before = json.loads((tmp_path / "resumed" / "harmonisation.json").read_text())
    grid, summary, _ = run(spaced_sites, tmp_path, "resumed", resume=True,
                           **{"num-rounds": 3, "target-spacing": "2,2,2"})
    assert summary["rounds_completed"] == 3
    assert not [m for m in grid.sent if m.metadata.message_type == "query"]
    assert summary["harmonisation"] == before["harmonisation"]  # not the new setting's
