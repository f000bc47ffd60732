"""Sites that would learn different tasks: in a run that names no structure,
each site learns its label map's one structure as the run's one class, so a
'vessel' site beside a 'membrane' site would train one model on two tasks
without a word. Each site says its structure (``wire.STRUCTURE``); the real
ServerApp and ClientApp on the in-process grid stop such a run before any
site trains (fingerprint) or at its first round (no fingerprint), and leave
out a later site naming another."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Error, Message
from flwr.common.constant import ErrorCode

from common import wire
from server.runs import read_metrics
from tests.grid import federation, run_server

# The attacks and edge cases run in the slow set (the default suite stays under
# 8 minutes); the stops, the agreement and the late site in the default one.
SLOW = pytest.mark.slow

TINY = {"model-channels": "8,16", "patch-size": 32, "batch-size": 2, "patches-per-image": 1,
        "num-rounds": 2, "min-nodes": 2, "test-time-flips": False, "mixed-precision": False}


def one_structure_site(folder: Path, name: str, seed: int) -> Path:
    """PNG cases of 48 x 48, a bright square (value 1) on noise, the map
    naming it ``name``."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True)
    (folder / "labels").mkdir()
    spec = {"labels": {"0": "background", "1": name}, "training": [], "test": []}
    for i in range(4):
        label = np.zeros((48, 48), np.uint8)
        r, c = rng.integers(4, 28, size=2)
        label[r:r + 14, c:c + 14] = 1
        image = np.clip(rng.normal(40, 10, label.shape) + 160 * label, 0, 255)
        Image.fromarray(image.astype(np.uint8)).save(folder / "images" / f"c{i}.png")
        Image.fromarray(label).save(folder / "labels" / f"c{i}.png")
        spec["training" if i < 3 else "test"].append(
            {"image": f"images/c{i}.png", "label": f"labels/c{i}.png"})
    (folder / "dataset.json").write_text(json.dumps(spec))
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("named")
    return {key: one_structure_site(root / key, name, seed)
            for seed, (key, name) in enumerate([("vessel", "vessel"), ("membrane", "membrane"),
                                                ("Vessel", "Vessel"),
                                                ("membrane2", "membrane")])}


def said(grid, kind: str) -> list[str | None]:
    """What each ``kind`` reply's site record said of its structure, as sent."""
    return [m.content[wire.SITE].get(wire.STRUCTURE) for m in grid.replies
            if m.metadata.message_type.endswith(kind) and not m.has_error()]


def keeping(grid):
    """Keep every reply the grid delivers, as the site sent it."""
    grid.replies = []
    delivered = dict(grid.faults)

    def keep(node, msg, deliver):
        fault = delivered.get(node)
        reply = fault(node, msg, deliver) if fault else deliver()
        if reply is not None:
            grid.replies.append(reply)
        return reply

    grid.faults = dict.fromkeys(grid.contexts, keep)
    return grid


def run(tmp_path, sites, name, faults=None, **overrides):
    grid = keeping(federation(sites, {**TINY, "run-name": name, **overrides}, faults))
    return grid, run_server(grid, tmp_path), read_metrics(tmp_path / name)


DISAGREE = ("the sites' label maps name different structures (hospital-b 'membrane'; "
            "hospital-a 'vessel') and the run names none")


def test_sites_naming_different_structures_stop_the_run_before_anyone_trains(
        folders, tmp_path):
    grid, summary, rows = run(tmp_path, [("hospital-a", folders["vessel"]),
                                         ("hospital-b", folders["membrane"])], "two-tasks")
    assert summary["rounds_completed"] == 0 and rows == []
    assert summary["stopped"].startswith(f"structures: {DISAGREE}")
    assert "name the structure with the run setting 'structures'" in summary["stopped"]
    assert not [m for m in grid.sent if m.metadata.message_type.endswith("train")]
    assert sorted(said(grid, "query")) == ["membrane", "vessel"]


def test_without_a_fingerprint_the_first_round_stops_it_unaggregated(folders, tmp_path):
    _, summary, rows = run(tmp_path, [("hospital-a", folders["vessel"]),
                                      ("hospital-b", folders["membrane"])], "no-print",
                           harmonise="off")
    assert summary["rounds_completed"] == 0
    assert summary["stopped"].startswith(f"structures: {DISAGREE}")
    assert all(not r["aggregated"] for r in rows)


