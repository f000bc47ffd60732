"""The hospital's side of a deployment: the site worker and a SuperNode.

``fedseg node`` checks what it can before Flower starts (the data folder, the
key, the CA certificate, that the SuperLink answers and that its certificate
is the federation's), then starts two processes and supervises them:

* the site worker (``client/worker.py``), from this installed fedseg: the
  only reader of the data folder, and the node's executor: it answers every
  message the SuperNode receives with this installed fedseg
  (``client/executor.py``); no code of the coordinator's app bundle runs here;
* ``flower-supernode`` in process isolation (``--isolation process``): it
  talks to the SuperLink and keeps the messages for the executor on its local
  Runtime API, which only a holder of the SuperExec auth secret (made here,
  at each start) may claim work from. It starts no process of its own.

Started as root (a service), it runs the worker as ``--data-user`` and the
SuperNode as ``--run-user``, and refuses to start unless the run user cannot
read the data folder and the data user can; the node's private key is the
SuperNode's alone (its user's, mode 0600, in a folder only it enters): no
other process of the node can open it. Containment by the operating system,
not by convention.

Hospitals only connect out: the SuperNode opens one outbound HTTPS connection
to the SuperLink and polls it; nothing connects in. Its local Runtime API port
(``--port``) listens on 127.0.0.1 only.

The site state folder (``--state``) holds what the node keeps: the audit log
of every message that left (``fedseg node audit``), the site's privacy
ledger, the models it kept, its prepared cases (``prepared/``, the worker's
alone: ``common/data/store.py``), the SuperNode's Flower home. Never inside
the data folder.
"""

from __future__ import annotations

import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from common.accounts import Account
from common.errors import ConfigError, FedsegError
from common.supervisor import Child, Supervisor


class NodeError(FedsegError):
    kind = "node error"


@dataclass(frozen=True)
class NodeSettings:
    superlink: str  # host:port
    data_dir: Path
    name: str
    key: Path | None
    ca: Path | None
    insecure: bool = False
    threads: int = 0  # 0: all cores of this machine
    device: str = "auto"
    port: int = 9094  # local Runtime API port
    max_wait: float | None = None  # give up connecting after this many seconds
    state: Path = Path("fedseg-site-node")  # the site's own state (audit log, ledger, Flower home)
    policy: Path | None = None  # the hospital's policy file (client/policy.py)
    run_user: str = "fedseg-run"  # as root: the SuperNode's user
    data_user: str | None = None  # as root: the worker's user (default: the data's owner)


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--superlink must be host:port, got {address!r}")
    return host.strip("[]"), int(port)


def preflight(settings: NodeSettings, check=None) -> None:
    """Fail early, in plain words, on what Flower would report obscurely.
    ``check``: the data folder's ``SiteCheck`` (``common.data.check``), read
    here if not given; a site without a usable training case does not join."""
    if check is None:
        from common.data.check import check_site

        check = check_site(settings.data_dir)
    for why in check.split_errors.values():
        raise NodeError(f"the data folder is not usable: {why}")
    if not check.can_join:
        reasons = "; ".join(f"#{c.index} {c.case_id!r}: {c.problem}" for c in check.cases
                            if c.split == "training")
        raise NodeError(f"the data folder has no usable training case, so this node does not "
                        f"join ({reasons}); `fedseg site check {settings.data_dir}` lists "
                        f"every case")
    print(f"fedseg node: data folder {settings.data_dir}: {check.summary()}", flush=True)
    if not settings.insecure:
        if settings.key is None or settings.ca is None:
            raise ConfigError("a node needs --key (its private key) and --ca (the federation's "
                              "CA certificate); --insecure only for a test without TLS")
        _check_key(settings.key)
        if not Path(settings.ca).is_file():
            raise ConfigError(f"CA certificate {settings.ca} not found")
    host, port = split_address(settings.superlink)
    try:
        with socket.create_connection((host, port), timeout=10) as sock:
            if settings.insecure:
                if _speaks_tls(sock, host):
                    raise NodeError(
                        f"the SuperLink at {settings.superlink} requires TLS and node "
                        f"authentication: a node without TLS is refused. Start with --ca "
                        f"and --key instead of --insecure"
                    )
            else:
                context = ssl.create_default_context(cafile=str(settings.ca))
                try:
                    with context.wrap_socket(sock, server_hostname=host):
                        pass
                except ssl.SSLCertVerificationError as exc:
                    raise NodeError(
                        f"the SuperLink at {settings.superlink} does not present a certificate "
                        f"of this federation for {host!r} ({exc.verify_message}): check --ca "
                        f"and that the address is one of the certificate's names"
                    ) from None
                except ssl.SSLError as exc:
                    raise NodeError(f"TLS with the SuperLink at {settings.superlink} failed "
                                    f"({exc.reason}): is it started without TLS?") from None
    except OSError as exc:
        if isinstance(exc, NodeError):
            raise
        raise NodeError(
            f"cannot reach the SuperLink at {settings.superlink} ({exc.strerror or exc}): check "
            f"the address and that this machine may connect out to that port"
        ) from None


