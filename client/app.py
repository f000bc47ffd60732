"""Flower ClientApp: one hospital's node.

Thin on purpose: unpack the message, call the site's algorithm
(``common.site_algorithm``), pack the reply. What leaves the site is exactly
what ``common.wire`` names:

* train reply: the model weights (``arrays``), ``wire.TRAIN_METRICS``
  (``metrics``), the site's public name (``site``);
* evaluate reply: ``wire.EVAL_METRICS`` (case count and means over the test
  cases), the site's name.

A failure replies with a scrubbed error (kind of failure, case index) instead
of the exception text, which could hold a path or a patient value.
"""

from __future__ import annotations

import logging

import flwr.compat.common.recorddict_compat as compat
import torch
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

from common import wire
from common.config import RunSettings, SiteSettings, fedseg_home, simulation_sites
from common.data.synthetic import ensure_site
from common.errors import FedsegError, error_reason, scrub, write_local_log
from common.site_algorithm import SiteAlgorithm

log = logging.getLogger(__name__)

OPTIMIZER_STATE = "fedseg-optimizer"  # context.state key: Adam's moments between rounds

app = ClientApp()

# The site's algorithm per (run, node), kept while the process lives: a
# simulation's worker serves many rounds; a deployment's ClientApp process
# serves one message, and Adam's moments then live in the node's context.state.
_ALGORITHMS: dict[tuple[int, int], SiteAlgorithm] = {}


def site_algorithm(context: Context) -> SiteAlgorithm:
    settings = RunSettings.from_run_config(context.run_config)
    site = SiteSettings.from_node_config(context.node_config, simulation_sites())
    if site.threads:
        torch.set_num_threads(site.threads)
    data_dir = site.data_dir or ensure_site(
        fedseg_home() / "synthetic", site.partition_id, settings.synthetic_train_cases,
        settings.synthetic_test_cases, settings.seed)
    key = (context.run_id, context.node_id)
    algo = _ALGORITHMS.get(key)
    if algo is None or (algo.settings, algo.site, algo.data_dir) != (settings, site.name,
                                                                      data_dir):
        for other in [k for k in _ALGORITHMS if k[0] != context.run_id]:
            del _ALGORITHMS[other]  # a finished run's
        algo = _ALGORITHMS[key] = SiteAlgorithm(settings, site.name, data_dir,
                                                device=site.device)
    return algo


def _site_name(context: Context) -> str | None:
    """This node's public name, if its node config can be read at all."""
    try:
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
                        {**metrics, wire.SITE: str(reply.content[wire.SITE][wire.SITE_NAME])})
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
    """Train the global model on this site's training cases."""
    try:
        algo = site_algorithm(context)
        saved = context.state.array_records.get(OPTIMIZER_STATE)  # this node's own
        algo.optimizer_state = {k: a.numpy() for k, a in saved.items()} if saved else None
        weights, metrics = algo.train(msg.content[wire.ARRAYS].to_torch_state_dict(),
                                      dict(msg.content[wire.CONFIG]))
        if algo.optimizer_state:  # never leaves the site
            context.state[OPTIMIZER_STATE] = ArrayRecord(
                {k: Array(v) for k, v in algo.optimizer_state.items()})
    except Exception as exc:  # noqa: BLE001 - every failure leaves scrubbed
        return _failed(msg, context, exc, "train")
    return Message(RecordDict({wire.ARRAYS: ArrayRecord(weights),
                               wire.METRICS: MetricRecord(metrics),
                               wire.SITE: ConfigRecord({wire.SITE_NAME: algo.site})}),
                   reply_to=msg)


@app.evaluate()
def evaluate_handler(msg: Message, context: Context) -> Message:
    """Score the global model on this site's test cases; reply with means only."""
    try:
        algo = site_algorithm(context)
        metrics = algo.evaluate(msg.content[wire.ARRAYS].to_torch_state_dict(),
                                dict(msg.content[wire.CONFIG]))
    except Exception as exc:  # noqa: BLE001
        return _failed(msg, context, exc, "evaluate")
    return Message(RecordDict({wire.METRICS: MetricRecord(metrics),
                               wire.SITE: ConfigRecord({wire.SITE_NAME: algo.site})}),
                   reply_to=msg)
