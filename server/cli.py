"""The ``fedseg`` command line: thin commands over ``server`` and ``common``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from common import wire
from common.config import (
    RunSettings,
    check_node_config,
    check_run_overrides,
    fedseg_home,
    parse_key_values,
)
from common.errors import ConfigError, FedsegError
from common.wire import SCORES as METRICS

console = Console(highlight=False)

RETINA_ENV = "FEDSEG_RETINA_DIR"  # the retina benchmark's sites, when not given
DEMO_SITES = 3
DEFAULT_PORT = 9093
QUALITY_ROUNDS, QUALITY_LOCAL_EPOCHS = 90, 2
DEMO_ROUNDS = 6
DEMO_LOCAL_EPOCHS = 2


def _round_line(row: dict[str, Any]) -> None:
    def fmt(v: float | None) -> str:
        return "  n/a" if v is None else f"{v:.3f}"

    sites = " ".join(f"{s} {fmt(d)}" for s, d in row["dice"].items())
    fails = f"  [red]{len(row['failures'])} failure(s)[/]" if row["failures"] else ""
    console.print(
        f"round {row['round']:>3}  Dice [bold cyan]{fmt(row['dice_mean'])}[/]  ({sites})  "
        f"loss {fmt(row['train_loss'])}  {row['seconds']:.1f} s{fails}",
        soft_wrap=True,
    )


def _summary_table(summary: dict[str, Any]) -> Table:
    table = Table(title=f"run {summary['run']}: round {summary['final']['round']}")
    table.add_column("site")
    for m in METRICS:
        table.add_column(m, justify="right")
    table.add_column("cases", justify="right")
    table.add_column("rounds trained", justify="right")
    rows = dict(summary["final"]["sites"])
    taking_part = summary.get("participation", {})
    done = summary["rounds_completed"]
    for site in sorted(set(rows) | set(taking_part)):
        vals = rows.get(site, {})
        trained = taking_part.get(site, {}).get("rounds_trained")
        cell = "" if trained is None else f"{trained} of {done}"
        table.add_row(site, *[_fmt(vals.get(m)) for m in METRICS],
                      str(vals.get(wire.NUM_EXAMPLES, "")),
                      f"[red]{cell}[/]" if trained == 0 else cell)
    table.add_row("[bold]all sites[/]",
                  *[_fmt(summary["final"]["overall"].get(m)) for m in METRICS], "", "")
    return table


def _site_error_line(line: str) -> None:
    """A simulated site's own error, as its local log has it (this machine's)."""
    console.print(f"[red]site error[/] {escape(line)}", soft_wrap=True)


def _problems(summary: dict[str, Any]) -> None:
    for problem in summary.get("problems", []):
        console.print(f"[red bold]problem:[/] {escape(problem)}", soft_wrap=True)
    if summary.get("stopped"):
        console.print(f"[yellow]stopped:[/] {escape(str(summary['stopped']))}", soft_wrap=True)


def _exit_code(summary: dict[str, Any]) -> int:
    """0 only for a run that did all its rounds with every site taking part."""
    complete = summary["rounds_completed"] == summary["rounds_planned"]
    return 0 if complete and not summary.get("problems") else 1


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The run settings typed on the command line, checked against their
    declarations before anything starts (unknown key, wrong type, rule)."""
    out: dict[str, Any] = {}
    for key, attr in (("num-rounds", "rounds"), ("local-epochs", "local_epochs"),
                      ("learning-rate", "lr"), ("patch-size", "patch_size"),
                      ("input-channels", "channels"), ("seed", "seed"),
                      ("min-nodes", "min_nodes"), ("fraction-train", "fraction_train")):
        value = getattr(args, attr, None)
        if value is not None:
            out[key] = value
    out.update(parse_key_values(args.config or []))
    typed = check_run_overrides(out).to_run_config()
    return {key: typed[key] for key in out}


