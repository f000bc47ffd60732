"""The coordinator's machine: who runs the SuperLink, who may reach it, who may
read what it keeps.

Flower 1.42's open-source SuperLink serves its Control API (runs, node keys)
on the same local port as everything else, with no account authentication,
and runs every submitted ServerApp as its own user. Started as root,
``fedseg superlink`` therefore

* runs ``flower-superlink``, and so Flower's SuperExec and every ServerApp,
  as an unprivileged user (``--link-user``, default ``fedseg-link``) that
  owns only what the SuperLink writes: ``link/`` (its database, its copies of
  the TLS server key and certificate, its Flower home), ``runs/``, ``logs/``
  and the audit folder. The CA's private key and the coordinator's own files
  stay out of its reach;
* lets the coordinator's account (root, or ``--coordinator-user``) read and
  write run folders and logs through their group, and nobody else in;
* closes the SuperLink's local port (127.0.0.1:``--local-port``, where the
  Control, Runtime and Fleet APIs all answer) to every other local account
  with an iptables chain matched on the connecting process's user
  (:class:`LocalPortGuard`).

Without root none of this is possible: everything runs as the starting user,
the state stays private to it, and one warning line says what is left open.
"""

from __future__ import annotations

import grp
import os
import pwd
import shlex
import shutil
import stat
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from common.accounts import Account
from common.errors import ConfigError
from server.deployment import State

LINK_USER = "fedseg-link"  # --link-user's default, as docs/deploy.md creates it
SHARED_DIR, SHARED_FILE = 0o2770, 0o660  # runs/, logs/, audit: the link user and the
# coordinator's group (setgid: what the ServerApp writes keeps that group)
PRIVATE_DIR, PRIVATE_FILE = 0o700, 0o600  # link/, and everything when not root
LINK_UMASK = 0o007  # what the link user's processes create: its own and the group's


@dataclass(frozen=True)
class Roles:
    """Who is who on the coordinator's machine, started as root."""

    link: Account  # the SuperLink, its SuperExec and every ServerApp
    coordinator: Account  # owns the state folder; may use the Control API

    @classmethod
    def resolve(cls, link_user: str, coordinator_user: str | None) -> Roles | None:
        """The accounts, checked; None when not root (no user can be switched to)."""
        if os.geteuid() != 0:
            return None
        link = Account.system(link_user, "the SuperLink, its SuperExec and every ServerApp "
                                         "(--link-user)", "fedseg superlink")
        coordinator = Account.current() if coordinator_user is None else Account.named(
            coordinator_user, f"--coordinator-user {coordinator_user!r} does not exist on "
                              f"this machine")
        if link.uid == 0:
            raise ConfigError(f"--link-user {link_user!r} is root: the ServerApps a run "
                              f"submits must not run as root; name an unprivileged user")
        if link.uid == coordinator.uid:
            raise ConfigError(f"--link-user and --coordinator-user are both {link_user!r}: "
                              f"the ServerApps' user must not be the coordinator's account")
        link.check_runs_install("the SuperLink")
        return cls(link, coordinator)


def _settle(top: Path, uid: int | None, gid: int | None, dir_mode: int,
            file_mode: int) -> None:
    """``top`` and everything under it owned by ``uid:gid`` (when given), folders
    ``dir_mode``, files ``file_mode`` (keeping their owner's and group's
    execute bits where ``file_mode`` lets them read). Symbolic links are
    re-owned, never followed."""
    if not top.exists():
        return

    def one(path: Path) -> None:
        info = os.lstat(path)
        if uid is not None:
            os.chown(path, uid, gid, follow_symlinks=False)
        if stat.S_ISDIR(info.st_mode):
            os.chmod(path, dir_mode)
        elif stat.S_ISREG(info.st_mode):
            execute = stat.S_IMODE(info.st_mode) & (file_mode >> 2) & 0o110
            os.chmod(path, file_mode | execute)

    one(top)
    for folder, dirs, files in os.walk(top, followlinks=False):
        for name in [*dirs, *files]:
            one(Path(folder) / name)


def _move_old_database(state: State) -> None:
    """A state folder of an older fedseg keeps its database at the top: move it
    into ``link/`` (SQLite writes its journal beside it, so its folder must be
    the link user's own)."""
    old = state.root / state.database.name
    if old.is_file() and not state.database.exists():
        for suffix in ("", "-journal", "-wal", "-shm"):
            if Path(f"{old}{suffix}").exists():
                os.replace(f"{old}{suffix}", f"{state.database}{suffix}")


