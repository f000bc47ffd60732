"""The coordinator's side of a deployment on Flower's Deployment Engine.

Thin wrappers over Flower's own binaries: ``flower-superlink`` for the server,
``flwr supernode register|list|unregister`` for hospitals' keys and ``flwr run``
for a run. fedseg adds what a coordinator needs around them: one state folder,
secure defaults, a record of which key belongs to which hospital, and a run
that is followed to its run folder.

State folder layout (``--state``, default ``./federation``; who owns what when
started as root: ``server/coordinator.py``)::

    flwr/config.toml    the connection the coordinator's flwr CLI uses to reach the SuperLink
    hospitals.json      hospital name -> node id, key fingerprint, registration time
    link/               the SuperLink's own: superlink.db (Flower's state: registered
                        nodes, runs), tls/ (its copies of the server key and
                        certificates), flwr/ (its Flower home), home/ (caches)
    runs/<name>/        run folders written by the ServerApp
    logs/               the SuperLink's log, the coordinator's run logs
    proxy/              nginx's configuration, logs and temp folders
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from common.errors import ConfigError, FedsegError
from common.processes import base_env
from server.processes import run_and_follow, run_config_arg
from server.runs import RUNS_DIR_ENV
from server.strategies import REGISTRY_ENV

APP_DIR = Path(__file__).resolve().parents[1]
CONNECTION = "fedseg"
DEFAULT_PORT = 9093


class DeploymentError(FedsegError):
    kind = "deployment error"


@dataclass(frozen=True)
class State:
    """The coordinator's state folder."""

    root: Path

    @property
    def flwr_home(self) -> Path:
        return self.root / "flwr"

    @property
    def link(self) -> Path:
        """What the SuperLink (its user, when started as root) keeps for itself."""
        return self.root / "link"

    @property
    def database(self) -> Path:
        return self.link / "superlink.db"

    @property
    def tls(self) -> Path:
        """The SuperLink's own copies of the server key and certificates."""
        return self.link / "tls"

    @property
    def link_flwr_home(self) -> Path:
        """The SuperLink's Flower home (the apps its ServerApps run)."""
        return self.link / "flwr"

    @property
    def link_home(self) -> Path:
        """HOME and caches of the SuperLink and its ServerApps."""
        return self.link / "home"

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    @property
    def registry(self) -> Path:
        return self.root / "hospitals.json"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def ensure(self) -> State:
        for path in (self.root, self.flwr_home, self.runs, self.logs):
            path.mkdir(parents=True, exist_ok=True)
        return self


def superlink_command(state: State, *, certs: Path | None, host: str, port: int,
                      insecure: bool) -> list[str]:
    """``flower-superlink`` with TLS, node authentication, a persistent state
    database and no run-time dependency installation."""
    cmd = ["flower-superlink", "--host", host, "--port", str(port),
           "--database", str(state.database), "--disable-runtime-dependency-installation",
           "--log-file", str(state.logs / "superlink.log")]
    if insecure:
        return [*cmd, "--insecure"]
    if certs is None:
        raise ConfigError("the SuperLink needs --certs (the folder `fedseg provision` wrote "
                          "as superlink/), or --insecure for a test on one machine")
    files = {name: Path(certs) / name for name in ("ca.crt", "server.pem", "server.key")}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise ConfigError(f"missing certificate files: {', '.join(missing)}")
    return [*cmd, "--ssl-ca-certfile", str(files["ca.crt"]),
            "--ssl-certfile", str(files["server.pem"]),
            "--ssl-keyfile", str(files["server.key"]), "--enable-supernode-auth"]


def write_connection(state: State, address: str, ca: Path | None, insecure: bool) -> None:
    """The flwr CLI's connection to this SuperLink, in the state folder's FLWR_HOME."""
    lines = ['[superlink]', f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]",
             f'address = "{address}"']
    if insecure:
        lines.append("insecure = true")
    elif ca is not None:
        lines.append(f'root-certificates = "{Path(ca).resolve()}"')
    state.ensure()
    (state.flwr_home / "config.toml").write_text("\n".join(lines) + "\n")