def _node_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """``--node-config`` of a simulation: the simulated hospitals' device and
    threads (their folders and names come from the command line)."""
    values = check_node_config(parse_key_values(args.node_config or [], "--node-config"))
    fixed = sorted(set(values) - {"device", "threads"})
    if fixed:
        raise ConfigError(f"node setting {', '.join(fixed)} is set by the simulation itself "
                          "(site folders and --names); --node-config takes device, threads")
    return values


def _run(sites: list, run_dir: Path, overrides: dict[str, Any], resume: bool,
         node: dict[str, Any], threads: int) -> dict[str, Any]:
    from server.simulation import simulate

    if resume:
        state = json.loads((run_dir / "summary.json").read_text()) if (
            run_dir / "summary.json").exists() else None
        saved = _saved_config(run_dir)
        overrides = {**saved, **overrides, "resume": True}
        done = state["rounds_completed"] if state else "?"
        console.print(f"resuming [bold]{run_dir}[/] after round {done}")
    elif (run_dir / "metrics.jsonl").exists():
        raise FedsegError(f"{run_dir} already holds a run: pass --resume {run_dir} to continue "
                          f"it, or choose another --out")
    settings = RunSettings.from_run_config({**overrides, "run-name": run_dir.name})
    console.print(
        f"[bold]fedseg[/] {len(sites)} hospitals, {settings.num_rounds} rounds, "
        f"{settings.local_epochs} local epoch(s), run folder [bold]{run_dir}[/]"
    )
    start = time.perf_counter()
    summary = simulate(sites, run_dir, overrides, on_round=_round_line,
                       on_site_error=_site_error_line,
                       threads_per_client=node.get("threads") or threads,
                       device=node.get("device"))
    console.print(_summary_table(summary))
    _problems(summary)
    console.print(
        f"Dice: first round {_fmt(summary['dice_first_round'])} -> final "
        f"{_fmt(summary['dice_final'])}   wall time {time.perf_counter() - start:.0f} s   "
        f"run folder {run_dir}",
        soft_wrap=True,
    )
    return summary


def _saved_config(run_dir: Path) -> dict[str, Any]:
    import torch

    ckpt = run_dir / "checkpoint.pt"
    if not ckpt.exists():
        raise FedsegError(f"cannot resume {run_dir}: no checkpoint.pt (no round finished)")
    return dict(torch.load(ckpt, map_location="cpu", weights_only=True)["config"])


def _default_out(prefix: str) -> Path:
    return Path("runs") / f"{prefix}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def cmd_demo(args: argparse.Namespace) -> int:
    overrides, node = _overrides(args), _node_overrides(args)  # before anything starts
    from common.data.synthetic import write_federation
    from server.simulation import Site

    root = fedseg_home() / "demo-data"
    folders = write_federation(root, args.sites, n_train=6, n_test=3, seed=args.seed or 0)
    console.print(f"wrote {args.sites} synthetic hospitals (DICOM series, DICOM SEG and NIfTI "
                  f"labels, different scanners) under {root}")
    sites = [Site(f.name, f) for f in folders]
    overrides.setdefault("num-rounds", DEMO_ROUNDS)
    overrides.setdefault("local-epochs", DEMO_LOCAL_EPOCHS)
    run_dir = Path(args.out) if args.out else _default_out("demo")
    summary = _run(sites, run_dir, overrides, resume=False, node=node, threads=args.threads)
    return _exit_code(summary)


def cmd_simulate(args: argparse.Namespace) -> int:
    overrides, node = _overrides(args), _node_overrides(args)  # before anything starts
    from server.simulation import Site

    if args.resume:
        run_dir = Path(args.resume)
    else:
        run_dir = Path(args.out) if args.out else _default_out("sim")
    folders = [Path(p) for p in args.site_dirs]
    names = args.names.split(",") if args.names else [f.resolve().name for f in folders]
    if len(names) != len(folders):
        raise FedsegError(f"--names gives {len(names)} names for {len(folders)} site folders")
    for folder in folders:
        if not folder.is_dir():
            raise FedsegError(f"site folder {folder} does not exist")
    overrides.setdefault("min-nodes", min(2, len(folders)))
    summary = _run([Site(n, f) for n, f in zip(names, folders, strict=True)], run_dir,
                   overrides, resume=bool(args.resume), node=node, threads=args.threads)
    return _exit_code(summary)


