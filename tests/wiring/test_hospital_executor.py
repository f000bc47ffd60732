"""The hospitals' executors (client/executor.py's Handler: the installed app,
the policy, the site's DP and ledger, the audit) as the sites of the real
ServerApp on the in-process grid: SecAgg+ over updates each site clipped and
noised itself, every stage audited, every release in the site's ledger."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Message
from flwr.supercore.run import Run

from client.audit import AuditLog
from client.executor import APP_ID, Handler
from client.policy import SitePolicy
from client.privacy import SiteLedger
from client.service import SiteService
from common import wire
from common.data.synthetic import write_federation
from server.runs import read_metrics
from server.wire import AUDIT_DIR_ENV
from tests.grid import LocalGrid, app_defaults, audited_replies, run_server

SETTINGS = {"num-rounds": 2, "seed": 0, "min-nodes": 3, "model-channels": "8,16",
            "patch-size": 32, "batch-size": 2, "patches-per-image": 1,
            "secure-aggregation": True, "secagg-max-weight": 10.0,
            "dp": "client-fixed", "dp-noise-multiplier": 0.3, "dp-clipping-norm": 2.0,
            "test-time-flips": False, "mixed-precision": False}
POLICY = "require-secure-aggregation = true\nrequire-dp = true\nmax-epsilon = 500.0\n"


class Hospitals:
    """One executor per node id, called as the grid calls a ClientApp."""

    def __init__(self, handlers: dict[int, Handler]) -> None:
        self.handlers = handlers

    def __call__(self, msg: Message, context) -> Message:
        run = Run.create_empty(context.run_id)
        run.fab_id, run.fab_hash = APP_ID, "ab" * 32
        return self.handlers[context.node_id].handle(msg, context, run).reply


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    return write_federation(tmp_path_factory.mktemp("ex"), 3, n_train=2, n_test=1, seed=7)


def test_secure_rounds_of_self_noised_updates_through_the_hospitals_own_code(
        sites, tmp_path, monkeypatch):
    handlers = {}
    for i, folder in enumerate(sites):
        policy = SitePolicy.from_dict(
            {"require-secure-aggregation": True, "require-dp": True, "max-epsilon": 500.0})
        state = tmp_path / f"state-{i}"
        handlers[100 + i] = Handler(
            SiteService(f"site-{i}", folder, device="cpu", policy=policy),
            policy, AuditLog(state / "audit.jsonl"), SiteLedger(state / "ledger.json"))
    grid = LocalGrid(Hospitals(handlers), [{"site-name": f"site-{i}"} for i in range(3)],
                     {**app_defaults(), **SETTINGS, "run-name": "secure-dp"})
    monkeypatch.setenv(AUDIT_DIR_ENV, str(tmp_path / "audit"))
    run_server(grid, tmp_path)
    rows = read_metrics(tmp_path / "secure-dp")
    assert [r["aggregated"] for r in rows] == [True, True]
    assert all(set(r["train_loss_sites"]) == {"site-0", "site-1", "site-2"} for r in rows)
    # (the grid gives replies no ids; over the network their id is this content hash)
    received = {m.object_id for m in audited_replies(tmp_path / "audit", "*")}
    for i in range(3):
        lines = AuditLog(tmp_path / f"state-{i}" / "audit.jsonl").entries()
        stages = [e["kind"].split(":")[-1] for e in lines if e["kind"].startswith("train/")]
        assert stages == ["setup", "share_keys", "collect_masked_vectors", "unmask"] * 2
        assert all(e["outcome"] == "sent" and e["arrays"] == 0 for e in lines)
        assert {e["message_id"] for e in lines if e["outcome"] == "sent"} <= received
        ledger = json.loads((tmp_path / f"state-{i}" / "ledger.json").read_text())
        assert [e["round"] for e in ledger["releases"]] == [1, 2]
        assert ledger["releases"][1]["epsilon_after"] > ledger["releases"][0]["epsilon_after"]
    for msg in audited_replies(tmp_path / "audit", "*"):  # nothing in plaintext
        assert all(len(rec) == 0 for rec in msg.content.array_records.values())
    assert np.isfinite(rows[-1]["train_loss"])
    assert wire.VERSION_KEY in app_defaults()


def test_the_hospitals_own_dp_at_float16_noises_in_float32_then_casts(sites, tmp_path,
                                                                      monkeypatch):
    """transfer-precision float16 through the hospitals' own code: the site
    clips and noises its update in float32 (its ledger records each release),
    then the reply leaves as float16."""
    handlers = {}
    for i, folder in enumerate(sites):
        policy = SitePolicy.from_dict({"require-dp": True, "max-epsilon": 500.0})
        state = tmp_path / f"state-{i}"
        handlers[100 + i] = Handler(
            SiteService(f"site-{i}", folder, device="cpu", policy=policy),
            policy, AuditLog(state / "audit.jsonl"), SiteLedger(state / "ledger.json"))
    settings = {**SETTINGS, "secure-aggregation": False, "transfer-precision": "float16"}
    grid = LocalGrid(Hospitals(handlers), [{"site-name": f"site-{i}"} for i in range(3)],
                     {**app_defaults(), **settings, "run-name": "dp-half"})
    monkeypatch.setenv(AUDIT_DIR_ENV, str(tmp_path / "audit"))
    run_server(grid, tmp_path)
    rows = read_metrics(tmp_path / "dp-half")
    assert [r["trained"] for r in rows] == [["site-0", "site-1", "site-2"]] * 2
    replies = audited_replies(tmp_path / "audit", "*-train-*")
    assert len(replies) == 6
    for msg in replies:
        weights = msg.content[wire.ARRAYS]["weights-float32"].numpy()
        assert weights.dtype == np.float16 and np.isfinite(weights).all()
    for i in range(3):
        ledger = json.loads((tmp_path / f"state-{i}" / "ledger.json").read_text())
        assert [e["round"] for e in ledger["releases"]] == [1, 2]
