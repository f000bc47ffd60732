"""A real Flower simulation at ``transfer-precision = "float16"``: it trains,
its messages carry float16 weights (about half the bytes) and its model stays
float32."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, RecordDict

from common import wire
from common.config import RunSettings
from common.data.synthetic import write_federation
from common.model import build_model
from server.runs import read_metrics
from server.simulation import APP_DIR, runtime_env
from server.wire import AUDIT_DIR_ENV, content_bytes
from tests.grid import audited_replies

pytestmark = pytest.mark.federation

CONFIG = {"transfer-precision": "float16", "model-channels": "8,16,32", "patch-size": 32,
          "local-epochs": 1, "batch-size": 4}


# 40-95 s on 2 cores; the in-process grid (tests/wiring/test_transfer.py) runs
# float16 through Flower's own serialisation in the default suite; this adds
# the real transport, with the drills (-m slow), as CI runs them
@pytest.mark.slow
def test_a_float16_simulation_trains_sends_half_the_bytes_and_keeps_float32(
        tmp_path, no_leftover_processes):
    sites = write_federation(tmp_path / "data", 2, n_train=4, n_test=2, seed=3)
    out = tmp_path / "run"
    env = runtime_env(1)
    env[AUDIT_DIR_ENV] = str(tmp_path / "audit")  # every reply, as the server received it
    cmd = [sys.executable, "-m", "server.cli", "simulate", *map(str, sites),
           "--names", "site-0,site-1", "--rounds", "2", "--out", str(out),
           *(arg for k, v in CONFIG.items() for arg in ("--config", f"{k}={v}"))]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, cwd=APP_DIR,
                          env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = read_metrics(out)
    assert [r["trained"] for r in rows] == [["site-0", "site-1"]] * 2
    assert all(r["failures"] == [] and 0 <= r["dice_mean"] <= 1 for r in rows)

    # What came back: float16 weights, half the bytes of the same reply in float32
    replies = audited_replies(tmp_path / "audit", "round*-train-*")
    assert len(replies) == 4
    for reply in replies:
        weights = reply.content[wire.ARRAYS]["weights-float32"].numpy()
        assert weights.dtype == np.float16 and np.isfinite(weights).all()
        full = RecordDict(dict(reply.content))
        full[wire.ARRAYS] = ArrayRecord({"weights-float32": Array(weights.astype(np.float32))})
        assert content_bytes(reply.content) / content_bytes(full) == pytest.approx(0.5,
                                                                                   abs=0.02)
    # the run's own count of round 1 (one train reply per site) is what arrived
    first = audited_replies(tmp_path / "audit", "round0001-train-*")
    assert rows[0]["bytes_up"] == sum(content_bytes(r.content) for r in first)

    # The server's model: float32, and trained (not the model it started from)
    settings = RunSettings.from_run_config(CONFIG)
    torch.manual_seed(settings.seed)
    initial = build_model(settings.model).state_dict()
    for name in ("final_model.pt", "checkpoint.pt"):
        saved = torch.load(out / name, weights_only=True)
        saved = saved.get("state_dict", saved)
        assert {v.dtype for v in saved.values()} == {torch.float32}
        assert saved.keys() == initial.keys()
        assert any(not torch.equal(saved[k], initial[k]) for k in initial)
