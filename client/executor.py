"""The hospital's executor: every message its node receives is handled by this
installed fedseg; no code from the run's app bundle runs at the hospital.

Flower's SuperNode runs in process isolation (``--isolation process``): it
pulls messages from the SuperLink, keeps them as tasks and serves them on its
local Runtime API (HTTP, 127.0.0.1) to an external executor, guarded by
Flower's SuperExec auth secret (only a holder of the secret can claim a task,
and only a task's token reads its message). Flower's default executor
(``flower-superexec``) starts a ``flwr-clientapp`` process per message that
installs the run's app bundle and runs the coordinator's ClientApp. This one
takes its place, inside the site worker (long-lived, the only reader of the
data folder), and for each message:

1. claims the task with the secret, pulls the message, its run and the
   bundle's metadata with the task's token (Flower's own calls, as
   ``flwr/supernode/runtime/run_clientapp.py`` makes them), heartbeating;
2. checks the run: a fedseg app (``fab_id`` fedseg/fedseg), a wire version
   this install speaks (``common.wire``), the policy's pins (wire versions,
   bundle hashes) and rules; a message of another kind is refused;
3. runs the INSTALLED ClientApp (``client.app.make_app``: the site's warm
   service; SecAgg+ masking and DP clipping and noise in the hospital's code,
   forced on where the policy requires them), never importing the bundle;
4. checks what is about to leave (under ``require-secure-aggregation`` no
   reply may carry a plaintext weight), writes the audit line from the very
   message (``client/audit.py``), then pushes it.

A refusal or failure is an error reply whose reason is scrubbed (the rule or
the kind of failure; the full text stays in the site's log), and it is
audited like any reply. SecAgg+'s per-run state (its private keys among it)
is kept here, in memory: the context handed back to the SuperNode has none.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode, SubStatus
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.common.serde import context_from_proto, run_from_proto
from flwr.proto.node_pb2 import Node
from flwr.proto.runtime_pb2 import (
    AcquireTaskRequest,
    PullAppMessagesRequest,
    PullTaskInputRequest,
    SendTaskHeartbeatRequest,
)
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender
from flwr.supercore.inflatable.inflatable_protobuf_utils import (
    make_confirm_message_received_fn_protobuf,
    make_pull_object_fn_protobuf,
)
from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
from flwr.supercore.interceptors import (
    RuntimeTokenHttpInterceptor,
    RuntimeVersionHttpInterceptor,
    SuperExecAuthHttpInterceptor,
)
from flwr.supercore.run import Run
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supercore.task_identity import TaskIdentity
from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

from client.app import make_app
from client.audit import AuditLog, describe_reply
from client.policy import PolicyRefusal, SitePolicy
from client.privacy import SiteLedger, site_dp_mod
from client.service import RequestRefused, SiteService
from common import wire
from common.config import RunSettings
from common.errors import FedsegError, error_reason, scrub

log = logging.getLogger("fedseg.executor")

APP_ID = "fedseg/fedseg"  # the bundle's publisher/name ([tool.flwr.app], [project])
KINDS = ("train", "evaluate", "query")
# The SuperNode hands a task out before it has fetched all of the message's
# objects from the SuperLink; Flower's pull waits 1 s after the first miss
# (right for a process that starts once per message). This executor is already
# waiting: it asks again soon.
PULL_BACKOFF, PULL_BACKOFF_CAP = 0.05, 0.5
POLL = 0.05  # seconds between asks for a task when there is none
REQUEST_TIMEOUT = 30.0  # seconds for one Runtime API call (Flower's client default)


class BundleRefused(FedsegError):
    """A run this hospital's fedseg does not run; the text names the rule only."""

    kind = "refused by the site"

    def scrubbed(self) -> str:
        return f"{self.kind}: {self}"


class SiteOfExecutor:
    """The site as the installed ClientApp sees it: the worker's warm service."""

    def __init__(self, service: SiteService) -> None:
        self.service = service
        self.name = service.site

    def request(self, kind, run_id, run_config, round_config, weights):
        return self.service.handle(kind, run_id, run_config, round_config, weights)


