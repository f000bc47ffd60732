"""The hospital's side of a deployment: start a SuperNode next to the data.

``fedseg node`` checks what it can before Flower starts (the data folder, the
key, the CA certificate, that the SuperLink answers and that its certificate
is the federation's), then runs ``flower-supernode`` with the site's settings
as node config, and turns Flower's exit codes into plain sentences.

Hospitals only connect out: the SuperNode opens one outbound HTTPS connection
to the SuperLink and polls it; nothing connects in. Its local Runtime API port
(``--port``) listens on 127.0.0.1 only.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from common.data.site import list_cases
from common.errors import ConfigError, FedsegError
from common.processes import stop_group


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


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--superlink must be host:port, got {address!r}")
    return host.strip("[]"), int(port)


def preflight(settings: NodeSettings) -> None:
    """Fail early, in plain words, on what Flower would report obscurely."""
    try:
        n_train = len(list_cases(settings.data_dir, "training"))
        n_test = len(list_cases(settings.data_dir, "test"))
    except FedsegError as exc:
        raise NodeError(f"the data folder is not usable: {exc}") from None
    print(f"fedseg node: data folder {settings.data_dir}: {n_train} training and {n_test} "
          f"test cases", flush=True)
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


def node_config(settings: NodeSettings) -> str:
    threads = settings.threads or os.cpu_count() or 1
    return (f'data-dir="{Path(settings.data_dir).resolve()}" site-name="{settings.name}" '
            f'threads={threads} device="{settings.device}"')


def supernode_command(settings: NodeSettings) -> list[str]:
    cmd = ["flower-supernode", "--superlink", settings.superlink,
           "--node-config", node_config(settings), "--port", str(settings.port)]
    if settings.max_wait:
        cmd += ["--max-wait-time", str(settings.max_wait)]
    if settings.insecure:
        return [*cmd, "--insecure"]
    return [*cmd, "--root-certificates", str(settings.ca),
            "--auth-supernode-private-key", str(settings.key)]


EXIT_CODE = re.compile(r"Exit Code: (\d+)")
EXPLAIN = {
    "Failed to activate SuperNode": (
        "the SuperLink refused this node: its key is not registered. Send {name}.pub to the "
        "coordinator (fedseg hospital register) and start again"),
    "Server disconnected without sending a response": (
        "the SuperLink closed the connection: it expects TLS; start without --insecure, "
        "with --ca and --key"),
    "CERTIFICATE_VERIFY_FAILED": (
        "the SuperLink's certificate is not signed by the CA given with --ca"),
}


def run_node(settings: NodeSettings, env: dict[str, str], log_path: Path | None = None) -> int:
    """Run ``flower-supernode`` in the foreground; returns its exit status.

    Its output goes to this terminal (and ``log_path``); a failure is explained.
    SIGTERM and SIGINT are passed on to the SuperNode and its children.
    """
    threads = settings.threads or os.cpu_count() or 1
    env = {**env, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.Popen(supernode_command(settings), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)

    def forward(signum, _frame):
        try:
            os.killpg(proc.pid, signum)
        except ProcessLookupError:
            pass

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    tail: list[str] = []

    def pump() -> None:
        assert proc.stdout is not None
        with open(log_path, "a") if log_path else open(os.devnull, "w") as log:
            for line in proc.stdout:
                sys.stdout.write(line)
                sys.stdout.flush()
                log.write(line)
                tail.append(line)
                del tail[:-40]

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        code = proc.wait()
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        # The SuperNode's helper (flower-superexec) can outlive it: stop the group.
        stop_group(proc.pid)
        reader.join(timeout=10)
    text = "".join(tail)
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