def _speaks_tls(sock: socket.socket, host: str) -> bool:
    """Whether the server completes a TLS handshake (certificate not checked)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with context.wrap_socket(sock, server_hostname=host):
            return True
    except (ssl.SSLError, OSError):
        return False


def _check_key(path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key

    try:
        key = load_ssh_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the private key {path}: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{path} is not an ECDSA key (make one with fedseg provision or keygen)")
    if os.name == "posix" and Path(path).stat().st_mode & 0o077:
        print(f"fedseg node: warning: {path} is readable by other users; chmod 600 it",
              file=sys.stderr)


@dataclass(frozen=True)
class SiteState:
    """The site's state folder, and who runs what (``users`` None: not root,
    everything runs as the user who started the node)."""

    root: Path
    users: tuple[Account, Account] | None  # (run, data)

    @property
    def worker(self) -> Path:
        """The worker's own folder: its copy of the secret, its ready mark."""
        return self.root / "worker"

    @property
    def ready(self) -> Path:
        return self.worker / "ready"

    @property
    def audit(self) -> Path:
        return self.root / "audit" / "audit.jsonl"

    @property
    def ledger(self) -> Path:
        """The site's privacy ledger (``client/privacy.py``), across all runs."""
        return self.root / "privacy" / "ledger.json"

    @property
    def supernode(self) -> Path:
        return self.root / "supernode"

    @property
    def models(self) -> Path:
        """The runs' final models the site kept, each with its model card."""
        return self.root / "models"

    @property
    def prepared(self) -> Path:
        """The site's prepared cases (resampled, normalised: ``common/data/store.py``),
        the worker's alone: they are the site's images."""
        return self.root / "prepared"

    @property
    def worker_home(self) -> Path:
        """The worker's own caches (torch, matplotlib): its user's, not the install's."""
        return self.root / "worker-home"


def resolve_users(settings: NodeSettings) -> tuple[Account, Account] | None:
    """As root: the (run, data) accounts, checked to contain the data folder."""
    if os.geteuid() != 0:
        return None
    run = Account.system(settings.run_user, "the SuperNode", "fedseg node")
    data_name = settings.data_user or pwd.getpwuid(Path(settings.data_dir).stat().st_uid
                                                   ).pw_name
    data = Account.system(data_name, "the site worker", "fedseg node")
    if run.uid == 0 or data.uid == 0:
        who = "--run-user" if run.uid == 0 else "--data-user (default: the data folder's owner)"
        raise ConfigError(f"{who} is root: fedseg node started as root runs the SuperNode "
                          f"and the worker as unprivileged users; give the data folder to "
                          f"its own user (chown -R fedseg-data) or name one with --data-user")
    if run.uid == data.uid:
        raise ConfigError(f"--run-user and --data-user are both {run.name!r}: the SuperNode's "
                          f"user must be one that cannot read the data folder")
    for account, role in ((data, "the site worker"), (run, "the SuperNode")):
        account.check_runs_install(role)
    data_dir = Path(settings.data_dir).resolve()
    if run.can_list(data_dir):
        raise NodeError(
            f"user {run.name!r} (the SuperNode) can read the "
            f"data folder {data_dir}: containment needs a folder only {data.name!r} may read "
            f"(chown -R {data.name} {data_dir}; chmod -R o-rwx,g-rwx {data_dir})")
    if not data.can_list(data_dir):
        raise NodeError(f"user {data.name!r} (the site worker) cannot read the data folder "
                        f"{data_dir} (or a folder above it)")
    return run, data


