"""Stopping a process group and everything it started: shared by the
coordinator's and the hospital's commands and the simulation driver.

Flower's helpers can outlive their parent (flower-superexec) or start their own
session (the simulation runtime and Ray's services under the SuperLink), so the
group alone is not enough: the processes descended from it are found through
``/proc`` first and stopped with it.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _table() -> dict[int, tuple[int, int, str]]:
    """pid -> (parent pid, process group, state) of every process (Linux ``/proc``)."""
    table = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
        table[int(entry.name)] = (int(fields[1]), int(fields[2]), fields[0])
    return table


def group_and_descendants(pgid: int) -> set[int]:
    """The processes of group ``pgid`` and all their descendants, in any group."""
    table = _table()
    found = {pid for pid, (_, group, _) in table.items() if group == pgid}
    while True:
        more = {pid for pid, (parent, _, _) in table.items()
                if parent in found and pid not in found}
        if not more:
            return found
        found |= more


def stop_group(pgid: int, grace: float = 10.0) -> None:
    """SIGTERM the process group ``pgid`` and every process descended from it,
    then SIGKILL what is left after ``grace`` seconds."""
    if Path("/proc/self/stat").exists():
        others = group_and_descendants(pgid)

        def running() -> bool:  # a zombie has ended; its parent reaps it
            return any(state != "Z" and (pid in others or group == pgid)
                       for pid, (_, group, state) in _table().items())
    else:  # no /proc: the group is all we can see
        others = set()

        def running() -> bool:
            return group_alive(pgid)

    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        for kill, target in ((os.killpg, pgid), *((os.kill, p) for p in others)):
            try:
                kill(target, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and running():
            time.sleep(0.1)
        if not running():
            return


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask Linux to send ``sig`` to this process when its parent dies (also
    by SIGKILL), so a helper never outlives the command that started it.
    A no-op elsewhere."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, int(sig), 0, 0, 0)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    if os.getppid() == 1:  # the parent was already gone
        os.kill(os.getpid(), sig)
