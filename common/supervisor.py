"""One supervisor for every command that starts children: ``fedseg node``
(the site worker and the SuperNode) and ``fedseg superlink`` (the SuperLink
and nginx).

Each child starts in a session (process group) of its own, so a signal to it
reaches everything it starts, and with PDEATHSIG, so it dies with this process
even when this process is killed outright (SIGKILL). The supervisor makes
this process the subreaper of what the children leave behind and reaps it
while it waits. Leaving the ``with`` block stops each child's group and
everything descended from it (:func:`~common.processes.stop_group`), the
last started first.

A child's output (``pump``) comes back line by line, each line stamped
``HH:MM:SS.mmm``, to this terminal, to a log file if one is given, and to the
child's own bounded tail (what explains its end). ``fedseg bench deploy``
reads the stamps.

SIGTERM and SIGINT, while the block runs:

* ``on_signal="forward"``: passed on to every child's group; the command
  sees its children end (the node: Flower's SuperNode leaves the SuperLink
  cleanly on SIGTERM, so its next start is not refused);
* ``on_signal="interrupt"``: ``KeyboardInterrupt`` in the command, once: it
  leaves the block, which stops every child (the superlink: Flower's
  SuperLink does not end on SIGTERM while it serves, so waiting for it would
  wait for nothing).

Either way a signal that comes while the children are being stopped never
cuts that short (a second SIGTERM from systemd or ``kill`` of the group):
it is forwarded again, or ignored.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

from common.processes import become_subreaper, child_dies_with_parent, reap_orphans, stop_group

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Account(Protocol):
    """A user a child runs as (``Popen``'s ``user``, ``group``, ``extra_groups``)."""

    def popen_args(self) -> dict[str, Any]: ...


def stamped(line: str, now: float | None = None) -> str:
    """``line`` with the wall-clock time in front: ``HH:MM:SS.mmm line``."""
    now = time.time() if now is None else now
    return f"{time.strftime('%H:%M:%S', time.localtime(now))}.{int(now % 1 * 1000):03d} {line}"


class Child:
    """A started child: its ``Popen``, its name in messages, its last lines."""

    def __init__(self, name: str, proc: subprocess.Popen, tail: int) -> None:
        self.name = name
        self.proc = proc
        self.tail: deque[str] = deque(maxlen=tail)  # its last stamped lines (pumped only)
        self.pump: threading.Thread | None = None
        self.stopped = False  # its group stopped by the supervisor

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        """Its exit status (negative: the signal that ended it), None while it runs."""
        return self.proc.poll()

    def running(self) -> bool:
        return self.proc.poll() is None

    def text(self) -> str:
        """Its last lines, as one string."""
        return "".join(self.tail)

    def settle(self, limit: float = 0.2) -> None:
        """Wait (up to ``limit`` s) for its last lines to come through."""
        if self.pump is not None:
            self.pump.join(limit)


class Supervisor:
    """``with Supervisor() as sup: child = sup.start(...); ended = sup.wait_any()``.

    ``log``: a file every pumped line is appended to too; ``tail``: lines kept
    per child; ``grace``: seconds a child's group has after SIGTERM before
    SIGKILL when stopped; ``echo``: pumped lines go to this process's stdout.
    """

    def __init__(self, *, on_signal: Literal["forward", "interrupt"] = "forward",
                 log: Path | None = None, tail: int = 40, grace: float = 10.0,
                 echo: bool = True, poll: float = 0.2) -> None:
        if on_signal not in ("forward", "interrupt"):
            raise ValueError(f"on_signal must be 'forward' or 'interrupt', not {on_signal!r}")
        if tail < 1 or grace < 0 or poll <= 0:
            raise ValueError(f"tail must be >= 1, grace >= 0 and poll > 0 (got {tail}, "
                             f"{grace}, {poll})")
        self.on_signal = on_signal
        self.log_path = Path(log) if log else None
        self.tail, self.grace, self.echo, self.poll = tail, grace, echo, poll
        self.children: list[Child] = []
        self._signalled = threading.Event()
        self._stopping_all = False
        self._lock = threading.Lock()
        self._log = None
        self._handlers: dict[int, Any] = {}

    @property
    def stopping(self) -> bool:
        """Whether a SIGTERM or SIGINT came while the block ran."""
        return self._signalled.is_set()

    def __enter__(self) -> Supervisor:
        become_subreaper()
        if self.log_path is not None:
            self._log = open(self.log_path, "a")  # noqa: SIM115 (closed on leaving)
        if threading.current_thread() is threading.main_thread():
            self._handlers = {s: signal.signal(s, self._on_signal) for s in SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.stop_all()
        finally:
            for sig, handler in self._handlers.items():
                signal.signal(sig, handler)
            self._handlers = {}
            with self._lock:
                if self._log is not None:
                    self._log.close()
                    self._log = None

    def _on_signal(self, signum: int, _frame: object) -> None:
        first = not self._signalled.is_set()
        self._signalled.set()
        if self.on_signal == "forward":
            for child in list(self.children):
                try:
                    os.killpg(child.pid, signum)
                except (ProcessLookupError, PermissionError):
                    pass
        elif first and not self._stopping_all:
            raise KeyboardInterrupt

    def start(self, name: str, cmd: Sequence[str], *, env: Mapping[str, str] | None = None,
              cwd: Path | None = None, account: Account | None = None, umask: int = -1,
              pump: bool = True, death_signal: int = signal.SIGTERM) -> Child:
        """Start ``cmd`` as child ``name`` (as ``account``, with ``umask``, when
        given). ``pump``: its output comes back through the supervisor (else
        it writes to this process's own stdout and stderr); ``death_signal``:
        what it gets when this process dies."""
        out = subprocess.PIPE if pump else None
        proc = subprocess.Popen(
            list(cmd), env=None if env is None else dict(env), cwd=cwd, stdout=out,
            stderr=subprocess.STDOUT if pump else None, text=pump,
            errors="replace" if pump else None, start_new_session=True, umask=umask,
            preexec_fn=child_dies_with_parent(death_signal),
            **(account.popen_args() if account is not None else {}))
        child = Child(name, proc, self.tail)
        self.children.append(child)
        if pump:
            child.pump = threading.Thread(target=self._pump, args=(child,), daemon=True,
                                          name=f"fedseg-pump-{proc.pid}")
            child.pump.start()
        return child

    def _pump(self, child: Child) -> None:
        assert child.proc.stdout is not None
        for raw in child.proc.stdout:
            line = stamped(raw)
            with self._lock:
                if self.echo:
                    sys.stdout.write(line)
                    sys.stdout.flush()
                if self._log is not None:
                    self._log.write(line)
                    self._log.flush()
                child.tail.append(line)

    def wait_any(self, timeout: float | None = None,
                 until: Callable[[], bool] | None = None) -> Child | None:
        """The first child found ended (its last lines through); None once
        ``until()`` holds or ``timeout`` seconds passed. Reaps orphans meanwhile."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            ended = next((c for c in self.children if not c.running()), None)
            if ended is not None:
                ended.settle()
                return ended
            if until is not None and until():
                return None
            if deadline is not None and time.monotonic() >= deadline:
                return None
            reap_orphans({c.pid for c in self.children})
            time.sleep(self.poll)

    def _stop(self, child: Child) -> None:
        child.stopped = True
        stop_group(child.pid, self.grace)
        try:
            child.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        child.settle(0.1)

    def stop(self, child: Child) -> None:
        """Stop ``child``'s group and what descends from it; forget the child."""
        self._stop(child)
        self.children.remove(child)

    def stop_all(self) -> None:
        """Stop every child's group, the last started first, and reap what is
        left; from here a signal no longer interrupts (it is still forwarded)."""
        self._stopping_all = True
        for child in reversed(self.children):
            if not child.stopped:
                self._stop(child)
        reap_orphans({c.pid for c in self.children if c.running()})
