"""Strategy wiring with the real ServerApp and ClientApp on the in-process
grid (tests/grid.py): every strategy, every DP mode, update checks,
evaluate-every, resume and failures, in seconds each."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from dp_accounting import dp_event, rdp
from flwr.app import Array

from common import wire
from common.config import RunSettings
from common.model import build_model
from server.runs import read_metrics
from server.strategies import REGISTRY_ENV
from tests.grid import federation, run_server

TINY = {"model-channels": "8,16", "patch-size": 32, "batch-size": 2, "patches-per-image": 1,
        "num-rounds": 2, "min-nodes": 3, "test-time-flips": False, "mixed-precision": False}


def run(sites, tmp_path, name, faults=None, **overrides):
    grid = federation(sites, {**TINY, "run-name": name, **overrides}, faults)
    return grid, run_server(grid, tmp_path), read_metrics(tmp_path / name)


@pytest.mark.parametrize("strategy", ["fedavg", "fedprox", "fednova", "fedadam"])
def test_every_strategy_trains_every_site(sites, tmp_path, strategy):
    _, summary, rows = run(sites, tmp_path, strategy, strategy=strategy)
    assert summary["rounds_completed"] == 2 and summary["problems"] == []
    for row in rows:
        assert row["trained"] == ["hospital-a", "hospital-b", "hospital-c"]
        assert set(row["dice"]) == {"hospital-a", "hospital-b", "hospital-c"}
        assert all(0 <= d <= 1 for d in row["dice"].values())
        assert row["failures"] == []


def test_fedprox_sends_its_proximal_weight(sites, tmp_path):
    grid, _, _ = run(sites, tmp_path, "prox", strategy="fedprox", **{"fedprox-mu": 0.3})
    train = [m for m in grid.sent if m.metadata.message_type.endswith("train")]
    assert {m.content[wire.CONFIG][wire.PROXIMAL_MU] for m in train} == {0.3}


def epsilon(z: float, releases: int, delta: float = 1e-5) -> float:
    accountant = rdp.RdpAccountant()
    accountant.compose(dp_event.GaussianDpEvent(z), releases)
    return accountant.get_epsilon(delta)


@pytest.mark.parametrize("mode", ["server-fixed", "client-fixed", "server-adaptive",
                                  "client-adaptive"])
def test_every_dp_mode_runs_and_accounts(sites, tmp_path, mode):
    _, summary, rows = run(sites, tmp_path, mode, dp=mode, **{"dp-noise-multiplier": 1.0,
                                                              "dp-clipping-norm": 0.5})
    assert summary["problems"] == [] and summary["privacy"]["dp"] == mode
    assert [r["epsilon"] for r in rows] == pytest.approx([epsilon(1.0, 1), epsilon(1.0, 2)])
    assert [r["dp_releases"] for r in rows] == [1, 2]


def test_the_privacy_budget_stops_the_run_before_it_is_exceeded(sites, tmp_path):
    budget = (epsilon(1.0, 1) + epsilon(1.0, 2)) / 2  # one round fits, two do not
    _, summary, rows = run(sites, tmp_path, "budget", dp="client-fixed",
                           **{"num-rounds": 3, "dp-max-epsilon": budget})
    assert [r["round"] for r in rows] == [1]
    assert summary["stopped"].startswith("privacy budget")
    assert summary["privacy"]["epsilon"] <= budget


def poison(kind: str):
    """A hospital whose update is broken (NaN) or of the wrong shape."""
    def fault(node, msg, deliver):
        reply = deliver()
        if msg.metadata.message_type.endswith("train") and not reply.has_error():
            arrays = reply.content[wire.ARRAYS]
            key = next(iter(arrays))
            value = arrays[key].numpy()
            bad = np.full_like(value, np.nan) if kind == "nan" else value.reshape(-1)[:3]
            arrays[key] = Array(bad)
        return reply
    return fault


@pytest.mark.parametrize(("kind", "says"), [("nan", "NaN or infinite"), ("shape", "shape")])
def test_a_broken_update_is_left_out_and_the_site_named(sites, tmp_path, kind, says):
    _, summary, rows = run(sites, tmp_path, kind, faults={101: poison(kind)})
    for row in rows:
        assert row["trained"] == ["hospital-a", "hospital-c"]
        assert any(f.startswith("update from hospital-b left out") and says in f
                   for f in row["failures"])
    assert summary["problems"] == ["site hospital-b failed every round (2 of 2)"]


def test_evaluate_every_scores_only_due_rounds(sites, tmp_path):
    grid, _, rows = run(sites, tmp_path, "every", **{"num-rounds": 3, "evaluate-every": 2})
    assert [bool(r["dice"]) for r in rows] == [False, True, True]  # round 2 and the last
    # One message a round: round 2's model is scored inside round 3's train
    # message; only the last round sends evaluate messages.
    evaluate = [m for m in grid.sent if m.metadata.message_type.endswith("evaluate")]
    assert len(evaluate) == 3
    train = [m for m in grid.sent if m.metadata.message_type.endswith("train")]
    asked = [(int(m.content["config"]["server-round"]),
              bool(m.content["config"]["evaluate-incoming"])) for m in train]
    assert sorted(set(asked)) == [(1, False), (2, False), (3, True)]


def test_resume_continues_from_the_last_round(sites, tmp_path):
    _, first, rows = run(sites, tmp_path, "resumed")
    grid, summary, rows2 = run(sites, tmp_path, "resumed", resume=True, **{"num-rounds": 4})
    assert [r["round"] for r in rows2] == [1, 2, 3, 4]
    assert rows2[:2] == rows  # rounds 1-2 intact
    train = [m for m in grid.sent if m.metadata.message_type.endswith("train")]
    assert {m.content[wire.CONFIG][wire.ROUNDS_DONE] for m in train} == {2}
    assert summary["rounds_completed"] == 4


def test_a_site_that_fails_is_named_from_round_one(sites, tmp_path, tmp_path_factory):
    broken = tmp_path_factory.mktemp("broken")
    (broken / "imagesTr").mkdir()
    (broken / "labelsTr").mkdir()
    (broken / "imagesTr" / "case_1.nii.gz").write_bytes(b"not a nifti")
    (broken / "labelsTr" / "case_1.nii.gz").write_bytes(b"not a nifti")
    _, summary, rows = run([*sites[:2], ("hospital-x", broken)], tmp_path, "broken",
                           **{"min-nodes": 2})
    cause = "fedseg data error (no usable training case: 1 left out, 1 (unreadable file))"
    assert rows[0]["failures"][0] == f"train at hospital-x: {cause}"
    assert "case_1" not in json.dumps(rows)
    assert "site hospital-x failed every round (2 of 2)" in summary["problems"]
    # its fingerprint failed too: the run's harmonisation came from the other two
    fixed = json.loads((tmp_path / "broken" / "harmonisation.json").read_text())
    assert fixed["failures"] == [f"hospital-x: {cause}"]
    assert set(fixed["fingerprints"]) == {"hospital-a", "hospital-b"}
    assert "case_1" not in json.dumps(fixed) and str(broken) not in json.dumps(fixed)


def test_too_few_usable_fingerprints_stop_the_run_before_any_training_naming_the_site(
        sites, tmp_path, tmp_path_factory):
    empty = tmp_path_factory.mktemp("empty")
    (empty / "imagesTr").mkdir()
    (empty / "labelsTr").mkdir()
    grid, summary, rows = run([*sites[:2], ("hospital-x", empty)], tmp_path, "few")
    assert rows == [] and summary["rounds_completed"] == 0
    assert summary["stopped"].startswith("fingerprint: 2 of the 3 sites needed (min-nodes) "
                                         "sent a usable fingerprint; hospital-x: ")
    assert str(empty) not in json.dumps(summary)
    assert not [m for m in grid.sent if m.metadata.message_type.endswith("train")]
    assert not (tmp_path / "few" / "final_model.pt").exists()


def test_a_site_that_never_replies_is_named_and_the_round_goes_on(sites, tmp_path,
                                                                  monkeypatch):
    """hospital-c (node 102) never answers, not even in round 1: the
    coordinator's registry names it; the others' rounds go on."""
    registry = tmp_path / "hospitals.json"
    registry.write_text(json.dumps({"hospital-c": {"node_id": "102"}}))
    monkeypatch.setenv(REGISTRY_ENV, str(registry))
    _, summary, rows = run(sites, tmp_path, "silent", faults={102: lambda n, m, d: None},
                           **{"min-nodes": 2})
    for row in rows:
        assert row["trained"] == ["hospital-a", "hospital-b"]
        assert "train at hospital-c: no reply" in row["failures"]
    assert summary["rounds_completed"] == 2
    assert summary["problems"] == ["site hospital-c failed every round (2 of 2)"]


def test_secure_aggregation_runs_on_the_grid(sites, tmp_path):
    _, summary, rows = run(sites, tmp_path, "secagg", **{"secure-aggregation": True})
    assert summary["problems"] == [] and summary["rounds_completed"] == 2
    assert all(set(r["dice"]) == {"hospital-a", "hospital-b", "hospital-c"} for r in rows)


def test_failed_replies_carry_only_the_scrubbed_cause(sites, tmp_path):
    replies = []

    def keep(node, msg, deliver):
        reply = deliver()
        replies.append(reply)
        return reply

    run(sites, tmp_path, "kept", faults={100: keep})
    assert replies and all(not r.has_error() for r in replies)
    assert all(set(r.content.keys()) <= {wire.ARRAYS, wire.METRICS, wire.SITE}
               for r in replies)
    assert {r.metadata.message_type for r in replies} == {"query", "train", "evaluate"}
    for r in replies:
        metrics = r.content[wire.METRICS]
        allowed = {"train": (*wire.TRAIN_METRICS,
                             *(wire.GLOBAL_PREFIX + k for k in wire.EVAL_METRICS)),
                   "evaluate": wire.EVAL_METRICS,
                   "query": wire.FINGERPRINT_METRICS}[r.metadata.message_type]
        assert set(metrics.keys()) <= set(allowed)


def update_vector(run_dir, settings) -> torch.Tensor:
    """The final global model minus the initial one, flattened."""
    torch.manual_seed(settings.seed)
    initial = build_model(settings.model).state_dict()
    final = torch.load(run_dir / "final_model.pt", weights_only=True)
    return torch.cat([(final[k] - initial[k]).flatten() for k in initial])


def test_dp_noise_has_the_promised_spread(sites, tmp_path):
    """Training moves nothing (learning rate 1e-12): what moves the model is
    the Gaussian noise of two releases, std z * clip / sites each."""
    z, clip = 1.0, 0.1
    config = {**TINY, "model-channels": "16,32,64", "learning-rate": 1e-12,
              "dp": "client-fixed", "dp-noise-multiplier": z, "dp-clipping-norm": clip}
    run(sites, tmp_path, "noise", **config)
    noise = update_vector(tmp_path / "noise", RunSettings.from_run_config(config))
    expected = math.sqrt(2) * z * clip / 3
    assert noise.numel() > 50_000
    assert noise.std().item() == pytest.approx(expected, rel=0.03)
    assert abs(noise.mean().item()) < 0.02 * expected


def test_server_side_clipping_bounds_the_aggregate_update(sites, tmp_path):
    clip = 0.01
    config = {**TINY, "num-rounds": 1, "learning-rate": 0.01, "dp": "server-fixed",
              "dp-noise-multiplier": 0.0, "dp-clipping-norm": clip}
    _, summary, _ = run(sites, tmp_path, "clip", **config)
    norm = update_vector(tmp_path / "clip", RunSettings.from_run_config(config)).norm().item()
    assert 0 < norm <= clip * (1 + 1e-4)  # each update clipped: their mean cannot be longer
    assert summary["privacy"]["epsilon"] is None  # no noise: no finite epsilon claimed


@pytest.mark.slow  # the default suite's 8 minutes
def test_replies_whose_metrics_differ_do_not_stop_the_run(sites, tmp_path):
    """Flower stops a run when replies' metric keys differ. A site that could
    not score the incoming model (no global-* keys, its reason in the site
    record) and one that adds a stray metric still train; the scoring failure
    is named in the round it belongs to; a reply missing a train metric is
    left out, named."""
    def unscored(node, msg, deliver):
        reply = deliver()
        if msg.metadata.message_type.endswith("train") and not reply.has_error():
            metrics = reply.content[wire.METRICS]
            for key in [k for k in metrics if k.startswith(wire.GLOBAL_PREFIX)]:
                del metrics[key]
            reply.content[wire.SITE][wire.EVALUATE_ERROR] = "fedseg data error in case #1"
        return reply

    def stray(node, msg, deliver):
        reply = deliver()
        if not reply.has_error():
            reply.content[wire.METRICS]["stray-key"] = 1.0
        return reply

    def partial(node, msg, deliver):
        reply = deliver()
        if msg.metadata.message_type.endswith("train") and not reply.has_error():
            del reply.content[wire.METRICS][wire.TRAIN_STEPS]
        return reply

    _, summary, rows = run(sites, tmp_path, "mixed", faults={100: unscored, 101: stray},
                           **{"num-rounds": 3})
    assert [r["trained"] for r in rows] == [["hospital-a", "hospital-b", "hospital-c"]] * 3
    assert rows[0]["failures"] == rows[1]["failures"] == [
        "evaluate at hospital-a: fedseg data error in case #1"]
    assert set(rows[0]["dice"]) == {"hospital-b", "hospital-c"}
    assert set(rows[2]["dice"]) == {"hospital-a", "hospital-b", "hospital-c"}  # last: apart
    _, _, rows = run(sites, tmp_path, "partial", faults={102: partial})
    assert all(r["trained"] == ["hospital-a", "hospital-b"] for r in rows)
    assert any("hospital-c left out: metrics missing (train-steps)" in f
               for f in rows[0]["failures"])


def test_too_few_sites_stop_the_run_after_node_wait_and_it_resumes(sites, tmp_path):
    """Every site goes away after round 1: round 2 waits node-wait (1 s here),
    not forever (Flower's own wait has no limit); the run stops with the
    reason, round 1 kept, and a resumed run finishes once they are back."""
    held = {}

    def vanish(node, msg, deliver):
        reply = deliver()
        if msg.metadata.message_type == "train":  # not the fingerprint at the start
            held["grid"].offline.update(held["grid"].contexts)  # every site drops out
        return reply

    grid = federation(sites, {**TINY, "run-name": "gone", "num-rounds": 3, "node-wait": 1.0},
                      {102: vanish})  # the last of the three to be asked
    held["grid"] = grid
    summary = run_server(grid, tmp_path)
    assert summary["rounds_completed"] == 1
    assert summary["stopped"].startswith("too few sites: 0 of the 3 sites needed (min-nodes) "
                                         "were connected for round 2, after waiting 1 s")
    assert any(p.startswith("stopped before its last round") for p in summary["problems"])
    rows = read_metrics(tmp_path / "gone")
    assert [r["round"] for r in rows] == [1] and rows[0]["trained"]
    grid, resumed, rows = run(sites, tmp_path, "gone", resume=True, **{"num-rounds": 3})
    assert resumed["rounds_completed"] == 3 and resumed["stopped"] is None
    assert [r["round"] for r in rows] == [1, 2, 3]


def test_a_broken_case_is_left_out_and_counted_not_a_failed_round(sites, tmp_path):
    import shutil

    copy = Path(shutil.copytree(sites[0][1], tmp_path / "a-copy"))
    label = sorted((copy / "labelsTr").iterdir())[0]
    label.write_bytes(b"not a label")  # one training case cannot be read
    _, summary, rows = run([(sites[0][0], copy), *sites[1:]], tmp_path, "left-out")
    assert summary["problems"] == [] and all(r["failures"] == [] for r in rows)
    assert all(r["trained"] == ["hospital-a", "hospital-b", "hospital-c"] for r in rows)
    for r in rows:
        assert r["cases_left_out"] == {"hospital-a": "training: 1 (unreadable file)"}
    assert summary["cases_left_out"] == {"hospital-a": "training: 1 (unreadable file)"}
    assert label.name not in json.dumps(rows)


@pytest.mark.slow  # with the drills: keeps the default suite under 8 min (issue 27 added ~70 s)
def test_rounds_short_of_min_nodes_are_skipped_then_the_run_stops_and_resumes(sites,
                                                                              tmp_path):
    """One of three sites never answers, min-nodes 3: each round is skipped
    (model unchanged, the reason recorded); after max-short-rounds such rounds
    the run stops, resumable, and finishes once the site is back."""
    def silent_in_rounds(node, msg, deliver):  # it sent its fingerprint at the start
        return deliver() if msg.metadata.message_type == "query" else None

    _, summary, rows = run(sites, tmp_path, "short", faults={101: silent_in_rounds},
                           **{"num-rounds": 4, "max-short-rounds": 2})
    assert [r["round"] for r in rows] == [1]  # round 2 stopped the run before its line
    assert rows[0]["aggregated"] is False and rows[0]["trained"] == []
    assert "round skipped: 2 of the 3 sites needed (min-nodes) answered round 1; the model " \
           "is unchanged" in rows[0]["failures"]
    assert "train at node-101: no reply" in rows[0]["failures"]  # no registry on the grid
    assert summary["stopped"] == ("too few sites: 2 of the 3 sites needed (min-nodes) answered "
                                  "round 2: 2 rounds in a row with too few replies "
                                  "(max-short-rounds 2)")
    assert any(p.startswith("stopped before its last round") for p in summary["problems"])
    _, resumed, rows = run(sites, tmp_path, "short", resume=True, **{"num-rounds": 4})
    assert resumed["rounds_completed"] == 4 and resumed["stopped"] is None
    assert [r["aggregated"] for r in rows] == [False, True, True, True]


def test_under_dp_a_round_missing_a_sampled_site_is_skipped_with_the_reason(sites, tmp_path):
    """Flower's DP noise is calibrated to every sampled site: a round one of
    them misses is not aggregated (Flower's rule), and now says so, and
    counts toward max-short-rounds instead of stalling the run."""
    _, summary, rows = run(sites, tmp_path, "dp-short", faults={101: lambda n, m, d: None},
                           **{"min-nodes": 2, "dp": "server-fixed", "num-rounds": 3,
                              "max-short-rounds": 2})
    assert [r["aggregated"] for r in rows] == [False]
    assert ("round skipped: 2 of the 3 sites needed (DP: its noise is calibrated to every "
            "sampled site) answered round 1; the model is unchanged") in rows[0]["failures"]
    assert summary["stopped"].startswith("too few sites: 2 of the 3 sites needed (DP")
    assert rows[0]["dp_releases"] in (0, None) and summary["privacy"]["epsilon"] == 0.0


def test_every_site_keeps_the_final_model_with_its_card(sites, tmp_path, monkeypatch):
    from client.app import simulated_site_state
    from common.inference import load_model

    monkeypatch.setenv("FEDSEG_HOME", str(tmp_path / "home"))
    _, summary, rows = run(sites, tmp_path, "kept", **{"keep-model-every": 1})
    final = torch.load(tmp_path / "kept" / "final_model.pt", weights_only=True)
    for name, data_dir in sites:
        folder = simulated_site_state(name, data_dir) / "models" / "kept"
        assert folder.is_relative_to(tmp_path / "home" / "sites")
        card = json.loads((folder / "model-card.json").read_text())
        assert card["run"] == "kept" and card["site"] == name and card["rounds"] == 2
        assert card["federation_dice"] == pytest.approx(rows[0]["dice_mean"])
        assert card["federation_dice_round"] == 1  # said of which round: not this model's
        assert card["units"]["hd95"] == "mm" and card["fedseg_version"]
        assert card["site_scores"]["dice"] == pytest.approx(summary["final"]["sites"][name]["dice"])
        saved = load_model(folder / "final_model.pt")  # settings from the card
        assert saved.sha256 == card["sha256"]
        kept = saved.model.state_dict()
        assert all(torch.equal(kept[k], final[k]) for k in final)
        round_1 = json.loads((folder / "round-001" / "model-card.json").read_text())
        assert round_1["rounds"] == 1 and round_1["site_scores"]["dice"] == pytest.approx(
            rows[0]["dice"][name])  # keep-model-every 1: round 1's model, scored in round 2


def test_cross_site_scores_each_local_model_at_every_site(sites, tmp_path):
    _, summary, rows = run(sites, tmp_path, "cross", **{"cross-site": True})
    table = summary["cross_site"]
    names = [name for name, _ in sites]
    assert list(table) == ["global", *(f"local {n}" for n in names)]
    for row in table.values():
        assert sorted(row) == names and all(0 <= d <= 1 for d in row.values())
    assert table["global"] == {n: summary["final"]["sites"][n]["dice"] for n in names}
    assert 'id="cross-site"' in (tmp_path / "cross" / "report.html").read_text().replace(
        "'", '"')


def test_a_site_shares_its_local_model_only_where_its_policy_allows(synthetic_sites):
    from client.policy import SitePolicy
    from client.service import SiteService
    from common.packing import pack

    config = {**TINY, "cross-site": True}
    for policy, shared in ((SitePolicy(), False), (SitePolicy(share_local_model=True), True)):
        service = SiteService("hospital-a", synthetic_sites[0], device="cpu", policy=policy)
        algo = service.algorithm(7, config)
        _, _, notes = service.handle("train", 7, config, {wire.SERVER_ROUND: 1},
                                     pack(algo.weights()))
        assert (wire.SHARE_LOCAL in notes) is shared
    with pytest.raises(Exception, match="cross-site scores each site's own local model"):
        RunSettings.from_run_config({"cross-site": True, "secure-aggregation": True})


@pytest.mark.parametrize("strategy", ["fedavg", pytest.param("fednova", marks=pytest.mark.slow)])
def test_server_learning_rate_moves_the_model_eta_times_the_aggregate(sites, tmp_path,
                                                                      strategy):
    """One round from the same model and the same site updates: with
    server-learning-rate 2.5 the model moves 2.5 times as far, the same way."""
    moved = {}
    for eta in (1.0, 2.5):
        name = f"{strategy}-{eta}"
        _, summary, _ = run(sites, tmp_path, name, strategy=strategy, **{
            "num-rounds": 1, "server-learning-rate": eta})
        assert summary["rounds_completed"] == 1
        moved[eta] = update_vector(tmp_path / name, RunSettings.from_run_config(TINY))
    assert moved[1.0].norm() > 0
    torch.testing.assert_close(moved[2.5], 2.5 * moved[1.0], rtol=1e-4, atol=1e-6)


def test_server_learning_rate_is_refused_with_fedadam():
    from common.errors import ConfigError

    with pytest.raises(ConfigError, match="fedadam has its own"):
        RunSettings.from_run_config({"strategy": "fedadam", "server-learning-rate": 2.0})