def test_sites_naming_one_structure_train_and_say_it(folders, tmp_path):
    grid, summary, rows = run(tmp_path, [("hospital-a", folders["vessel"]),
                                         ("hospital-c", folders["Vessel"])], "one-task")
    assert summary["rounds_completed"] == 2 and summary["problems"] == []
    assert summary["stopped"] is None
    assert set(said(grid, "train")) == {"vessel"} and set(said(grid, "query")) == {"vessel"}


def late(node, msg, deliver):
    """A site not there for the fingerprint and round 1."""
    first = (msg.metadata.message_type.endswith("query")
             or msg.content[wire.CONFIG].get(wire.SERVER_ROUND) == 1)
    return None if first else deliver()


def test_a_site_joining_later_with_another_structure_is_left_out(folders, tmp_path):
    """Its update is left out, and its scores (of a model of another task,
    against its own labels) count nowhere: not in a row, the summary or the
    federation's Dice."""
    _, summary, rows = run(tmp_path, [("hospital-a", folders["vessel"]),
                                      ("hospital-c", folders["Vessel"]),
                                      ("hospital-b", folders["membrane"])], "late",
                           faults={102: late}, **{"num-rounds": 3})
    assert summary["rounds_completed"] == 3 and summary["stopped"] is None
    assert summary["site_structure"] == "vessel"
    assert "hospital-b" not in summary["final"]["sites"]
    assert all("hospital-b" not in r["dice"] for r in rows)
    assert rows[0]["trained"] == ["hospital-a", "hospital-c"]
    for row in rows[1:]:
        assert row["trained"] == ["hospital-a", "hospital-c"]
        assert ("update from hospital-b left out: its label map names 'membrane', the "
                "structure the run's sites learn is 'vessel' (the run names none: name it "
                "with the run setting 'structures', --config structures=NAME)") in " ".join(
                    row["failures"])


@SLOW
def test_a_secure_round_cannot_leave_one_out_so_it_stops(folders, tmp_path):
    _, summary, _ = run(tmp_path, [("hospital-a", folders["vessel"]),
                                   ("hospital-b", folders["membrane"]),
                                   ("hospital-c", folders["Vessel"])], "secure",
                        harmonise="off", **{"secure-aggregation": True, "min-nodes": 3})
    assert summary["rounds_completed"] == 0
    assert summary["stopped"].startswith(
        "structures: the sites' label maps name different structures (hospital-b "
        "'membrane'; hospital-a, hospital-c 'vessel')")


@SLOW
@pytest.mark.parametrize("overrides", [{"structures": "vessel"}, {"fedseg-wire": 2}],
                         ids=["named", "wire-2"])
def test_nothing_is_said_where_the_run_names_its_structure_or_speaks_wire_2(
        folders, tmp_path, overrides):
    grid, summary, _ = run(tmp_path, [("hospital-a", folders["vessel"]),
                                      ("hospital-c", folders["Vessel"])], "quiet",
                           **{"num-rounds": 1, **overrides})
    assert summary["rounds_completed"] == 1 and summary["problems"] == []
    assert said(grid, "train") == [None, None]


@SLOW
def test_the_fingerprints_structure_holds_when_another_site_answers_first(folders, tmp_path):
    """The fingerprint found 'vessel'. The vessel sites' round-1 replies
    fail and a 'membrane' site that missed the fingerprint answers round 1
    alone: it is left out (the round skipped, too few sites), and rounds 2
    and 3 train the vessel sites; the structure is not set by who answers
    first."""
    def fails_round_1(node, msg, deliver):
        if msg.content[wire.CONFIG].get(wire.SERVER_ROUND) == 1 and \
                msg.metadata.message_type.endswith("train"):
            return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                                 reason="transient"), reply_to=msg)
        return deliver()

    def missed_the_fingerprint(node, msg, deliver):
        return None if msg.metadata.message_type.endswith("query") else deliver()

    _, summary, rows = run(tmp_path, [("hospital-a", folders["vessel"]),
                                      ("hospital-c", folders["Vessel"]),
                                      ("hospital-b", folders["membrane"])], "switch",
                           faults={100: fails_round_1, 101: fails_round_1,
                                   102: missed_the_fingerprint}, **{"num-rounds": 3})
    assert summary["stopped"] is None and summary["site_structure"] == "vessel"
    assert [r["trained"] for r in rows] == [[], ["hospital-a", "hospital-c"],
                                            ["hospital-a", "hospital-c"]]
    assert all(any(f.startswith("update from hospital-b left out") for f in r["failures"])
               for r in rows)