def prepare_state(settings: NodeSettings, users: tuple[Account, Account] | None) -> SiteState:
    """The state folder with each part owned by the process that uses it."""
    root = Path(settings.state).resolve()
    data_dir = Path(settings.data_dir).resolve()
    if root == data_dir or data_dir in root.parents or root in data_dir.parents:
        raise ConfigError(f"--state {root} and the data folder {data_dir} must be apart: the "
                          f"data folder holds only data")
    state = SiteState(root, users)
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o711 if users else 0o700)  # each part's user passes, none lists
    for folder in (state.worker, state.audit.parent, state.ledger.parent, state.supernode,
                   state.worker_home, state.models, state.prepared):
        folder.mkdir(exist_ok=True)
        os.chmod(folder, 0o700)
    state.ready.unlink(missing_ok=True)  # a killed worker's
    if users:
        run, data = users
        for folder in (state.worker, state.audit.parent, state.ledger.parent,
                       state.worker_home, state.models, state.prepared):
            for path in [folder, *folder.rglob("*")]:
                os.chown(path, data.uid, data.gid, follow_symlinks=False)
        for path in [state.supernode, *state.supernode.rglob("*")]:
            os.chown(path, run.uid, run.gid, follow_symlinks=False)
    return state


SECRET = "superexec.secret"


