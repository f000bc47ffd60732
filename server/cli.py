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
from typing import TYPE_CHECKING, Any

from rich.markup import escape
from rich.table import Table

# ``main`` is the program's entry point ([project.scripts]), so it is the one place
# that adds both roles' commands: this is the only import from server to client
# (tests/unit/test_layout.py); what both sides use lives in common/.
from client.cli import add_commands as hospital_commands
from common.accounts import Account
from common.config import (
    RunSettings,
    fedseg_home,
)
from common.console import warn_insecure
from common.errors import ConfigError, FedsegError
from server.bench_cli import add_commands as bench_commands
from server.options import add_run_options, default_out, node_overrides, run_overrides
from server.render import (
    console,
    problems,
    round_line,
    site_error_line,
    summary_table,
    workers_line,
)

if TYPE_CHECKING:
    from server.coordinator import LocalPortGuard, Roles

DEMO_SITES = 3
DEFAULT_PORT = 9093
DEFAULT_LOCAL_PORT = 9092
DEMO_ROUNDS = 6
DEMO_LOCAL_EPOCHS = 2


def _exit_code(summary: dict[str, Any]) -> int:
    """0 only for a run that did all its rounds with every site taking part."""
    complete = summary["rounds_completed"] == summary["rounds_planned"]
    return 0 if complete and not summary.get("problems") else 1


def _run(sites: list, run_dir: Path, overrides: dict[str, Any], resume: bool,
         node: dict[str, Any], threads: int, ray_address: str | None = None,
         gpus_per_site: float | None = None) -> dict[str, Any]:
    from server.runs import read_metrics
    from server.simulation import simulate, worker_summary

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
    earlier = len(read_metrics(run_dir)) if resume else 0  # rounds of an earlier part
    settings = RunSettings.from_run_config({**overrides, "run-name": run_dir.name})
    console.print(
        f"[bold]fedseg[/] {len(sites)} hospitals, {settings.num_rounds} rounds, "
        f"{settings.local_epochs} local epoch(s), run folder [bold]{run_dir}[/]"
        + (f", on the Ray cluster at {ray_address}" if ray_address else "")
    )
    start, started = time.perf_counter(), time.time()
    summary = simulate(sites, run_dir, overrides, on_round=round_line,
                       on_site_error=site_error_line,
                       threads_per_client=node.get("threads") or threads,
                       device=node.get("device"), ray_address=ray_address,
                       gpus_per_site=gpus_per_site)
    console.print(summary_table(summary))
    problems(summary)
    workers_line(worker_summary(run_dir, since=started), read_metrics(run_dir)[earlier:])
    console.print(
        f"{dice_progress(read_metrics(run_dir))}   wall time "
        f"{time.perf_counter() - start:.0f} s   run folder {run_dir}",
        soft_wrap=True,
    )
    return summary


def dice_progress(rows: list[dict[str, Any]]) -> str:
    """The run's Dice (``dice_mean``, case-weighted across the sites that
    scored) at the first and the last scored round, each with the sites it is
    the mean of: with fraction-evaluate below 1, or sites that fail, the two
    can be means over different sites."""
    scored = [r for r in rows if r.get("dice")]
    if not scored:
        return "Dice: no round was scored"
    first, last = scored[0], scored[-1]

    def mean(row: dict[str, Any]) -> str:
        return "n/a" if row.get("dice_mean") is None else f"{row['dice_mean']:.3f}"

    if first is last:
        return f"Dice: round {last['round']} {mean(last)} ({len(last['dice'])} sites)"
    note = "" if set(first["dice"]) == set(last["dice"]) else ", not the same sites"
    return (f"Dice: round {first['round']} {mean(first)} ({len(first['dice'])} sites) -> "
            f"round {last['round']} {mean(last)} ({len(last['dice'])} sites{note})")


def _saved_config(run_dir: Path) -> dict[str, Any]:
    import torch

    ckpt = run_dir / "checkpoint.pt"
    if not ckpt.exists():
        raise FedsegError(f"cannot resume {run_dir}: no checkpoint.pt (no round finished)")
    return dict(torch.load(ckpt, map_location="cpu", weights_only=True)["config"])