@SLOW
def test_a_resumed_run_keeps_its_structure(folders, tmp_path):
    """Round 1 learned 'vessel' (kept in the checkpoint). Resumed with two
    'membrane' sites (no fingerprint: the harmonisation is kept), they are
    left out and the round is skipped: the vessel model is not trained on
    membranes."""
    _, first, _ = run(tmp_path, [("hospital-a", folders["vessel"]),
                                 ("hospital-c", folders["Vessel"])], "resumed",
                      **{"num-rounds": 1})
    assert first["rounds_completed"] == 1 and first["site_structure"] == "vessel"
    _, summary, rows = run(tmp_path, [("hospital-b", folders["membrane"]),
                                      ("hospital-d", folders["membrane2"])], "resumed",
                           **{"resume": True, "num-rounds": 2})
    assert summary["site_structure"] == "vessel"
    assert rows[-1]["trained"] == [] and not rows[-1]["aggregated"]
    assert sum(f.startswith(("update from hospital-b left out", "update from hospital-d "
                             "left out")) for f in rows[-1]["failures"]) == 2
    assert rows[-1]["dice"] == {}  # their scores of the vessel model count nowhere


@SLOW
def test_two_nodes_under_one_name_are_told_apart(folders, tmp_path):
    """Structures are recorded by node, not by the (self-reported) name: a
    'membrane' node that gives the name of a 'vessel' site does not hide."""
    _, summary, _ = run(tmp_path, [("hospital-a", folders["membrane"]),
                                   ("hospital-a", folders["vessel"]),
                                   ("hospital-c", folders["Vessel"])], "clash",
                        harmonise="off")
    assert summary["rounds_completed"] == 0
    assert summary["stopped"].startswith(
        "structures: the sites' label maps name different structures (hospital-a "
        "'membrane'; hospital-a, hospital-c 'vessel')")


@SLOW
def test_a_hostile_structure_note_is_one_bounded_line(folders, tmp_path):
    """A fingerprint reply is not cut by the declared keys: its note is read
    as text of one line, at most 64 characters, before it reaches a message,
    the log or summary.json."""
    hostile = "\x1b[31m" + "x" * 100_000 + "\nINFO : fake log line"

    def lie(node, msg, deliver):
        reply = deliver()
        if msg.metadata.message_type.endswith("query"):
            reply.content[wire.SITE][wire.STRUCTURE] = hostile
        return reply

    _, summary, _ = run(tmp_path, [("hospital-a", folders["vessel"]),
                                   ("hospital-c", folders["Vessel"])], "hostile",
                        faults={101: lie})
    stopped = summary["stopped"]
    assert stopped.startswith("structures: ") and stopped.isprintable()
    assert len(stopped) < 600 and "fake log line" not in stopped


@SLOW
def test_under_dp_a_site_left_out_for_its_structure_does_not_count_as_answering(
        folders, tmp_path):
    """DP's noise is calibrated to every sampled site: a round with one of
    them left out for its structure is skipped, not aggregated from fewer
    updates with the noise of more."""
    _, summary, rows = run(tmp_path, [("hospital-a", folders["vessel"]),
                                      ("hospital-c", folders["Vessel"]),
                                      ("hospital-b", folders["membrane"])], "dp",
                           faults={102: late},
                           **{"num-rounds": 2, "dp": "server-adaptive",
                              "dp-noise-multiplier": 1.0, "dp-clipping-norm": 0.5})
    assert [r["aggregated"] for r in rows] == [False, False]
    assert "round skipped: 2 of the 3 sites needed (DP: its noise is calibrated to every " \
           "sampled site) answered round 2; the model is unchanged" in rows[1]["failures"]


@SLOW
def test_a_note_is_not_read_where_the_run_names_its_structure(folders, tmp_path):
    """A run that names its structure learns it at every site by name: a
    stray note (an older or a hostile site's) neither stops it nor leaves a
    site out."""
    def stray(node, msg, deliver):
        reply = deliver()
        if not reply.has_error():
            reply.content[wire.SITE][wire.STRUCTURE] = "membrane"
        return reply

    _, summary, rows = run(tmp_path, [("hospital-a", folders["vessel"]),
                                      ("hospital-c", folders["Vessel"])], "stray",
                           faults={101: stray}, structures="vessel")
    assert summary["stopped"] is None and summary["site_structure"] is None
    assert all(r["trained"] == ["hospital-a", "hospital-c"] for r in rows)
