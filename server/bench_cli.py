"""``fedseg bench ...``: the measurement commands, together (see
docs/performance.md and docs/benchmarks.md)."""

from __future__ import annotations

import argparse
import os
import re
import time
from pathlib import Path

from rich.table import Table

from common.config import fedseg_home
from common.errors import FedsegError
from server.options import add_run_options, default_out, node_overrides, run_overrides
from server.render import console, fmt, round_line

RETINA_ENV = "FEDSEG_RETINA_DIR"  # the retina benchmark's sites, when not given
QUALITY_ROUNDS = 90
QUALITY_LOCAL_EPOCHS = 2


def cmd_bench_deploy(args: argparse.Namespace) -> int:
    """Wall time per round of a TLS deployment on this machine, split into the
    site work (the slowest site worker's training and scoring, from the sites'
    audit logs) and everything else, with the same run simulated next to it."""
    import platform
    import tempfile

    from common.config import check_run_overrides, parse_key_values
    from common.data.synthetic import write_federation
    from server.localfed import LocalFederation
    from server.runs import read_metrics
    from server.simulation import Site, simulate

    typed = parse_key_values(args.config or [])
    check_run_overrides(typed)  # a mistyped setting: said before anything starts
    link = None
    if args.link:  # refused here, before anything starts, where it cannot be shaped
        from server.bench_link import preflight
        from server.link import Link

        link = Link.parse(args.link)
        if "transfer-precision" in typed:
            raise FedsegError("--link runs both transfer precisions side by side: leave "
                              "transfer-precision out of --config")
        preflight(link)
    # As root the nodes run as unprivileged users, who must reach the folder:
    # the system's temporary folder then, not root's home.
    base = Path(tempfile.gettempdir()) if os.geteuid() == 0 else fedseg_home()
    base.mkdir(parents=True, exist_ok=True)
    folders = [Path(p) for p in args.site_dirs]
    missing = [str(f) for f in folders if not f.is_dir()]
    if missing:
        raise FedsegError(f"site folder(s) not found: {', '.join(missing)}")
    work = Path(tempfile.mkdtemp(prefix="bench-deploy-", dir=base))
    config: dict[str, object] = {"num-rounds": args.rounds, "local-epochs": 1}
    if folders:  # real sites: copied into the work folder, which the nodes' users own
        import shutil

        from server.presets import RETINA

        sites = [Path(shutil.copytree(f, work / "data" / f.resolve().name)) for f in folders]
        names = [f.resolve().name for f in folders]
        if args.retina_defaults:
            config = {**RETINA, "evaluate-every": 1, **config}
    else:
        sites = write_federation(work / "data", args.hospitals, n_train=6, n_test=3)
        names = [f"hospital-{chr(ord('a') + i)}" for i in range(len(sites))]
    config = {**config, **typed}
    console.print(f"TLS deployment on 127.0.0.1: {len(sites)} hospitals, "
                  f"{args.rounds} rounds, {args.threads} thread(s) each; work folder {work}")
    if link is not None:
        from server.bench_link import compare, markdown, report

        rows = compare(work, sites, names, config, link, args.threads)
        console.print(report(rows, len(sites), link))
        (work / "link.md").write_text(markdown(rows, len(sites)))
        console.print("the same federation (processes, sites, seeds), the link shaped on the "
                      "SuperLink's public port once the hospitals were connected; a run at "
                      "transfer-precision float32, then one at float16; MB: metrics.jsonl's "
                      "bytes_down / bytes_up per site (the last round also sends the evaluate "
                      f"message); one link of that rate for all the hospitals together "
                      f"(they share the server's port); machine: {platform.machine()}, "
                      f"{os.cpu_count()} cores; the table as markdown: {work / 'link.md'}",
                      soft_wrap=True)
        return 0
    with LocalFederation(work, sites, names=names, threads=args.threads) as fed:
        summary = fed.run("bench", config, on_round=round_line)
        memory = worker_memory(fed)
        cost = proxy_cost(fed, args.rounds)
    deployed = read_metrics(fed.state.runs / "bench")
    site_work = worker_seconds(work)
    console.print("the same run, simulated (Flower's simulation engine, same sites and seeds):")
    sim_summary = simulate([Site(n, s) for n, s in zip(names, sites, strict=True)],
                           work / "sim" / "bench", config, on_round=round_line,
                           threads_per_client=args.threads)
    simulated = read_metrics(work / "sim" / "bench")
    table = Table(title="seconds per round")
    for col in ("round", "deployed", "site work", "other", "simulated", "Dice dep.",
                "Dice sim."):
        table.add_column(col, justify="right")
    for r, s in zip(deployed, simulated, strict=True):
        work_s = site_work.get(r["round"], 0.0)
        table.add_row(str(r["round"]), f"{r['seconds']:.1f}", f"{work_s:.1f}",
                      f"{r['seconds'] - work_s:.1f}", f"{s['seconds']:.1f}",
                      fmt(r["dice_mean"]), fmt(s["dice_mean"]))
    steady = [r for r in deployed[1:-1]] or deployed  # the last round also evaluates apart
    if steady:
        wall = sum(r["seconds"] for r in steady) / len(steady)
        work_s = sum(site_work.get(r["round"], 0.0) for r in steady) / len(steady)
        sim = [s for s in simulated if s["round"] in {r["round"] for r in steady}]
        table.add_row("mean 2..n-1", f"{wall:.1f}", f"{work_s:.1f}",
                      f"{wall - work_s:.1f}",
                      f"{sum(s['seconds'] for s in sim) / max(1, len(sim)):.1f}", "", "")
    console.print(table)
    console.print("deployed: the round's wall time at the ServerApp; site work: the slowest "
                  "site worker's own time (training, and scoring the incoming model), from the "
                  "sites' audit logs; other: the rest (below); simulated: the same run in "
                  "Flower's simulation engine; the last round also sends evaluate messages",
                  soft_wrap=True)
    parts = message_parts(work, names)
    if parts:
        table = Table(title="where a message's time goes at each hospital (mean seconds)")
        for col in ("hospital", "messages", *PARTS):
            table.add_column(col, justify="right")
        for name, row in parts.items():
            table.add_row(name, str(row["messages"]), *(f"{row[k]:.2f}" for k in PARTS))
        console.print(table)
        console.print("idle: from the node sending a reply to it receiving the next message "
                      "(the server aggregating and the other sites' work, then up to 3 s of "
                      "the SuperNode's hard-coded idle poll); fetch: the SuperNode pulling the "
                      "message from the SuperLink; pickup: the executor claiming it and "
                      "reading it from the SuperNode; work: the worker's handling (training, "
                      "scoring, checks, audit); notice: the SuperNode seeing the reply (it "
                      "looks every 0.5 s); upload: the SuperNode pushing it to the SuperLink",
                      soft_wrap=True)
    console.print(f"machine: {platform.machine()}, {os.cpu_count()} cores, "
                  f"{platform.python_implementation()} {platform.python_version()}; "
                  f"final Dice deployment {fmt(summary['dice_final'])}, simulation "
                  f"{fmt(sim_summary['dice_final'])}", soft_wrap=True)
    if memory:
        console.print("site worker memory (resident; peak): " + ", ".join(
            f"{n} {rss / 2**20:.0f} MiB; {peak / 2**20:.0f} MiB" for n, (rss, peak)
            in memory.items()), soft_wrap=True)
    console.print(
        f"proxy (nginx in front of the SuperLink): {cost['requests_per_round']:.0f} requests a "
        f"round through it; a request {cost['via_ms']:.2f} ms through nginx against "
        f"{cost['direct_ms']:.2f} ms straight to the SuperLink (medians, alternated), so at "
        f"most {cost['seconds_per_round']:.3f} s a round if every request waited in turn",
        soft_wrap=True)
    return 0