def pull_input(client: RuntimeHttpClient) -> tuple[Message, Context, Run]:
    """The task's message, context and run, as Flower's ``pull_task_input``
    (``flwr/supernode/runtime/run_clientapp.py``) gets them, with Flower's own
    calls, but the app bundle in the reply is never deserialised and a message
    whose objects are still arriving is asked for again after 50 ms, not 1 s."""
    res = client.PullTaskInput(PullTaskInputRequest())
    TaskIdentity.task_id = res.task_id
    TaskIdentity.run_id = res.run.run_id
    TaskIdentity.node_id = res.context.node_id
    context, run = context_from_proto(res.context), run_from_proto(res.run)
    pulled = client.PullMessages(PullAppMessagesRequest())
    if not pulled.messages_list:
        raise RuntimeError("the SuperNode's Runtime API gave the task no message")
    node = Node(node_id=context.node_id)
    tree = pulled.message_object_trees[0]
    message = pull_and_inflate_object_from_tree(
        tree, make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node,
                                                  context.run_id),
        return_type=Message, initial_backoff=PULL_BACKOFF, backoff_cap=PULL_BACKOFF_CAP)
    message.metadata.__dict__["_message_id"] = tree.object_id  # not in the deflated message
    return message, context, run


def message_round(msg: Message) -> int | None:
    """The server round a message belongs to (Flower's group id, or the round
    its instructions name), if any; never an error, whatever the message holds."""
    group = str(msg.metadata.group_id or "")
    if group.isdigit() and len(group) < 10:
        return int(group)
    if msg.has_content():
        for name in (wire.CONFIG, RECORD_KEY_CONFIGS):
            record = msg.content.config_records.get(name)
            value = record.get(wire.SERVER_ROUND, record.get("current_round")) \
                if record is not None else None
            if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 10**9:
                return value
    return None


def message_kind(msg: Message) -> str:
    """``train``, ``evaluate``, or a SecAgg+ stage ``train/secagg:<stage>``."""
    kind = str(msg.metadata.message_type)[:40]
    if msg.has_content() and RECORD_KEY_CONFIGS in msg.content.config_records:
        stage = msg.content.config_records[RECORD_KEY_CONFIGS].get(Key.STAGE)
        return f"{kind}/secagg:{str(stage)[:30]}"
    return kind


@dataclass
class Outcome:
    """What became of one message."""

    reply: Message
    outcome: str  # sent | refused | failed
    reason: str | None = None
    notes: dict[str, Any] = field(default_factory=dict)