def _flwr(state: State, *args: str, timeout: float = 60) -> dict[str, Any]:
    """Call the flwr CLI with JSON output; raise with Flower's message on failure."""
    if not (state.flwr_home / "config.toml").exists():
        raise ConfigError(f"{state.root} has no SuperLink connection: start the SuperLink "
                          f"with `fedseg superlink --state {state.root}` first")
    proc = subprocess.run(["flwr", *args, "--format", "json"], capture_output=True, text=True,
                          env=base_env({"FLWR_HOME": str(state.flwr_home)}), timeout=timeout)
    try:
        out = json.loads(proc.stdout)
    except ValueError:
        raise DeploymentError(f"flwr {args[0]} {args[1]} failed: "
                              f"{(proc.stdout + proc.stderr).strip()[-800:]}") from None
    if not out.get("success", False):
        message = out.get("error-message", "unknown error").split("\n")[-1]
        raise DeploymentError(f"flwr {args[0]} {args[1]}: {message}")
    return out


def key_fingerprint(public_key_file: Path) -> str:
    """SHA256 fingerprint of an OpenSSH public key, as ``ssh-keygen -l`` prints it."""
    try:
        blob = base64.b64decode(Path(public_key_file).read_text().split()[1])
    except (OSError, IndexError, ValueError):
        raise ConfigError(f"{public_key_file} is not an OpenSSH public key file") from None
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def _registry(state: State) -> dict[str, dict[str, Any]]:
    return json.loads(state.registry.read_text()) if state.registry.exists() else {}


def _save_registry(state: State, registry: dict[str, dict[str, Any]]) -> None:
    tmp = state.registry.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    with _open_new(tmp, os.O_WRONLY | os.O_EXCL, 0o640) as fh:  # the ServerApp reads names
        fh.write(json.dumps(registry, indent=2).encode())
    os.replace(tmp, state.registry)


def _open_new(path: Path, flags: int, mode: int):
    """``path`` opened for writing without following a symbolic link: the
    coordinator (root, perhaps) writes into folders the SuperLink's user owns."""
    fd = os.open(path, os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | flags, mode)
    return os.fdopen(fd, "wb")


def register(state: State, public_key: Path, name: str) -> dict[str, Any]:
    """Register a hospital's public key at the SuperLink under ``name``."""
    registry = _registry(state)
    if name in registry:
        raise ConfigError(f"a hospital named {name!r} is registered already "
                          f"(node {registry[name]['node_id']}); remove it first to replace "
                          f"its key")
    fingerprint = key_fingerprint(public_key)
    out = _flwr(state, "supernode", "register", str(public_key), CONNECTION, "--name", name)
    registry[name] = {"node_id": str(out["node-id"]), "fingerprint": fingerprint,
                      "registered": datetime.now(UTC).isoformat(timespec="seconds")}
    _save_registry(state, registry)
    return registry[name]


UNKNOWN = "(unknown)"


def hospitals(state: State) -> list[dict[str, Any]]:
    """Every node key the SuperLink holds, with Flower's view of each node
    (status, last online): the hospitals registered through ``register`` by
    name, and any other key marked ``(unknown)`` — registered some other way,
    to be checked and removed (``fedseg hospital remove NODE_ID``)."""
    nodes = {str(n["node-id"]): n for n in _flwr(state, "supernode", "list", CONNECTION)["nodes"]}
    rows = []
    registry = _registry(state)
    for name, entry in sorted(registry.items()):
        node = nodes.get(entry["node_id"], {})
        rows.append({"name": name, **entry, "status": node.get("status", "unknown"),
                     "online_at": node.get("online-at", "N/A")})
    known = {e["node_id"] for e in registry.values()}
    for node_id, node in sorted(nodes.items()):
        if node_id not in known and node.get("status") != "unregistered":
            rows.append({"name": UNKNOWN, "node_id": node_id, "fingerprint": "?",
                         "registered": "not by fedseg", "status": node.get("status", "?"),
                         "online_at": node.get("online-at", "N/A")})
    return rows


def remove(state: State, name_or_key: str) -> dict[str, Any]:
    """Unregister a hospital, named by its name or its public key file."""
    registry = _registry(state)
    name = name_or_key
    if name not in registry and Path(name_or_key).is_file():
        fingerprint = key_fingerprint(Path(name_or_key))
        name = next((n for n, e in registry.items() if e["fingerprint"] == fingerprint), "")
    if name not in registry:
        nodes = {str(n["node-id"]) for n in
                 _flwr(state, "supernode", "list", CONNECTION)["nodes"]}
        if name_or_key in nodes:  # a key fedseg did not register (listed as unknown)
            _flwr(state, "supernode", "unregister", name_or_key, CONNECTION)
            return {"name": UNKNOWN, "node_id": name_or_key}
        raise ConfigError(f"no registered hospital {name_or_key!r}; see `fedseg hospital list`")
    _flwr(state, "supernode", "unregister", registry[name]["node_id"], CONNECTION)
    entry = registry.pop(name)
    _save_registry(state, registry)
    return {"name": name, **entry}


