"""``transfer-precision = "float16"`` with the real ServerApp and ClientApp on
the in-process grid: half the bytes both ways, the server's model float32,
and every combination docs/privacy.md claims works (each DP mode, SecAgg+,
cross-site); a site replying in the wrong precision is left out, a global
model beyond float16's range stops the run (resumable) instead of going out
as infinity."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from common import wire
from common.config import RunSettings
from server.bench_transfer import round_bytes
from server.runs import RunFolder
from server.wire import AUDIT_DIR_ENV
from tests.grid import audited_replies
from tests.wiring.test_strategies import TINY, epsilon, run

HALF = {"transfer-precision": "float16"}


def weights_sent(grid, kind: str) -> list[np.ndarray]:
    return [m.content[wire.ARRAYS]["weights-float32"].numpy() for m in grid.sent
            if m.metadata.message_type.endswith(kind) and wire.ARRAYS in m.content]


def test_float16_halves_the_bytes_both_ways_and_the_server_keeps_float32(sites, tmp_path):
    config = {"model-channels": "16,32,64"}  # 0.1 M weights: the records' overhead is small
    _, full, full_rows = run(sites, tmp_path, "fp32", **config)
    grid, half, rows = run(sites, tmp_path, "fp16", **config, **HALF)
    assert half["problems"] == [] and [r["trained"] for r in rows] == [
        ["hospital-a", "hospital-b", "hospital-c"]] * 2
    for row, ref in zip(rows, full_rows, strict=True):
        assert row["bytes_down"] / ref["bytes_down"] == pytest.approx(0.5, abs=0.01)
        assert row["bytes_up"] / ref["bytes_up"] == pytest.approx(0.5, abs=0.01)
    sent = weights_sent(grid, "train") + weights_sent(grid, "evaluate")
    assert len(sent) == 9 and {a.dtype for a in sent} == {np.dtype(np.float16)}
    for name in ("final_model.pt", "checkpoint.pt"):
        saved = torch.load(tmp_path / "fp16" / name, weights_only=True)
        saved = saved.get("state_dict", saved)
        assert {v.dtype for v in saved.values()} == {torch.float32}
    # what went out last is the server's float32 model, rounded to float16
    final = torch.load(tmp_path / "fp16" / "final_model.pt", weights_only=True)
    flat = torch.cat([v.flatten() for v in final.values()]).numpy()
    assert np.array_equal(sent[-1], flat.astype(np.float16))
    assert not np.array_equal(flat, flat.astype(np.float16).astype(np.float32))
    assert abs(half["dice_final"] - full["dice_final"]) < 0.05  # the same training
    # fedseg bench transfer's figures are what the run recorded (3 sites; the
    # last round also sends the evaluate message and gets its reply)
    for rows_of, precision in ((full_rows, "float32"), (rows, "float16")):
        settings = {**TINY, **config, "transfer-precision": precision}
        harmonisation = RunFolder(tmp_path / "fp16", RunSettings(), 0, []).harmonisation
        b = round_bytes(RunSettings.from_run_config(settings), harmonisation)
        assert rows_of[1]["bytes_down"] == 3 * (b.down + b.evaluate_down)
        # two sites' maps name their structure ('lesion'), which their train
        # replies say; the third has no map and says none
        said = b.up - round_bytes(RunSettings.from_run_config(
            {**settings, "structures": "lesion"}), harmonisation).up
        assert said > 0
        assert rows_of[1]["bytes_up"] == 3 * (b.up + b.evaluate_up) - said


def test_a_site_replying_in_float32_to_a_float16_run_is_left_out_and_named(sites, tmp_path):
    def full_precision(node, msg, deliver):
        reply = deliver()
        if msg.metadata.message_type.endswith("train") and not reply.has_error():
            arrays = reply.content[wire.ARRAYS]
            arrays["weights-float32"] = Array(arrays["weights-float32"].numpy()
                                              .astype(np.float32))
        return reply

    _, summary, (row,) = run(sites, tmp_path, "mixed", faults={101: full_precision},
                             **HALF, **{"num-rounds": 1})
    assert row["trained"] == ["hospital-a", "hospital-c"]
    assert ("update from hospital-b left out: weight 'weights-float32' arrived as float32; "
            "the run's weights travel as float16 (transfer-precision)") in row["failures"]
    assert summary["problems"] == ["site hospital-b failed every round (1 of 1)"]


# The default suite keeps one of each kind (fedavg above, client-side DP,
# SecAgg+); the rest run with the drills (-m slow), as CI does.
SLOW = pytest.mark.slow


@pytest.mark.parametrize("setting", [pytest.param(s, marks=SLOW) for s in (
    {"strategy": "fedprox"}, {"strategy": "fednova"}, {"strategy": "fedadam"},
    {"aggregation": "median"})])
def test_every_strategy_aggregates_the_float16_updates_in_float32(sites, tmp_path, setting):
    _, summary, (row,) = run(sites, tmp_path, "-".join(setting.values()), **setting, **HALF,
                             **{"num-rounds": 1})
    assert summary["problems"] == [] and row["failures"] == []
    assert row["trained"] == ["hospital-a", "hospital-b", "hospital-c"]
    final = torch.load(tmp_path / "-".join(setting.values()) / "final_model.pt",
                       weights_only=True)
    assert {v.dtype for v in final.values()} == {torch.float32}


@pytest.mark.parametrize("mode", [pytest.param("server-fixed", marks=SLOW),
                                  pytest.param("server-adaptive", marks=SLOW), "client-fixed",
                                  pytest.param("client-adaptive", marks=SLOW)])
def test_every_dp_mode_runs_at_float16(sites, tmp_path, monkeypatch, mode):
    """Sites clip (client-*) in float32, then cast, the update never longer
    than the clipping norm as sent; the server clips (server-*) and noises in
    float32 after casting back; the accounting is the float32 run's."""
    norm = 0.05
    monkeypatch.setenv(AUDIT_DIR_ENV, str(tmp_path / "audit"))
    grid, summary, (row,) = run(sites, tmp_path, mode, dp=mode, **HALF,
                                **{"dp-noise-multiplier": 1.0, "dp-clipping-norm": norm,
                                   "num-rounds": 1})
    assert summary["problems"] == [] and summary["privacy"]["dp"] == mode
    assert row["epsilon"] == pytest.approx(epsilon(1.0, 1))
    assert row["trained"] == ["hospital-a", "hospital-b", "hospital-c"]
    replies = audited_replies(tmp_path / "audit", "round0001-train-*")
    assert len(replies) == 3
    got = [r.content[wire.ARRAYS]["weights-float32"].numpy() for r in replies]
    assert {a.dtype for a in got} == {np.dtype(np.float16)}
    if mode == "client-fixed":  # the update as received, against the model as sent
        sent = [m for m in grid.sent if m.metadata.message_type.endswith("train")][0]
        assert sent.content[wire.CONFIG][KEY_CLIPPING_NORM] == norm
        model = sent.content[wire.ARRAYS]["weights-float32"].numpy().astype(np.float64)
        lengths = [np.linalg.norm(a.astype(np.float64) - model) for a in got]
        assert all(0.9 * norm <= length <= norm for length in lengths), lengths


