"""The coordinator's machine, started as root (docs/deploy.md, "The coordinator's
machine"): the SuperLink, its SuperExec and every ServerApp run as the link
user; only the coordinator's account reaches the SuperLink's local port (the
Control API); a ServerApp cannot read the CA's private key; the state, run
folders, logs and audit folder are closed to other accounts.

A real federation on 127.0.0.1 (two synthetic hospitals, TLS, node
authentication), a second local account (``fedseg-other``, made if missing),
and the iptables rule ``fedseg superlink`` installs."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from common.data.synthetic import write_federation
from common.errors import ConfigError
from common.processes import base_env
from server.coordinator import LocalPortGuard
from server.localfed import LINK_USER, LocalFederation, ensure_user
from server.processes import free_port
from server.proxy import nginx_binary
from server.simulation import APP_DIR
from server.wire import AUDIT_DIR_ENV
from tests.federation.conftest import FLOWER_PROCESSES, processes_matching

pytestmark = [pytest.mark.federation, pytest.mark.slow]

OTHER = "fedseg-other"  # a local account that is not the coordinator's


def iptables_rules() -> str:
    return subprocess.run(["iptables", "-w", "-S"], capture_output=True, text=True,
                          timeout=60).stdout


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("the coordinator's machine is hardened when fedseg superlink starts as "
                    "root (it switches users and installs a firewall rule); this test is not "
                    "root")
    if not (shutil.which("iptables") or os.access("/usr/sbin/iptables", os.X_OK)):
        pytest.skip("iptables is not installed (apt-get install iptables): no firewall rule "
                    "to test")
    if not shutil.which("useradd"):
        pytest.skip("useradd is not here: the test cannot make the link user and a second "
                    "local account")
    try:
        nginx_binary()
    except ConfigError as exc:
        pytest.skip(f"no real deployment without its proxy: {exc}")
    trial = LocalPortGuard(free_port(), [0])
    why = trial.install()
    trial.remove()
    if why:
        pytest.skip(f"no firewall rule can be installed here: {why}")
    ensure_user(OTHER)
    work = tmp_path_factory.mktemp("coordinator")
    sites = write_federation(work / "data", 2, n_train=3, n_test=2, seed=3)
    before = set(processes_matching(*FLOWER_PROCESSES))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(AUDIT_DIR_ENV, str(work / "audit"))
        with LocalFederation(work, sites) as fed:
            yield fed
    left = {p: c for p, c in processes_matching(*FLOWER_PROCESSES).items()
            if p not in before and str(work) in c}
    assert not left, f"processes left running: {left}"
    assert f"FEDSEG-{fed.local_port}" not in iptables_rules()  # removed on SIGTERM


@pytest.fixture(scope="module")
def other_home():
    """A home of the other account's own, with the federation's CA certificate
    (which every hospital holds) and a connection to the local address."""
    home = Path(tempfile.mkdtemp(prefix="fedseg-other-"))
    account = pwd.getpwnam(OTHER)
    os.chown(home, account.pw_uid, account.pw_gid)
    yield home
    shutil.rmtree(home, ignore_errors=True)


def uids(pid: int) -> list[int]:
    """Real, effective, saved and filesystem uid of a process."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return [int(u) for u in line.split()[1:]]
    raise AssertionError(f"no Uid line for {pid}")


def ours(federation, *needles: str) -> dict[int, str]:
    """This federation's processes whose command line holds every needle."""
    return {pid: cmd for pid, cmd in processes_matching(needles[0]).items()
            if str(federation.state.root) in cmd and all(n in cmd for n in needles)}


def flwr(home: Path, *args: str, user: str | None = None, cwd: Path | None = None
         ) -> subprocess.CompletedProcess:
    env = base_env({"FLWR_HOME": str(home), "HOME": str(home)})
    return subprocess.run(["flwr", *args, "--format", "json"], capture_output=True, text=True,
                          timeout=180, env=env, cwd=cwd or home, user=user,
                          group=pwd.getpwnam(user).pw_gid if user else None)


def succeeded(proc: subprocess.CompletedProcess) -> bool:
    try:
        return bool(json.loads(proc.stdout).get("success"))
    except ValueError:
        return False


