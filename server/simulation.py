"""Run a simulated federation on this machine through Flower's own runtime.

``simulate`` starts a private SuperLink in simulation mode on free 127.0.0.1
ports, submits the app with ``flwr run`` (the same ServerApp and ClientApp a
deployment runs), follows the run folder while it runs and stops the SuperLink
(and Ray under it) by process group when done, also on error or Ctrl-C.

The site folders reach the simulated nodes through a local file named in the
``FEDSEG_SIM_SITES`` environment variable of that SuperLink, never through run
config (which in a deployment would travel to every hospital).

With ``ray_address`` the simulated sites run on an existing Ray cluster
instead of a private Ray on this machine: Flower's simulation engine calls
``ray.init()``, which joins the cluster named in ``RAY_ADDRESS``. Ray starts
the cluster's worker processes from its own ``ray start`` environment, not
from this one, so the few variables a simulated site reads (the site list
itself, not a path to it; threads; the worker log) reach them through Ray's
job runtime environment (``RAY_JOB_CONFIG_JSON_ENV_VAR``, as ``ray job submit``
passes it). The site folders must be readable at the same paths on every
node, with the same Python environment (docs/deploy.md, "A simulation on a
Ray cluster"). No scheduling of our own: Ray places Flower's actors.

Every simulated site's message leaves a line in the run folder's
``workers.jsonl`` (``client/app.py``'s ``worker_line``): the process, host and
Ray node that answered, the sites' cases it held and its peak memory.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.config import SIM_SITES_ENV, SIM_WORKERS_ENV, check_run_overrides, fedseg_home
from common.errors import LOCAL_LOG_ENV, ConfigError, FedsegError
from server.processes import (
    free_port,
    run_and_follow,
    run_config_arg,
    stop_process_group,
    wait_for_port,
)
from server.runs import RUNS_DIR_ENV

APP_DIR = Path(__file__).resolve().parents[1]
WORKERS_LOG = "workers.jsonl"  # in the run folder: one line per simulated site's message
# What a simulated site's process reads from its environment: on a Ray cluster
# these travel in the job's runtime environment (PYTHONPATH is Flower's own).
WORKER_ENV = ("FEDSEG_HOME", "FEDSEG_THREADS", "FEDSEG_DEVICE", "OMP_NUM_THREADS",
              "FLWR_TELEMETRY_ENABLED", "FLWR_DISABLE_UPDATE_CHECK", "MPLCONFIGDIR",
              "TORCHINDUCTOR_CACHE_DIR", "PYTHONUNBUFFERED", SIM_WORKERS_ENV)


class SimulationError(FedsegError):
    kind = "simulation error"


@dataclass(frozen=True)
class Site:
    name: str
    data_dir: Path


def runtime_env(threads_per_client: int) -> dict[str, str]:
    """Environment for Flower's processes: everything under FEDSEG_HOME, no
    telemetry, no run-time dependency installation, bounded CPU threads."""
    home = fedseg_home()
    env = dict(os.environ)
    env.update(
        FEDSEG_HOME=str(home),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        OMP_NUM_THREADS=str(threads_per_client),
        FEDSEG_THREADS=str(threads_per_client),
        MPLCONFIGDIR=str(home / "matplotlib"),
        RAY_USAGE_STATS_ENABLED="0",
        # Ray on Linux picks the machine's outward address for its own services;
        # this keeps a single-machine simulation on 127.0.0.1.
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        TORCHINDUCTOR_CACHE_DIR=str(home / "torchinductor"),
        RAY_DEDUP_LOGS="0",
        PYTHONUNBUFFERED="1",
    )
    ray_tmp = home / "ray"
    if len(str(ray_tmp)) <= 48:  # Ray's unix sockets must fit in 107 characters
        env["RAY_TMPDIR"] = str(ray_tmp)
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    return env


def cpu_slots(sites: int, cores: int, threads_per_client: int) -> int:
    """How many simulated sites a private Ray runs at once on ``cores`` CPUs
    (its ``init-args-num-cpus``, in units of ``threads_per_client``).

    Normally one per ``threads_per_client`` cores. Where one more wave would
    leave most cores idle (3 sites on 2 cores: 2, then 1 alone), all sites run
    at once instead, up to 1.5 sites per slot: the cores stay busy, and a round
    takes about 1.5 slots' time, not 2 (docs/performance.md)."""
    slots = max(1, cores // max(1, threads_per_client))
    return sites if slots < sites <= slots * 3 // 2 else slots


def check_site_names(sites: Sequence[Site]) -> None:
    """Refuse two sites of one name (a site's scores and its kept model go by
    its name), naming the clashing folders and ``--names``."""
    names = [s.name for s in sites]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        clash = "; ".join(f"{n}: " + ", ".join(str(s.data_dir) for s in sites if s.name == n)
                          for n in twice)
        raise ConfigError(f"two site folders would be named alike ({clash}); a site is "
                          "named by its folder's name: give each its own with --names "
                          "NAME,NAME,...")


def simulate(
    sites: Sequence[Site],
    run_dir: Path,
    run_config: Mapping[str, Any],
    *,
    on_round: Callable[[dict[str, Any]], None] | None = None,
    on_site_error: Callable[[str], None] | None = None,
    threads_per_client: int = 1,
    device: str | None = None,
    timeout: float | None = None,
    ray_address: str | None = None,
    gpus_per_site: float | None = None,
) -> dict[str, Any]:
    """Run one simulated federation, one node per site; returns ``summary.json``.

    ``run_dir`` is the run folder (``runs/<name>``); ``run_config`` overrides
    ``[tool.flwr.app.config]`` (``run-name`` is set from ``run_dir``). A site's
    own errors (case names and causes: every party is on this machine) go to
    ``run_dir/local.log`` and, line by line, to ``on_site_error``; the run's
    metrics keep only their scrubbed form.

    ``ray_address`` (``HOST:PORT`` of a running cluster's head, as ``ray start``
    prints it): run the simulated sites on that cluster; ``gpus_per_site``:
    the GPU share each simulated site reserves (default: this machine's GPUs
    shared between the sites; none on a cluster unless given).
    """
    if not sites:
        raise ConfigError("a simulation needs at least one site folder")
    check_run_overrides(run_config)  # a bad setting fails here, not in Flower
    check_site_names(sites)
    home = fedseg_home()
    run_dir = Path(run_dir).resolve()
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    port = free_port()
    work = home / "sim" / f"{run_dir.name}-{port}"
    work.mkdir(parents=True, exist_ok=True)
    manifest = work / "sites.json"
    manifest.write_text(json.dumps(
        [{"name": s.name, "data_dir": str(Path(s.data_dir).resolve())} for s in sites]))

    env = runtime_env(threads_per_client)
    if device:
        env["FEDSEG_DEVICE"] = device  # the simulated hospitals' device (node setting)
    env[SIM_SITES_ENV] = str(manifest)
    env[RUNS_DIR_ENV] = str(run_dir.parent)
    run_dir.mkdir(exist_ok=True)
    summary_path = run_dir / "summary.json"
    # a resumed run's folder holds the summary of its earlier part: only a new
    # one says this simulation finished
    earlier = summary_path.stat().st_mtime_ns if summary_path.exists() else None
    local_log = run_dir / "local.log"
    env[LOCAL_LOG_ENV] = str(local_log)
    env[SIM_WORKERS_ENV] = str(run_dir / WORKERS_LOG)
    env["FLWR_HOME"] = str(work / "flwr")
    (work / "flwr").mkdir(exist_ok=True)
    (work / "flwr" / "config.toml").write_text(
        '[superlink]\ndefault = "fedseg-sim"\n\n'
        f'[superlink.fedseg-sim]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    log_path = work / "flower.log"
    overrides = {**run_config, "run-name": run_dir.name}
    federation: dict[str, Any] = {
        "num-supernodes": len(sites),
        "client-resources-num-cpus": threads_per_client,
    }
    if ray_address:
        # ray.init() joins this cluster; it refuses init-args such as num_gpus there.
        env["RAY_ADDRESS"] = ray_address
        # Ray's own multi-node setting: it finds this machine's address as the
        # cluster sees it (the private Ray's loopback-only switch would refuse).
        env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
        worker_env = {k: env[k] for k in WORKER_ENV if k in env}
        worker_env[SIM_SITES_ENV] = manifest.read_text()  # the list, not a local path
        env["RAY_JOB_CONFIG_JSON_ENV_VAR"] = json.dumps(
            {"runtime_env": {"env_vars": worker_env}})
        if gpus_per_site:
            federation["client-resources-num-gpus"] = gpus_per_site
    else:
        env.pop("RAY_ADDRESS", None)  # a private Ray on this machine
        env.pop("RAY_JOB_CONFIG_JSON_ENV_VAR", None)
        gpus = _gpu_count()
        if not gpus:
            slots = cpu_slots(len(sites), os.cpu_count() or 1, threads_per_client)
            federation["init-args-num-cpus"] = slots * threads_per_client
        if gpus_per_site:
            if not gpus:
                raise ConfigError("--gpus-per-site: this machine has no CUDA GPU")
            federation["client-resources-num-gpus"] = gpus_per_site
            federation["init-args-num-gpus"] = gpus
        elif gpus:
            # Ray hides GPUs from actors that reserve none: share the GPUs between
            # the simulated hospitals so each trains on CUDA.
            federation["client-resources-num-gpus"] = round(min(1.0, gpus / len(sites)), 3)
            federation["init-args-num-gpus"] = gpus
    superlink_cmd = [
        "flower-superlink", "--insecure", "--simulation", "--isolation", "subprocess",
        "--host", "127.0.0.1", "--port", str(port),  # one port: Fleet, Control, Runtime
        "--disable-runtime-dependency-installation",
    ]
    run_cmd = [
        "flwr", "run", str(APP_DIR), "fedseg-sim", "--stream",
        "--run-config", run_config_arg(overrides),
        "--federation-config", " ".join(f"{k}={v}" for k, v in federation.items()),
    ]
    with open(log_path, "ab") as log_file:
        superlink = subprocess.Popen(
            superlink_cmd, env=env, cwd=work, stdout=log_file, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        code = None
        try:
            wait_for_port(port, superlink, "flower-superlink", log_path)
            code = run_and_follow(run_cmd, env=env, cwd=work, log=log_file, run_dir=run_dir,
                                  on_round=on_round, timeout=timeout, local_log=local_log,
                                  on_local=on_site_error)
        finally:
            stop_process_group(superlink)
    fresh = summary_path.exists() and summary_path.stat().st_mtime_ns != earlier
    if code != 0 or not fresh:
        cause = cause_in_log(log_path)
        raise SimulationError(
            f"the simulation did not finish (flwr run exit code {code})"
            f"{f': {cause}' if cause else ''}; Flower's log: {log_path}"
        )
    shutil.rmtree(work / "flwr", ignore_errors=True)
    return json.loads(summary_path.read_text())


# Flower's simulation engine says why it stopped in its log, not in its exit code
_ANSI = re.compile(r"\x1b\[[0-9;]*m|\[[0-9;]*m")


def cause_in_log(log_path: Path, tail_bytes: int = 200_000) -> str:
    """The error that stopped a failed simulation, from Flower's log, in one
    line (the first exception raised: later ones wrap it; with what to do
    where it is a known one), or "" where the log holds none."""
    try:
        with open(log_path, "rb") as fh:
            fh.seek(max(0, fh.seek(0, os.SEEK_END) - tail_bytes))
            lines = fh.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return ""
    raised, logged, wants = [], [], ""
    for line in lines:
        text = _ANSI.sub("", line).strip()
        if re.match(r"^[A-Za-z_.]*(Error|Exception): ", text):
            raised.append(text)  # a traceback's last line
        elif text.startswith("ERROR"):
            logged.append(text)
        if "does not meet the criteria" in text:  # Ray's actor pool could not start
            wants = text.split("resources:", 1)[-1].split("}", 1)[0].strip() + "}"
    if any("ActorPool is empty" in x for x in raised):
        return (f"no Ray node can host one simulated site, which asks for "
                f"{wants or 'more than any node has'}: lower --threads (CPUs a site) or "
                f"--gpus-per-site, or give the nodes more (ray start --num-cpus N)")
    # the first exception raised is the cause; the later ones wrap it
    return (raised or logged or [""])[0][:400]


def worker_summary(run_dir: Path, since: float = 0.0) -> dict[str, Any] | None:
    """What ``workers.jsonl`` says about the processes that ran the simulated
    sites (from time ``since`` on: a resumed run's own part): how many, on how
    many Ray nodes (and which sites ran on each), the most sites' cases one
    process held at once, and each process's peak memory (MB). None where the
    run left no such log."""
    from common.jsonl import read_jsonl

    path = Path(run_dir) / WORKERS_LOG
    if not path.exists():
        return None
    lines = [x for x in read_jsonl(path) if isinstance(x, dict) and "pid" in x
             and isinstance(x.get("time"), (int, float)) and x["time"] >= since]
    if not lines:
        return None
    processes: dict[str, float] = {}
    nodes: dict[str, set[str]] = {}
    for x in lines:
        proc = f"{x.get('host')}:{x['pid']}"
        processes[proc] = max(processes.get(proc, 0.0), float(x.get("peak_rss_mb") or 0.0))
        nodes.setdefault(str(x.get("ray_node") or x.get("host")), set()).add(str(x.get("site")))
    return {
        "messages": len(lines),
        "processes": len(processes),
        "nodes": {node: sorted(sites) for node, sites in nodes.items()},
        "sites_held_peak": max(int(x.get("sites_held_peak") or 0) for x in lines),
        "peak_rss_mb": dict(sorted(processes.items())),
    }


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


