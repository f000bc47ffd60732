"""A run's metrics as TensorBoard event files in its folder (server/tensorboard_events.py):
a two-structure run with differential privacy on the in-process grid (the
real ServerApp and ClientApp), read back with TensorBoard's own
EventAccumulator, round by round against metrics.jsonl; a resumed run shows
each round once."""

from __future__ import annotations

from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from server.runs import read_metrics
from tests.grid import federation, run_server
from tests.wiring.test_structures import STRUCTURES, TINY, write_site


@pytest.fixture(scope="module")
def sites(tmp_path_factory) -> list[tuple[str, Path]]:
    root = tmp_path_factory.mktemp("tensorboard")
    return [(f"hospital-{x}", write_site(root / x, seed)) for seed, x in enumerate("ab")]


def events(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the folder's event files: tag -> (step, value), as TensorBoard reads them."""
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)]
            for tag in acc.Tags()["scalars"]}


def expected(rows: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """What the event files should hold, from metrics.jsonl."""
    want: dict[str, list[tuple[int, float]]] = {}

    def add(tag: str, step: int, value) -> None:
        if value is not None:
            want.setdefault(tag, []).append((step, float(value)))

    for row in rows:
        step = row["round"]
        add("dice/mean", step, row["dice_mean"])
        for site, dice in row["dice"].items():
            add(f"dice_site/{site}", step, dice)
        for structure in STRUCTURES:
            add(f"dice_structure/{structure}", step, row["overall"][f"dice/{structure}"])
        add("overall/hd95", step, row["overall"]["hd95"])
        add("train/loss", step, row["train_loss"])
        for site, loss in row["train_loss_sites"].items():
            add(f"train_loss_site/{site}", step, loss)
        add("round/seconds", step, row["seconds"])
        add("round/bytes_up", step, row["bytes_up"])
        add("round/bytes_down", step, row["bytes_down"])
        add("privacy/epsilon", step, row["epsilon"])
    return want


def check(folder: Path, rows: list[dict]) -> dict[str, list[tuple[int, float]]]:
    got = events(folder)
    for tag, values in expected(rows).items():
        assert [s for s, _ in got.get(tag, [])] == [s for s, _ in values], tag
        assert [v for _, v in got[tag]] == pytest.approx([v for _, v in values], rel=1e-6), tag
    return got


@pytest.mark.slow  # the default suite's 8 minutes
def test_a_runs_metrics_are_tensorboard_event_files_and_a_resume_adds_each_round_once(
        sites, tmp_path):
    config = {**TINY, "run-name": "tb", "dp": "client-fixed", "dp-noise-multiplier": 1.0,
              "dp-clipping-norm": 0.5}
    run_server(federation(sites, config), tmp_path)
    folder = tmp_path / "tb"
    rows = read_metrics(folder)
    assert [r["round"] for r in rows] == [1, 2]
    assert list(folder.glob("events.out.tfevents.*"))  # beside report.html
    assert (folder / "report.html").is_file()
    got = check(folder, rows)
    assert {f"dice_site/hospital-{x}" for x in "ab"} <= set(got)
    assert {f"dice_structure/{s}" for s in STRUCTURES} <= set(got)
    assert [s for s, _ in got["privacy/epsilon"]] == [1, 2]
    assert got["privacy/epsilon"][0][1] < got["privacy/epsilon"][1][1]  # spent grows

    # what an earlier process may have left past the resume point is dropped
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(log_dir=str(folder)) as stray:
        stray.add_scalar("dice/mean", 0.123, global_step=3)
    run_server(federation(sites, {**config, "resume": True, "num-rounds": 3}), tmp_path)
    rows = read_metrics(folder)
    assert [r["round"] for r in rows] == [1, 2, 3]
    got = check(folder, rows)  # each round once, round 3 as the resumed run scored it
    assert [s for s, _ in got["dice/mean"]] == [1, 2, 3]
    assert got["dice/mean"][2][1] != pytest.approx(0.123)