def test_the_superlink_and_its_superexec_run_as_the_link_user(federation):
    link = pwd.getpwnam(LINK_USER).pw_uid
    superlink = ours(federation, "flower-superlink")
    superexec = ours(federation, "flower-superexec")
    assert len(superlink) == 1 and len(superexec) == 1, (superlink, superexec)
    for pid in [*superlink, *superexec]:
        assert uids(pid) == [link] * 4
    assert link != 0
    workers = {p for p, c in processes_matching("nginx: worker").items()
               if os.getpgid(p) == os.getpgid(next(iter(ours(federation, "nginx: master"))))}
    assert workers and all(uids(p)[0] == pwd.getpwnam("nobody").pw_uid for p in workers)


def test_only_the_coordinator_reaches_the_control_api(federation, other_home):
    shutil.copyfile(federation.certs / "ca" / "ca.crt", other_home / "ca.crt")
    (other_home / "config.toml").write_text(
        '[superlink]\ndefault = "x"\n\n[superlink.x]\n'
        f'address = "127.0.0.1:{federation.local_port}"\n'
        f'root-certificates = "{other_home / "ca.crt"}"\n')
    for path in (other_home / "ca.crt", other_home / "config.toml"):
        os.chown(path, pwd.getpwnam(OTHER).pw_uid, pwd.getpwnam(OTHER).pw_gid)
    # A plain TCP connection as the other account: reset on the local port, while
    # the public port (nginx) answers it: the firewall refuses, not the network.
    code = ("import socket, sys\n"
            "for port in sys.argv[1:]:\n"
            "    try:\n"
            "        socket.create_connection(('127.0.0.1', int(port)), timeout=10).close()\n"
            "        print(port, 'open')\n"
            "    except OSError as exc:\n"
            "        print(port, type(exc).__name__)\n")
    probe = subprocess.run([sys.executable, "-c", code, str(federation.local_port),
                            str(federation.port)], capture_output=True, text=True, timeout=60,
                           cwd=other_home, user=OTHER)
    assert probe.stdout.split("\n")[:2] == [f"{federation.local_port} ConnectionRefusedError",
                                            f"{federation.port} open"], probe.stdout
    with socket.create_connection(("127.0.0.1", federation.local_port), timeout=10):
        pass  # root's goes through
    listed = flwr(other_home, "ls", "x", user=OTHER)
    assert not succeeded(listed), listed.stdout[-800:]
    submitted = flwr(other_home, "run", str(APP_DIR), "x", user=OTHER)
    assert not succeeded(submitted) and "run-id" not in submitted.stdout, \
        submitted.stdout[-800:]
    own = flwr(federation.state.flwr_home, "ls", "fedseg")
    assert succeeded(own), own.stdout[-800:] + own.stderr[-800:]
    registered = flwr(federation.state.flwr_home, "supernode", "list", "fedseg")
    assert len(json.loads(registered.stdout)["nodes"]) == 2


PROBE = '''
    # The probe: what a submitted ServerApp gets when it reads the CA's key.
    try:
        got = open(CA_KEY, "rb").read()
        outcome = "read " + got.hex()
    except OSError as exc:
        outcome = type(exc).__name__
    import os
    import time
    folder = runs_root() / "probe"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "outcome.json").write_text(
        __import__("json").dumps({"outcome": outcome, "uid": os.getuid()}))
    log(INFO, "probe: %s", outcome)
    for _ in range(300):  # until the test has seen this process
        if (folder / "release").exists():
            break
        time.sleep(0.1)
    return
'''


