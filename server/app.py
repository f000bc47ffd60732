"""Flower ServerApp: FedAvg rounds of the shared U-Net, written to a run folder."""

from __future__ import annotations

from logging import INFO, WARNING

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.exception import PrivacyBudgetExhausted as FlowerBudgetExhausted

from common import wire
from common.config import RunSettings
from common.model import build_model
from common.packing import PrecisionOverflow
from common.processes import exit_when_orphaned
from server.fingerprint import harmonise_run
from server.prompt_grid import prompt
from server.runs import RunFolder, packed_arrays, runs_root
from server.strategies import PrivacyBudgetExhausted, TooFewSites, build_strategy
from server.strategies.recorder import SitesDisagree, wait_for_sites

app = ServerApp()


def format_round(row: dict) -> str:
    sites = "  ".join(f"{s} {d:.3f}" if d is not None else f"{s} n/a"
                      for s, d in row["dice"].items())
    mean = row["dice_mean"]
    loss = row["train_loss"]
    eps = f"  epsilon {row['epsilon']:.3f}" if row.get("epsilon") is not None else ""
    return (f"round {row['round']:>3}  dice mean {mean if mean is None else f'{mean:.3f}'}"
            f"  [{sites}]  train loss {loss if loss is None else f'{loss:.3f}'}"
            f"  {row['seconds']:.1f} s{eps}")


def cross_site(grid: Grid, strategy, settings: RunSettings,
               instructions: dict | None = None) -> dict[str, dict[str, dict]]:
    """Each shareable site's last local model scored at every connected site
    (its own included): ``{model's site: {scoring site: means}}``. Only the
    sites whose policy allowed it (``share-local-model``) are in the rows."""
    from flwr.app import Message, MessageType, RecordDict

    names = strategy.names  # node id -> site name
    connected = set(grid.get_node_ids())
    messages, asked = [], {}
    for owner, arrays in sorted(strategy.local_models.items()):
        for node in sorted(connected & set(names)):
            msg = Message(RecordDict({wire.ARRAYS: arrays, wire.CONFIG: ConfigRecord(
                {wire.CROSS_SITE_OF: owner, wire.SERVER_ROUND: settings.num_rounds,
                 **(instructions or {})})}),
                dst_node_id=node, message_type=MessageType.EVALUATE)
            messages.append(msg)
    replies = list(grid.send_and_receive(messages, timeout=settings.round_timeout))
    for msg in messages:  # their ids are given when they are pushed
        asked[msg.metadata.message_id or msg.object_id] = msg
    matrix: dict[str, dict[str, dict]] = {}
    for reply in replies:
        sent = asked.get(reply.metadata.reply_to_message_id)
        if sent is None or reply.has_error():
            continue
        owner = str(sent.content[wire.CONFIG][wire.CROSS_SITE_OF])
        scorer, metrics, _ = strategy.read(reply, "evaluate", f"cross-site of {owner}")
        matrix.setdefault(owner, {})[scorer] = metrics
    log(INFO, "cross-site: %d local model(s) scored at %d site(s)", len(matrix),
        len({t for row in matrix.values() for t in row}))
    return matrix


def nodes_per_round(grid: Grid, settings: RunSettings) -> int:
    """Nodes each round samples, once ``min-nodes`` are connected (DP scales its
    noise to this number)."""
    connected = wait_for_sites(grid, settings.min_nodes, settings.node_wait, "at the start")
    return max(int(connected * settings.fraction_train), settings.min_nodes)