def prepare_state(state: State, roles: Roles | None, certs: Path | None,
                  audit: Path | None) -> Path | None:
    """Give every part of the state folder (and the audit folder) to the
    process that uses it, with no access for anyone else; returns the folder
    of the SuperLink's own copies of ``certs`` (None without TLS)."""
    for folder in (state.link, state.link_home, state.link_flwr_home, state.tls):
        folder.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
    _move_old_database(state)
    tls = None
    if certs is not None:
        tls = state.tls
        for name in ("ca.crt", "server.pem", "server.key"):
            (tls / name).unlink(missing_ok=True)
            fd = os.open(tls / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                         PRIVATE_FILE)  # private from the first byte
            with os.fdopen(fd, "wb") as copy:
                copy.write((Path(certs) / name).read_bytes())
    shared = [state.runs, state.logs, *([audit] if audit else [])]
    if audit:
        audit.mkdir(parents=True, exist_ok=True)
    if roles is None:  # everything is this user's own
        os.chmod(state.root, PRIVATE_DIR)
        for top in [state.flwr_home, state.link, *shared]:
            _settle(top, None, None, PRIVATE_DIR, PRIVATE_FILE)
        if state.registry.exists():
            os.chmod(state.registry, PRIVATE_FILE)
        return tls
    link, coordinator = roles.link, roles.coordinator
    # The top: the coordinator's, entered by the link user's group (it reads
    # hospitals.json) and passed through by nginx's workers (their temp folders
    # are in proxy/); listed by no one else.
    os.chown(state.root, coordinator.uid, link.gid)
    os.chmod(state.root, 0o2751)
    _settle(state.flwr_home, coordinator.uid, coordinator.gid, PRIVATE_DIR, PRIVATE_FILE)
    if state.registry.exists():
        os.chown(state.registry, coordinator.uid, link.gid, follow_symlinks=False)
        if not state.registry.is_symlink():
            os.chmod(state.registry, 0o640)
    _settle(state.link, link.uid, link.gid, PRIVATE_DIR, PRIVATE_FILE)
    for top in shared:
        _settle(top, link.uid, coordinator.gid, SHARED_DIR, SHARED_FILE)
    return tls


def uids_allowed(roles: Roles, proxy_user: str) -> list[int]:
    """Who may open a connection to the SuperLink's local port: root, the
    coordinator, the link user (its SuperExec and ServerApps reach the
    SuperLink there) and nginx's workers (they forward the Fleet API to it)."""
    return sorted({0, roles.coordinator.uid, roles.link.uid, pwd.getpwnam(proxy_user).pw_uid})


def group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


class LocalPortGuard:
    """An iptables chain that lets only ``uids`` open TCP connections to
    ``port`` over the loopback interface; every other attempt gets a TCP reset.

    The owner match sees the user of the process that opens the connection, so
    it needs no help from the server behind the port. Only connection openings
    (SYN) are checked: nothing reaches the port without one. The chain is
    named after the port, so a chain left by a killed run on that port is
    removed before a new one is made.
    """

    def __init__(self, port: int, uids: Iterable[int], binary: str = "iptables") -> None:
        self.port = port
        self.uids = sorted(set(uids))
        self.binary = binary
        self.chain = f"FEDSEG-{port}"
        self.hook = ["-o", "lo", "-p", "tcp", "--dport", str(port), "--syn"]
        self.installed = False

    def rules(self) -> list[list[str]]:
        """The iptables arguments that make the chain and hook it, in order."""
        allow = [["-A", self.chain, "-m", "owner", "--uid-owner", str(uid), "-j", "RETURN"]
                 for uid in self.uids]
        return [["-N", self.chain], *allow,
                ["-A", self.chain, "-p", "tcp", "-j", "REJECT", "--reject-with", "tcp-reset"],
                ["-I", "OUTPUT", "1", *self.hook, "-j", self.chain]]

    def _path(self) -> str | None:
        return shutil.which(self.binary) or next(
            (p for p in (f"/usr/sbin/{self.binary}", f"/sbin/{self.binary}")
             if os.access(p, os.X_OK)), None)

    def _call(self, args: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run([self._path() or self.binary, "-w", *args], capture_output=True,
                              text=True, timeout=60)

    def install(self) -> str | None:
        """Make the chain; None when it is in place, else why not (nothing is left)."""
        if os.geteuid() != 0:
            return "not started as root"
        if self._path() is None:
            return (f"{self.binary} is not installed (apt-get install iptables; dnf install "
                    f"iptables-nft)")
        self.remove()  # a chain a killed run left on this port
        for rule in self.rules():
            done = self._call(rule)
            if done.returncode != 0:
                self.remove()
                return f"{self.binary} {shlex.join(rule)} failed: {done.stderr.strip()}"
        self.installed = True
        return None

    def remove(self) -> None:
        """Unhook and delete the chain, whoever made it."""
        if os.geteuid() != 0 or self._path() is None:
            return
        listed = self._call(["-S", "OUTPUT"])
        for line in listed.stdout.splitlines():
            words = shlex.split(line)
            if words[:2] == ["-A", "OUTPUT"] and words[-2:] == ["-j", self.chain]:
                self._call(["-D", *words[1:]])
        self._call(["-F", self.chain])
        self._call(["-X", self.chain])
        self.installed = False