def test_a_serverapp_runs_as_the_link_user_and_cannot_read_the_ca_key(federation, tmp_path):
    """The coordinator submits a copy of the app whose ServerApp opens
    certs/ca/ca.key: it runs as the link user and gets a permission error, and
    nothing of the key reaches the state folder, its logs or the run folder."""
    ca_key = federation.certs / "ca" / "ca.key"
    key = ca_key.read_bytes()
    body = key.split(b"\n")[1]  # a line of the PEM's base64 body
    evil = tmp_path / "evil"
    for package in ("client", "common", "server"):
        shutil.copytree(APP_DIR / package, evil / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(APP_DIR / "pyproject.toml", evil / "pyproject.toml")
    app = evil / "server" / "app.py"
    text = app.read_text()
    signature = "def main(grid: Grid, context: Context) -> None:\n"
    assert signature in text
    text = text.replace(signature, signature + PROBE)
    app.write_text(text.replace("app = ServerApp()",
                                f"app = ServerApp()\nCA_KEY = {str(ca_key)!r}"))
    log = tmp_path / "flwr-run.out"
    with open(log, "wb") as out:
        run = subprocess.Popen(
            ["flwr", "run", str(evil), "fedseg", "--stream", "--run-config",
             'run-name="probe" num-rounds=1'], stdout=out, stderr=subprocess.STDOUT, cwd=evil,
            env=base_env({"FLWR_HOME": str(federation.state.flwr_home)}),
            start_new_session=True)
    outcome = federation.state.runs / "probe" / "outcome.json"
    try:
        deadline = time.monotonic() + 180
        while not outcome.exists() and time.monotonic() < deadline and run.poll() is None:
            time.sleep(0.2)
        assert outcome.exists(), log.read_text()[-2000:]
        time.sleep(0.2)  # its whole text
        serverapps = ours(federation, "flwr-serverapp")
        assert serverapps, processes_matching("flwr-serverapp")
        link = pwd.getpwnam(LINK_USER).pw_uid
        assert all(uids(pid) == [link] * 4 for pid in serverapps)
        (outcome.parent / "release").touch(mode=0o600)
        assert run.wait(timeout=180) == 0, log.read_text()[-2000:]
        (outcome.parent / "release").unlink()
    finally:
        if run.poll() is None:
            os.killpg(run.pid, 9)
    assert json.loads(outcome.read_text()) == {"outcome": "PermissionError", "uid": link}
    needles = [key, body, key.hex().encode()]
    server_side = [p for root in (federation.state.root, federation.work / "audit")
                   for p in root.rglob("*") if p.is_file()]
    server_side += [federation.work / "superlink.out", log]
    assert len(server_side) > 5
    assert [str(p) for p in server_side if any(n in p.read_bytes() for n in needles)] == []


def world_bits(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode) & 0o007


def test_a_run_keeps_its_folders_from_other_accounts(federation):
    """A real round: the ServerApp (the link user) writes the run folder and the
    audit folder, the coordinator (root here) reads the summary; other accounts
    can open none of it."""
    summary = federation.run("closed", {"num-rounds": 1, "local-epochs": 1}, timeout=400)
    assert summary["rounds_completed"] == 1  # the coordinator read what the ServerApp wrote
    state, link = federation.state, pwd.getpwnam(LINK_USER).pw_uid
    audit = federation.work / "audit"
    closed = [state.database, state.runs, state.runs / "closed", state.logs, state.link,
              state.tls / "server.key", audit]
    kept = [p for top in (state.runs, state.logs, state.link, audit)
            for p in top.rglob("*") if not p.is_symlink()]
    assert state.database.exists() and len(list(audit.iterdir())) >= 4
    assert {p.name for p in (state.runs / "closed").iterdir()} >= {"summary.json",
                                                                 "final_model.pt"}
    opened = [str(p) for p in closed + kept if world_bits(p)]
    assert opened == []
    owners = {p: p.lstat().st_uid for p in [state.database, state.runs / "closed",
                                            state.runs / "closed" / "summary.json",
                                            state.logs / "superlink.log", audit,
                                            *audit.iterdir()]}
    assert set(owners.values()) == {link}, owners
    ca_key = federation.certs / "ca" / "ca.key"
    assert ca_key.stat().st_uid == 0 and stat.S_IMODE(ca_key.stat().st_mode) == 0o600
    # and, asked as the other account, the state folder's parts do not open
    code = ("import os, sys\n"
            "for p in sys.argv[1:]:\n"
            "    try:\n"
            "        os.listdir(p) if os.path.isdir(p) else open(p, 'rb').read(1)\n"
            "        print('opened', p)\n"
            "    except OSError:\n"
            "        pass\n")
    tried = [state.root, state.database, state.runs, state.runs / "closed" / "summary.json",
             state.logs, state.tls / "server.key", audit, state.registry]
    asked = subprocess.run([sys.executable, "-c", code, *map(str, tried)], capture_output=True,
                           text=True, timeout=60, cwd="/", user=OTHER)
    assert asked.returncode == 0 and asked.stdout == "", asked.stdout + asked.stderr


def test_a_chain_left_by_a_killed_superlink_is_replaced_not_doubled(federation):
    port = free_port()
    left = LocalPortGuard(port, [0])
    try:
        assert left.install() is None
        assert LocalPortGuard(port, [0, 1]).install() is None  # the next start, same port
        rules = iptables_rules()
        assert rules.count(f"-j FEDSEG-{port}") == 1
        assert f"-A FEDSEG-{port} -m owner --uid-owner 1 -j RETURN" in rules
    finally:
        left.remove()
    assert f"FEDSEG-{port}" not in iptables_rules()
