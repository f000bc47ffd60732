"""Starting, following and stopping Flower's processes (shared by simulation,
deployment and the one-machine federation)."""

from __future__ import annotations

import json
import numbers
import socket
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np

from common.errors import FedsegError
from common.processes import stop_group
from server.runs import read_metrics


class ProcessError(FedsegError):
    kind = "process error"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def toml_value(value: Any) -> str:
    """A scalar as ``flwr run --run-config`` reads it."""
    if isinstance(value, bool | np.bool_):
        return "true" if value else "false"
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        return repr(float(value))
    return json.dumps(str(value))


def run_config_arg(config: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={toml_value(v)}" for k, v in config.items())


def stop_process_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """Stop the process group started for ``proc`` (``start_new_session``)."""
    stop_group(proc.pid, grace)
    proc.wait(timeout=5)


def wait_for_port(port: int, proc: subprocess.Popen, what: str, log_path: Path,
                  limit: float = 60, host: str = "127.0.0.1") -> None:
    """Wait until ``proc`` listens on ``host``:``port``."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ProcessError(f"{what} exited with code {proc.returncode}; see {log_path}")
        with socket.socket() as s:
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.2)
    raise ProcessError(f"{what} did not open port {port} within {limit:.0f} s; see {log_path}")


def run_and_follow(cmd: list[str], *, env: Mapping[str, str], cwd: Path, log: IO[bytes],
                   run_dir: Path, on_round: Callable[[dict[str, Any]], None] | None,
                   timeout: float | None, local_log: Path | None = None,
                   on_local: Callable[[str], None] | None = None) -> int:
    """Run ``cmd`` (``flwr run ... --stream``) and call ``on_round`` with each new
    line of ``run_dir/metrics.jsonl`` until it exits; returns its exit code.
    ``on_local`` gets each new line of ``local_log`` (a simulation's sites'
    own errors). The command's process group is stopped on timeout, error or
    Ctrl-C."""
    seen = {row["round"] for row in read_metrics(run_dir)}
    shown = local_log.stat().st_size if local_log and local_log.exists() else 0
    deadline = time.monotonic() + timeout if timeout else None
    proc = subprocess.Popen(cmd, env=dict(env), cwd=cwd, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        while True:
            done = proc.poll() is not None
            if local_log is not None and local_log.exists():
                with open(local_log, "rb") as fh:
                    fh.seek(shown)
                    chunk = fh.read()
                complete = chunk[:chunk.rfind(b"\n") + 1]
                shown += len(complete)
                for line in complete.decode(errors="replace").splitlines():
                    if on_local:
                        on_local(line)
            for row in read_metrics(run_dir):
                if row["round"] not in seen:
                    seen.add(row["round"])
                    if on_round:
                        on_round(row)
            if done:
                return proc.returncode
            if deadline and time.monotonic() > deadline:
                raise ProcessError(f"the run passed its time limit of {timeout:.0f} s")
            time.sleep(0.5)
    finally:
        stop_process_group(proc)
