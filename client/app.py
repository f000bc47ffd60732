"""Flower ClientApp: one hospital's node.

Thin on purpose: unpack the message, ask the site (``client.service``), pack
the reply. In a deployment the site is the hospital's own worker process
(``client/worker.py``), reached over a local socket that ``fedseg node`` names
in the node config: this app, which arrives from the coordinator, never learns
the data folder, and imports no torch and no MONAI. In a simulation the same
service runs in this process.

What leaves the site is exactly what ``common.wire`` names:

* train reply: the model weights (``arrays``), ``wire.TRAIN_METRICS`` and,
  when asked (``evaluate-incoming``), the incoming global model's scores
  (``global-*``) in ``metrics``, the site's public name (``site``);
* evaluate reply: ``wire.EVAL_METRICS`` (case count and means over the test
  cases), the site's name.

A failure replies with a scrubbed error (kind of failure, case index) instead
of the exception text, which could hold a path or a patient value.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

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
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.common.constant import ErrorCode
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from client.channel import WorkerClient
from common import wire
from common.config import RunSettings, SiteSettings, fedseg_home, simulation_sites
from common.errors import FedsegError, error_reason, scrub, write_local_log
from common.processes import exit_when_orphaned

log = logging.getLogger(__name__)

OPTIMIZER_STATE = "fedseg-optimizer"  # context.state key: Adam's moments between rounds
WORKER = "worker"  # node config: the site worker's socket (set by `fedseg node`)

app = ClientApp()

# In a simulation: the site's service per (run, node), kept while the process
# lives (a simulation's process serves many rounds, not always of one node:
# Adam's moments travel in the node's context.state).
_SERVICES: dict[tuple[int, int], Any] = {}


class InProcessSite:
    """The site's service in this process (simulation)."""

    def __init__(self, context: Context) -> None:
        self.context = context

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
        from client.policy import SitePolicy

        key = (self.context.run_id, self.context.node_id)
        policy = SitePolicy(share_local_model=settings.cross_site)  # the user's consent
        models = fedseg_home() / "sites" / site.name / "models"
        service = _SERVICES.get(key)
        if service is None or (service.site, service.data_dir, service.policy,
                               service.models_dir) != (site.name, data_dir, policy, models):
            for other in [k for k in _SERVICES if k[0] != self.context.run_id]:
                del _SERVICES[other]  # a finished run's
            service = _SERVICES[key] = SiteService(site.name, data_dir, device=site.device,
                                                   policy=policy, models_dir=models)
        return service

    def request(self, kind: str, run_id: int, run_config: Mapping[str, Any],
                round_config: Mapping[str, Any], weights: Mapping[str, np.ndarray] | None
                ) -> tuple[dict[str, np.ndarray], dict[str, Any], dict[str, str]]:
        service = self.service(RunSettings.from_run_config(run_config))
        state = self.context.state
        if kind == "train":
            algo = service.algorithm(run_id, run_config)
            saved = state.array_records.get(OPTIMIZER_STATE)  # this node's own
            algo.optimizer_state = {k: a.numpy() for k, a in saved.items()} if saved else None
        out = service.handle(kind, run_id, run_config, round_config, weights)
        if kind == "train" and algo.optimizer_state:  # never leaves the site
            state[OPTIMIZER_STATE] = ArrayRecord(
                {k: Array(v) for k, v in algo.optimizer_state.items()})
        return out


def site(context: Context) -> WorkerClient | InProcessSite:
    """The worker when ``fedseg node`` named one, else the service in process."""
    path = context.node_config.get(WORKER)
    if not path:
        return InProcessSite(context)
    exit_when_orphaned("ClientApp")  # a killed SuperNode does not leave it hanging
    return WorkerClient(str(path))