class Handler:
    """Turns one received message into the reply that leaves the site, by the
    installed fedseg and the site's policy; audits it. No network here: the
    :class:`Executor` feeds it, tests call it directly."""

    def __init__(self, service: SiteService, policy: SitePolicy, audit: AuditLog,
                 ledger: SiteLedger) -> None:
        self.service = service
        self.policy = policy
        self.audit = audit
        site = SiteOfExecutor(service)
        self.app = make_app(lambda _context: site, policy=policy,
                            site_mods=[site_dp_mod(policy, ledger, message_round)])
        self.states: dict[int, RecordDict] = {}  # per run: SecAgg+'s state, in memory
        self.runs_seen: set[int] = set()

    def check_run(self, msg: Message, run: Run, run_config: dict[str, Any]) -> None:
        kind = str(msg.metadata.message_type)
        if kind not in KINDS:
            raise BundleRefused(f"message kind {kind[:40]!r} is not one this site answers "
                                f"({', '.join(KINDS)})")
        if run.fab_id != APP_ID:
            raise BundleRefused(f"this node runs fedseg's app only ({APP_ID}), not "
                                f"{str(run.fab_id)[:80]!r}")
        declared = run_config.get(wire.VERSION_KEY)
        if isinstance(declared, bool) or not isinstance(declared, int) \
                or declared not in wire.SPOKEN:
            shown = "no fedseg wire version" if declared is None else \
                f"fedseg wire version {str(declared)[:20]}"
            raise BundleRefused(f"the run's app speaks {shown}; this site's fedseg speaks "
                                f"{', '.join(map(str, wire.SPOKEN))} (CHANGELOG.md): the "
                                f"coordinator and the hospital must upgrade together")
        broken = self.policy.bundle_violations(declared, run.fab_hash)
        broken += self.policy.violations(RunSettings.from_run_config(run_config))
        if broken:
            raise PolicyRefusal("; ".join(broken))

    def check_secagg_setup(self, msg: Message) -> None:
        """A SecAgg+ round must say it has at least the policy's ``min-sites``:
        fewer, and the "sum" the server unmasks is too close to this site's own."""
        configs = msg.content.config_records.get(RECORD_KEY_CONFIGS) if msg.has_content() \
            else None
        if configs is None or not self.policy.min_sites or configs.get(Key.STAGE) != "setup":
            return
        sample = configs.get(Key.SAMPLE_NUMBER, 0)
        if not isinstance(sample, int) or sample < self.policy.min_sites:
            raise PolicyRefusal("more sites per round (min-nodes) are required")

    def gate(self, reply: Message) -> None:
        """What may leave, checked on the reply itself."""
        if reply.has_error():
            return
        if self.policy.require_secure_aggregation and any(
                len(record) for record in reply.content.array_records.values()):
            raise PolicyRefusal("secure aggregation is required: unmasked weights do not "
                                "leave this site")

    def handle(self, msg: Message, context: Context, run: Run,
               task_type: str = TaskType.CLIENT_APP.value) -> Outcome:
        start = time.perf_counter()
        run_id = int(context.run_id)
        kind = message_kind(msg)
        try:
            if task_type != TaskType.CLIENT_APP.value:
                raise BundleRefused(f"this node answers ClientApp messages only, not a "
                                    f"{str(task_type)[:40]!r} task")
            self.check_run(msg, run, dict(context.run_config))
            self.check_secagg_setup(msg)
            for old in [r for r in self.states if r != run_id]:
                del self.states[old]  # one run at a time keeps its secrets
            state = self.states.setdefault(run_id, RecordDict())
            local = Context(run_id=run_id, node_id=context.node_id,
                            node_config={"site-name": self.service.site}, state=state,
                            run_config=dict(context.run_config))
            reply = self.app(message=msg, context=local)
            self.gate(reply)
            outcome = Outcome(reply, "failed" if reply.has_error() else "sent",
                              reply.error.reason if reply.has_error() else None)
            if reply.has_error() and any(reply.error.reason.find(k) >= 0 for k in (
                    PolicyRefusal.kind, RequestRefused.kind)):
                outcome.outcome = "refused"
        except (BundleRefused, PolicyRefusal, RequestRefused) as exc:
            log.warning("refused %s message of run %d: %s", kind, run_id, exc)
            outcome = Outcome(self._error(msg, exc), "refused", exc.scrubbed())
        except Exception as exc:  # noqa: BLE001 - the site's log has it; the server a scrub
            log.error("%s message of run %d failed at this site: %s", kind, run_id, exc,
                      exc_info=not isinstance(exc, FedsegError))
            outcome = Outcome(self._error(msg, exc), "failed", scrub(exc))
        seconds = time.perf_counter() - start
        described = describe_reply(outcome.reply)
        bundle = str(run.fab_hash)[:64]  # what allowed-bundles pins
        if run_id not in self.runs_seen:
            self.runs_seen.add(run_id)
            log.info("run %d: app %s, bundle sha256 %s, fedseg wire %s", run_id,
                     str(run.fab_id)[:80], bundle,
                     str(context.run_config.get(wire.VERSION_KEY))[:20])
        self.audit.append(run=run_id, round=message_round(msg), kind=kind,
                          outcome=outcome.outcome, reason=outcome.reason, seconds=seconds,
                          bundle=bundle, **described)
        log.info("%s (run %d, round %s): %s in %.1f s, message %s", kind, run_id,
                 message_round(msg), outcome.outcome, seconds, described["message_id"][:16])
        return outcome

    def _error(self, msg: Message, exc: Exception) -> Message:
        return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                             reason=error_reason(self.service.site, scrub(exc))),
                       reply_to=msg)


