"""Fault drills on a real deployment (SuperLink behind nginx, two nodes with
their site workers, TLS, as real processes on 127.0.0.1): a hospital killed
outright in the middle of a run, a frozen hospital, the SuperLink killed and
the run resumed. Each drill is bounded by the run settings it states
(``round-timeout``, ``node-wait``), not by Flower's 60 s heartbeat.

Slow (about a minute each): marked ``slow``, run by CI after the default
suite (``python3 bootstrap.py test -m slow``)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from client.node import NOT_ACTIVATED
from common.data.synthetic import write_federation
from common.errors import ConfigError
from common.processes import group_and_descendants
from server.deployment import DeploymentError
from server.localfed import LocalFederation
from server.proxy import nginx_binary
from server.runs import read_metrics
from tests.federation.conftest import FLOWER_PROCESSES, processes_matching, state_of

pytestmark = [pytest.mark.federation, pytest.mark.slow]

SMALL = {"model-channels": "8,16", "patch-size": 32, "batch-size": 4, "patches-per-image": 1,
         "test-time-flips": False, "mixed-precision": False, "local-epochs": 1}


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    try:
        nginx_binary()
    except ConfigError as exc:
        pytest.skip(f"no real deployment without its proxy: {exc}")
    work = tmp_path_factory.mktemp("faults")
    os.chmod(work, 0o755)
    sites = write_federation(work / "data", 2, n_train=3, n_test=1, seed=4)
    before = set(processes_matching(*FLOWER_PROCESSES, "client.worker", "nginx: master"))
    with LocalFederation(work, sites) as federation:
        yield federation
    time.sleep(0.5)
    left = {p: c for p, c in processes_matching(*FLOWER_PROCESSES, "client.worker",
                                                "nginx: master").items() if p not in before}
    assert not left, f"processes left running: {left}"




def wait_gone(pids: set[int], limit: float) -> dict[int, str]:
    """Wait up to ``limit`` s for ``pids`` to end; those still running."""
    deadline = time.monotonic() + limit
    while True:
        running = {p: s for p in pids if (s := state_of(p)) not in (None, "Z")}
        if not running or time.monotonic() > deadline:
            return running
        time.sleep(0.2)


def started_tree(pid: int, limit: float = 90) -> set[int]:
    """``fedseg node`` ``pid`` and what it started, once its site worker and
    SuperNode are both up (the SuperNode runs in process isolation: it starts
    no superexec of its own, the worker is the node's executor)."""
    deadline = time.monotonic() + limit
    while True:
        tree = group_and_descendants(pid)
        cmds = " ".join(_cmdline(p) for p in tree)
        if "flower-supernode" in cmds and "client.worker" in cmds:
            return tree
        assert time.monotonic() < deadline, f"node {pid} did not start: {cmds}"
        time.sleep(0.2)


def wait_online(fed: LocalFederation, name: str, limit: float = 90) -> None:
    """Until the SuperLink lists hospital ``name`` as online."""
    from server.deployment import hospitals

    deadline = time.monotonic() + limit
    while not any(h["name"] == name and h["status"] == "online"
                  for h in hospitals(fed.state)):
        assert time.monotonic() < deadline, f"{name} never came online"
        time.sleep(0.5)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def node_of(fed: LocalFederation, name: str):
    """The ``fedseg node`` process of hospital ``name``."""
    needle = f"--name {name} "
    return next(p for p in fed.processes if needle in " ".join(p.args) + " ")


def test_a_node_killed_mid_run_the_run_finishes_without_it_and_it_rejoins(fed):
    node = node_of(fed, "hospital-b")
    tree = started_tree(node.pid)  # fedseg node, its worker and SuperNode
    killed = {}

    def kill_after_round_1(row):
        if row["round"] == 1 and not killed:
            os.kill(node.pid, signal.SIGKILL)  # only fedseg node: no cleanup code runs
            killed["left"] = wait_gone(tree - {node.pid}, 15)

    start = time.monotonic()
    summary = fed.run("killed", {**SMALL, "num-rounds": 3, "min-nodes": 1,
                                 "round-timeout": 10.0, "node-wait": 30.0},
                      on_round=kill_after_round_1, timeout=300)
    assert killed["left"] == {}, f"still running after fedseg node was killed: {killed}"
    node.wait(timeout=10)
    fed.processes.remove(node)
    fed.killed = [node]
    assert summary["rounds_completed"] == 3 and summary["stopped"] is None
    rows = read_metrics(fed.state.runs / "killed")
    assert rows[0]["trained"] == ["hospital-a", "hospital-b"]
    assert rows[-1]["trained"] == ["hospital-a"]
    # Its SuperNode ends by PDEATHSIG (SIGTERM) and may or may not reach the
    # SuperLink to sign off first: signed off, it is sent nothing more; not, a
    # round sent to it ends at round-timeout with "no reply". Either way every
    # failure is hospital-b's, and none is hospital-a's.
    failures = [f for r in rows for f in r["failures"]]
    assert all("at hospital-b" in f for f in failures), failures
    assert time.monotonic() - start < 90


def test_a_killed_node_restarted_at_once_rejoins(fed):
    """Restarted on its state folder right after being killed: where Flower
    still holds its last session (up to 2 x 30 s; its SuperNode, ended by
    PDEATHSIG, may not have signed off) the node retries until it is let in,
    saying why; either way it trains in the next run's rounds."""
    gone = [p for p in fed.killed if "hospital-b" in " ".join(p.args)]
    assert gone, "needs the node killed by the test before"
    args = gone[0].args
    port = int(args[args.index("--port") + 1])
    start = time.monotonic()
    fed.start_node("hospital-b", fed.sites[1], log="node-hospital-b-again.out", port=port,
                   index=1)
    log = fed.work / "node-hospital-b-again.out"
    while "SuperNode ID:" not in (log.read_text() if log.exists() else ""):
        assert time.monotonic() - start < 90, "the restarted node was never let in"
        time.sleep(0.5)  # (a message sent to its old session fails when that expires)
    fed.run("back", {**SMALL, "num-rounds": 1, "min-nodes": 2, "node-wait": 90.0},
            timeout=300)
    assert read_metrics(fed.state.runs / "back")[0]["trained"] == ["hospital-a", "hospital-b"]
    assert time.monotonic() - start < 90
    out = log.read_text()
    assert "not registered" not in out
    if NOT_ACTIVATED in out:  # the SuperLink still held its last session: retried, let in
        assert "did not stop cleanly last time" in out


def test_a_frozen_node_is_cut_off_by_the_round_timeout_and_its_late_reply_ignored(fed):
    """Hospital b frozen (SIGSTOP) through round 1: the round ends at
    ``round-timeout`` with a alone; b thaws during round 2 and answers round
    1's message late: that reply is discarded without harm."""
    import threading

    node = node_of(fed, "hospital-b")
    tree = started_tree(node.pid)
    wait_online(fed, "hospital-b")

    def thaw() -> None:
        for pid in tree:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass

    checkpoint = fed.state.runs / "frozen" / "checkpoint.pt"
    done = threading.Event()

    def thaw_after_round_1() -> None:  # b thaws in round 2
        while not checkpoint.exists() and not done.wait(0.2):
            pass
        thaw()

    for pid in tree:
        os.kill(pid, signal.SIGSTOP)
    watcher = threading.Thread(target=thaw_after_round_1, daemon=True)
    watcher.start()
    try:
        summary = fed.run("frozen", {**SMALL, "num-rounds": 2, "min-nodes": 1,
                                     "round-timeout": 20.0}, timeout=300)
    finally:
        done.set()
        watcher.join(timeout=5)
        thaw()
    rows = read_metrics(fed.state.runs / "frozen")
    assert rows[0]["trained"] == ["hospital-a"]
    # (frozen through the fingerprint too, b may have missed its heartbeat by round 1:
    # Flower then adds why to the "no reply")
    lost = [f for f in rows[0]["failures"] if f.startswith("train at hospital-b: no reply")]
    assert lost, rows[0]["failures"]
    if lost[0] == "train at hospital-b: no reply":  # nothing from Flower: the round's timeout
        assert 20.0 <= rows[0]["seconds"] < 60, rows[0]["seconds"]
    else:  # Flower found b's heartbeat gone and said so: the round may end before its timeout
        assert rows[0]["seconds"] < 60, (rows[0]["seconds"], lost)
    assert summary["rounds_completed"] == 2 and summary["stopped"] is None
    assert rows[1]["aggregated"] and "hospital-a" in rows[1]["trained"]
    assert not any("round 1" in f for f in rows[1]["failures"])  # the late reply: ignored


def test_the_superlink_killed_and_resumed_loses_no_completed_round(fed):
    crashed = {}

    def crash_after_round_1(row):
        if row["round"] == 1 and not crashed:
            before = processes_matching("flower-superlink", "flwr-serverapp", "nginx: master")
            fed.kill_superlink()
            crashed["left"] = wait_gone(set(before), 15)

    with pytest.raises(DeploymentError):
        fed.run("crash", {**SMALL, "num-rounds": 3, "min-nodes": 2}, on_round=crash_after_round_1,
                timeout=300)
    assert crashed["left"] == {}, f"SuperLink side still running: {crashed['left']}"
    kept = read_metrics(fed.state.runs / "crash")
    assert [r["round"] for r in kept] == [1]
    fed.start_superlink()  # same state folder; the nodes reconnect by themselves
    summary = fed.run("crash", {**SMALL, "num-rounds": 3, "min-nodes": 2, "resume": True,
                                "node-wait": 90.0}, timeout=300)
    rows = read_metrics(fed.state.runs / "crash")
    assert summary["rounds_completed"] == 3 and [r["round"] for r in rows] == [1, 2, 3]
    assert rows[0] == kept[0]  # the completed round, as it was
    assert all(r["trained"] == ["hospital-a", "hospital-b"] for r in rows[1:])


def test_sigterm_stops_a_node_and_everything_it_started(fed):
    """What systemd stop and Ctrl-C do: the node stops its worker, SuperNode
    and Flower's helpers, and exits 0."""
    node = node_of(fed, "hospital-a")
    tree = started_tree(node.pid)
    node.send_signal(signal.SIGTERM)
    assert node.wait(timeout=30) == 0
    fed.processes.remove(node)
    assert wait_gone(tree, 15) == {}

