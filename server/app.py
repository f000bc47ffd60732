"""Flower ServerApp: FedAvg rounds of the shared U-Net, written to a run folder."""

from __future__ import annotations

from logging import INFO

import torch
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from common.config import RunSettings
from common.model import build_model
from server.runs import RunFolder, runs_root
from server.strategy import build_strategy

app = ServerApp()


def format_round(row: dict) -> str:
    sites = "  ".join(f"{s} {d:.3f}" if d is not None else f"{s} n/a"
                      for s, d in row["dice"].items())
    mean = row["dice_mean"]
    loss = row["train_loss"]
    return (f"round {row['round']:>3}  dice mean {mean if mean is None else f'{mean:.3f}'}"
            f"  [{sites}]  train loss {loss if loss is None else f'{loss:.3f}'}"
            f"  {row['seconds']:.1f} s")


@app.main()
def main(grid: Grid, context: Context) -> None:
    settings = RunSettings.from_run_config(context.run_config)
    run = RunFolder.open(runs_root(), settings)
    torch.manual_seed(settings.seed)
    arrays = run.checkpoint_arrays() or ArrayRecord(build_model(settings.model).state_dict())
    done = run.last_round
    strategy = build_strategy(settings)
    log(INFO, "fedseg run %s: rounds %d..%d", run.path.name, done + 1, settings.num_rounds)

    def end_of_round(server_round: int, global_arrays: ArrayRecord) -> MetricRecord | None:
        if server_round > 0:  # round 0 is the initial model, before any training
            row = run.record_round(done + server_round, global_arrays,
                                   strategy.rounds.pop(server_round))
            log(INFO, "fedseg %s", format_round(row))
        return None

    result = None
    if done < settings.num_rounds:
        result = strategy.start(
            grid=grid,
            initial_arrays=arrays,
            num_rounds=settings.num_rounds - done,
            evaluate_fn=end_of_round,
        )
    run.finish(result.arrays if result is not None and len(result.arrays) else None)
    log(INFO, "fedseg run folder: %s", run.path)
