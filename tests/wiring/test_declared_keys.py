"""The server writes only what the run asked for (issue 26, item 6): a
hospital's reply with keys outside the run's declared set (an extra metric, an
extra record, an extra site note), a value of the wrong kind (not finite) or a
huge string is read on the in-process grid by the real ServerApp; none of it
reaches the run folder, the honest metrics do, and the server's log names the
site and the keys it dropped (never their values)."""

from __future__ import annotations

import logging
import math
from pathlib import Path

from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict

from common import wire
from common.errors import error_reason
from server.runs import read_metrics
from tests.grid import federation, run_server

TINY = {"model-channels": "8,16", "patch-size": 32, "batch-size": 2, "patches-per-image": 1,
        "num-rounds": 2, "min-nodes": 3, "test-time-flips": False, "mixed-precision": False}

LOOT = "zz-loot"  # every planted key and value holds it
METRIC, GLOBAL, NOTE = f"{LOOT}-metric", f"{wire.GLOBAL_PREFIX}{LOOT}-global", f"{LOOT}-note"
RECORD, CONFIG = f"{LOOT}-record", f"{LOOT}-config"
HUGE = "zz-huge-" * 5000  # 40,000 characters
TOO_LONG = ("zz-huge-" * 63).encode()  # 504 characters: longer than any text the server keeps


def plant(node, msg, deliver):
    """hospital-b (node 101): every reply carries extra metrics (plain and
    ``global-``), values that are not finite (its score of the incoming model,
    its test case count), an extra metric record (first) and config record,
    an extra site note and a huge ``left-out`` note."""
    reply = deliver()
    if reply.has_error():
        return reply
    content = reply.content
    metrics = content[wire.METRICS]
    metrics[METRIC] = 1.0
    if wire.ARRAYS in content:  # train
        metrics[GLOBAL] = 2.0
        if wire.GLOBAL_PREFIX + "dice" in metrics:  # round 2 scores round 1's model
            metrics[wire.GLOBAL_PREFIX + "dice"] = -math.inf
    else:
        metrics[wire.NUM_EXAMPLES] = math.inf
    content[wire.SITE][NOTE] = f"{LOOT}-note-value"
    content[wire.SITE][wire.LEFT_OUT] = HUGE
    reply.content = RecordDict({RECORD: MetricRecord({f"{LOOT}-in-record": 3.0}),
                                **dict(content.items()),
                                CONFIG: ConfigRecord({f"{LOOT}-cfg": f"{LOOT}-cfg-value"})})
    return reply


def rename(node, msg, deliver):
    """hospital-c (node 102): a huge public name; its last evaluate fails
    with a huge reason."""
    reply = deliver()
    if (msg.metadata.message_type.endswith("evaluate")
            and wire.CROSS_SITE_OF not in msg.content[wire.CONFIG]):
        return Message(Error(code=0, reason=error_reason("hospital-c" + HUGE, HUGE)),
                       reply_to=msg)
    if not reply.has_error():
        reply.content[wire.SITE][wire.SITE_NAME] = "hospital-c" + HUGE
    return reply


def written(folder: Path) -> bytes:
    """Every file of the run folder, raw."""
    files = sorted(p for p in folder.iterdir() if p.is_file())
    assert {"metrics.jsonl", "summary.json", "report.html", "checkpoint.pt"} <= {
        p.name for p in files}
    return b"".join(p.read_bytes() for p in files)


def assert_nothing_planted(folder: Path) -> None:
    data = written(folder)
    assert LOOT.encode() not in data
    assert TOO_LONG not in data


