#!/usr/bin/env python3
"""Set up fedseg in ./.venv (once) and run a command in it. Needs only Python 3.11+ and pip.

    python3 bootstrap.py demo            # the demo federation
    python3 bootstrap.py test [ARGS]     # the test suite (ARGS go to pytest)
    python3 bootstrap.py fedseg ARGS     # any fedseg command
    python3 bootstrap.py env             # print the environment lines to source

torch is installed first, pinned, so that a CPU machine takes the CPU wheel
instead of a build with several GB of CUDA packages. Everything is written
inside this folder: the virtual environment, pip's cache, Flower's home, Ray's
temporary files, synthetic data and run folders.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
HOME = ROOT / ".fedseg"
TORCH = "torch==2.13.0"


def python() -> Path:
    return VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def environment() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        FEDSEG_HOME=str(HOME),
        FLWR_HOME=str(HOME / "flwr"),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        RAY_USAGE_STATS_ENABLED="0",
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",  # keep Ray's services on 127.0.0.1
        TORCHINDUCTOR_CACHE_DIR=str(HOME / "torchinductor"),
        PIP_CACHE_DIR=str(HOME / "pip-cache"),
        XDG_CACHE_HOME=str(HOME / "cache"),
        MPLCONFIGDIR=str(HOME / "matplotlib"),
        TORCH_HOME=str(HOME / "torch"),
    )
    env["PATH"] = str(python().parent) + os.pathsep + env.get("PATH", "")
    return env


def setup() -> None:
    stamp = VENV / ".fedseg-installed"
    want = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if stamp.exists() and stamp.read_text() == want and python().exists():
        return
    HOME.mkdir(exist_ok=True)
    if not python().exists():
        print(f"bootstrap: creating {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True, clear=False).create(VENV)
    env = environment()
    pip = [str(python()), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    print(f"bootstrap: installing {TORCH} first, then fedseg and its dependencies", flush=True)
    subprocess.run([*pip, TORCH], check=True, env=env)
    subprocess.run([*pip, "-e", f"{ROOT}[dev]"], check=True, env=env, cwd=ROOT)
    stamp.write_text(want)


def main(argv: list[str]) -> int:
    if sys.version_info < (3, 11):  # noqa: UP036 - this file runs before any venv
        print("bootstrap: fedseg needs Python 3.11 or newer", file=sys.stderr)
        return 2
    command, rest = (argv[0], argv[1:]) if argv else ("demo", [])
    if command == "env":
        for key in ("FEDSEG_HOME", "FLWR_HOME", "FLWR_TELEMETRY_ENABLED",
                    "FLWR_DISABLE_UPDATE_CHECK", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION",
                    "PATH"):
            print(f"export {key}={environment()[key]!r}")
        return 0
    setup()
    env = environment()
    if command == "demo":
        cmd = [str(python()), "-m", "server.cli", "demo", *rest]
    elif command == "test":
        cmd = [str(python()), "-m", "pytest", *rest]
    elif command == "fedseg":
        cmd = [str(python()), "-m", "server.cli", *rest]
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return subprocess.run(cmd, env=env, cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
