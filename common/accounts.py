"""Local accounts the hospital's and the coordinator's commands run their parts
as, when started as root (``fedseg node``: the SuperNode's and the site
worker's; ``fedseg superlink``: the SuperLink's), and the checks, asked as
that account, that it can do its part before anything starts."""

from __future__ import annotations

import os
import pwd
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from common.errors import ConfigError

ROOT_APP = Path(__file__).resolve().parents[1]  # this install: client/, common/, server/


@dataclass(frozen=True)
class Account:
    """A local user processes run as, or files belong to."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]

    @classmethod
    def named(cls, name: str, missing: str) -> Account:
        """The account ``name``; a ConfigError saying ``missing`` where there is none."""
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            raise ConfigError(missing) from None
        return cls(name, entry.pw_uid, entry.pw_gid, tuple(os.getgrouplist(name, entry.pw_gid)))

    @classmethod
    def system(cls, name: str, role: str, command: str) -> Account:
        """A system account ``command`` (run as root) runs ``role`` as; missing,
        the error says how to create it."""
        return cls.named(name, (
            f"{command} runs as root, so it runs {role} as user {name!r}, which does not "
            f"exist on this machine; create it (useradd --system --no-create-home --shell "
            f"/usr/sbin/nologin {name}) or name another"))

    @classmethod
    def current(cls) -> Account:
        uid = os.geteuid()
        return cls(pwd.getpwuid(uid).pw_name, uid, os.getegid(), tuple(os.getgroups()))

    def popen_args(self) -> dict:
        return {"user": self.uid, "group": self.gid, "extra_groups": list(self.groups)}

    def _python(self, code: str, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", code, *args], cwd="/",
                              env={"PATH": os.environ.get("PATH", ""),
                                   "PYTHONPATH": str(ROOT_APP)},
                              capture_output=True, text=True, timeout=120, **self.popen_args())

    def can_list(self, folder: Path) -> bool:
        """Whether this account can list ``folder``."""
        return self._python("import os, sys; os.listdir(sys.argv[1])", str(folder)
                            ).returncode == 0

    def check_runs_install(self, role: str) -> None:
        """A ConfigError, saying what to do, unless this account can run this
        installed fedseg (its Python, its packages): an install under a folder
        only root may enter (``/root``) cannot start the parts it runs."""
        try:
            done = self._python("import common.config, flwr")
        except (OSError, subprocess.SubprocessError) as exc:
            done = None
            why = str(exc)
        else:
            why = (done.stderr.strip().splitlines() or ["no output"])[-1]
        if done is None or done.returncode != 0:
            raise ConfigError(
                f"user {self.name!r} ({role}) cannot run this fedseg install "
                f"({sys.executable}, {ROOT_APP}): {why[:200]}. Install fedseg where that "
                f"user can read it (e.g. /opt/fedseg), or let it pass through the folders "
                f"above (chmod o+x)")
