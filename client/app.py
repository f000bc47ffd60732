"""Flower ClientApp: one hospital's node, as this installed fedseg runs it.

Thin on purpose: unpack the message, ask the site, pack the reply. Two
transports, one app:

* in a deployment the hospital's executor (``client/executor.py``, inside the
  site worker) builds the app with :func:`make_app` around the site's warm
  service and the hospital's policy. The coordinator's app bundle is never
  imported at a hospital: the bundle only says which run this is;
* in a simulation Flower loads :data:`app` (the same handlers and mods) and
  the site's service runs in that process.

What leaves the site is exactly what ``common.wire`` names:

* train reply: the model weights (``arrays``, at the run's
  ``transfer-precision``), ``wire.TRAIN_METRICS`` and,
  when asked (``evaluate-incoming``), the incoming global model's scores
  (``global-*``) in ``metrics``, the site's public name (``site``);
* evaluate reply: ``wire.EVAL_METRICS`` (case count and means over the test
  cases), the site's name;
* query reply (``fingerprint``, once at a run's start): ``wire.FINGERPRINT_METRICS``
  (aggregates of the training cases), the site's name and modality.

A failure replies with a scrubbed error (kind of failure, case index) instead
of the exception text, which could hold a path or a patient value.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import flwr.compat.common.recorddict_compat as compat
import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.common.constant import ErrorCode
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from client.policy import PolicyRefusal, SitePolicy
from common import wire
from common.config import (
    SIM_WORKERS_ENV,
    RunSettings,
    SiteSettings,
    fedseg_home,
    simulation_sites,
)
from common.errors import FedsegError, error_reason, scrub, write_local_log
from common.packing import PrecisionOverflow, WrongPrecision, from_wire, to_wire

log = logging.getLogger(__name__)

OPTIMIZER_STATE = "fedseg-optimizer"  # context.state key: Adam's moments between rounds

# In a simulation: the service of the site this process served last, kept
# while the process lives. A simulation's worker process serves many sites one
# after another; another site's message replaces the service and drops the
# last site's prepared cases first (parking only the handles of its cases on
# disk: common.data.cache), so a process holds one site's model and data at a
# time however many sites the simulation has. What a site keeps
# between its rounds (Adam's moments) travels in the node's context.state.
_CURRENT: dict[str, Any] = {}  # "key": (run, node, site, folder, policy, models), "service"


def simulated_site_state(name: str, data_dir: Path) -> Path:
    """A simulated site's own state folder (its kept models and prepared
    cases): ``$FEDSEG_HOME/sites/<name>-<8 hex of its folder's path>``.
    The path's hash keeps apart sites of one name from two folders
    (``hippo3/site-1`` and ``hippo20/site-1``), which would otherwise set
    aside each other's models and evict each other's prepared cases."""
    digest = hashlib.sha256(str(Path(data_dir).resolve()).encode()).hexdigest()[:8]
    return fedseg_home() / "sites" / f"{name}-{digest}"


class InProcessSite:
    """The site's service in this process (simulation)."""

    def __init__(self, context: Context) -> None:
        self.context = context

    @property
    def name(self) -> str:
        return SiteSettings.from_node_config(self.context.node_config, simulation_sites()).name

    def service(self, settings: RunSettings):
        from client.service import SiteService
        from common.data.synthetic import ensure_site

        site = SiteSettings.from_node_config(self.context.node_config, simulation_sites())
        if site.threads:
            import torch

            torch.set_num_threads(site.threads)
        data_dir = site.data_dir or ensure_site(
            fedseg_home() / "synthetic", site.partition_id, settings.synthetic_train_cases,
            settings.synthetic_test_cases, settings.seed)
        policy = SitePolicy(share_local_model=settings.cross_site)  # the user's consent
        state = simulated_site_state(site.name, data_dir)
        models = state / "models"
        key = (self.context.run_id, self.context.node_id, site.name, data_dir, policy, models)
        if _CURRENT.get("key") != key:
            from common.data import cache

            _CURRENT.clear()  # the last site's model and cases go before this one's come
            cache.keep_only(data_dir)
            _CURRENT["service"] = SiteService(site.name, data_dir, device=site.device,
                                              policy=policy, models_dir=models,
                                              prepared_dir=state / "prepared")
            _CURRENT["key"] = key
        return _CURRENT["service"]

    def request(self, kind: str, run_id: int, run_config: Mapping[str, Any],
                round_config: Mapping[str, Any], weights: Mapping[str, np.ndarray] | None
                ) -> tuple[dict[str, np.ndarray], dict[str, Any], dict[str, str]]:
        start, ok = time.monotonic(), False
        try:
            service = self.service(RunSettings.from_run_config(run_config))
            state = self.context.state
            if kind == "train":
                algo = service.algorithm(run_id, run_config)
                saved = state.array_records.get(OPTIMIZER_STATE)  # this node's own
                algo.optimizer_state = ({k: a.numpy() for k, a in saved.items()}
                                        if saved else None)
            out = service.handle(kind, run_id, run_config, round_config, weights)
            if kind == "train" and algo.optimizer_state:  # never leaves the site
                state[OPTIMIZER_STATE] = ArrayRecord(
                    {k: Array(v) for k, v in algo.optimizer_state.items()})
            ok = True
            return out
        finally:
            worker_line(self.context, kind, round_config, ok, time.monotonic() - start)