def dropped(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


def test_undeclared_keys_and_values_never_reach_the_run_folder(sites, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="flwr")
    summary = run_server(federation(sites, {**TINY, "run-name": "planted", "cross-site": True},
                                    {101: plant, 102: rename}), tmp_path)
    folder = tmp_path / "planted"
    assert_nothing_planted(folder)
    rows = read_metrics(folder)
    # The honest part of each reply still counts and is written.
    c = next(s for s in rows[0]["trained"] if s.startswith("hospital-c"))
    assert len(c) <= 64
    for row in rows:
        assert row["trained"] == ["hospital-a", "hospital-b", c]
        assert set(row["train_loss_sites"]) == {"hospital-a", "hospital-b", c}
        assert all(seconds > 0 for seconds in row["train_seconds"].values())
    assert set(rows[0]["sites"]) == {"hospital-a", "hospital-b", c}
    assert list(rows[0]["sites"]["hospital-a"]) == list(wire.EVAL_METRICS)
    assert list(rows[0]["sites"]["hospital-b"]) == [wire.NUM_EXAMPLES, *wire.SCORES[1:]]
    assert rows[0]["dice"]["hospital-b"] is None  # not finite: dropped
    final = summary["final"]["sites"]
    assert set(final) == {"hospital-a", "hospital-b"}
    assert list(final["hospital-a"]) == list(wire.EVAL_METRICS)
    assert set(final["hospital-b"]) == set(wire.SCORES)  # its case count was not finite
    assert 0 <= final["hospital-b"]["dice"] <= 1
    assert any(f.startswith(f"evaluate at {c}: zz-huge-") for f in rows[-1]["failures"])
    assert set(summary["cross_site"]) == {"global", "local hospital-a", "local hospital-b",
                                          f"local {c}"}
    left = summary["cases_left_out"]["hospital-b"]
    assert left.startswith("zz-huge-") and len(left) <= 400
    # The server's log names the site and what it dropped, never the values.
    log = dropped(caplog)
    assert "hospital-b" in log
    for key in (METRIC, GLOBAL, NOTE, RECORD, CONFIG, wire.GLOBAL_PREFIX + "dice",
                wire.NUM_EXAMPLES, wire.LEFT_OUT):
        assert key in log, key
    assert f"{LOOT}-note-value" not in log and f"{LOOT}-cfg-value" not in log
    assert TOO_LONG.decode() not in log


def plant_secure(node, msg, deliver):
    """hospital-b in a secure round: its plaintext metrics (the legacy fit
    result's metrics record) carry extra keys, a value that is not finite, an
    extra note and a huge one; its name is huge too."""
    reply = deliver()
    if reply.has_error():
        return reply
    for record in reply.content.config_records.values():
        if wire.SITE in record:  # the fit result's metrics
            record[METRIC] = 1.0
            record[GLOBAL] = 2.0
            record[wire.TRAIN_SECONDS] = math.inf
            record[NOTE] = f"{LOOT}-note-value"
            record[wire.LEFT_OUT] = HUGE
            record[wire.SITE] = "hospital-b" + HUGE
    return reply


def test_a_secure_rounds_plaintext_metrics_are_kept_to_the_declared_keys(sites, tmp_path,
                                                                         caplog):
    caplog.set_level(logging.WARNING, logger="flwr")
    summary = run_server(federation(sites, {**TINY, "run-name": "secure",
                                            "secure-aggregation": True},
                                    {101: plant_secure}), tmp_path)
    folder = tmp_path / "secure"
    assert_nothing_planted(folder)
    rows = read_metrics(folder)
    b = next(s for s in rows[0]["train_loss_sites"] if s.startswith("hospital-b"))
    assert len(b) <= 64
    for row in rows:
        assert set(row["train_loss_sites"]) == {"hospital-a", b, "hospital-c"}
        assert row["train_seconds"][b] is None and row["train_seconds"]["hospital-a"] > 0
    assert summary["problems"] == [] and summary["rounds_completed"] == 2
    log = dropped(caplog)
    for key in (METRIC, GLOBAL, NOTE, wire.TRAIN_SECONDS):
        assert key in log, key
    assert f"{LOOT}-note-value" not in log and TOO_LONG.decode() not in log