def cmd_demo(args: argparse.Namespace) -> int:
    overrides, node = run_overrides(args), node_overrides(args)  # before anything starts
    from common.data.synthetic import write_federation
    from server.simulation import Site

    root = fedseg_home() / "demo-data"
    folders = write_federation(root, args.sites, n_train=6, n_test=3, seed=args.seed or 0)
    console.print(f"wrote {args.sites} synthetic hospitals (DICOM series, DICOM SEG and NIfTI "
                  f"labels, different scanners) under {root}")
    sites = [Site(f.name, f) for f in folders]
    overrides.setdefault("num-rounds", DEMO_ROUNDS)
    overrides.setdefault("local-epochs", DEMO_LOCAL_EPOCHS)
    run_dir = Path(args.out) if args.out else default_out("demo")
    summary = _run(sites, run_dir, overrides, resume=False, node=node, threads=args.threads)
    return _exit_code(summary)


def cmd_simulate(args: argparse.Namespace) -> int:
    from server.presets import PRESETS

    if args.resume and args.preset != "none":
        raise ConfigError("--preset starts a new run from a benchmark's settings; a resumed "
                          "run keeps its own (give only what changes, e.g. --rounds)")
    preset = PRESETS[args.preset]  # the benchmark's measured settings, beneath the typed ones
    overrides = preset | run_overrides(args, base=preset)  # checked before anything starts
    node = node_overrides(args)
    from server.simulation import Site, check_site_names

    if args.resume:
        run_dir = Path(args.resume)
    else:
        run_dir = Path(args.out) if args.out else default_out("sim")
    folders = [Path(p) for p in args.site_dirs]
    names = args.names.split(",") if args.names else [f.resolve().name for f in folders]
    if len(names) != len(folders):
        raise FedsegError(f"--names gives {len(names)} names for {len(folders)} site folders")
    sites = [Site(n, f) for n, f in zip(names, folders, strict=True)]
    check_site_names(sites)  # before the label maps are read; simulate() checks it too
    for folder in folders:
        if not folder.is_dir():
            raise FedsegError(f"site folder {folder} does not exist")
    if not args.resume:  # each site's label map against the run's structures, before Ray
        _check_label_maps(folders, overrides)
    overrides.setdefault("min-nodes", min(2, len(folders)))
    summary = _run(sites, run_dir,
                   overrides, resume=bool(args.resume), node=node, threads=args.threads,
                   ray_address=args.ray_address or os.environ.get("RAY_ADDRESS") or None,
                   gpus_per_site=args.gpus_per_site)
    return _exit_code(summary)


def _check_label_maps(folders: list[Path], overrides: dict[str, Any]) -> None:
    """Each site folder's label map read against the run's structures, as its
    site will read it: where no site could train, a ConfigError naming each
    folder before Ray starts; where some can, each one that cannot is named
    now, and the run goes on without it, as a federation does."""
    from common.config import RunSettings
    from common.data.labels import LabelMapError, site_classes

    settings = RunSettings.from_run_config(overrides)
    refused = []
    for folder in folders:
        try:
            site_classes(folder, settings)
        except LabelMapError as exc:
            refused.append(f"site folder {folder}: {exc}")
    if refused and len(refused) == len(folders):
        raise ConfigError("; ".join(refused))
    for line in refused:
        console.print(f"[yellow]note:[/] {escape(line)}; that site will refuse to train",
                      soft_wrap=True)


def _scanners(spacings: str | None, offsets: str | None, sites: int
              ) -> list[tuple[tuple[float, float] | None, float]] | None:
    """``--spacings 1.5:3,0.7:2,...`` and ``--hu-offsets 0,40,...``, one per site."""
    if not spacings and not offsets:
        return None
    out_spacing: list[tuple[float, float] | None] = [None] * sites
    out_offset = [0.0] * sites
    if spacings:
        parts = spacings.split(",")
        if len(parts) != sites:
            raise ConfigError(f"--spacings gives {len(parts)} scanners for {sites} sites")
        try:
            out_spacing = [tuple(float(v) for v in part.split(":")) for part in parts]
        except ValueError:
            raise ConfigError(f"--spacings takes PIXEL:SLICE mm per site, e.g. 1.5:3,0.7:2; "
                              f"got {spacings!r}") from None
        if any(len(sp) != 2 or not all(0.1 <= v <= 20 for v in sp) for sp in out_spacing):
            raise ConfigError(f"--spacings takes PIXEL:SLICE mm (0.1 to 20) per site, got "
                              f"{spacings!r}")
    if offsets:
        parts = offsets.split(",")
        if len(parts) != sites:
            raise ConfigError(f"--hu-offsets gives {len(parts)} offsets for {sites} sites")
        try:
            out_offset = [float(v) for v in parts]
        except ValueError:
            raise ConfigError(f"--hu-offsets takes a number of HU per site, got "
                              f"{offsets!r}") from None
    return list(zip(out_spacing, out_offset, strict=True))