def ask(kind: str, msg: Message, context: Context
        ) -> tuple[dict[str, np.ndarray], dict[str, Any], dict[str, str]]:
    """The site's answer to ``msg``: weights by name, metrics, notes."""
    weights = ({k: a.numpy() for k, a in msg.content[wire.ARRAYS].items()}
               if wire.ARRAYS in msg.content.array_records else None)
    config = dict(msg.content[wire.CONFIG]) if wire.CONFIG in msg.content.config_records else {}
    return site(context).request(kind, context.run_id, dict(context.run_config), config,
                                 weights)


def _site_name(context: Context) -> str | None:
    """This node's public name, if its node config can be read at all."""
    try:
        if context.node_config.get(WORKER):
            return str(context.node_config.get("site-name") or "") or None
        return SiteSettings.from_node_config(context.node_config, simulation_sites()).name
    except Exception:  # noqa: BLE001 - the failure being reported is the real one
        return None


def _failed(msg: Message, context: Context, exc: Exception, what: str) -> Message:
    """The reply for a failed handler: the site's name and the scrubbed cause.
    The full cause (case name, path) stays in this site's own log, and in a
    simulation (where every party is the user's own machine) also goes to the
    run folder's local log that ``fedseg simulate`` shows in the terminal."""
    name = _site_name(context)
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


def secagg_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Secure aggregation (SecAgg+) when the run asks for it: Flower's
    ``secaggplus_mod`` masks this site's update; this bridges its legacy
    fit-record format to this app's own records. Without the run setting, a
    no-op; with it, a train message without SecAgg+ configuration is refused
    (``secaggplus_mod`` fails closed)."""
    if not RunSettings.from_run_config(context.run_config).secure_aggregation:
        return call_next(msg, context)

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
        fitres = FitRes(Status(Code.OK, ""),
                        ndarrays_to_parameters(reply.content[wire.ARRAYS].to_numpy_ndarrays()),
                        weight,
                        {**metrics, **{k: v for k, v in reply.content[wire.SITE].items()
                                       if k in wire.SITE_NOTES},
                         wire.SITE: str(reply.content[wire.SITE][wire.SITE_NAME])})
        return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=inner)

    return secaggplus_mod(msg, context, plain_train)


def privacy_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Client-side DP: clip this site's update (Flower's clipping mods) when the
    run asks for it; the server wrapper adds the noise to the aggregate."""
    dp = RunSettings.from_run_config(context.run_config).dp
    if dp == "client-fixed":
        return fixedclipping_mod(msg, context, call_next)
    if dp == "client-adaptive":
        return adaptiveclipping_mod(msg, context, call_next)
    return call_next(msg, context)


@app.train(mods=[secagg_mod, privacy_mod])
def train_handler(msg: Message, context: Context) -> Message:
    """Train the global model on this site's training cases (scoring it first
    when the message asks)."""
    try:
        weights, metrics, notes = ask("train", msg, context)
    except Exception as exc:  # noqa: BLE001 - every failure leaves scrubbed
        return _failed(msg, context, exc, "train")
    site = {wire.SITE_NAME: _site_name(context) or "",
            **{k: v for k, v in notes.items() if k in wire.SITE_NOTES}}
    return Message(RecordDict({wire.ARRAYS: ArrayRecord({k: Array(v) for k, v in
                                                         weights.items()}),
                               wire.METRICS: MetricRecord(metrics),
                               wire.SITE: ConfigRecord(site)}),
                   reply_to=msg)


@app.evaluate()
def evaluate_handler(msg: Message, context: Context) -> Message:
    """Score the global model on this site's test cases; reply with means only."""
    try:
        _, metrics, notes = ask("evaluate", msg, context)
    except Exception as exc:  # noqa: BLE001
        return _failed(msg, context, exc, "evaluate")
    site = {wire.SITE_NAME: _site_name(context) or "",
            **{k: v for k, v in notes.items() if k in wire.SITE_NOTES}}
    return Message(RecordDict({wire.METRICS: MetricRecord(metrics),
                               wire.SITE: ConfigRecord(site)}),
                   reply_to=msg)