def worker_line(context: Context, kind: str, round_config: Mapping[str, Any], ok: bool,
                seconds: float) -> None:
    """In a simulation started by ``fedseg simulate``, one JSON line per message
    to ``$FEDSEG_SIM_WORKERS``: which process on which host and Ray node
    answered for which site, how many sites' cases that process holds now and
    held at most, and its peak memory. A convenience for the user (every party
    is on the user's machines); a worker that cannot write there skips it."""
    path = os.environ.get(SIM_WORKERS_ENV)
    if not path:
        return
    import json
    import resource
    import socket
    import sys

    from common.data import cache

    ray_node = None
    ray = sys.modules.get("ray")
    try:
        if ray is not None and ray.is_initialized():
            ray_node = ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - only a label for the log line
        pass
    try:
        site = SiteSettings.from_node_config(context.node_config, simulation_sites()).name
    except Exception:  # noqa: BLE001
        site = None
    line = {
        "time": round(time.time(), 3), "kind": kind, "ok": ok,
        "round": round_config.get(wire.SERVER_ROUND), "site": site,
        "node": context.node_id, "pid": os.getpid(), "host": socket.gethostname(),
        "ray_node": ray_node, "seconds": round(seconds, 3),
        "sites_held": len(cache.folders_held()), "sites_held_peak": cache.peak_folders(),
        "sites_parked": len(cache.folders_parked()),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    try:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(line) + "\n")
    except OSError:
        pass


class SiteAnswers(Protocol):
    """What a handler asks a site: weights by name, metrics, notes."""

    name: str | None  # the site's public name

    def request(self, kind: str, run_id: int, run_config: Mapping[str, Any],
                round_config: Mapping[str, Any], weights: Mapping[str, np.ndarray] | None
                ) -> tuple[dict[str, np.ndarray], dict[str, Any], dict[str, str]]: ...


SiteOf = Callable[[Context], SiteAnswers]


def ask(site: SiteAnswers, kind: str, msg: Message, context: Context
        ) -> tuple[dict[str, np.ndarray], dict[str, Any], dict[str, str]]:
    """The site's answer to ``msg``: weights by name, metrics, notes."""
    weights = ({k: a.numpy() for k, a in msg.content[wire.ARRAYS].items()}
               if wire.ARRAYS in msg.content.array_records else None)
    config = dict(msg.content[wire.CONFIG]) if wire.CONFIG in msg.content.config_records else {}
    return site.request(kind, context.run_id, dict(context.run_config), config, weights)


def _site_name(context: Context, site_of: SiteOf) -> str | None:
    """This node's public name, if it can be told at all."""
    try:
        return site_of(context).name
    except Exception:  # noqa: BLE001 - the failure being reported is the real one
        return None


def _failed(msg: Message, name: str | None, exc: Exception, what: str) -> Message:
    """The reply for a failed handler: the site's name and the scrubbed cause.
    The full cause (case name, path) stays in this site's own log, and in a
    simulation (where every party is the user's own machine) also goes to the
    run folder's local log that ``fedseg simulate`` shows in the terminal."""
    log.error("%s failed at this site: %s", what, exc, exc_info=exc)  # local log only
    write_local_log(name, what, exc)
    return Message(
        Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
              reason=error_reason(name, scrub(exc))),
        reply_to=msg,
    )