def cmd_synth(args: argparse.Namespace) -> int:
    from common.config import structure_list
    from common.data.synthetic import ROLES, write_federation

    options: dict = {}
    if args.structures:
        names = structure_list(args.structures)
        if not 1 <= len(names) <= len(ROLES):
            raise ConfigError(f"--structures names 1 to {len(ROLES)} structures (drawn as "
                              f"{', '.join(ROLES)}), not {len(names)}")
        options = {"labels": {0: "background", **{i + 1: n for i, n in enumerate(names)}},
                   "image_format": args.images, "label_format": args.labels,
                   "slices": args.slices}
    elif args.images != "dicom" or args.labels or args.slices != 8:
        raise ConfigError("--images, --labels and --slices go with --structures (the default "
                          "sites keep their own form)")
    scanners = _scanners(args.spacings, args.hu_offsets, args.sites)
    try:
        if scanners is None:
            folders = write_federation(Path(args.out), args.sites, args.train, args.test,
                                       args.seed, **options)
        else:
            from common.data.synthetic import write_site

            folders = [write_site(Path(args.out) / f"hospital-{k}", k, args.train, args.test,
                                  args.seed, spacing=spacing, hu_offset=offset, **options)
                       for k, (spacing, offset) in enumerate(scanners)]
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    for f in folders:
        console.print(str(f))
    return 0


def cmd_partition(args: argparse.Namespace) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from common.data.partition import partition

    names = args.names.split(",") if args.names is not None else None
    with Progress(TextColumn("measuring labelled structures"), BarColumn(),
                  MofNCompleteColumn(), console=console, transient=True,
                  disable=args.split != "skewed" or args.by is not None) as progress:
        task = progress.add_task("measure", total=None)
        result = partition(Path(args.dataset_dir), Path(args.out), args.sites,
                           split=args.split, seed=args.seed,
                           test_fraction=args.test_fraction, names=names, by=args.by,
                           progress=lambda done, total: progress.update(
                               task, completed=done, total=total))
    how = "even" if result["split"] == "even" else f"skewed by {result['by']}"
    table = Table(title=f"{result['cases']} cases of {result['source_name']} in "
                        f"{result['num_sites']} sites ({how}, seed {result['seed']})")
    for col in ("site", "cases", "training", "test"):
        table.add_column(col, justify="left" if col == "site" else "right")
    ranged = "labelled_voxels" if args.by is None else "by_range"
    if result["split"] == "skewed":
        table.add_column("labelled voxels" if args.by is None else args.by, justify="right")
    for site in result["sites"]:
        row = [site["name"], str(site["cases"]), str(site["training"]), str(site["test"])]
        if ranged in site:
            span = site[ranged]
            row.append(f"{span['min']} .. {span['median']} .. {span['max']}"
                       if "median" in span else f"{span['min']} .. {span['max']}")
        table.add_row(*row)
    console.print(table)
    console.print(f"wrote {args.out}/ ({result['files']} to the source's files, nothing "
                  f"copied) and {Path(args.out) / 'partition.json'}", soft_wrap=True)
    untested = [site["name"] for site in result["sites"] if not site["test"]]
    if untested and args.test_fraction > 0:
        console.print(f"[yellow]note:[/] {len(untested)} site(s) hold a single case and so no "
                      f"test case ({', '.join(untested[:5])}{' ...' * (len(untested) > 5)}): "
                      "they train, but cannot score a model; fewer --sites gives each one "
                      "to test on", soft_wrap=True)
    return 0


# ------------------------------------------------------------------ deployment


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