PARTS = ("idle", "fetch", "pickup", "work", "notice", "upload")
STAMP = re.compile(r"^(\d\d):(\d\d):(\d\d)\.(\d{3}) (.*)$")
WORKER_LINE = re.compile(r"fedseg worker: INFO \S+ \(run \d+, round \S+\): \w+ in "
                         r"([\d.]+) s, message")


def message_parts(work: Path, names: list[str]) -> dict[str, dict[str, float]]:
    """Per hospital, the mean seconds of each part of a message's life at the
    node (:data:`PARTS`), read from the timestamped lines of ``fedseg node``'s
    output (the SuperNode's and the worker's)."""
    out = {}
    for name in names:
        path = work / f"node-{name}.out"
        if not path.exists():
            continue
        events: list[tuple[float, str, str]] = []
        for line in path.read_text(errors="replace").splitlines():
            m = STAMP.match(line)
            if not m:
                continue
            h, mi, sec, ms, text = m.groups()
            t = int(h) * 3600 + int(mi) * 60 + int(sec) + int(ms) / 1000
            if "Receiving: " in text:
                events.append((t, "receiving", ""))
            elif "Received successfully" in text:
                events.append((t, "received", ""))
            elif (w := WORKER_LINE.search(text)):
                events.append((t, "worker", w.group(1)))
            elif "Sending: " in text:
                events.append((t, "sending", ""))
            elif "Sent successfully" in text:
                events.append((t, "sent", ""))
        sums = dict.fromkeys(PARTS, 0.0)
        n, idle_n, last_sent = 0, 0, None
        i = 0
        while i + 4 < len(events):
            kinds = [e[1] for e in events[i:i + 5]]
            if kinds != ["receiving", "received", "worker", "sending", "sent"]:
                i += 1
                continue
            (t0, _, _), (t1, _, _), (t2, _, work_s), (t3, _, _), (t4, _, _) = events[i:i + 5]
            if last_sent is not None:
                sums["idle"] += t0 - last_sent
                idle_n += 1
            sums["fetch"] += t1 - t0
            sums["work"] += float(work_s)
            sums["pickup"] += max(0.0, t2 - t1 - float(work_s))
            sums["notice"] += t3 - t2
            sums["upload"] += t4 - t3
            n, last_sent, i = n + 1, t4, i + 5
        if n:
            row = {k: v / n for k, v in sums.items()}
            row["idle"] = sums["idle"] / idle_n if idle_n else 0.0
            out[name] = {"messages": n, **row}
    return out


