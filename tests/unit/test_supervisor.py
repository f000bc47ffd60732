"""The one process supervisor (``fedseg node``, ``fedseg superlink``), with
real small processes: which child ended and its last lines, the rest stopped
with what they started, orphans reaped, SIGTERM forwarded or turned into an
interrupt that a second SIGTERM does not cut short."""

from __future__ import annotations

import os
import re
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from common.processes import PR_SET_CHILD_SUBREAPER, _prctl
from common.supervisor import Supervisor
from tests.federation.conftest import state_of

PY = sys.executable
READY = "import signal, sys, time; print('ready', flush=True); "


@pytest.fixture(autouse=True)
def no_subreaper_after():
    """The supervisor makes this process a subreaper; pytest should not stay one."""
    yield
    prctl = _prctl()
    if prctl is not None:
        prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)




def parent_of(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2:].split()[1])


def wait_for(condition, limit: float = 10.0) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_the_child_that_ends_is_reported_with_its_last_lines_and_the_rest_stopped(
        tmp_path, capsys):
    log = tmp_path / "node.log"
    with Supervisor(log=log, tail=3, grace=2) as sup:
        sleeper = sup.start("the sleeper", ["sleep", "30"])
        talker = sup.start("the talker", [PY, "-c", "for i in range(5): print('line', i)\n"
                                                    "raise SystemExit(3)"])
        ended = sup.wait_any(timeout=20)
        assert ended is talker and ended.returncode == 3
        assert sleeper.running()
    assert sleeper.returncode == -signal.SIGTERM and state_of(sleeper.pid) is None
    assert [line.split(" ", 1)[1] for line in talker.tail] == ["line 2\n", "line 3\n",
                                                               "line 4\n"]  # bounded
    lines = log.read_text().splitlines()
    assert len(lines) == 5 and re.fullmatch(r"\d\d:\d\d:\d\d\.\d{3} line 0", lines[0])
    assert "line 4" in capsys.readouterr().out


def test_a_grandchild_in_a_session_of_its_own_is_stopped_with_its_parent():
    spawn = ("import subprocess; p = subprocess.Popen(['sleep', '60'], "
             "start_new_session=True); print(p.pid, flush=True); p.wait()")
    with Supervisor(grace=2) as sup:
        child = sup.start("the parent", [PY, "-c", spawn])
        wait_for(lambda: child.text().strip() != "")
        grandchild = int(child.text().split()[-1])
        assert os.getpgid(grandchild) != os.getpgid(child.pid)  # out of its group
    assert state_of(grandchild) in (None, "Z")
    wait_for(lambda: state_of(grandchild) is None, 5)  # and reaped, not left a zombie


def test_an_orphan_comes_back_to_the_supervisor_and_is_reaped_while_it_waits():
    orphan = ("import subprocess; p = subprocess.Popen(['sleep', '0.5'], "
              "start_new_session=True); print(p.pid, flush=True)")
    with Supervisor(grace=2) as sup:
        sleeper = sup.start("the sleeper", ["sleep", "30"])
        parent = sup.start("the parent", [PY, "-c", orphan])
        assert sup.wait_any(timeout=20) is parent
        left = int(parent.text().split()[-1])
        sup.stop(parent)  # forgotten: only the sleeper is its own now
        assert sup.children == [sleeper]
        if state_of(left) is not None:
            assert parent_of(left) == os.getpid()  # the subreaper took it
        assert sup.wait_any(timeout=2.0, until=lambda: state_of(left) is None) is None
        assert state_of(left) is None  # ended and reaped, not a zombie


def test_sigterm_is_forwarded_to_every_child_which_ends_as_it_chooses():
    polite = READY + ("signal.signal(signal.SIGTERM, lambda *_: (print('bye', flush=True), "
                      "sys.exit(0))); time.sleep(30)")
    before = signal.getsignal(signal.SIGTERM)
    with Supervisor(grace=2) as sup:
        child = sup.start("the polite one", [PY, "-c", polite])
        sleeper = sup.start("the sleeper", ["sleep", "30"])
        wait_for(lambda: "ready" in child.text())
        os.kill(os.getpid(), signal.SIGTERM)  # as systemd stop or kill would
        wait_for(lambda: not child.running() and not sleeper.running())
        assert sup.stopping
        child.settle()
    assert child.returncode == 0 and "bye" in child.text()
    assert sleeper.returncode == -signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == before  # its handler is gone with it


def test_interrupt_mode_raises_once_and_a_second_sigterm_does_not_cut_the_stop_short():
    stubborn = READY + "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(30)"
    child = None
    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        with Supervisor(on_signal="interrupt", grace=2) as sup:
            child = sup.start("the SuperLink", [PY, "-c", stubborn])
            wait_for(lambda: "ready" in child.text())
            # the second one lands while the stubborn child is being stopped
            threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM)).start()
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(10)  # not reached: the first SIGTERM interrupts
    assert child is not None and child.returncode == -signal.SIGKILL  # after its grace
    assert time.monotonic() - start < 9


def test_settings_are_checked():
    with pytest.raises(ValueError, match="on_signal"):
        Supervisor(on_signal="ignore")  # type: ignore[arg-type]