def cmd_synth(args: argparse.Namespace) -> int:
    from common.data.synthetic import write_federation

    folders = write_federation(Path(args.out), args.sites, args.train, args.test, args.seed)
    for f in folders:
        console.print(str(f))
    return 0


# ------------------------------------------------------------------ deployment


def _warn_insecure(what: str) -> None:
    console.print(f"[bold yellow]warning:[/] {what} runs WITHOUT TLS"
                  + (" and without node authentication" if what == "the SuperLink" else "")
                  + ": anyone on the network can read and inject traffic. Use only for a "
                    "test on one machine.")


def cmd_provision(args: argparse.Namespace) -> int:
    from server.provision import provision

    hosts = list(dict.fromkeys([*args.host, "localhost", "127.0.0.1"]))
    result = provision(Path(args.out), hosts, args.hospital, force=args.force, days=args.days)
    for path, audience in result.written:
        console.print(f"wrote {path}  [dim]->[/] {audience}", soft_wrap=True)
    for path in result.kept:
        console.print(f"kept existing {path} (pass --force to replace)")
    console.print("Private keys (*.key) are mode 0600: move each only to its owner, over a "
                  "channel you trust. SuperLink certificate names: " + ", ".join(hosts))
    return 0


def cmd_keygen(args: argparse.Namespace) -> int:
    from server.provision import hospital_keypair

    result = hospital_keypair(Path(args.out), args.name, force=args.force)
    for path, _ in result.written:
        console.print(str(path))
    if result.kept:
        console.print(f"kept existing {result.kept[0]} (pass --force to rotate it)")
        return 1
    console.print(f"Send {args.name}.pub to the coordinator; {args.name}.key stays here.")
    return 0


def cmd_superlink(args: argparse.Namespace) -> int:
    import os

    from server.deployment import State, superlink_command, superlink_env, write_connection

    state = State(Path(args.state).resolve()).ensure()
    certs = Path(args.certs).resolve() if args.certs else None
    cmd = superlink_command(state, certs=certs, host=args.host, port=args.port,
                            insecure=args.insecure)
    if args.insecure:
        _warn_insecure("the SuperLink")
    local = "127.0.0.1" if args.host in ("0.0.0.0", "::", "127.0.0.1") else args.host
    address = args.cli_address or f"{local}:{args.port}"
    write_connection(state, address, certs / "ca.crt" if certs else None, args.insecure)
    console.print(f"SuperLink on {args.host}:{args.port} (hospitals connect here; nothing else "
                  f"needs to be open), state in {state.root}, run folders in {state.runs}")
    env = superlink_env(state)
    os.execvpe(cmd[0], cmd, env)  # the SuperLink takes over this process (systemd-friendly)
    return 0  # pragma: no cover


def cmd_hospital(args: argparse.Namespace) -> int:
    from server import deployment

    state = deployment.State(Path(args.state).resolve())
    if args.action == "register":
        entry = deployment.register(state, Path(args.public_key), args.name)
        console.print(f"registered {args.name}: node {entry['node_id']}, key "
                      f"{entry['fingerprint']}")
    elif args.action == "list":
        table = Table(title="hospitals")
        for col in ("name", "node id", "key", "status", "registered"):
            table.add_column(col, overflow="fold")
        for row in deployment.hospitals(state):
            table.add_row(row["name"], row["node_id"], row["fingerprint"], row["status"],
                          row["registered"])
        console.print(table)
    else:
        entry = deployment.remove(state, args.name_or_key)
        console.print(f"removed {entry['name']} (node {entry['node_id']}): its key is no "
                      f"longer accepted")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    overrides = _overrides(args)  # before anything starts
    from server import deployment

    state = deployment.State(Path(args.state).resolve())
    if args.resume:
        overrides = {**_saved_config(state.runs / args.name), **overrides, "resume": True}
    name = args.name or datetime.now().strftime("run-%Y%m%d-%H%M%S")
    console.print(f"[bold]fedseg[/] run {name} on the SuperLink of {state.root}")
    start = time.perf_counter()
    summary = deployment.launch(state, name, overrides, on_round=_round_line)
    console.print(_summary_table(summary))
    _problems(summary)
    console.print(f"wall time {time.perf_counter() - start:.0f} s   run folder "
                  f"{state.runs / name}", soft_wrap=True)
    return _exit_code(summary)


