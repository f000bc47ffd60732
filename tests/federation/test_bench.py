"""Smoke version of ``fedseg bench quality``: one round, tiny patches.

FedAvg is left out (each federated method is a Flower simulation of its own,
about 30 s here, and the suite runs FedAvg in most federation tests); FedProx
and FedNova stay, with their own strategy wiring."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from common.data.synthetic import write_federation
from server.simulation import APP_DIR, runtime_env

pytestmark = pytest.mark.federation


@pytest.mark.slow  # a benchmark's smoke run; CI runs it with the drills (default-suite budget)
def test_quality_benchmark_smoke(tmp_path, no_leftover_processes):
    sites = write_federation(tmp_path / "data", 2, n_train=2, n_test=1, seed=6)
    out = tmp_path / "bench"
    cmd = [sys.executable, "-m", "server.cli", "bench", "quality", *map(str, sites),
           "--rounds", "1", "--local-epochs", "1", "--no-retina-defaults", "--patch-size", "32",
           "--config", "model-channels=8,16", "--methods", "local,pooled,fednova",
           "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=APP_DIR,
                          env=runtime_env(1))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "quality.json").read_text())
    assert set(report["results"]) == {"local", "pooled", "fednova"}
    for result in report["results"].values():
        assert set(result["sites"]) == {"hospital-0", "hospital-1"}
        for metrics in result["sites"].values():
            assert set(metrics) >= {"dice", "iou", "hd95", "sensitivity", "specificity"}
            assert 0.0 <= metrics["dice"] <= 1.0
        assert result["seconds"] >= 0
    table = (out / "quality.md").read_text()
    assert table.count("| fednova |") == 2 and "Machine:" in table
    assert table.count("best federated") == 2  # one line per site against pooled and local
    assert (out / "dice.png").stat().st_size > 0
