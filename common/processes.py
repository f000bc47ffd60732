"""Starting and stopping Flower's processes: their environment, and stopping a
process group and everything it started; shared by the coordinator's and the
hospital's commands and the simulation driver (``common/supervisor.py``
supervises the commands' children with these).

Flower's helpers can outlive their parent (flower-superexec) or start their own
session (the simulation runtime and Ray's services under the SuperLink), so the
group alone is not enough: the processes descended from it are found through
``/proc`` first and stopped with it.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Mapping
from pathlib import Path


def base_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for Flower's processes: no telemetry, no run-time installs,
    this Python's scripts first on PATH (SuperNodes spawn ``flower-superexec``)."""
    env = dict(os.environ)
    env.update(
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        PYTHONUNBUFFERED="1",
    )
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.update(extra or {})
    return env


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


def _prctl():
    """libc's ``prctl``, or None off Linux (loaded once, before any fork)."""
    import ctypes

    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except OSError:
        return None


PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER = 1, 36


def child_dies_with_parent(sig: int = signal.SIGTERM):
    """A ``preexec_fn`` for ``subprocess.Popen``: the child gets ``sig`` when
    the process that started it dies, even by SIGKILL. It runs in the child
    after the user switch (``Popen(user=...)``), so the setting survives into
    the unprivileged program; it calls only libc (safe after fork), loaded
    here, before the fork. None where Linux's prctl is not available."""
    prctl = _prctl()
    if prctl is None:
        return None

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)

    return preexec


def become_subreaper() -> bool:
    """Make this process the reaper of its orphaned descendants (Linux), so a
    helper whose parent died comes back to us to be reaped instead of
    lingering as a zombie under a PID 1 that does not reap (a container)."""
    prctl = _prctl()
    return prctl is not None and prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0


def reap_orphans(own: set[int]) -> list[int]:
    """Reap every ended child that is not one of ``own`` (whose status their
    ``Popen`` reads): the orphans a subreaper inherits. Returns their pids."""
    reaped = []
    while True:
        try:
            info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return reaped
        if info is None:
            return reaped
        if info.si_pid in own:  # its Popen reaps it; look no further this time
            return reaped
        try:
            os.waitpid(info.si_pid, 0)
            reaped.append(info.si_pid)
        except ChildProcessError:
            pass


_watching = False


def exit_when_orphaned(what: str, grace: float = 5.0) -> None:
    """Start (once per process) a watchdog that ends this process when the
    process that started it is gone: Flower's ServerApp and ClientApp
    processes otherwise hang at exit, their threads retrying requests to a
    SuperLink or SuperNode that was killed (Flower's own parent monitor raises
    SIGINT, but the interpreter then waits for those threads forever). Each
    round is checkpointed before the next starts, so nothing done is lost."""
    global _watching
    if _watching:
        return
    _watching = True
    import threading

    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        print(f"fedseg: the process that started this {what} is gone; ending it in "
              f"{grace:.0f} s", file=sys.stderr, flush=True)
        time.sleep(grace)
        os._exit(1)

    threading.Thread(target=watch, name="fedseg-orphan-watch", daemon=True).start()


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask Linux to send ``sig`` to this process when its parent dies (also
    by SIGKILL), so a helper never outlives the command that started it.
    A no-op elsewhere."""
    import ctypes

    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, int(sig), 0, 0, 0)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    if os.getppid() == 1:  # the parent was already gone
        os.kill(os.getpid(), sig)
