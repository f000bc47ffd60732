"""An in-process test grid: a Flower ``Grid`` that delivers each message to
the real ClientApp in this process.

The real ServerApp (``server.app.app``) runs on it with the real ClientApp
(``client.app.app``, its mods included), so strategy wiring — every strategy,
DP mode, update checks, ``evaluate-every``, resume, failures — is tested in
seconds. Only Flower's transport is left out (a SuperLink, processes, Ray);
the real simulations and deployments in tests/federation and
tests/deployment keep that covered.

Each node has its own ``Context`` (node config, persistent ``state``), as a
SuperNode gives its ClientApp. ``faults`` replace a node's behaviour for a
message: return a reply, or ``None`` for no reply at all (a lost node).
"""

from __future__ import annotations

import os
import tomllib
import uuid
from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

ROOT = Path(__file__).resolve().parents[1]
SUPERLINK_NODE = 1

# node id, message, the real ClientApp's call -> reply, or None for no reply
Fault = Callable[[int, Message, Callable[[], Message]], Message | None]


def app_defaults() -> dict[str, Any]:
    """pyproject.toml's ``[tool.flwr.app.config]``, as Flower merges it."""
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"][
        "config"]


def wire_copy(msg: Message) -> Message:
    """``msg`` through Flower's own serialisation, as the transport carries it."""
    copy = message_from_proto(message_to_proto(msg))
    copy.metadata.__dict__["_message_id"] = msg.metadata.message_id
    return copy


@contextmanager
def task(run_id: int, node_id: int):
    saved = TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, node_id, 1
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


@dataclass
class LocalGrid(Grid):
    """``node_configs``: one node config per node (``data-dir``, ``site-name``...)."""

    client_app: Any
    node_configs: list[dict[str, Any]]
    run_config: dict[str, Any]
    run_id: int = 1
    faults: dict[int, Fault] = field(default_factory=dict)
    sent: list[Message] = field(default_factory=list)  # every message pushed
    _replies: dict[str, Message] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.contexts = {
            100 + i: Context(run_id=self.run_id, node_id=100 + i, node_config=dict(cfg),
                             state=RecordDict(), run_config=dict(self.run_config))
            for i, cfg in enumerate(self.node_configs)}
        self.offline: set[int] = set()

    # -- Grid -----------------------------------------------------------------------------
    def set_run(self, run: Run) -> None:
        self.run_id = run.run_id

    @property
    def run(self) -> Run:
        return Run.create_empty(self.run_id)

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        with task(self.run_id, SUPERLINK_NODE):
            return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return [n for n in self.contexts if n not in self.offline]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            self.sent.append(msg)
            ids.append(msg.metadata.message_id)
            node = msg.metadata.dst_node_id
            if node in self.offline:
                continue
            with task(self.run_id, node):
                def deliver(msg: Message = msg, node: int = node) -> Message:
                    # Each side gets its own copy, as over the wire (a ClientApp's
                    # mods may change the message they are given).
                    try:
                        reply = self.client_app(wire_copy(msg), self.contexts[node])
                    except Exception as exc:  # noqa: BLE001 - as Flower's runtime does
                        reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                                              reason=f"{type(exc)}:<'{exc}'>"), reply_to=msg)
                    return wire_copy(reply)

                fault = self.faults.get(node)
                reply = fault(node, msg, deliver) if fault else deliver()
            if reply is not None:
                self._replies[msg.metadata.message_id] = reply
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))


def run_server(grid: LocalGrid, runs_dir: Path) -> dict[str, Any]:
    """Run the real ServerApp on ``grid``; its ``summary.json``."""
    import json

    from server.app import app as server_app
    from server.runs import RUNS_DIR_ENV

    old = os.environ.get(RUNS_DIR_ENV)
    os.environ[RUNS_DIR_ENV] = str(runs_dir)
    try:
        context = Context(run_id=grid.run_id, node_id=SUPERLINK_NODE, node_config={},
                          state=RecordDict(), run_config=dict(grid.run_config))
        with task(grid.run_id, SUPERLINK_NODE):
            server_app(grid, context)
    finally:
        if old is None:
            os.environ.pop(RUNS_DIR_ENV, None)
        else:
            os.environ[RUNS_DIR_ENV] = old
    name = grid.run_config["run-name"]
    return json.loads((runs_dir / name / "summary.json").read_text())


def federation(sites: list[tuple[str, Path]], overrides: Mapping[str, Any],
               faults: dict[int, Fault] | None = None) -> LocalGrid:
    """A grid of the real ClientApp at each site (name, folder), with the run
    config Flower would merge: pyproject's defaults + ``overrides``."""
    from client.app import app as client_app

    run_config = {**app_defaults(), **overrides}
    return LocalGrid(client_app, [{"data-dir": str(folder), "site-name": name}
                                  for name, folder in sites], run_config,
                     faults=dict(faults or {}))


def audited_replies(folder: Path, pattern: str) -> list[Message]:
    """The messages the server's audit (``FEDSEG_AUDIT_DIR``) kept in
    ``folder`` under names matching ``pattern``, those that are not errors."""
    from flwr.proto.message_pb2 import Message as ProtoMessage

    out = []
    for path in sorted(Path(folder).glob(pattern)):
        proto = ProtoMessage()
        proto.ParseFromString(path.read_bytes())
        msg = message_from_proto(proto)
        if not msg.has_error():
            out.append(msg)
    return out