class SecureRoundFailed(FedsegError):
    """Training failed inside a secure round; its text is already scrubbed."""

    def scrubbed(self) -> str:
        return str(self)


def secagg_mod(required: bool = False) -> Mod:
    """Secure aggregation (SecAgg+) when the run asks for it, or always when
    the site's policy requires it (``required``): Flower's ``secaggplus_mod``
    masks this site's update; this bridges its legacy fit-record format to
    this app's own records. Otherwise a no-op. On, a train message without
    SecAgg+ configuration is refused (``secaggplus_mod`` fails closed), so a
    run that only claims secure aggregation gets nothing unmasked."""

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        if not (required or RunSettings.from_run_config(context.run_config).secure_aggregation):
            return call_next(msg, context)
        if RECORD_KEY_CONFIGS not in msg.content.config_records:  # fail closed, saying why
            from client.service import RequestRefused

            refusal = PolicyRefusal if required else RequestRefused
            raise refusal("secure aggregation is required, and this training message is "
                          "no SecAgg+ stage: this site's update leaves masked or not at all")

        def plain_train(inner: Message, ctx: Context) -> Message:
            # secaggplus_mod has read its own record; the rest of the chain (DP
            # clipping, the handler) sees the plain {arrays, config} message.
            inner.content.config_records.pop(RECORD_KEY_CONFIGS, None)
            reply = call_next(inner, ctx)
            if reply.has_error():
                raise SecureRoundFailed(reply.error.reason)
            metrics = {k: v for k, v in reply.content[wire.METRICS].items()}
            dp_on = RunSettings.from_run_config(ctx.run_config).dp != "off"
            weight = 1 if dp_on else int(metrics[wire.NUM_EXAMPLES])  # DP: uniform weights
            fitres = FitRes(
                Status(Code.OK, ""),
                ndarrays_to_parameters(reply.content[wire.ARRAYS].to_numpy_ndarrays()),
                weight,
                {**metrics, **{k: v for k, v in reply.content[wire.SITE].items()
                               if k in wire.SITE_NOTES},
                 wire.SITE: str(reply.content[wire.SITE][wire.SITE_NAME])})
            return Message(compat.fitres_to_recorddict(fitres, keep_input=False),
                           reply_to=inner)

        return secaggplus_mod(msg, context, plain_train)

    return mod


def privacy_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Client-side DP: clip this site's update (Flower's clipping mods) when the
    run asks for it; the server wrapper adds the noise to the aggregate."""
    dp = RunSettings.from_run_config(context.run_config).dp
    if dp == "client-fixed":
        return fixedclipping_mod(msg, context, call_next)
    if dp == "client-adaptive":
        return adaptiveclipping_mod(msg, context, call_next)
    return call_next(msg, context)


def transfer_mod(site_of: SiteOf) -> Mod:
    """The weights at the run's ``transfer-precision`` (``common/packing.py``),
    outermost but for SecAgg+: the incoming model, which must arrive in that
    precision (or the message is refused), is cast back to the model's float32
    before anything else reads it; a train reply's weights are cast to it last,
    after any DP clipping and noise, and never lengthening the update (so a
    clipped update stays within its norm as sent). Under SecAgg+ the reply
    stays float32: SecAgg+ quantises it to integers, whatever the precision. A
    value beyond float16's range fails the reply, naming the weight."""

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        settings = RunSettings.from_run_config(context.run_config)
        precision = settings.transfer_precision
        if precision == "float32" or wire.ARRAYS not in msg.content.array_records:
            return call_next(msg, context)
        what = "train" if msg.metadata.message_type.endswith("train") else "evaluate"
        try:
            received = from_wire({k: a.numpy() for k, a in msg.content[wire.ARRAYS].items()},
                                 precision)
        except WrongPrecision as exc:
            from client.service import RequestRefused

            return _failed(msg, _site_name(context, site_of), RequestRefused(str(exc)), what)
        msg.content[wire.ARRAYS] = ArrayRecord({k: Array(v) for k, v in received.items()})
        reply = call_next(msg, context)
        if (reply.has_error() or settings.secure_aggregation
                or wire.ARRAYS not in reply.content.array_records):
            return reply
        packed = {k: a.numpy() for k, a in reply.content[wire.ARRAYS].items()}
        try:
            sent = to_wire(packed, precision, reference=received
                           if settings.dp.startswith("client") and set(packed) == set(received)
                           else None)
        except PrecisionOverflow as exc:
            from common.model import build_model
            from common.packing import template_of

            exc = exc.named(template_of(build_model(settings.model).state_dict()))
            return _failed(msg, _site_name(context, site_of), exc, what)
        reply.content[wire.ARRAYS] = ArrayRecord({k: Array(v) for k, v in sent.items()})
        return reply

    return mod