STARTED = re.compile(r"Successfully started run (\d+)")
FLOWER_RUN_ID = "flower-run-id"  # in a run folder: the Flower run that wrote it last


def stop_previous(state: State, run_dir: Path) -> None:
    """Before a resume: stop the Flower run that wrote ``run_dir`` last, if the
    SuperLink still has it running (its ServerApp died with a crashed
    SuperLink): otherwise the hospitals first work through its stale
    messages, about half a minute each, before the resumed run's reach them."""
    path = run_dir / FLOWER_RUN_ID
    if not path.exists():
        return
    try:
        _flwr(state, "stop", path.read_text().strip(), CONNECTION)
    except (DeploymentError, subprocess.TimeoutExpired):
        pass  # finished or gone already: nothing to stop


def launch(state: State, run_dir_name: str, overrides: Mapping[str, Any], *,
           on_round: Callable[[dict[str, Any]], None] | None = None,
           log_path: Path | None = None, timeout: float | None = None) -> dict[str, Any]:
    """Submit a run with ``flwr run`` and follow it until its summary is written.

    The ServerApp runs in the SuperLink's process tree and writes
    ``<state>/runs/<name>/``; this reads the same folder, so launch runs on the
    coordinator's machine.
    """
    run_dir = state.runs / run_dir_name
    if (run_dir / "metrics.jsonl").exists() and not overrides.get("resume"):
        raise ConfigError(f"{run_dir} already holds a run: resume it or choose another name")
    config = {**overrides, "run-name": run_dir_name}
    if overrides.get("resume"):
        stop_previous(state, run_dir)
    cmd = ["flwr", "run", str(APP_DIR), CONNECTION, "--stream",
           "--run-config", run_config_arg(config)]
    log_path = log_path or state.logs / f"run-{run_dir_name}.log"
    start = log_path.stat().st_size if log_path.exists() else 0
    with _open_new(log_path, os.O_WRONLY | os.O_APPEND, 0o640) as log:
        code = run_and_follow(cmd, env=base_env({"FLWR_HOME": str(state.flwr_home)}),
                              cwd=state.root, log=log, run_dir=run_dir, on_round=on_round,
                              timeout=timeout)
    with open(log_path, "rb") as log:
        log.seek(start)
        started = STARTED.search(log.read().decode(errors="replace"))
    if started and run_dir.is_dir():  # which Flower run this was, for a resume to stop
        with _open_new(run_dir / FLOWER_RUN_ID, os.O_WRONLY | os.O_TRUNC, 0o660) as fh:
            fh.write(started.group(1).encode() + b"\n")
    summary = run_dir / "summary.json"
    if code != 0 or not summary.exists():
        raise DeploymentError(f"the run did not finish (flwr run exit code {code});"
                              f" see {log_path} and {state.logs / 'superlink.log'}")
    return json.loads(summary.read_text())


# Flower's switches for its old gRPC Control and Fleet servers, on ports of their own.
LEGACY_LISTENERS = ("FLWR_INTERNAL_GRPC_CONTROL_API", "FLWR_INTERNAL_GRPC_FLEET_API")


def superlink_env(state: State) -> dict[str, str]:
    """The SuperLink's environment: the ServerApp it starts writes run folders
    into the state folder; its Flower home and caches are its own."""
    home = state.link_home
    env = base_env({RUNS_DIR_ENV: str(state.runs), "FLWR_HOME": str(state.link_flwr_home),
                    REGISTRY_ENV: str(state.registry), "HOME": str(home),
                    "FEDSEG_HOME": str(home), "XDG_CACHE_HOME": str(home / "cache"),
                    "MPLCONFIGDIR": str(home / "matplotlib"),
                    "TORCHINDUCTOR_CACHE_DIR": str(home / "torchinductor")})
    for extra in LEGACY_LISTENERS:  # the local port is the only one the firewall rule covers
        env.pop(extra, None)
    return env