def write_secret(state: SiteState) -> None:
    """A new SuperExec auth secret for this start, one copy for the SuperNode
    (its user's) and one for the executor (the worker's user's), each 0600:
    nobody else can claim the node's messages on its Runtime API."""
    secret = secrets.token_bytes(32)
    for folder, owner in ((state.supernode, 0), (state.worker, 1)):
        path = folder / SECRET
        path.unlink(missing_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(secret)
        if state.users:
            account = state.users[owner]
            os.chown(path, account.uid, account.gid)


def node_config(settings: NodeSettings) -> str:
    """The SuperNode's node config: the site's public name, nothing else."""
    return f'site-name="{settings.name}"'


def supernode_command(settings: NodeSettings, state: SiteState) -> list[str]:
    """``flower-supernode`` in process isolation: it launches nothing; the
    executor (the worker) claims its messages with the secret."""
    cmd = ["flower-supernode", "--superlink", settings.superlink,
           "--node-config", node_config(settings), "--host", "127.0.0.1",
           "--port", str(settings.port), "--isolation", "process",
           "--superexec-auth-secret-file", str(state.supernode / SECRET)]
    if settings.max_wait:
        cmd += ["--max-wait-time", str(settings.max_wait)]
    if settings.insecure:
        return [*cmd, "--insecure"]
    key, ca = Path(settings.key), Path(settings.ca)
    if state.users:  # the SuperNode's user may not read root's files: its own copies
        run = state.users[0]
        copies = []
        for src, name, mode in ((key, "node.key", 0o600), (ca, "ca.crt", 0o644)):
            dst = state.supernode / name
            shutil.copyfile(src, dst)
            os.chown(dst, run.uid, run.gid)
            os.chmod(dst, mode)
            copies.append(dst)
        key, ca = copies
    return [*cmd, "--root-certificates", str(ca), "--auth-supernode-private-key", str(key)]


def worker_command(settings: NodeSettings, state: SiteState) -> list[str]:
    threads = settings.threads or os.cpu_count() or 1
    cmd = [sys.executable, "-m", "client.worker",
           "--runtime", f"127.0.0.1:{settings.port}", "--secret", str(state.worker / SECRET),
           "--data-dir", str(Path(settings.data_dir).resolve()), "--name", settings.name,
           "--device", settings.device, "--threads", str(threads),
           "--audit", str(state.audit), "--ledger", str(state.ledger),
           "--models", str(state.models), "--prepared", str(state.prepared),
           "--ready", str(state.ready)]
    if settings.policy:  # the worker's own copy, in its own folder
        policy = state.audit.parent / "policy.toml"
        shutil.copyfile(settings.policy, policy)
        if state.users:
            os.chown(policy, state.users[1].uid, state.users[1].gid)
        cmd += ["--policy", str(policy)]
    return cmd


EXIT_CODE = re.compile(r"Exit Code: (\d+)")
NOT_ACTIVATED = "Failed to activate SuperNode"
ACTIVATION_RETRY = 90.0  # Flower's heartbeat patience (2 x 30 s) and a margin
ACTIVATION_PAUSE = 5.0
EXPLAIN = {
    NOT_ACTIVATED: (
        "the SuperLink refused this node: its key is not registered. Send {name}.pub to the "
        "coordinator (fedseg hospital register) and start again"),
    "Server disconnected without sending a response": (
        "the SuperLink closed the connection: it expects TLS; start without --insecure, "
        "with --ca and --key"),
    "CERTIFICATE_VERIFY_FAILED": (
        "the SuperLink's certificate is not signed by the CA given with --ca"),
}


def run_node(settings: NodeSettings, env: dict[str, str], log_path: Path | None = None) -> int:
    """Run the site worker and ``flower-supernode`` in the foreground; returns
    the SuperNode's exit status (or the worker's, if it stopped first).

    Their output goes to this terminal (and ``log_path``); a failure is
    explained. SIGTERM and SIGINT stop both, with everything they started.
    Killed outright (SIGKILL), this command takes them with it (PDEATHSIG)
    and it reaps whatever of theirs is orphaned while it runs
    (``common/supervisor.py``).
    """
    users = resolve_users(settings)
    state = prepare_state(settings, users)
    if settings.policy:
        from client.policy import SitePolicy

        SitePolicy.load(Path(settings.policy))  # a mistyped policy fails here, not mid-run
    threads = settings.threads or os.cpu_count() or 1
    run_user, data_user = users or (None, None)
    app_root = Path(__file__).resolve().parents[1]

    def own_caches(home: Path) -> dict[str, str]:
        return {"HOME": str(home), "FEDSEG_HOME": str(home), "XDG_CACHE_HOME": str(home),
                "MPLCONFIGDIR": str(home / "matplotlib"),
                "TORCHINDUCTOR_CACHE_DIR": str(home / "torchinductor")}

    worker_env = {**env, **own_caches(state.worker_home), "OMP_NUM_THREADS": str(threads),
                  "PYTHONPATH": str(app_root) + os.pathsep + env.get("PYTHONPATH", "")}
    node_env = {**env, **own_caches(state.supernode), "OMP_NUM_THREADS": "1",
                "FLWR_HOME": str(state.supernode / "flwr")}
    running = state.root / "running"  # left behind when this command is killed
    unclean = running.exists()
    try:
        with Supervisor(log=log_path) as sup:
            running.write_text(f"{os.getpid()}\n")
            write_secret(state)
            worker = sup.start("the site worker", worker_command(settings, state),
                               env=worker_env, account=data_user,
                               cwd=Path("/") if users else Path.cwd())
            sup.wait_any(timeout=120, until=lambda: state.ready.exists() or sup.stopping)
            if not state.ready.exists():
                if worker.running():
                    try:
                        worker.proc.wait(timeout=10)
                    except subprocess.TimeoutExpired:
                        pass
                worker.settle()
                print("fedseg node: the site worker did not start (its output is above)",
                      file=sys.stderr)
                return worker.returncode or 1
            supernode = _run_supernode(sup, worker, supernode_command(settings, state),
                                       node_env, run_user, state.supernode, unclean)
            if supernode.running():
                print("fedseg node: the site worker stopped; stopping the SuperNode",
                      file=sys.stderr)
                code = worker.returncode or 1
            else:
                code = supernode.returncode
    finally:
        running.unlink(missing_ok=True)
    if sup.stopping:
        return 0 if code in (0, -signal.SIGTERM, -signal.SIGINT) else code
    text = supernode.text()  # what explains the SuperNode's end
    flower_code = EXIT_CODE.search(text)
    for needle, sentence in EXPLAIN.items():
        if needle in text:
            print(f"fedseg node: {sentence.format(name=settings.name)}", file=sys.stderr)
            return code or 1
    if flower_code:
        print(f"fedseg node: the SuperNode stopped with Flower exit code "
              f"{flower_code.group(1)}", file=sys.stderr)
        return code or 1
    return code


def _run_supernode(sup: Supervisor, worker: Child, cmd: list[str], env: dict[str, str],
                   account: Account | None, cwd: Path, unclean: bool) -> Child:
    """Start the SuperNode and wait for it or the worker to end; returns it.

    Flower keeps a node that vanished (killed, power cut) online for 2 x 30 s
    after its last heartbeat and refuses its key until then: only a node that
    did not stop cleanly last time (``unclean``) starts it again while the
    SuperLink refuses to activate it, for up to :data:`ACTIVATION_RETRY` s."""
    refused_until = None
    while True:
        supernode = sup.start("the SuperNode", cmd, env=env, account=account, cwd=cwd)
        sup.wait_any()
        supernode.settle()  # its last lines
        if sup.stopping or not worker.running() or NOT_ACTIVATED not in supernode.text():
            return supernode
        refused_until = refused_until or time.monotonic() + ACTIVATION_RETRY
        if not unclean or time.monotonic() > refused_until:
            return supernode
        print(f"fedseg node: the SuperLink did not activate this node; this node did not "
              f"stop cleanly last time, so the SuperLink may still hold its last session "
              f"(up to a minute): trying again in {ACTIVATION_PAUSE:.0f} s (for up to "
              f"{ACTIVATION_RETRY:.0f} s)", file=sys.stderr, flush=True)
        sup.stop(supernode)
        sup.wait_any(timeout=ACTIVATION_PAUSE, until=lambda: sup.stopping)