def worker_seconds(work: Path) -> dict[int, float]:
    """Per round, the slowest site worker's time (training and scoring), from
    the sites' audit logs (``fedseg node audit``)."""
    from common.jsonl import read_jsonl

    per_round: dict[int, dict[str, float]] = {}
    for log in work.glob("site-*/audit/audit.jsonl"):
        for e in read_jsonl(log):
            if e.get("outcome") == "sent" and e.get("round"):
                sites = per_round.setdefault(int(e["round"]), {})
                sites[str(log)] = sites.get(str(log), 0.0) + float(e.get("seconds", 0.0))
    return {r: max(v.values()) for r, v in per_round.items()}


def worker_memory(fed) -> dict[str, tuple[int, int]]:
    """Resident and peak memory of each site worker of ``fed`` (Linux /proc)."""
    out = {}
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            cmdline = (status.parent / "cmdline").read_bytes().split(b"\0")
            text = status.read_text()
        except OSError:
            continue
        if b"client.worker" not in cmdline or str(fed.work).encode() not in b" ".join(cmdline):
            continue
        name = cmdline[cmdline.index(b"--name") + 1].decode()
        fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        kib = {k: int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM")}
        out[name] = (kib["VmRSS"], kib["VmHWM"])
    return out


def proxy_cost(fed, rounds: int, batches: int = 6, per_batch: int = 100) -> dict[str, float]:
    """What nginx adds: the same Fleet request (refused by the SuperLink: it is
    unsigned) through the public port and straight to the SuperLink's local
    port, alternating batches; times the requests the run's rounds made
    through the proxy (its access log)."""
    import statistics

    import httpx

    url = "/v1/fleet/pull-messages"
    times: dict[str, list[float]] = {"via": [], "direct": []}
    with httpx.Client(verify=str(fed.certs / "ca" / "ca.crt"), timeout=30) as client:
        for _ in range(batches):
            for side, base in (("via", f"https://{fed.address}"),
                               ("direct", f"https://localhost:{fed.local_port}")):
                for _ in range(per_batch):
                    start = time.perf_counter()
                    client.post(base + url, content=b"\0" * 16)
                    times[side].append(time.perf_counter() - start)
    log = fed.state.root / "proxy" / "access.log"
    made = sum(1 for line in log.read_text().splitlines() if "/v1/fleet/" in line)
    requests = max(0, made - batches * per_batch) / rounds
    via, direct = (statistics.median(times[k]) for k in ("via", "direct"))
    return {"via_ms": via * 1e3, "direct_ms": direct * 1e3, "requests_per_round": requests,
            "seconds_per_round": max(0.0, via - direct) * requests}


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
    from server.presets import PRESETS

    preset = PRESETS[args.preset if args.retina_defaults else "none"]
    # Before anything starts (or loads torch), and checked with the preset
    # beneath them (a 24-voxel patch fits the hippocampus preset's 4 levels).
    typed, node = run_overrides(args, base=preset), node_overrides(args)
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
    if args.baseline_jobs is not None and args.baseline_jobs < 1:
        raise FedsegError(f"--baseline-jobs must be 1 or more, not {args.baseline_jobs}")
    from server.bench import METHODS, STRATEGIES, quality
    from server.simulation import Site

    overrides = preset | typed
    if "device" in node:  # read by every site of the benchmark (SiteSettings' fallback)
        os.environ["FEDSEG_DEVICE"] = node["device"]
    rounds = overrides.pop("num-rounds", QUALITY_ROUNDS)
    local_epochs = overrides.pop("local-epochs", QUALITY_LOCAL_EPOCHS)
    out = Path(args.out) if args.out else default_out("bench-quality")
    methods = tuple(args.methods.split(",")) if args.methods else METHODS
    unknown = [m for m in methods if m not in ("local", "pooled", *STRATEGIES)]
    if unknown:
        raise FedsegError(f"unknown method(s) {', '.join(unknown)}: choose from local, pooled, "
                          f"{', '.join(STRATEGIES)}")
    console.print(f"quality benchmark: {', '.join(f.name for f in folders)}; {rounds} "
                  f"rounds x {local_epochs} local epochs; methods {', '.join(methods)}; "
                  f"output {out}", soft_wrap=True)

    def show(method: str, result: dict) -> None:
        dice = "  ".join(f"{s} {fmt(m['dice'])}" for s, m in result["sites"].items())
        console.print(f"{method:>8}  Dice {dice}  ({result['seconds']:.0f} s)", soft_wrap=True)

    report = quality([Site(f.resolve().name, f) for f in folders], out, overrides,
                     rounds=rounds, local_epochs=local_epochs, methods=methods,
                     on_result=show, baseline_jobs=args.baseline_jobs)
    console.print((out / "quality.md").read_text(), soft_wrap=True)
    console.print(f"machine: {report['machine']}; written {out}/quality.md, quality.json, "
                  f"dice.png", soft_wrap=True)
    return 0


def cmd_bench_transfer(args: argparse.Namespace) -> int:
    """Bytes per site per round by model and transfer precision (no training)."""
    from server.bench_transfer import table

    _, markdown = table(rate_mbit=args.rate)
    console.print(markdown, soft_wrap=True)
    console.print("down: the train message (the global model and the round's instructions); "
                  "up: the train reply (the site's weights, its metrics and name); as the "
                  "run's recorder counts them (Flower's serialised payload, metrics.jsonl "
                  f"bytes_down / bytes_up). Seconds: the bytes alone at {args.rate:g} Mbit/s, "
                  "without the link's delay or TLS and HTTP overhead; fedseg bench deploy "
                  "--link measures rounds on a shaped link.", soft_wrap=True)
    return 0


def cmd_bench_patches(args: argparse.Namespace) -> int:
    from common.config import check_run_overrides, parse_key_values
    from common.model import pick_device
    from server.bench import machine
    from server.bench_patches import DEFAULT_CONFIGS, markdown, patch_cost

    overrides = {"structures": "organ,lesion", "batch-size": 2, **parse_key_values(
        args.config or [])}
    typed = check_run_overrides(overrides).to_run_config()  # mistyped: said before it runs
    overrides = {k: typed[k] for k in overrides}
    try:
        configs = ([tuple(int(x) for x in c.split(":")) for c in args.models.split(",")]
                   if args.models else list(DEFAULT_CONFIGS))
        volume = tuple(int(v) for v in args.volume.split(","))
    except ValueError:
        raise FedsegError("--models is DIMS:PATCH,... (e.g. 2:64,3:96); --volume is X,Y,Z "
                          "(e.g. 192,192,64)") from None
    if any(len(c) != 2 or c[0] not in (2, 3) or c[1] < 8 for c in configs) or len(volume) != 3:
        raise FedsegError("--models is DIMS:PATCH,... with DIMS 2 or 3 and PATCH at least 8; "
                          "--volume is X,Y,Z")
    device = str(pick_device(args.device))
    console.print(f"patch cost on {device}: {len(configs)} models, {args.steps} timed steps "
                  f"each, settings {overrides}", soft_wrap=True)
    rows = patch_cost(configs, overrides, steps=args.steps, volume=volume, device=device,
                      layouts=(True, False) if args.compare_layout else (True,))
    console.print(markdown(rows, volume), soft_wrap=True)
    console.print(f"machine: {machine()}", soft_wrap=True)
    return 0


def cmd_bench_memory(args: argparse.Namespace) -> int:
    """A site larger than memory: the worker's peak memory from disk, and
    steps a second from disk against in memory (server/bench_memory.py)."""
    import shlex
    import tempfile

    from server.bench import machine
    from server.bench_memory import DEFAULT_SHAPE, bench

    try:
        shape = tuple(int(v) for v in args.shape.split(",")) if args.shape else DEFAULT_SHAPE
    except ValueError:
        raise FedsegError("--shape is X,Y,Z (e.g. 384,384,192)") from None
    if len(shape) != 3 or min(shape) < 64 or args.size_gib <= 0 or args.steps < 1:
        raise FedsegError("--shape needs 3 sizes of at least 64 (the bench's 64-voxel "
                          "patches); --size-gib and --steps must be positive")
    base = fedseg_home()
    base.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench-memory-",
                                                                   dir=base))
    start = time.perf_counter()
    bench(work, args.size_gib, shape, args.steps, args.fit_cases, args.threads, console,
          keep=args.keep, repeat=args.repeat)
    command = ["fedseg", "bench", "memory", "--size-gib", f"{args.size_gib:g}", "--shape",
               ",".join(map(str, shape)), "--steps", str(args.steps), "--fit-cases",
               str(args.fit_cases), "--threads", str(args.threads), "--repeat",
               str(args.repeat), "--work", str(work), *(["--keep"] if args.keep else [])]
    console.print(f"machine: {machine()}; {time.perf_counter() - start:.0f} s in all; "
                  f"command: {' '.join(shlex.quote(a) for a in command)}; "
                  f"written {work}/memory.md, memory.json", soft_wrap=True)
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="measurements (see docs/performance.md)")
    bsub = p.add_subparsers(dest="bench", required=True)
    b = bsub.add_parser("deploy", help="seconds per round of a TLS deployment on this machine")
    b.add_argument("site_dirs", nargs="*", metavar="SITE_DIR",
                   help="site folders to deploy (copied into the work folder; default: "
                        "--hospitals synthetic DICOM sites)")
    b.add_argument("--rounds", type=int, default=3)
    b.add_argument("--hospitals", type=int, default=2)
    b.add_argument("--threads", type=int, default=1, help="CPU threads per hospital")
    b.add_argument("--no-retina-defaults", dest="retina_defaults", action="store_false",
                   help="with SITE_DIRs, do not apply the retina settings (as bench quality)")
    b.add_argument("--link", metavar="RATE[:RTT]",
                   help="shape the hospitals' link to the server like a hospital's (e.g. "
                        "50mbit:40ms: each way at the rate, the round trip; Linux traffic "
                        "control on the SuperLink's public port, as root; the delay needs "
                        "the kernel's netem) and compare transfer-precision float32 and "
                        "float16 in one run (docs/performance.md)")
    b.add_argument("--config", action="append", metavar="KEY=VALUE",
                   help="run settings for the bench's runs (docs/settings.md)")
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
    b.add_argument("--preset", choices=["retina", "hippocampus", "none"], default="retina",
                   help="measured settings for the task (docs/benchmarks.md), under any "
                        "given here: retina (RGB input, 96-px patches, 8 per image, batch 16, "
                        "learning rate 2e-3, scoring every 30 rounds), hippocampus (3D "
                        "U-Net of 5 levels, 8 to 128 channels, 1 residual unit each, "
                        "Anterior,Posterior, 32-voxel patches, 1 per image a round, batch 8, "
                        "learning rate 2e-3, 256 rounds of 1 epoch, scoring every 128), none")
    b.add_argument("--no-retina-defaults", dest="retina_defaults", action="store_false",
                   help="the same as --preset none")
    b.add_argument("--baseline-jobs", type=int, metavar="N",
                   help="processes that train the local-only and pooled models side by side "
                        "before the federated methods run (default: one a CPU core, 1 on a "
                        "GPU; 1 trains them in this process, one after another)")
    add_run_options(b)
    b.set_defaults(func=cmd_bench_quality)
    b = bsub.add_parser("transfer", help="bytes per site per round by model and "
                        "transfer-precision (docs/performance.md)")
    b.add_argument("--rate", type=float, default=50.0,
                   help="link rate in Mbit/s for the seconds column (default 50)")
    b.set_defaults(func=cmd_bench_transfer)
    b = bsub.add_parser("patches", help="2D vs 3D U-Net cost per patch size (docs/data.md)")
    b.add_argument("--models", help="DIMS:PATCH,... (default 2:64,2:128,3:32,3:64,3:96,3:128)")
    b.add_argument("--steps", type=int, default=3, help="timed training steps per model")
    b.add_argument("--volume", default="192,192,64",
                   help="X,Y,Z of the volume segmented to time inference")
    b.add_argument("--device", default="auto", help="auto, cpu or cuda:N")
    b.add_argument("--config", action="append", metavar="KEY=VALUE",
                   help="run settings (default structures=organ,lesion, batch-size=2)")
    b.add_argument("--compare-layout", action="store_true",
                   help="each model also without its few-channel 3D convolutions in "
                        "channels-last order, side by side (docs/performance.md)")
    b.set_defaults(func=cmd_bench_patches)
    b = bsub.add_parser("memory", help="a site larger than memory: the worker's peak "
                        "memory, steps a second from disk vs in memory (docs/performance.md)")
    b.add_argument("--size-gib", type=float, default=20.0,
                   help="the synthetic site's prepared volumes in GiB as float32 (default 20)")
    b.add_argument("--shape", help="X,Y,Z of each volume (default 384,384,192)")
    b.add_argument("--steps", type=int, default=60,
                   help="training steps per worker (one case's patches a step)")
    b.add_argument("--fit-cases", type=int, default=8,
                   help="cases of the site that fits, trained in memory and from disk")
    b.add_argument("--threads", type=int, default=2, help="CPU threads per worker")
    b.add_argument("--repeat", type=int, default=2,
                   help="fresh workers each for in memory and from disk, in turn (the best)")
    b.add_argument("--work", help="work folder (default a new one in the fedseg home)")
    b.add_argument("--keep", action="store_true",
                   help="keep the synthetic site and its prepared copies")
    b.set_defaults(func=cmd_bench_memory)

