"""A whole deployment on one machine, on 127.0.0.1: for tests and benchmarks.

Runs the same commands a coordinator and hospitals run (``fedseg superlink``,
``fedseg hospital register``, ``fedseg node``) as real processes, with TLS and
node authentication, and stops every process it started, by process group,
when it leaves its ``with`` block, also on error.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from common.processes import base_env
from server import deployment
from server.coordinator import LINK_USER
from server.processes import free_port, stop_process_group, wait_for_port
from server.provision import provision

RUN_USER, DATA_USER = "fedseg-run", "fedseg-data"  # as docs/deploy.md creates them


def ensure_user(name: str) -> None:
    """A system user without a home or login, made if missing (root only)."""
    try:
        pwd.getpwnam(name)
    except KeyError:
        if not shutil.which("useradd"):
            raise RuntimeError(f"user {name!r} is missing and useradd is not here") from None
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell",
                        "/usr/sbin/nologin", name], check=True, capture_output=True)


def open_path_to(path: Path) -> None:
    """Let every user pass through (not list) the folders above ``path``."""
    for folder in Path(path).resolve().parents:
        mode = folder.stat().st_mode
        if mode & 0o001 == 0:
            os.chmod(folder, mode | 0o001)


def hand_to_data_user(site: Path) -> None:
    """The site folder readable by the worker's user only, as a hospital sets it."""
    data = pwd.getpwnam(DATA_USER)
    for path in [site, *site.rglob("*")]:
        os.chown(path, data.pw_uid, data.pw_gid, follow_symlinks=False)
        if not path.is_symlink():
            os.chmod(path, path.stat().st_mode & 0o700 | (0o700 if path.is_dir() else 0))
    open_path_to(site)


class LocalFederation:
    """``with LocalFederation(work, sites) as fed: fed.run(...)``."""

    def __init__(self, work: Path, sites: list[Path], names: list[str] | None = None,
                 threads: int = 1, insecure: bool = False,
                 policies: dict[str, str] | None = None) -> None:
        self.work = Path(work)
        self.policies = policies or {}  # hospital name -> its policy file's text
        self.sites = [Path(s) for s in sites]
        self.names = names or [f"hospital-{chr(ord('a') + i)}" for i in range(len(sites))]
        self.threads = threads
        self.insecure = insecure
        self.port = free_port()  # the public port (nginx)
        self.local_port = free_port()  # the SuperLink's own, on 127.0.0.1
        self.state = deployment.State(self.work / "state")
        self.certs = self.work / "certs"
        self.processes: list[subprocess.Popen] = []

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def fedseg(self, *args: str, log: str) -> subprocess.Popen:
        """Start a ``fedseg`` command as its own process group."""
        out = open(self.work / log, "ab")
        proc = subprocess.Popen([sys.executable, "-m", "server.cli", *args], stdout=out,
                                stderr=subprocess.STDOUT, env=base_env(),
                                cwd=self.work, start_new_session=True)
        out.close()
        self.processes.append(proc)
        return proc

    def __enter__(self) -> LocalFederation:
        self.work.mkdir(parents=True, exist_ok=True)
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        if os.geteuid() == 0:  # nodes started as root run as the users a hospital makes
            for name in (RUN_USER, DATA_USER):
                ensure_user(name)
            for site in self.sites:
                hand_to_data_user(site)
            os.chmod(self.work, self.work.stat().st_mode | 0o005)
            open_path_to(self.work)
        provision(self.certs, ["127.0.0.1", "localhost"], self.names)
        self.start_superlink()
        if not self.insecure:
            for name in self.names:
                deployment.register(self.state, self.key(name).with_suffix(".pub"), name)
        for i, (name, site) in enumerate(zip(self.names, self.sites, strict=True)):
            extra: tuple[str, ...] = ()
            if name in self.policies:
                policy = self.work / f"policy-{name}.toml"
                policy.write_text(self.policies[name])
                extra = ("--policy", str(policy))
            self.start_node(name, site, log=f"node-{name}.out", port=free_port(), index=i,
                            extra=extra)

    def start_superlink(self) -> subprocess.Popen:
        """``fedseg superlink`` on this federation's state and ports (again,
        after :meth:`kill_superlink`: the nodes reconnect by themselves).
        As root, the SuperLink runs as :data:`LINK_USER`, made if missing."""
        if os.geteuid() == 0:
            ensure_user(LINK_USER)
        link = ["superlink", "--state", str(self.state.root), "--host", "127.0.0.1",
                "--port", str(self.port), "--local-port", str(self.local_port),
                "--link-user", LINK_USER]
        link += ["--insecure"] if self.insecure else ["--certs", str(self.certs / "superlink")]
        self.superlink = self.fedseg(*link, log="superlink.out")
        wait_for_port(self.port, self.superlink, "the SuperLink", self.work / "superlink.out")
        wait_for_port(self.local_port, self.superlink, "the SuperLink",
                      self.work / "superlink.out")
        return self.superlink

    def kill_superlink(self) -> None:
        """SIGKILL ``fedseg superlink`` alone, as a crash would: what it started
        must go with it (it takes them along itself)."""
        import signal

        self.superlink.send_signal(signal.SIGKILL)
        self.superlink.wait(timeout=10)
        self.processes.remove(self.superlink)

    def key(self, name: str) -> Path:
        return self.certs / "hospitals" / name / f"{name}.key"

    def start_node(self, name: str, site: Path, log: str, port: int, index: int = 0,
                   key: Path | None = None, insecure: bool | None = None,
                   extra: tuple[str, ...] = ()) -> subprocess.Popen:
        insecure = self.insecure if insecure is None else insecure
        args = ["node", "--superlink", self.address, "--data-dir", str(site), "--name", name,
                "--threads", str(self.threads), "--port", str(port),
                "--state", str(self.work / f"site-{name}-{port}"), *extra]
        if os.geteuid() == 0:
            args += ["--run-user", RUN_USER, "--data-user", DATA_USER]
        if insecure:
            args.append("--insecure")
        else:
            args += ["--key", str(key or self.key(name)), "--ca", str(self.certs / "ca" /
                                                                      "ca.crt")]
        return self.fedseg(*args, log=log)

    def run(self, name: str, overrides: dict[str, Any], timeout: float = 900,
            on_round=None) -> dict[str, Any]:
        return deployment.launch(self.state, name, overrides, on_round=on_round,
                                 timeout=timeout)

    def stop(self) -> None:
        for proc in reversed(self.processes):  # nodes first, the SuperLink last
            stop_process_group(proc)

    def __exit__(self, *exc: object) -> None:
        self.stop()
