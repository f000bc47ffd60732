"""The run folder: rounds, summary, plot, resume."""

import json
import math

import pytest
import torch
from flwr.app import ArrayRecord

from common.config import RunSettings
from common.errors import ConfigError
from common.model import build_model
from server.runs import RunFolder, packed_arrays, read_metrics
from server.strategies import RoundRecord

CFG = {"model-channels": "4,8", "patch-size": 16, "num-rounds": 3, "run-name": "r1"}


def round_record(dice_a: float, dice_b: float) -> RoundRecord:
    metrics = {"iou": 0.5, "hd95": math.nan, "sensitivity": 0.7, "specificity": 0.99}
    return RoundRecord(
        train={"a": {"num-examples": 4, "train-loss": 1.0, "train-seconds": 1.0},
               "b": {"num-examples": 2, "train-loss": 0.4, "train-seconds": 1.0}},
        evaluate={"a": {"dice": dice_a, "num-examples": 3, **metrics},
                  "b": {"dice": dice_b, "num-examples": 1, **metrics}},
        bytes_down=100, bytes_up=50, aggregated=True,
    )


def state(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return build_model(RunSettings.from_run_config(CFG).model).state_dict()


def arrays(seed: int) -> ArrayRecord:
    """The model as the wire carries it (packed, common/packing.py)."""
    return packed_arrays(state(seed))


def test_rounds_summary_and_plot(tmp_path):
    run = RunFolder.open(tmp_path, RunSettings.from_run_config(CFG))
    run.record_round(1, arrays(1), round_record(0.2, 0.6))
    row = run.record_round(2, arrays(2), round_record(0.5, 0.9))
    assert row["dice"] == {"a": 0.5, "b": 0.9}
    assert row["dice_mean"] == pytest.approx((0.5 * 3 + 0.9) / 4)
    assert row["train_loss"] == pytest.approx((1.0 * 4 + 0.4 * 2) / 6)
    assert row["sites"]["a"]["hd95"] is None  # undefined, written as null
    summary = run.finish(None)
    folder = tmp_path / "r1"
    for name in ("metrics.jsonl", "summary.json", "final_model.pt", "dice.png", "checkpoint.pt"):
        assert (folder / name).exists(), name
    assert json.loads((folder / "summary.json").read_text()) == summary
    assert summary["rounds_completed"] == 2
    assert set(summary["final"]["overall"]) == {"dice", "iou", "hd95", "sensitivity",
                                                "specificity"}
    assert summary["dice_first_round"] < summary["dice_final"]
    final = torch.load(folder / "final_model.pt", weights_only=True)
    assert final.keys() == state(2).keys()
    assert all(torch.equal(final[k], v) for k, v in state(2).items())


def test_the_report_is_drawn_after_scored_rounds_and_every_redraw_seconds(tmp_path,
                                                                          monkeypatch):
    """Unscored rounds of a long run do not each redraw report.html and
    dice.png (matplotlib, about 0.3 s a round between one round and the
    next): a scored round draws both, an unscored one the report only once
    REDRAW_SECONDS have passed, and the end of the run draws both."""
    import server.runs as runs

    clock = [1000.0]
    monkeypatch.setattr(runs.time, "monotonic", lambda: clock[0])
    drawn: list[str] = []
    monkeypatch.setattr(RunFolder, "report", lambda self, summary=None: drawn.append("report"))
    monkeypatch.setattr(RunFolder, "plot", lambda self: drawn.append("plot"))
    run = RunFolder.open(tmp_path, RunSettings.from_run_config({**CFG, "num-rounds": 9}))
    unscored = RoundRecord(train=round_record(0, 0).train, evaluate={}, aggregated=True)
    run.record_round(1, arrays(1), unscored)
    assert drawn == ["report"]  # the first round: the page exists from the start
    for r in (2, 3, 4):
        clock[0] += 5
        run.record_round(r, arrays(r), unscored)
    assert drawn == ["report"]
    clock[0] += runs.REDRAW_SECONDS
    run.record_round(5, arrays(5), unscored)
    assert drawn == ["report"] * 2
    clock[0] += 1
    run.record_round(6, arrays(6), round_record(0.5, 0.7))
    assert drawn == ["report"] * 2 + ["plot", "report"]
    run.finish(None)
    assert drawn[-2:] == ["plot", "report"]


def test_resume_continues_after_the_last_saved_round(tmp_path):
    settings = RunSettings.from_run_config(CFG)
    run = RunFolder.open(tmp_path, settings)
    run.record_round(1, arrays(1), round_record(0.2, 0.6))
    run.record_round(2, arrays(2), round_record(0.3, 0.7))
    with open(tmp_path / "r1" / "metrics.jsonl", "a") as fh:
        fh.write('{"round": 3, "dice": {"a"')  # a line cut short by a crash
    resumed = RunFolder.open(tmp_path, RunSettings.from_run_config({**CFG, "resume": True}))
    assert resumed.last_round == 2
    assert [r["round"] for r in read_metrics(tmp_path / "r1")] == [1, 2]
    restored = resumed.state_dict(resumed.checkpoint_arrays())
    assert all(torch.equal(restored[k], v) for k, v in state(2).items())


def test_a_finished_folder_is_not_overwritten(tmp_path):
    run = RunFolder.open(tmp_path, RunSettings.from_run_config(CFG))
    run.record_round(1, arrays(1), round_record(0.2, 0.6))
    with pytest.raises(ConfigError, match="already holds a run"):
        RunFolder.open(tmp_path, RunSettings.from_run_config(CFG))


def test_resume_refuses_another_model(tmp_path):
    run = RunFolder.open(tmp_path, RunSettings.from_run_config(CFG))
    run.record_round(1, arrays(1), round_record(0.2, 0.6))
    with pytest.raises(ConfigError, match="its model was"):
        RunFolder.open(tmp_path, RunSettings.from_run_config(
            {**CFG, "resume": True, "model-channels": "4,8,16"}))


def test_resume_without_checkpoint(tmp_path):
    with pytest.raises(ConfigError, match="no checkpoint"):
        RunFolder.open(tmp_path, RunSettings.from_run_config({**CFG, "resume": True}))


def test_a_site_that_failed_every_round_is_a_problem(tmp_path):
    """Both rounds aggregate a's update; b fails each time: the summary names
    b as failed every round (the CLI exits non-zero on any problem)."""
    run = RunFolder.open(tmp_path, RunSettings.from_run_config(CFG))
    for r in (1, 2):
        rec = round_record(0.5, 0.9)
        rec.failures.append("train at b: fedseg data error in case #0 (unreadable file)")
        rec.failed.add("b")
        rec.left_out.add("b")
        run.record_round(r, arrays(r), rec)
    summary = run.finish(None)
    assert summary["participation"] == {"a": {"rounds_trained": 2, "rounds_failed": 0},
                                        "b": {"rounds_trained": 0, "rounds_failed": 2}}
    assert summary["problems"] == ["site b failed every round (2 of 2)"]
    assert summary["rounds_aggregated"] == 2


def test_a_run_that_never_aggregated_is_a_problem(tmp_path):
    run = RunFolder.open(tmp_path, RunSettings.from_run_config(CFG))
    rec = round_record(0.5, 0.9)
    rec.aggregated = False
    run.record_round(1, arrays(1), rec)
    summary = run.finish(None)
    assert ("no round aggregated an update (1 round(s) run): no final model was written"
            in summary["problems"])
    assert {"site a never trained", "site b never trained"} <= set(summary["problems"])


def test_a_healthy_run_has_no_problems(tmp_path):
    run = RunFolder.open(tmp_path, RunSettings.from_run_config(CFG))
    run.record_round(1, arrays(1), round_record(0.5, 0.9))
    assert run.finish(None)["problems"] == []


def test_a_site_never_drawn_under_fraction_train_is_no_problem(tmp_path):
    """fraction-train under 1: a site the sampling never drew (scored only) is
    not a failure; one that was asked and never counted still is."""
    run = RunFolder.open(tmp_path, RunSettings.from_run_config({**CFG,
                                                                "fraction-train": 0.5}))
    rec = round_record(0.5, 0.9)
    rec.evaluate["c"] = dict(rec.evaluate["b"])  # scored, never drawn for training
    rec.left_out.add("b")  # drawn, its update left out
    run.record_round(1, arrays(1), rec)
    assert run.finish(None)["problems"] == ["site b never trained"]


# ------------------------------------------------ honest outputs (issue 29 item 5)


def test_a_run_that_never_aggregated_writes_no_final_model_and_says_so(tmp_path):
    """Its model is the initial one: no final_model.pt for predict to take
    without a word, no model card, and a problem (the CLI exits non-zero)."""
    from server.cli import _exit_code

    run = RunFolder.open(tmp_path, RunSettings.from_run_config(CFG))
    rec = round_record(0.5, 0.9)
    rec.aggregated = False
    run.record_round(1, arrays(1), rec)
    summary = run.finish(None)
    folder = tmp_path / "r1"
    assert not (folder / "final_model.pt").exists()
    assert not (folder / "model-card.json").exists()
    assert summary["final_model"] is None
    assert any("no final model was written" in p for p in summary["problems"])
    assert _exit_code({**summary, "rounds_completed": summary["rounds_planned"]}) == 1


def test_the_model_card_carries_the_final_rounds_figures_date_version_hash_and_units(
        tmp_path):
    import hashlib
    from datetime import datetime

    from common.inference import fedseg_version, load_model

    run = RunFolder.open(tmp_path, RunSettings.from_run_config(CFG))
    run.record_round(1, arrays(1), round_record(0.2, 0.6))
    run.record_round(2, arrays(2), round_record(0.5, 0.9))
    summary = run.finish(None)
    folder = tmp_path / "r1"
    card = json.loads((folder / "model-card.json").read_text())
    final_dice = (0.5 * 3 + 0.9) / 4  # round 2's, not round 1's
    assert card["scored_round"] == 2 and card["rounds"] == 2
    assert card["federation_dice"] == pytest.approx(final_dice)
    assert card["sites"]["b"]["dice"] == pytest.approx(0.9)
    assert card["units"]["hd95"] == "mm" and card["units"]["dice"].startswith("fraction")
    digest = hashlib.sha256((folder / "final_model.pt").read_bytes()).hexdigest()
    assert card["sha256"] == digest == summary["final_model"]["sha256"]
    assert card["fedseg_version"] == summary["fedseg_version"] == fedseg_version()
    assert datetime.fromisoformat(card["saved"]).tzinfo is not None  # a date with its zone
    assert load_model(folder / "final_model.pt").sha256 == digest  # predict reads the card