def cmd_node(args: argparse.Namespace) -> int:
    from client.node import NodeSettings, preflight, run_node
    from server.deployment import base_env

    settings = NodeSettings(
        superlink=args.superlink, data_dir=Path(args.data_dir), name=args.name,
        key=Path(args.key) if args.key else None, ca=Path(args.ca) if args.ca else None,
        insecure=args.insecure, threads=args.threads or 0, device=args.device, port=args.port,
        max_wait=args.max_wait)
    if args.insecure:
        _warn_insecure("this node")
    preflight(settings)
    return run_node(settings, base_env())


def cmd_bench_deploy(args: argparse.Namespace) -> int:
    """Wall time per round of a TLS deployment on this machine, split into the
    hospitals' local training and everything else."""
    import platform
    import tempfile

    from common.data.synthetic import write_federation
    from server.localfed import LocalFederation

    work = Path(tempfile.mkdtemp(prefix="bench-deploy-", dir=fedseg_home()))
    sites = write_federation(work / "data", args.hospitals, n_train=6, n_test=3)
    console.print(f"TLS deployment on 127.0.0.1: {args.hospitals} hospitals, "
                  f"{args.rounds} rounds, {args.threads} thread(s) each; work folder {work}")
    with LocalFederation(work, sites, threads=args.threads) as fed:
        summary = fed.run("bench", {"num-rounds": args.rounds, "local-epochs": 1},
                          on_round=_round_line)
    from server.runs import read_metrics

    rows = read_metrics(fed.state.runs / "bench")
    table = Table(title="seconds per round")
    for col in ("round", "wall", "training (slowest site)", "everything else", "share"):
        table.add_column(col, justify="right")
    for r in rows:
        train = max(v for v in r["train_seconds"].values() if v is not None)
        table.add_row(str(r["round"]), f"{r['seconds']:.1f}", f"{train:.1f}",
                      f"{r['seconds'] - train:.1f}", f"{train / r['seconds']:.0%}")
    steady = rows[1:] or rows
    wall = sum(r["seconds"] for r in steady) / len(steady)
    train = sum(max(r["train_seconds"].values()) for r in steady) / len(steady)
    table.add_row("mean, rounds 2+" if rows[1:] else "mean", f"{wall:.1f}", f"{train:.1f}",
                  f"{wall - train:.1f}", f"{train / wall:.0%}")
    console.print(table)
    console.print(f"machine: {platform.machine()}, {os.cpu_count()} cores, "
                  f"{platform.python_implementation()} {platform.python_version()}; "
                  f"final Dice {_fmt(summary['dice_final'])}", soft_wrap=True)
    return 0