@SLOW  # the default suite's 8 minutes (6:29 to 7:36 on the 2-core machine)
def test_secure_aggregation_at_float16_halves_the_download_only(sites, tmp_path,
                                                               monkeypatch):
    """SecAgg+ quantises each site's float32 update to integers and masks them:
    the upload is the same at either precision; the model going down is half."""
    config = {"secure-aggregation": True, "secagg-max-weight": 10.0, "num-rounds": 1}
    _, _, (full,) = run(sites, tmp_path, "sa32", **config)
    monkeypatch.setenv(AUDIT_DIR_ENV, str(tmp_path / "audit"))
    grid, summary, (half,) = run(sites, tmp_path, "sa16", **config, **HALF)
    assert summary["problems"] == [] and half["trained"] == ["hospital-a", "hospital-b",
                                                             "hospital-c"]
    assert half["bytes_up"] == pytest.approx(full["bytes_up"], rel=0.001)
    model = 4 * sum(v.numel() for v in torch.load(tmp_path / "sa16" / "final_model.pt",
                                                  weights_only=True).values())
    # 3 sites: the train message's model (in the SecAgg+ fit stage) and the
    # last round's evaluate message, each half the float32 model's bytes
    assert full["bytes_down"] - half["bytes_down"] == pytest.approx(2 * 3 * model / 2,
                                                                    rel=0.01)
    assert {a.dtype for a in weights_sent(grid, "train")} == {np.dtype(np.float16)}
    for msg in audited_replies(tmp_path / "audit", "round0001-secagg*"):
        assert all(len(rec) == 0 for rec in msg.content.array_records.values())


@SLOW
def test_cross_site_at_float16_scores_each_local_model(sites, tmp_path):
    grid, summary, _ = run(sites, tmp_path, "cross", **{"cross-site": True, "num-rounds": 1},
                           **HALF)
    table = summary["cross_site"]
    assert list(table) == ["global", "local hospital-a", "local hospital-b",
                           "local hospital-c"]
    assert all(sorted(row) == ["hospital-a", "hospital-b", "hospital-c"] for row in
               table.values())
    assert {a.dtype for a in weights_sent(grid, "evaluate")} == {np.dtype(np.float16)}


@SLOW  # the default suite's 8 minutes
def test_a_global_model_beyond_float16s_range_stops_the_run_resumable(sites, tmp_path):
    """A float32 run resumed at float16 whose model cannot be carried: the
    server stops before sending it (never as infinity), names the weight and
    keeps the checkpoint; resumed at float32 it goes on."""
    run(sites, tmp_path, "big", **{"num-rounds": 1})
    path = tmp_path / "big" / "checkpoint.pt"
    saved = torch.load(path, weights_only=True)
    name = next(iter(saved["state_dict"]))
    saved["state_dict"][name].view(-1)[0] = 1e5
    torch.save(saved, path)
    grid, summary, _ = run(sites, tmp_path, "big", resume=True, **HALF)
    assert not grid.sent
    assert summary["stopped"] == (
        f"transfer precision: the global model holds 1 value(s) beyond float16's range "
        f"(+-65504), the first in weight {name!r} (largest |value| 100000): float16 cannot "
        f"carry it (use transfer-precision float32); --resume with --config "
        f"transfer-precision=float32 goes on from the last round")
    assert summary["rounds_completed"] == 1
    grid, summary, rows = run(sites, tmp_path, "big", resume=True)
    assert summary["rounds_completed"] == 2 and [r["round"] for r in rows] == [1, 2]