def _site_record(name: str | None, notes: Mapping[str, str]) -> ConfigRecord:
    return ConfigRecord({wire.SITE_NAME: name or "",
                         **{k: v for k, v in notes.items() if k in wire.SITE_NOTES}})


def make_app(site_of: SiteOf, policy: SitePolicy | None = None,
             site_mods: Sequence[Mod] = ()) -> ClientApp:
    """The ClientApp over a site: ``site_of(context)`` answers the requests.
    Train messages pass SecAgg+ (always on where ``policy`` requires it), then
    the transfer precision's cast, then ``site_mods`` (the hospital's own DP),
    then Flower's DP clipping: the reply goes back through them in the other
    order, so the site's noise is added to the clipped update, in float32, and
    the noised update is what is cast for the wire or SecAgg+ masks. Evaluate
    messages pass the cast only."""
    client_app = ClientApp()
    required = bool(policy and policy.require_secure_aggregation)

    transfer = transfer_mod(site_of)

    @client_app.train(mods=[secagg_mod(required), transfer, *site_mods, privacy_mod])
    def train_handler(msg: Message, context: Context) -> Message:
        """Train the global model on this site's training cases (scoring it
        first when the message asks)."""
        try:
            site = site_of(context)
            weights, metrics, notes = ask(site, "train", msg, context)
        except Exception as exc:  # noqa: BLE001 - every failure leaves scrubbed
            return _failed(msg, _site_name(context, site_of), exc, "train")
        return Message(RecordDict({wire.ARRAYS: ArrayRecord({k: Array(v) for k, v in
                                                             weights.items()}),
                                   wire.METRICS: MetricRecord(metrics),
                                   wire.SITE: _site_record(site.name, notes)}),
                       reply_to=msg)

    @client_app.evaluate(mods=[transfer])
    def evaluate_handler(msg: Message, context: Context) -> Message:
        """Score the global model on this site's test cases; reply with means only."""
        try:
            site = site_of(context)
            _, metrics, notes = ask(site, "evaluate", msg, context)
        except Exception as exc:  # noqa: BLE001
            return _failed(msg, _site_name(context, site_of), exc, "evaluate")
        return Message(RecordDict({wire.METRICS: MetricRecord(metrics),
                                   wire.SITE: _site_record(site.name, notes)}),
                       reply_to=msg)

    @client_app.query()
    def query_handler(msg: Message, context: Context) -> Message:
        """The one query a run asks at its start: this site's fingerprint
        (aggregates of its training cases, ``common/data/harmonise.py``)."""
        try:
            asked = (msg.content[wire.CONFIG].get(wire.QUERY)
                     if wire.CONFIG in msg.content.config_records else None)
            if asked != wire.FINGERPRINT:
                from client.service import RequestRefused

                raise RequestRefused(f"unknown query {str(asked)[:40]!r}; this site answers "
                                     f"'{wire.FINGERPRINT}'")
            site = site_of(context)
            _, metrics, notes = ask(site, wire.FINGERPRINT, msg, context)
        except Exception as exc:  # noqa: BLE001
            return _failed(msg, _site_name(context, site_of), exc, wire.FINGERPRINT)
        return Message(RecordDict({wire.METRICS: MetricRecord(metrics),
                                   wire.SITE: _site_record(site.name, notes)}),
                       reply_to=msg)

    client_app.train_handler = train_handler  # for tests that call a handler directly
    client_app.evaluate_handler = evaluate_handler
    client_app.query_handler = query_handler
    return client_app


# Simulations (Flower loads this object): the site's service in this process.
app = make_app(InProcessSite)
train_handler = app.train_handler
evaluate_handler = app.evaluate_handler
query_handler = app.query_handler