def cmd_bench_privacy(args: argparse.Namespace) -> int:
    """Secure aggregation's cost, and DP's effect on Dice, in side-by-side
    simulations on this machine."""
    import tempfile

    from common.data.synthetic import write_federation
    from server.runs import read_metrics
    from server.simulation import Site, simulate

    work = Path(tempfile.mkdtemp(prefix="bench-privacy-", dir=fedseg_home()))
    console.print(f"work folder {work}")

    def sites(n: int, n_train: int, n_test: int) -> list[Site]:
        folders = write_federation(work / f"data-{n}-{n_train}", n, n_train, n_test)
        return [Site(f.name, f) for f in folders]

    lines = ["| hospitals | secure aggregation | seconds per round (round 2) | "
             "bytes up per client per round | bytes down per client per round |",
             "|---|---|---|---|---|"]
    for n in args.hospitals:
        federation = sites(n, 2, 1)
        for secure in (False, True):
            name = f"secagg-{n}-{'on' if secure else 'off'}"
            simulate(federation, work / name, {"num-rounds": 2, "local-epochs": 1,
                                               "secure-aggregation": secure,
                                               "min-nodes": n}, timeout=1800)
            row = read_metrics(work / name)[-1]
            lines.append(f"| {n} | {'on' if secure else 'off'} | {row['seconds']:.1f} | "
                         f"{row['bytes_up'] / n / 1e6:.2f} MB | "
                         f"{row['bytes_down'] / n / 1e6:.2f} MB |")
            console.print(lines[-1])
    lines += ["", "| DP (client-side fixed clipping) | noise multiplier | clipping norm | "
              f"Dice after {args.rounds} rounds | epsilon (delta 1e-5) |", "|---|---|---|---|---|"]
    demo = sites(3, 6, 3)
    for z in (None, *args.noise):
        name = f"dp-{z}"
        config = {"num-rounds": args.rounds, "local-epochs": 2}
        if z is not None:
            config |= {"dp": "client-fixed", "dp-noise-multiplier": z,
                       "dp-clipping-norm": args.clip}
        summary = simulate(demo, work / name, config, timeout=1800)
        eps = summary["privacy"]["epsilon"]
        lines.append(f"| {'off' if z is None else 'on'} | {'-' if z is None else z} | "
                     f"{'-' if z is None else args.clip} | {summary['dice_final']:.3f} | "
                     f"{'-' if eps is None else f'{eps:.2f}'} |")
        console.print(lines[-1])
    (work / "privacy.md").write_text("\n".join(lines) + "\n")
    console.print("\n".join(lines), soft_wrap=True)
    return 0


def cmd_bench_quality(args: argparse.Namespace) -> int:
    typed, node = _overrides(args), _node_overrides(args)  # before anything starts
    folders = [Path(p) for p in args.site_dirs]
    if not folders:
        retina = os.environ.get(RETINA_ENV)
        if not retina:
            raise FedsegError(f"give the sites' folders (SITE_DIR ...) or set {RETINA_ENV} to "
                              "the retina folder holding chase_db1/ and stare/ "
                              "(docs/benchmarks.md)")
        folders = [Path(retina) / "chase_db1", Path(retina) / "stare"]
    missing = [str(f) for f in folders if not f.is_dir()]
    if missing:
        raise FedsegError(f"site folder(s) not found: {', '.join(missing)}")
    from server.bench import METHODS, RETINA, STRATEGIES, quality
    from server.simulation import Site

    overrides = dict(RETINA) if args.retina_defaults else {}
    overrides |= typed
    if "device" in node:  # read by every site of the benchmark (SiteSettings' fallback)
        os.environ["FEDSEG_DEVICE"] = node["device"]
    rounds = overrides.pop("num-rounds", QUALITY_ROUNDS)
    local_epochs = overrides.pop("local-epochs", QUALITY_LOCAL_EPOCHS)
    out = Path(args.out) if args.out else _default_out("bench-quality")
    methods = tuple(args.methods.split(",")) if args.methods else METHODS
    unknown = [m for m in methods if m not in ("local", "pooled", *STRATEGIES)]
    if unknown:
        raise FedsegError(f"unknown method(s) {', '.join(unknown)}: choose from local, pooled, "
                          f"{', '.join(STRATEGIES)}")
    console.print(f"quality benchmark: {', '.join(f.name for f in folders)}; {rounds} "
                  f"rounds x {local_epochs} local epochs; methods {', '.join(methods)}; "
                  f"output {out}", soft_wrap=True)

    def show(method: str, result: dict) -> None:
        dice = "  ".join(f"{s} {_fmt(m['dice'])}" for s, m in result["sites"].items())
        console.print(f"{method:>8}  Dice {dice}  ({result['seconds']:.0f} s)", soft_wrap=True)

    report = quality([Site(f.resolve().name, f) for f in folders], out, overrides,
                     rounds=rounds, local_epochs=local_epochs, methods=methods,
                     on_result=show)
    console.print((out / "quality.md").read_text(), soft_wrap=True)
    console.print(f"machine: {report['machine']}; written {out}/quality.md, quality.json, "
                  f"dice.png", soft_wrap=True)
    return 0


