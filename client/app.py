"""Flower ClientApp: one hospital's node.

Thin on purpose: unpack the message, call ``common``, pack the reply. What
leaves the site is exactly:

* train reply: the model weights (``arrays``), ``num-examples`` (training
  cases), ``train-loss``, ``train-seconds`` and ``train-steps`` (``metrics``), the site's public
  name (``site``);
* evaluate reply: ``num-examples`` (test cases) and the mean ``dice``, ``iou``,
  ``hd95``, ``sensitivity``, ``specificity`` (``metrics``), the site's name.

A failure replies with a scrubbed error (kind of failure, case index) instead
of the exception text, which could hold a path or a patient value.
"""

from __future__ import annotations

import logging
from pathlib import Path

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

from common.config import RunSettings, SiteSettings, fedseg_home, simulation_sites
from common.data.cache import load_prepared
from common.data.synthetic import ensure_site
from common.errors import FedsegError, error_reason, scrub, write_local_log
from common.metrics import METRICS
from common.model import build_model, pick_device
from common.training import evaluate, train

log = logging.getLogger(__name__)

TRAIN_METRICS = ("num-examples", "train-loss", "train-seconds", "train-steps")
EVAL_METRICS = ("num-examples", *METRICS)
OPTIMIZER_STATE = "fedseg-optimizer"  # context.state key: Adam's moments between rounds

app = ClientApp()


def _setup(msg: Message, context: Context) -> tuple[RunSettings, SiteSettings, Path,
                                                     torch.nn.Module, torch.device]:
    settings = RunSettings.from_run_config(context.run_config)
    site = SiteSettings.from_node_config(context.node_config, simulation_sites())
    if site.threads:
        torch.set_num_threads(site.threads)
    data_dir = site.data_dir or ensure_site(
        fedseg_home() / "synthetic",
        site.partition_id,
        settings.synthetic_train_cases,
        settings.synthetic_test_cases,
        settings.seed,
    )
    model = build_model(settings.model)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    return settings, site, data_dir, model, pick_device(site.device)


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
        # clipping, the handler) sees the plain {"arrays", "config"} message.
        inner.content.config_records.pop(RECORD_KEY_CONFIGS, None)
        reply = call_next(inner, ctx)
        if reply.has_error():
            raise SecureRoundFailed(reply.error.reason)
        metrics = {k: v for k, v in reply.content["metrics"].items()}
        dp_on = str(ctx.run_config.get("dp", "off")) != "off"
        weight = 1 if dp_on else int(metrics["num-examples"])  # DP: uniform weights
        fitres = FitRes(Status(Code.OK, ""),
                        ndarrays_to_parameters(reply.content["arrays"].to_numpy_ndarrays()),
                        weight, {**metrics, "site": str(reply.content["site"]["name"])})
        return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=inner)

    return secaggplus_mod(msg, context, plain_train)


def privacy_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Client-side DP: clip this site's update (Flower's clipping mods) when the
    run asks for it; the server wrapper adds the noise to the aggregate."""
    dp = str(context.run_config.get("dp", "off"))
    if dp == "client-fixed":
        return fixedclipping_mod(msg, context, call_next)
    if dp == "client-adaptive":
        return adaptiveclipping_mod(msg, context, call_next)
    return call_next(msg, context)


@app.train(mods=[secagg_mod, privacy_mod])
def train_handler(msg: Message, context: Context) -> Message:
    """Train the global model on this site's training cases."""
    try:
        settings, site, data_dir, model, device = _setup(msg, context)
        config = msg.content["config"]
        # The run's round: Flower counts from 1 again when a run is resumed.
        server_round = int(config.get("server-round", 0)) + int(config.get("rounds-done", 0))
        cases = load_prepared(data_dir, "training", settings.input_channels)
        seed = settings.seed * 1_000_003 + server_round * 1_009 + site.partition_id
        mu = float(config.get("proximal-mu", 0.0))  # sent by FedProx
        progress = ((server_round - 1) / settings.num_rounds, server_round / settings.num_rounds)
        saved = context.state.array_records.get(OPTIMIZER_STATE)
        result = train(model, cases, settings, device, seed=seed, proximal_mu=mu,
                       progress=progress,
                       optimizer_state={k: a.numpy() for k, a in saved.items()}
                       if saved is not None and settings.keep_optimizer_state else None)
        if result.optimizer_state:  # the node's own state: it never leaves the site
            context.state[OPTIMIZER_STATE] = ArrayRecord(
                {k: Array(v) for k, v in result.optimizer_state.items()})
    except Exception as exc:  # noqa: BLE001 - every failure leaves scrubbed
        return _failed(msg, context, exc, "train")
    metrics = MetricRecord(
        {
            "num-examples": result.num_cases,
            "train-loss": result.mean_loss,
            "train-seconds": result.seconds,
            "train-steps": result.steps,  # FedNova normalises by it
        }
    )
    content = RecordDict(
        {
            "arrays": ArrayRecord(model.state_dict()),
            "metrics": metrics,
            "site": ConfigRecord({"name": site.name}),
        }
    )
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate_handler(msg: Message, context: Context) -> Message:
    """Score the global model on this site's test cases; reply with means only."""
    try:
        settings, site, data_dir, model, device = _setup(msg, context)
        cases = load_prepared(data_dir, "test", settings.input_channels)
        summary = evaluate(model, cases, settings, device).summary
    except Exception as exc:  # noqa: BLE001
        return _failed(msg, context, exc, "evaluate")
    metrics = MetricRecord({k: float(summary[k]) for k in METRICS})
    metrics["num-examples"] = int(summary["num-examples"])
    content = RecordDict({"metrics": metrics, "site": ConfigRecord({"name": site.name})})
    return Message(content, reply_to=msg)
