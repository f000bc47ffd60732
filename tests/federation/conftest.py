from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

# Flower's processes and every process of a Ray cluster: raylet and GCS, Ray's
# workers (ray::IDLE, ray::ClientAppActor...), its agents, monitors and
# dashboard (python .../site-packages/ray/...)
FLOWER_PROCESSES = ("flower-superlink", "flower-supernode", "flwr-simulation",
                    "flwr-serverapp", "flwr-clientapp", "raylet", "gcs_server", "ray::",
                    "site-packages/ray/")


def processes_matching(*needles: str) -> dict[int, str]:
    """PID -> command line of the processes whose command line holds a needle."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if any(n in cmd for n in needles):
            found[int(entry.name)] = cmd
    return found


def stop_pids(pids: list[int], grace: float = 10.0) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in pids):
            time.sleep(0.2)


@pytest.fixture
def no_leftover_processes():
    """Fail a test that leaves a Flower or Ray process behind (and stop those)."""
    before = set(processes_matching(*FLOWER_PROCESSES))
    yield
    deadline = time.monotonic() + 15  # a stopped cluster's workers take a moment to go
    while True:
        left = {p: c for p, c in processes_matching(*FLOWER_PROCESSES).items()
                if p not in before and state_of(p) not in (None, "Z")}
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    stop_pids(list(left))
    assert not left, f"processes left running: {left}"


def state_of(pid: int) -> str | None:
    """A process's state letter (Z: ended, not yet reaped), None once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2]
