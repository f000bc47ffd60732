"""Simulations beyond a handful of sites: many sites sampled per round in
bounded memory, and the simulated sites on an existing (two-node) Ray cluster."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import pytest

from common.data.synthetic import write_federation
from server.processes import free_port
from server.runs import read_metrics
from server.simulation import APP_DIR, WORKERS_LOG, runtime_env

pytestmark = [pytest.mark.federation, pytest.mark.slow]


def simulate(args: list[str], out: Path, timeout: float = 500) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "server.cli", "simulate", *args,
                           "--out", str(out)], capture_output=True, text=True,
                          timeout=timeout, cwd=APP_DIR, env=runtime_env(1))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def worker_lines(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / WORKERS_LOG).read_text().splitlines()]


def test_twenty_sites_sampled_per_round_one_sites_cases_per_process(tmp_path,
                                                                   no_leftover_processes):
    """20 tiny sites, fraction-train 0.25: the run finishes (exit 0: a site the
    sampling never drew is no problem) and reports its round times; each round
    trains exactly the 5 sampled sites (the recorded ones, and no other site
    did any training work that round); every Ray worker process served several
    sites, and never held more than one site's cases at once."""
    folders = write_federation(tmp_path / "sites", 20, n_train=2, n_test=1, seed=3)
    out = tmp_path / "run"
    proc = simulate([*map(str, folders), "--rounds", "3", "--fraction-train", "0.25",
                     "--patch-size", "32", "--config", "patches-per-image=1"], out)
    for r in (1, 2, 3):
        assert f"round   {r}" in proc.stdout
    assert "round time: median" in proc.stdout, proc.stdout[-2000:]
    rows = read_metrics(out)
    lines = worker_lines(out)
    assert [r["round"] for r in rows] == [1, 2, 3]
    for row in rows:
        trained_here = sorted(x["site"] for x in lines
                              if x["kind"] == "train" and x["round"] == row["round"])
        assert len(row["trained"]) == 5 and trained_here == row["trained"], row["round"]
        assert row["failures"] == []
    # the last round scores the model at every site (fraction-evaluate 1)
    assert {x["site"] for x in lines if x["kind"] == "evaluate"} == {f.name for f in folders}
    assert all(x["ok"] for x in lines)
    by_process = defaultdict(set)
    assert {x["site"] for x in lines if x["kind"] == "fingerprint"} == {f.name for f in folders}
    for x in lines:  # the fingerprint at the start reads a site's cases, keeping none
        by_process[x["pid"]].add(x["site"])
        assert x["sites_held"] <= 1 and x["sites_held_peak"] <= 1, x
        if x["kind"] != "fingerprint":
            assert x["sites_held"] == 1, x
    assert len(by_process) >= 2 and all(len(s) > 3 for s in by_process.values()), by_process
    assert "at most 1 site's cases in a process at once" in " ".join(proc.stdout.split())


def _ray_start(args: list[str], env: dict[str, str], log: Path) -> int:
    """``ray start ARGS`` in a new session; returns its process group (the
    daemons it leaves behind stay in it)."""
    with open(log, "ab") as fh:
        proc = subprocess.Popen(["ray", "start", *args, "--disable-usage-stats"], env=env,
                                stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            rc = None
    if rc != 0:
        _stop_group(proc.pid)
        raise AssertionError(f"ray start {' '.join(args)} failed ({rc}): "
                             f"{log.read_text()[-3000:]}")
    return proc.pid


def _stop_group(pgid: int) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)


@pytest.fixture
def two_node_ray(tmp_path):
    """A Ray cluster of two nodes on this machine, both started with ``ray
    start`` (a head and a second node joining it at 127.0.0.1), one CPU and one
    custom resource each; stopped by process group afterwards."""
    ray_cli = Path(sys.executable).parent / "ray"
    if not ray_cli.exists() and shutil.which("ray") is None:
        pytest.skip("the ray command is not installed")
    ray_tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # unix sockets: short paths
    env = runtime_env(1)
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)  # Ray's multi-node default
    env.pop("RAY_ADDRESS", None)
    env["RAY_TMPDIR"] = ray_tmp
    port = free_port()
    groups = []
    try:
        groups.append(_ray_start(["--head", "--node-ip-address", "127.0.0.1", "--port",
                                  str(port), "--num-cpus", "1", "--resources",
                                  '{"fedseg_head": 1}', "--include-dashboard", "false"],
                                 env, tmp_path / "ray-head.log"))
        groups.append(_ray_start(["--address", f"127.0.0.1:{port}", "--num-cpus", "1",
                                  "--resources", '{"fedseg_second": 1}'],
                                 env, tmp_path / "ray-second.log"))
        # the nodes as the cluster lists them, from a separate driver process
        listing = subprocess.run(
            [sys.executable, "-c",
             f"import json, ray; ray.init(address='127.0.0.1:{port}', logging_level='ERROR');"
             "print(json.dumps({n['NodeID']: n['Resources'] for n in ray.nodes()"
             " if n['Alive']}))"],
            env=env, capture_output=True, text=True, timeout=120)
        assert listing.returncode == 0, listing.stderr[-3000:]
        nodes = json.loads(listing.stdout.strip().splitlines()[-1])
        assert len(nodes) == 2, nodes
        yield f"127.0.0.1:{port}", nodes
    finally:
        for pgid in reversed(groups):
            _stop_group(pgid)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_a_simulation_runs_on_an_existing_two_node_ray_cluster(tmp_path,
                                                              no_leftover_processes,
                                                              two_node_ray):
    """``fedseg simulate --ray-address``: Flower's actors run on the cluster's
    two nodes (one CPU each, one site at a time per node), the site list and
    settings reach processes that Ray, not this command, started, and the run
    trains every site."""
    address, nodes = two_node_ray
    folders = write_federation(tmp_path / "sites", 3, n_train=2, n_test=1, seed=5)
    names = ["alpha", "beta", "gamma"]
    out = tmp_path / "run"
    proc = simulate([*map(str, folders), "--names", ",".join(names), "--rounds", "2",
                     "--patch-size", "32", "--config", "patches-per-image=1",
                     "--ray-address", address], out)
    assert f"on the Ray cluster at {address}" in " ".join(proc.stdout.split())
    rows = read_metrics(out)
    assert [r["trained"] for r in rows] == [names, names]
    lines = worker_lines(out)
    # the names come from the site list the cluster's workers received
    assert {x["site"] for x in lines} == set(names) and all(x["ok"] for x in lines)
    ran_on = {x["ray_node"] for x in lines}
    assert ran_on == set(nodes), (ran_on, nodes)  # both nodes, and only the cluster's
    resources = {k for node in ran_on for k in nodes[node]}
    assert {"fedseg_head", "fedseg_second"} <= resources
    assert "on 2 Ray node(s)" in " ".join(proc.stdout.split())
    # a site asking for more CPUs than any node has: the cause, not only an exit code
    failed = subprocess.run([sys.executable, "-m", "server.cli", "simulate",
                             *map(str, folders), "--rounds", "1", "--threads", "2",
                             "--ray-address", address, "--out", str(tmp_path / "too-big")],
                            capture_output=True, text=True, timeout=300, cwd=APP_DIR,
                            env=runtime_env(1))
    said = " ".join((failed.stdout + failed.stderr).split())
    assert failed.returncode != 0, said
    assert "no Ray node can host one simulated site, which asks for {'num_cpus': 2" in said, said