class Executor:
    """Claims the SuperNode's tasks and answers them with a :class:`Handler`."""

    def __init__(self, runtime_address: str, secret: bytes, handler: Handler,
                 poll: float = POLL) -> None:
        self.address = runtime_address
        self.secret = secret
        self.handler = handler
        self.poll = poll
        self.stop = threading.Event()
        self.claimer = RuntimeHttpClient.from_server_address(
            server_address=runtime_address, insecure=True, root_certificates=None,
            interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec"),
                          SuperExecAuthHttpInterceptor(
                              master_secret=secret,
                              protected_methods=frozenset({"/flwr.proto.Runtime/AcquireTask"}))])

    def claim(self) -> tuple[str, Any] | None:
        """A pending task and its token, or None. Every kind is claimed (a task
        nobody claims would hold the SuperNode, which waits for its reply)."""
        res = self.claimer.AcquireTask(AcquireTaskRequest(
            supported_task_types=[t.value for t in TaskType]))
        if res.HasField("task") and res.token:
            return res.token, res.task
        return None

    def serve(self, on_ready: Callable[[], None] | None = None) -> None:
        """Until :attr:`stop` is set: claim, answer, repeat. A SuperNode not
        answering yet (starting, restarting) is waited for."""
        waiting_since: float | None = None
        while not self.stop.is_set():
            try:
                claimed = self.claim()
            except httpx.HTTPError as exc:
                if waiting_since is None:
                    waiting_since = time.monotonic()
                    log.info("waiting for the SuperNode's Runtime API at %s (%s)",
                             self.address, type(exc).__name__)
                self.stop.wait(0.5)
                continue
            if waiting_since is not None:
                log.info("the SuperNode's Runtime API answers")
                waiting_since = None
                if on_ready:
                    on_ready()
                    on_ready = None
            if claimed is None:
                self.stop.wait(self.poll)
                continue
            token, task = claimed
            try:
                self.run_task(token, task)
            except Exception as exc:  # noqa: BLE001 - one task never stops the site
                log.error("task %s not answered: %s", task.task_id, exc, exc_info=exc)

    def run_task(self, token: str, task) -> None:
        client = RuntimeHttpClient.from_server_address(
            server_address=self.address, insecure=True, root_certificates=None,
            interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                          RuntimeTokenHttpInterceptor(token)])
        lost = threading.Event()

        def beat() -> bool:
            try:
                ok = client.SendTaskHeartbeat(SendTaskHeartbeatRequest()).success
            except httpx.HTTPError:
                return False
            if not ok:
                lost.set()  # Flower's own heartbeat would SIGINT this process
            return True

        heartbeat = HeartbeatSender(beat)
        heartbeat.start()
        context = None
        status, details = SubStatus.FAILED, "not answered"
        try:
            # Every task is answered, also one of a kind this node does not run (the
            # SuperNode waits for a reply to each message it handed out).
            start = time.perf_counter()
            message, context, run = pull_input(client)  # the bundle: never opened
            pulled = time.perf_counter()
            outcome = self.handler.handle(message, context, run, str(task.type))
            answered = time.perf_counter()
            try:
                if lost.is_set():
                    raise RuntimeError("the SuperNode dropped the task meanwhile")
                push_message(client, outcome.reply, context)
            except Exception as exc:
                # The audit said what was to leave; it did not: say so there too.
                self.handler.audit.append(
                    run=int(context.run_id), round=message_round(message),
                    kind=message_kind(message), outcome="not sent",
                    reason=f"{type(exc).__name__}: {str(exc)[:200]}",
                    message_id=outcome.reply.object_id)
                raise
            status, details = SubStatus.COMPLETED, ""
            log.info("message of task %s: pulled from the SuperNode in %.2f s, answered in "
                     "%.2f s, pushed to it in %.2f s", task.task_id, pulled - start,
                     answered - pulled, time.perf_counter() - answered)
        finally:
            try:
                # The context goes back as it came: SecAgg+'s state stays here.
                push_task_output(client, context, status, details)
            finally:
                heartbeat.stop()
                client.close()
                TaskIdentity.task_id = TaskIdentity.run_id = TaskIdentity.node_id = None

    def close(self) -> None:
        self.stop.set()
        self.claimer.close()
