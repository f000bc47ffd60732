"""Metrics per structure, end to end: a two-round run of two structures on two
sites (the real ServerApp and ClientApp on the in-process grid). The replies
carry exactly the run's per-structure scores; metrics.jsonl and summary.json
hold them per site and across sites, the terminal table and the report show
them, and ``fedseg evaluate`` writes them."""

from __future__ import annotations

import argparse
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from common import wire
from common.metrics import weighted_mean
from server.render import summary_table
from server.runs import read_metrics
from tests.grid import federation, run_server

STRUCTURES = ("a", "b")
TINY = {"model-channels": "8,16", "patch-size": 32, "batch-size": 2, "patches-per-image": 1,
        "num-rounds": 2, "min-nodes": 2, "test-time-flips": False, "mixed-precision": False,
        "structures": ",".join(STRUCTURES), "learning-rate": 0.01}


def write_site(folder: Path, seed: int, n_train: int = 3, n_test: int = 2) -> Path:
    """PNG cases of 48 x 48: a bright square (structure a, value 1) and a dim
    bar (structure b, value 2) on noise, with a label map naming both."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    spec = {"labels": {"0": "background", "1": "a", "2": "b"}, "training": [], "test": []}
    for i in range(n_train + n_test):
        split = "training" if i < n_train else "test"
        label = np.zeros((48, 48), np.uint8)
        r, c = rng.integers(4, 20, size=2)
        label[r:r + 14, c:c + 14] = 1
        c = rng.integers(4, 20)
        label[36:42, c:c + 20] = 2
        image = rng.normal(40, 10, label.shape) + 160 * (label == 1) + 80 * (label == 2)
        name = f"case_{i}.png"
        for sub, array in (("images", np.clip(image, 0, 255).astype(np.uint8)),
                           ("labels", label)):
            (folder / sub).mkdir(exist_ok=True)
            Image.fromarray(array).save(folder / sub / name)
        spec[split].append({"image": f"images/{name}", "label": f"labels/{name}"})
    (folder / "dataset.json").write_text(json.dumps(spec))
    return folder


@pytest.fixture(scope="module")
def sites(tmp_path_factory) -> list[tuple[str, Path]]:
    root = tmp_path_factory.mktemp("structures")
    return [(f"hospital-{x}", write_site(root / x, seed)) for seed, x in enumerate("ab")]


@pytest.fixture(scope="module")
def ran(sites, tmp_path_factory):
    """The run, and every reply's kind and metric keys as the site sent them
    (then one site's replies get a stray structure's score)."""
    out = tmp_path_factory.mktemp("runs")
    replies = []

    def keep(node, msg, deliver):
        reply = deliver()
        assert not reply.has_error(), reply.error
        replies.append((msg.metadata.message_type, set(reply.content[wire.METRICS].keys())))
        return reply

    def stray(node, msg, deliver):
        reply = keep(node, msg, deliver)
        reply.content[wire.METRICS][wire.structure_key("dice", "c")] = 0.5
        return reply

    summary = run_server(federation(sites, {**TINY, "run-name": "two"},
                                    {100: keep, 101: stray}), out)
    return out / "two", summary, read_metrics(out / "two"), replies


def test_replies_carry_exactly_the_runs_per_structure_scores(ran):
    _, _, _, replies = ran
    scores = set(wire.eval_metrics(STRUCTURES))
    assert len(scores) == 1 + 5 * 3
    assert {kind.rsplit(".", 1)[-1] for kind, _ in replies} == {"query", "train", "evaluate"}
    scored = {wire.GLOBAL_PREFIX + k for k in scores}
    for kind, keys in replies:
        if kind.endswith("query"):  # the fingerprint at the start
            assert keys == set(wire.FINGERPRINT_METRICS)
        elif kind.endswith("evaluate"):
            assert keys == scores
        else:  # round 2's train replies score round 1's model first
            assert keys in (set(wire.TRAIN_METRICS), {*wire.TRAIN_METRICS, *scored})
    assert sum(kind.endswith("train") and scored <= keys for kind, keys in replies) == 2


def test_metrics_and_summary_hold_each_structure_per_site_and_across_sites(ran):
    folder, summary, rows, _ = ran
    scores = wire.score_keys(STRUCTURES)
    assert summary["problems"] == [] and summary["rounds_completed"] == 2
    assert summary["structures"] == list(STRUCTURES)
    assert [r["round"] for r in rows] == [1, 2]
    for row in [*rows, summary["final"]]:
        sites = row["sites"]
        assert set(sites) == {"hospital-a", "hospital-b"}
        for values in sites.values():  # the run's scores only: the stray "dice/c" is not
            assert list(values) == [wire.NUM_EXAMPLES, *scores]
            assert values[wire.NUM_EXAMPLES] == 2
            assert all(v is None or 0 <= v <= 1 for k, v in values.items()
                       if k.startswith(("dice", "iou", "sensitivity", "specificity")))
        overall = row["overall"]
        assert list(overall) == list(scores)
        for key in scores:  # across sites: case-weighted, undefined left out
            expected = weighted_mean([{**m, key: math.nan if m[key] is None else m[key]}
                                      for m in sites.values()], key)
            assert overall[key] == (None if math.isnan(expected)
                                    else pytest.approx(expected))
    assert rows[-1]["dice_mean"] == pytest.approx(rows[-1]["overall"]["dice"])
    assert summary["dice_final"] == pytest.approx(summary["final"]["overall"]["dice"])
    assert json.loads((folder / "summary.json").read_text()) == summary


def test_table_and_report_show_a_block_per_structure(ran):
    folder, summary, _, _ = ran
    console = Console(file=io.StringIO(), width=120)
    console.print(summary_table(summary))
    rows = [[cell.strip() for cell in line.split("│")[1:-1]]
            for line in console.file.getvalue().splitlines() if line.startswith("│")]
    heads = [i for i, cells in enumerate(rows) if cells[0] in STRUCTURES]
    assert [rows[i][0] for i in heads] == list(STRUCTURES)  # a block per structure
    assert [rows[i + 3][0] for i in heads] == ["all sites"] * 2
    overall = summary["final"]["overall"]
    assert rows[heads[1] + 3][1:3] == [f"{overall['dice/b']:.3f}", f"{overall['iou/b']:.3f}"]
    page = (folder / "report.html").read_text()
    assert "<table id='structures'>" in page and "<table id='final'>" in page
    assert page.count("all (case-weighted)") == 3  # the headline, then a and b


def test_fedseg_evaluate_writes_each_structure(ran, sites, tmp_path):
    from client.cli import cmd_evaluate

    folder, _, _, _ = ran
    csv = tmp_path / "scores.csv"
    assert cmd_evaluate(argparse.Namespace(model=str(folder / "final_model.pt"),
                                           site_dir=str(sites[0][1]), csv=str(csv),
                                           device="cpu", split="test")) == 0
    rows = csv.read_text().splitlines()
    assert rows[0].split(",") == ["case", *wire.score_keys(STRUCTURES), "note"]
    assert len(rows) == 2 + 2 and rows[-1].startswith("mean,")


def test_a_radiotherapy_site_and_a_seg_site_learn_the_same_structures_together(tmp_path):
    """One hospital exports RTSTRUCT contours (its ROIs spelt 'ORGAN' and
    'Lesion_1', matched through its label_aliases), the other a DICOM SEG of two
    segments: both are read as the run's organ and lesion, train, and are
    scored per structure."""
    from common.data.synthetic import ORGAN_LESION
    from common.data.synthetic import write_site as write_synthetic

    rt = write_synthetic(tmp_path / "rt", 0, 2, 1, label_format="rtstruct",
                         labels={0: "background", 1: "ORGAN", 2: "Lesion_1"})
    spec = json.loads((rt / "dataset.json").read_text())
    spec["labels"] = {"0": "background", "1": "organ", "2": "lesion"}
    spec["label_aliases"] = {"lesion": ["Lesion_1", "GTV"]}
    (rt / "dataset.json").write_text(json.dumps(spec))
    seg = write_synthetic(tmp_path / "seg", 1, 2, 1, labels=ORGAN_LESION, label_format="seg")
    overrides = {**TINY, "structures": "organ,lesion", "num-rounds": 1, "run-name": "rt-seg",
                 "model-spatial-dims": 3}
    summary = run_server(federation([("hospital-rt", rt), ("hospital-seg", seg)], overrides),
                         tmp_path / "runs")
    assert summary["problems"] == [], summary["problems"]
    (row,) = read_metrics(tmp_path / "runs" / "rt-seg")
    assert row["trained"] == ["hospital-rt", "hospital-seg"] and row["failures"] == []
    for site in ("hospital-rt", "hospital-seg"):
        scores = row["sites"][site]
        assert list(scores) == [wire.NUM_EXAMPLES, *wire.score_keys(("organ", "lesion"))]
        assert 0 <= scores["dice/organ"] <= 1 and 0 <= scores["dice/lesion"] <= 1