def cmd_superlink(args: argparse.Namespace) -> int:
    """The SuperLink on 127.0.0.1 and nginx on the public port in front of it,
    forwarding the Fleet API only (server/proxy.py); both stopped, by process
    group, on Ctrl-C, SIGTERM or when either exits. Started as root, the
    SuperLink and its ServerApps run as --link-user, and only the coordinator
    reaches the local port (server/coordinator.py)."""
    from common.supervisor import Supervisor
    from server import coordinator, proxy
    from server.deployment import State, superlink_command, superlink_env, write_connection
    from server.processes import wait_for_port
    from server.wire import audit_dir

    state = State(Path(args.state).resolve()).ensure()
    certs = Path(args.certs).resolve() if args.certs else None
    local_port = args.local_port
    if local_port == args.port:
        raise ConfigError(f"--local-port must differ from --port ({args.port})")
    roles = coordinator.Roles.resolve(args.link_user, args.coordinator_user)
    conf = proxy.write_config(state.root / "proxy", host=args.host, port=args.port,
                              local_port=local_port, certs=None if args.insecure else certs)
    nginx = proxy.nginx_command(conf) if args.proxy == "nginx" else None
    if args.insecure:
        warn_insecure("the SuperLink")
    # The coordinator's own flwr CLI (fedseg hospital, fedseg run, flwr ls) uses
    # the local address; the public port refuses the Control and Runtime APIs.
    write_connection(state, f"127.0.0.1:{local_port}", certs / "ca.crt" if certs else None,
                     args.insecure)
    audit = audit_dir()
    tls = coordinator.prepare_state(state, roles, None if args.insecure else certs,
                                    audit.resolve() if audit else None)
    cmd = superlink_command(state, certs=tls, host="127.0.0.1", port=local_port,
                            insecure=args.insecure)
    probe = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    # Killed outright (SIGKILL), this command takes both with it (PDEATHSIG),
    # and it reaps whatever of theirs is orphaned while it runs.
    # Flower's SuperLink does not end on SIGTERM while it serves (its server
    # threads hold it), so it gets SIGKILL; its state is SQLite, safe from that.
    # SIGTERM and SIGINT stop both here at once, like Ctrl-C (main: exit 130).
    with Supervisor(on_signal="interrupt") as sup:
        guard = None
        try:
            guard = _guard_local_port(roles, local_port)
            superlink = sup.start("the SuperLink", cmd, env=superlink_env(state), cwd=state.link,
                                  account=roles.link if roles else None,
                                  umask=coordinator.LINK_UMASK if roles else 0o077,
                                  pump=False, death_signal=signal.SIGKILL)
            wait_for_port(local_port, superlink.proc, "the SuperLink",
                          state.logs / "superlink.log")
            if nginx is not None:
                front = sup.start("nginx", nginx, pump=False)
                wait_for_port(args.port, front.proc, "nginx", state.root / "proxy" / "error.log",
                              host=probe)
            else:
                console.print(f"the proxy is run separately (--proxy external): start nginx "
                              f"with {conf} (deploy/compose.yaml's proxy service does)",
                              soft_wrap=True)
            who = f" as {roles.link.name}" if roles else ""
            only = ""
            if guard is not None and guard.installed:
                only = (" (root only)" if roles.coordinator.uid == 0
                        else f" (root and {roles.coordinator.name} only)")
            console.print(f"SuperLink{who}: hospitals connect to {args.host}:{args.port} "
                          f"(nginx, Fleet API only); this machine's flwr CLI uses "
                          f"127.0.0.1:{local_port}{only}; state in {state.root}, run folders "
                          f"in {state.runs}", soft_wrap=True)
            gone = sup.wait_any()
            console.print(f"[red]{gone.name} exited with code {gone.returncode}[/]; stopping")
            return gone.returncode or 1
        finally:
            sup.stop_all()  # from here a second SIGTERM is ignored, not cutting this short
            if guard is not None:  # after the SuperLink is gone: the port is never open
                guard.remove()


