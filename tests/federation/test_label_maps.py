"""Label maps in a real Flower simulation (``fedseg simulate``): a run that
names its structures trains on the sites whose maps name the same ones and
refuses, by name and without training on it, a site whose map names another."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from common.data.synthetic import ORGAN_LESION, write_site
from server.runs import read_metrics
from server.simulation import APP_DIR, runtime_env

pytestmark = [pytest.mark.federation, pytest.mark.slow]  # ~65 s: in the slow set

SMALL = ("model-channels=8,16,32", "patch-size=32", "batch-size=8", "local-epochs=2",
         "test-time-flips=false", "structures=organ,lesion")


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """Two CT sites that name organ and lesion, and one whose map calls the
    lesion "tumour" (a folder name that must not leave it)."""
    root = tmp_path_factory.mktemp("maps")
    return {
        "a": write_site(root / "site-a-folder", 0, 3, 1, labels=ORGAN_LESION,
                        image_format="nifti"),
        "b": write_site(root / "site-b-folder", 1, 3, 1, labels=ORGAN_LESION,
                        image_format="nifti"),
        "tumour": write_site(root / "tumour-site-folder", 1, 3, 1, image_format="nifti",
                             labels={0: "background", 1: "organ", 2: "tumour"}),
    }


def simulate(sites: list[Path], out: Path, *config: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "server.cli", "simulate", *map(str, sites),
           "--names", "hospital-a,hospital-b", "--rounds", "1", "--out", str(out)]
    for item in (*SMALL, *config):
        cmd += ["--config", item]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=400, cwd=APP_DIR,
                          env=runtime_env(1))


def server_log_lines(run_dir: Path, needle: str) -> list[str]:
    """The ServerApp's lines holding ``needle`` in this run's Flower log."""
    from common.config import fedseg_home

    logs = sorted((fedseg_home() / "sim").glob(f"{run_dir.name}-*/flower.log"),
                  key=lambda p: p.stat().st_mtime)
    assert logs, f"no Flower log of {run_dir.name}"
    # the newest: an earlier run of the same name (a stopped session's) may be kept
    return [line for line in logs[-1].read_text(errors="replace").splitlines()
            if needle in line]


def test_a_site_whose_map_names_another_structure_is_refused_by_name(
        folders, tmp_path, no_leftover_processes):
    out = tmp_path / "labels-disagree"
    proc = simulate([folders["a"], folders["tumour"]], out, "min-nodes=1")
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]  # a problem
    said = " ".join(proc.stdout.split())  # named before the run starts, then refused by it
    assert f"note: site folder {folders['tumour']}: the site's label map has no" in said, said

    (row,) = read_metrics(out)
    assert row["trained"] == ["hospital-a"]  # the model never saw hospital-b's labels
    assert set(row["dice"]) == {"hospital-a"}
    refused = [f for f in row["failures"] if f.startswith("train at hospital-b:")]
    assert refused == ["train at hospital-b: fedseg data error (the site's label map does "
                       "not fit the run's structures (structure 'lesion'))"], row["failures"]
    summary = json.loads((out / "summary.json").read_text())
    assert "site hospital-b failed every round (1 of 1)" in summary["problems"]
    assert "problem:" in proc.stdout and "hospital-b failed every round" in proc.stdout
    # what the server holds and says: the run's structure, never the site's map or a path
    (line,) = server_log_lines(out, "train failed at hospital-b")
    assert "structure 'lesion'" in line
    for text in ((out / "metrics.jsonl").read_text(), (out / "summary.json").read_text(),
                 line):
        for secret in ("tumour", "site-a-folder", str(folders["a"].parent)):
            assert secret not in text, secret
    # the hospital's own log says what is wrong with its map, and what the run learns
    local = (out / "local.log").read_text()
    assert "hospital-b: train failed: LabelMapError" in local
    assert "has no 'lesion'" in local and "2 tumour" in local and "organ, lesion" in local


def test_sites_whose_maps_agree_train_together(folders, tmp_path, no_leftover_processes):
    out = tmp_path / "labels-agree"
    proc = simulate([folders["a"], folders["b"]], out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (row,) = read_metrics(out)
    assert row["trained"] == ["hospital-a", "hospital-b"] and row["failures"] == []
    for site in ("hospital-a", "hospital-b"):
        scores = row["sites"][site]
        assert 0 < scores["dice"] <= 1 and scores["num-examples"] == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["problems"] == [] and summary["config"]["structures"] == "organ,lesion"
    # each structure's scores beside the headline, per site and across sites
    for scores in (*row["sites"].values(), row["overall"], summary["final"]["overall"]):
        assert {"dice/organ", "dice/lesion", "hd95/lesion"} <= set(scores)
        assert 0 <= scores["dice/organ"] <= 1 and 0 <= scores["dice/lesion"] <= 1


def test_sites_learning_different_structures_stop_the_run_before_any_training(
        tmp_path, no_leftover_processes):
    """A run that names no structure learns each site's one structure as its
    one class: a 'liver' site and a 'kidney' site would train one model on two
    tasks. Each says its structure with its fingerprint; the run stops there,
    saying which site names which, and the command's exit code says so."""
    root = tmp_path / "sites"
    sites = [write_site(root / name, i, 2, 1, labels={0: "background", 1: name},
                        image_format="nifti") for i, name in enumerate(["liver", "kidney"])]
    out = tmp_path / "two-tasks"
    cmd = [sys.executable, "-m", "server.cli", "simulate", *map(str, sites),
           "--names", "hospital-a,hospital-b", "--rounds", "1", "--out", str(out),
           "--config", "model-channels=8,16", "--config", "patch-size=32"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, cwd=APP_DIR,
                          env=runtime_env(1))
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds_completed"] == 0 and read_metrics(out) == []
    said = ("the sites' label maps name different structures (hospital-b 'kidney'; "
            "hospital-a 'liver') and the run names none")
    assert summary["stopped"].startswith(f"structures: {said}")
    assert said in " ".join(proc.stdout.split())  # rich wraps the line
    assert "--config structures=NAME" in " ".join(proc.stdout.split())