def _common_run_options(p: argparse.ArgumentParser, local: bool = True) -> None:
    p.add_argument("--rounds", type=int, help="federated rounds (num-rounds)")
    p.add_argument("--local-epochs", type=int, help="local epochs per round")
    p.add_argument("--lr", type=float, help="learning rate")
    p.add_argument("--patch-size", type=int, help="training patch / sliding window, pixels")
    p.add_argument("--channels", choices=["grey", "rgb", "red", "green", "blue"],
                   help="input channels taken from colour images")
    p.add_argument("--seed", type=int)
    p.add_argument("--min-nodes", type=int, help="fewest nodes a round needs")
    p.add_argument("--fraction-train", type=float)
    p.add_argument("--config", action="append", metavar="KEY=VALUE",
                   help="any other run-config key (repeatable)")
    if local:
        p.add_argument("--threads", type=int, default=1,
                       help="CPU threads per simulated hospital")
        p.add_argument("--node-config", action="append", metavar="KEY=VALUE",
                       help="the simulated hospitals' node settings: device, threads "
                            "(docs/settings.md)")
        p.add_argument("--out", help="run folder (default runs/<kind>-<time>)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedseg", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="three synthetic hospitals, a few rounds, on this machine")
    p.add_argument("--sites", type=int, default=DEMO_SITES)
    _common_run_options(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("simulate", help="one simulated hospital per site folder")
    p.add_argument("site_dirs", nargs="+", metavar="SITE_DIR")
    p.add_argument("--names", help="comma-separated site names (default: folder names)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped run from its folder")
    _common_run_options(p)
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("synth", help="write synthetic hospitals (DICOM) to a folder")
    p.add_argument("out")
    p.add_argument("--sites", type=int, default=3)
    p.add_argument("--train", type=int, default=6)
    p.add_argument("--test", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("provision", help="coordinator: CA, SuperLink certificate, hospital keys")
    p.add_argument("out", help="folder to write (ca/, superlink/, hospitals/<name>/)")
    p.add_argument("--host", action="append", default=[], required=True,
                   help="a name or IP hospitals reach the SuperLink by (repeatable)")
    p.add_argument("--hospital", action="append", default=[], metavar="NAME",
                   help="make a key pair for this hospital (repeatable)")
    p.add_argument("--days", type=int, default=825, help="certificate validity")
    p.add_argument("--force", action="store_true", help="replace existing keys and certificates")
    p.set_defaults(func=cmd_provision)

    p = sub.add_parser("keygen", help="hospital: make this hospital's own key pair")
    p.add_argument("out")
    p.add_argument("--name", required=True)
    p.add_argument("--force", action="store_true", help="replace an existing key (rotation)")
    p.set_defaults(func=cmd_keygen)

    p = sub.add_parser("superlink", help="coordinator: run the SuperLink (TLS, node auth)")
    p.add_argument("--certs", help="the superlink/ folder from fedseg provision")
    p.add_argument("--state", default="federation", help="state folder (default ./federation)")
    p.add_argument("--host", default="0.0.0.0", help="address to listen on")
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument("--cli-address", help="host:port this machine's flwr CLI uses "
                   "(default 127.0.0.1:PORT)")
    p.add_argument("--insecure", action="store_true", help="no TLS, no node authentication")
    p.set_defaults(func=cmd_superlink)

    p = sub.add_parser("hospital", help="coordinator: register, list, remove hospitals' keys")
    hsub = p.add_subparsers(dest="action", required=True)
    h = hsub.add_parser("register")
    h.add_argument("public_key")
    h.add_argument("--name", required=True)
    h = hsub.add_parser("list")
    h = hsub.add_parser("remove")
    h.add_argument("name_or_key", help="the hospital's name or its .pub file")
    for h in hsub.choices.values():
        h.add_argument("--state", default="federation")
    p.set_defaults(func=cmd_hospital)

    p = sub.add_parser("run", help="coordinator: launch a run on the SuperLink and follow it")
    p.add_argument("--state", default="federation")
    p.add_argument("--name", help="run folder name (default run-<time>)")
    p.add_argument("--resume", action="store_true", help="continue run --name")
    _common_run_options(p, local=False)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("bench", help="measurements (see docs/performance.md)")
    bsub = p.add_subparsers(dest="bench", required=True)
    b = bsub.add_parser("deploy", help="seconds per round of a TLS deployment on this machine")
    b.add_argument("--rounds", type=int, default=3)
    b.add_argument("--hospitals", type=int, default=2)
    b.add_argument("--threads", type=int, default=1, help="CPU threads per hospital")
    b.set_defaults(func=cmd_bench_deploy)
    b = bsub.add_parser("privacy", help="secure aggregation's cost and DP's effect on Dice")
    b.add_argument("--hospitals", type=int, nargs="+", default=[3, 10])
    b.add_argument("--noise", type=float, nargs="+", default=[0.3, 1.0],
                   help="DP noise multipliers to compare with no DP")
    b.add_argument("--clip", type=float, default=0.1, help="DP clipping norm")
    b.add_argument("--rounds", type=int, default=6)
    b.set_defaults(func=cmd_bench_privacy)
    b = bsub.add_parser("quality", help="local-only vs pooled vs FedAvg/FedProx/FedNova")
    b.add_argument("site_dirs", nargs="*", metavar="SITE_DIR",
                   help="site folders (default: the two retina sites in ../shared/data)")
    b.add_argument("--methods", help="comma-separated subset of local,pooled,fedavg,"
                   "fedprox,fednova,fedadam (default: all but fedadam)")
    b.add_argument("--no-retina-defaults", dest="retina_defaults", action="store_false",
                   help="do not apply the retina settings (RGB input, 96-px patches, 8 per image, "
                        "batch 16, learning rate 2e-3, scoring every 30 rounds)")
    _common_run_options(b)
    b.set_defaults(func=cmd_bench_quality)

    p = sub.add_parser("node", help="hospital: run this hospital's SuperNode")
    p.add_argument("--superlink", required=True, help="host:port of the SuperLink")
    p.add_argument("--data-dir", required=True, help="this hospital's site folder")
    p.add_argument("--name", required=True, help="this hospital's public name")
    p.add_argument("--key", help="this hospital's private key (OpenSSH ECDSA)")
    p.add_argument("--ca", help="the federation's CA certificate")
    p.add_argument("--threads", type=int, help="CPU threads for training (default: all)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda:N")
    p.add_argument("--port", type=int, default=9094, help="local Runtime API port")
    p.add_argument("--max-wait", type=float, help="give up connecting after this many seconds")
    p.add_argument("--insecure", action="store_true", help="no TLS (test only)")
    p.set_defaults(func=cmd_node)
    return parser


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM (systemd, timeout, kill) cleans up like Ctrl-C


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        return int(args.func(args))
    except FedsegError as exc:
        console.print(f"[red]error:[/] {exc}")
        return 2
    except KeyboardInterrupt:
        console.print("[yellow]stopped; continue with --resume RUN_DIR[/]")
        return 130


if __name__ == "__main__":
    sys.exit(main())