def _guard_local_port(roles: Roles | None, local_port: int) -> LocalPortGuard | None:
    """As root, the firewall rule that keeps other local accounts off the
    SuperLink's local port (``server/coordinator.py``); a warning line for
    what is left open without it. Returns the guard, None when not root."""
    from server import coordinator, proxy

    if roles is None:
        console.print(f"[yellow]warning:[/] not started as root: the SuperLink and every "
                      f"ServerApp run as {Account.current().name}, and any local "
                      f"account can use the Control API on 127.0.0.1:{local_port} (submit "
                      f"runs, register keys); docs/deploy.md, \"The coordinator's machine\"",
                      soft_wrap=True)
        return None
    guard = coordinator.LocalPortGuard(
        local_port, coordinator.uids_allowed(roles, proxy.unprivileged()[0]))
    why = guard.install()
    if why:
        console.print(f"[yellow]warning:[/] no firewall rule for 127.0.0.1:{local_port} "
                      f"({why}): any local account can use the Control API (submit runs, "
                      f"register keys); docs/deploy.md, \"The coordinator's machine\"",
                      soft_wrap=True)
    return guard


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
        rows = deployment.hospitals(state)
        for row in rows:
            name = f"[red]{row['name']}[/]" if row["name"] == deployment.UNKNOWN else row["name"]
            table.add_row(name, row["node_id"], row["fingerprint"], row["status"],
                          row["registered"])
        console.print(table)
        for row in rows:
            if row["name"] == deployment.UNKNOWN:
                console.print(f"[red]node {row['node_id']} holds a key not registered through "
                              f"fedseg:[/] remove it with `fedseg hospital remove "
                              f"{row['node_id']} --state {state.root}`", soft_wrap=True)
    else:
        entry = deployment.remove(state, args.name_or_key)
        console.print(f"removed {entry['name']} (node {entry['node_id']}): its key is no "
                      f"longer accepted")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    overrides = run_overrides(args)  # before anything starts
    from server import deployment

    state = deployment.State(Path(args.state).resolve())
    if args.resume:
        overrides = {**_saved_config(state.runs / args.name), **overrides, "resume": True}
    name = args.name or datetime.now().strftime("run-%Y%m%d-%H%M%S")
    console.print(f"[bold]fedseg[/] run {name} on the SuperLink of {state.root}")
    start = time.perf_counter()
    summary = deployment.launch(state, name, overrides, on_round=round_line)
    console.print(summary_table(summary))
    problems(summary)
    console.print(f"wall time {time.perf_counter() - start:.0f} s   run folder "
                  f"{state.runs / name}", soft_wrap=True)
    return _exit_code(summary)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedseg", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="three synthetic hospitals, a few rounds, on this machine")
    p.add_argument("--sites", type=int, default=DEMO_SITES)
    add_run_options(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("simulate", help="one simulated hospital per site folder")
    p.add_argument("site_dirs", nargs="+", metavar="SITE_DIR")
    p.add_argument("--names", help="comma-separated site names (default: folder names)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped run from its folder")
    p.add_argument("--ray-address", metavar="HOST:PORT",
                   help="run the simulated sites on this running Ray cluster (default: "
                        "$RAY_ADDRESS if set, else a private Ray on this machine); the site "
                        "folders must be readable at the same paths on every node "
                        "(docs/deploy.md)")
    p.add_argument("--gpus-per-site", type=float, metavar="SHARE",
                   help="GPUs each simulated site reserves, e.g. 0.25 (default: this "
                        "machine's GPUs shared between the sites; none on a cluster)")
    p.add_argument("--preset", choices=["retina", "hippocampus", "none"], default="none",
                   help="start from the settings fedseg bench quality measured for this "
                        "task (server/presets.py, docs/benchmarks.md); typed settings "
                        "go over them")
    add_run_options(p)
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("synth", help="write synthetic hospitals (DICOM) to a folder")
    p.add_argument("out")
    p.add_argument("--sites", type=int, default=3)
    p.add_argument("--train", type=int, default=6)
    p.add_argument("--test", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--structures", help="several structures per case, named (up to three, "
                   "drawn as an organ, lesions inside it, a second organ beside it), e.g. "
                   "organ,lesion; each site's dataset.json names them")
    p.add_argument("--images", choices=["dicom", "nifti", "png"], default="dicom",
                   help="with --structures: DICOM series, NIfTI volumes or 2D PNG images")
    p.add_argument("--labels", choices=["seg", "rtstruct", "nifti"],
                   help="with --structures and DICOM images: a DICOM SEG of a segment per "
                        "structure, an RTSTRUCT of an ROI per structure, or a NIfTI label map "
                        "(default: SEG at even sites, NIfTI at odd)")
    p.add_argument("--slices", type=int, default=8, help="with --structures: slices per volume")
    p.add_argument("--spacings", metavar="P:S,...",
                   help="each site's scanner: pixel and slice spacing in mm, e.g. "
                        "1.5:3,0.7:2,1:5 (default 1.5:3 everywhere)")
    p.add_argument("--hu-offsets", metavar="HU,...",
                   help="each site's calibration error in Hounsfield units, e.g. 0,40,-40")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("partition", help="many sites from one dataset (MSD or nnU-Net form): "
                       "site folders linking to its files (docs/data.md)")
    p.add_argument("dataset_dir", metavar="DATASET_DIR")
    p.add_argument("out", metavar="OUT", help="folder to write (must be new or empty)")
    p.add_argument("--sites", type=int, required=True, help="how many site folders")
    p.add_argument("--split", choices=["even", "skewed"], default="even",
                   help="even: a seeded random even split (default); skewed: sorted by the "
                        "size of the labelled structure (or --by), contiguous bands, site 1 "
                        "the smallest")
    p.add_argument("--by", metavar="ATTRIBUTE",
                   help="with --split skewed: sort by this per-case attribute of the "
                        "dataset.json entries instead of the structure size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--test-fraction", type=float, default=0.2,
                   help="each site's held-out test share (default 0.2)")
    p.add_argument("--names", help="comma-separated site names (default site-1..site-N)")
    p.set_defaults(func=cmd_partition)

    p = sub.add_parser("provision", help="coordinator: CA, SuperLink certificate, hospital keys")
    p.add_argument("out", help="folder to write (ca/, superlink/, hospitals/<name>/)")
    p.add_argument("--host", action="append", default=[], required=True,
                   help="a name or IP hospitals reach the SuperLink by (repeatable)")
    p.add_argument("--hospital", action="append", default=[], metavar="NAME",
                   help="make a key pair for this hospital (repeatable)")
    p.add_argument("--days", type=int, default=825, help="certificate validity")
    p.add_argument("--force", action="store_true", help="replace existing keys and certificates")
    p.set_defaults(func=cmd_provision)

    p = sub.add_parser("superlink", help="coordinator: run the SuperLink (TLS, node auth)")
    p.add_argument("--certs", help="the superlink/ folder from fedseg provision")
    p.add_argument("--state", default="federation", help="state folder (default ./federation)")
    p.add_argument("--host", default="0.0.0.0", help="address to listen on")
    p.add_argument("--port", type=int, default=DEFAULT_PORT,
                   help="the public port (nginx): hospitals connect here")
    p.add_argument("--local-port", type=int, default=DEFAULT_LOCAL_PORT,
                   help="the SuperLink's own port, on 127.0.0.1 only: the coordinator's "
                        "commands use it")
    p.add_argument("--proxy", choices=["nginx", "external"], default="nginx",
                   help="nginx: start nginx on --port too (default); external: only write "
                        "its configuration (<state>/proxy/nginx.conf) for a proxy run as its "
                        "own service (deploy/compose.yaml)")
    p.add_argument("--insecure", action="store_true", help="no TLS, no node authentication")
    p.add_argument("--link-user", default="fedseg-link",
                   help="started as root: the user the SuperLink, its SuperExec and every "
                        "ServerApp run as (default fedseg-link)")
    p.add_argument("--coordinator-user", metavar="USER",
                   help="started as root: the coordinator's account, which may use the "
                        "Control API (fedseg hospital, fedseg run, flwr) besides root and "
                        "owns the state folder")
    p.set_defaults(func=cmd_superlink)

    p = sub.add_parser("hospital", help="coordinator: register, list, remove hospitals' keys")
    hsub = p.add_subparsers(dest="action", required=True)
    h = hsub.add_parser("register")
    h.add_argument("public_key")
    h.add_argument("--name", required=True)
    h = hsub.add_parser("list")
    h = hsub.add_parser("remove")
    h.add_argument("name_or_key", help="the hospital's name, its .pub file, or the node id of "
                   "a key listed as unknown")
    for h in hsub.choices.values():
        h.add_argument("--state", default="federation")
    p.set_defaults(func=cmd_hospital)

    p = sub.add_parser("run", help="coordinator: launch a run on the SuperLink and follow it")
    p.add_argument("--state", default="federation")
    p.add_argument("--name", help="run folder name (default run-<time>)")
    p.add_argument("--resume", action="store_true", help="continue run --name")
    add_run_options(p, local=False)
    p.set_defaults(func=cmd_run)

    bench_commands(sub)  # server/bench_cli.py
    hospital_commands(sub)  # client/cli.py: node, keygen
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