@app.main()
def main(grid: Grid, context: Context) -> None:
    exit_when_orphaned("ServerApp")  # a killed SuperLink does not leave it hanging
    grid = prompt(grid)  # replies as they come, not on Flower's 3 s poll
    settings = RunSettings.from_run_config(context.run_config)
    run = RunFolder.open(runs_root(), settings)
    torch.manual_seed(settings.seed)
    arrays = run.checkpoint_arrays() or packed_arrays(build_model(settings.model).state_dict())
    done = run.last_round
    # Only DP needs the number of nodes up front (to scale its noise).
    try:
        sampled = nodes_per_round(grid, settings) if settings.dp != "off" else None
    except TooFewSites as exc:
        log(WARNING, "fedseg run %s stopped: %s", run.path.name, exc)
        run.finish(None, stopped=str(exc))
        return
    try:  # the run's target spacing and intensity scheme, from the sites' fingerprints
        harmonisation = harmonise_run(grid, settings, run) if done < settings.num_rounds \
            else run.harmonisation
    except TooFewSites as exc:
        log(WARNING, "fedseg run %s stopped: %s", run.path.name, exc)
        run.finish(None, stopped=f"fingerprint: {exc}")
        return
    except SitesDisagree as exc:
        log(WARNING, "fedseg run %s stopped: %s", run.path.name, exc)
        run.finish(None, stopped=f"structures: {exc}")
        return
    instructions = {wire.HARMONISATION: harmonisation.to_wire()} if harmonisation else {}
    strategy = build_strategy(settings, sampled, rounds_done=done,
                              dp_releases=run.dp_releases())
    ledger = strategy.privacy
    strategy.structure = run.site_structure  # the fingerprint's, or a resumed run's
    log(INFO, "fedseg run %s: rounds %d..%d", run.path.name, done + 1, settings.num_rounds)

    # Rounds checkpointed whose line waits for their scores, which come with
    # the next round's train replies (call round, snapshot); a resumed run's
    # checkpointed round without its line is call round 0.
    waiting: list[tuple[int, dict]] = []
    restored = run.pending_round()
    if restored is not None:
        strategy.rounds[0], snapshot = restored
        waiting.append((0, snapshot))

    def write_rows(upto: int) -> None:
        while waiting and waiting[0][0] <= upto:
            call_round, snapshot = waiting.pop(0)
            row = run.append_row(done + call_round, strategy.rounds.pop(call_round, None)
                                 or strategy.round(call_round), snapshot)
            log(INFO, "fedseg %s", format_round(row))

    def end_of_round(server_round: int, global_arrays: ArrayRecord) -> MetricRecord | None:
        if server_round > 0:  # round 0 is the initial model, before any training
            run.site_structure = strategy.structure
            waiting.append((server_round, run.save_checkpoint(
                done + server_round, global_arrays, strategy.round(server_round), ledger)))
            last = server_round == settings.num_rounds - done
            write_rows(server_round if last else server_round - 1)
        return None

    result, stopped = None, None
    if done < settings.num_rounds:
        try:
            result = strategy.start(grid=grid, initial_arrays=arrays,
                                    num_rounds=settings.num_rounds - done,
                                    # Flower counts this call's rounds from 1; the sites'
                                    # learning-rate schedule spans the whole run
                                    train_config=ConfigRecord({wire.ROUNDS_DONE: done,
                                                               **instructions}),
                                    evaluate_config=ConfigRecord(dict(instructions)),
                                    evaluate_fn=end_of_round,
                                    timeout=settings.round_timeout)
        except (PrivacyBudgetExhausted, FlowerBudgetExhausted) as exc:
            stopped = f"privacy budget: {exc}"
            log(WARNING, "fedseg run %s stopped: %s", run.path.name, stopped)
        except TooFewSites as exc:  # resumable: the last round's checkpoint is kept
            stopped = f"too few sites: {exc}"
            log(WARNING, "fedseg run %s stopped: %s", run.path.name, stopped)
        except SitesDisagree as exc:  # not resumable as it is: the run must name its structure
            stopped = f"structures: {exc}"
            log(WARNING, "fedseg run %s stopped: %s", run.path.name, stopped)
        except PrecisionOverflow as exc:  # the global model cannot go out at float16
            stopped = (f"transfer precision: the global model holds {exc}; --resume with "
                       f"--config transfer-precision=float32 goes on from the last round")
            log(WARNING, "fedseg run %s stopped: %s", run.path.name, stopped)
    write_rows(settings.num_rounds)  # a stopped run's last rounds, scored or not
    final = result.arrays if result is not None and len(result.arrays) else None
    if settings.cross_site and stopped is None and strategy.local_models:
        run.cross_site = cross_site(grid, strategy, settings, instructions)
    run.finish(final, stopped=stopped, ledger=ledger)
    log(INFO, "fedseg run folder: %s", run.path)
