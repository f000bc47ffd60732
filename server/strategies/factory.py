"""The strategy a run's settings ask for, with fedseg's wrappers around it.
From the outside in:

* ``SiteRecorder``: per-site metrics, failures and bytes of each round, of
  replies first cut to what the run declared (``Declared``);
* ``PrivacyBudget``: counts DP releases and stops before the budget is exceeded;
* ``UpdateChecks``: leaves out replies with non-finite values, wrong shapes,
  weights not in the run's transfer precision or missing weights, naming the site;
* ``TransferPrecision``: the model goes out, and replies come back, cast at
  the run's ``transfer-precision`` (float16: half the bytes); everything
  inside sees float32;
* Flower's DP wrapper (server- or client-side, fixed or adaptive clipping), when on;
* Flower's ``FedAvg`` (or FedProx, FedNova, scheduled FedAdam, SecAgg+ FedAvg),
  weighted by training cases (uniformly under DP).
"""

from __future__ import annotations

from flwr.serverapp.strategy import (
    Bulyan,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    Krum,
    MultiKrum,
    Strategy,
)

from common import wire
from common.config import RunSettings
from common.privacy.accounting import PrivacyLedger
from server.strategies.base import UNIFORM_WEIGHT
from server.strategies.budget import FlowerAccount, PrivacyBudget, flower_accounts_for
from server.strategies.checks import UpdateChecks
from server.strategies.declared import Declared
from server.strategies.dp import dp_wrapper
from server.strategies.fedadam import ScheduledFedAdam
from server.strategies.fednova import FedNova
from server.strategies.recorder import SiteRecorder, aggregate_site_metrics
from server.strategies.secagg import SecAggPlusFedAvg
from server.strategies.serverstep import ServerStep
from server.strategies.transfer import TransferPrecision, wire_arrays


def robust_fedavg(settings: RunSettings, fedavg_args: dict) -> FedAvg:
    """FedAvg with the rule of ``aggregation``: Flower's own strategies."""
    f = settings.robust_malicious
    rule = settings.aggregation
    if rule == "median":
        return FedMedian(**fedavg_args)
    if rule == "trimmed-mean":
        return FedTrimmedAvg(beta=settings.robust_trim, **fedavg_args)
    if rule == "krum":
        return Krum(num_malicious_nodes=f, **fedavg_args)
    if rule == "multi-krum":
        return MultiKrum(num_malicious_nodes=f, num_nodes_to_select=settings.robust_select
                         or max(1, settings.min_nodes - f), **fedavg_args)
    if rule == "bulyan":
        return Bulyan(num_malicious_nodes=f, **fedavg_args)
    return FedAvg(**fedavg_args)


def build_strategy(settings: RunSettings, num_sampled: int | None = None,
                   rounds_done: int = 0, dp_releases: int = 0) -> SiteRecorder:
    """FedAvg weighted by each site's training cases (uniformly under DP),
    with DP, update checks, the privacy budget and per-site records around it.

    ``num_sampled``: nodes per round, which Flower's DP wrappers need to scale
    the noise (defaults to ``min-nodes``). ``rounds_done``: rounds of a resumed
    run already behind (Flower counts this call's rounds from 1 again);
    ``dp_releases``: its DP releases so far. The privacy account (Flower's
    accountant or fedseg's ledger) is the recorder's ``privacy``.
    """
    dp_on = settings.dp != "off"
    fedavg_args = dict(
        fraction_train=settings.fraction_train,
        fraction_evaluate=settings.fraction_evaluate,
        min_train_nodes=settings.min_nodes,
        min_evaluate_nodes=settings.min_nodes if settings.fraction_evaluate > 0 else 0,
        min_available_nodes=settings.min_nodes,
        weighted_by_key=UNIFORM_WEIGHT if dp_on else wire.NUM_EXAMPLES,
        evaluate_metrics_aggr_fn=aggregate_site_metrics,
    )
    precision = settings.transfer_precision
    template = None
    if precision != "float32":  # to name a weight beyond float16's range
        from common.model import build_model
        from common.packing import template_of

        template = template_of(build_model(settings.model).state_dict())
    fedavg: FedAvg
    if settings.secure_aggregation:
        fedavg = SecAggPlusFedAvg(
            to_wire=lambda arrays: wire_arrays(arrays, precision, template),
            proximal_mu=settings.fedprox_mu if settings.strategy == "fedprox" else 0.0,
            clipping_range=settings.secagg_clipping_range,
            max_weight=settings.secagg_max_weight,
            reconstruction_threshold=settings.secagg_reconstruction_threshold,
            timeout=settings.secagg_timeout, **fedavg_args)
    elif settings.strategy == "fedprox":
        fedavg = FedProx(proximal_mu=settings.fedprox_mu, **fedavg_args)
    elif settings.strategy == "fednova":
        fedavg = FedNova(**fedavg_args)
    elif settings.strategy == "fedadam":
        fedavg = ScheduledFedAdam(settings, rounds_done, eta=settings.fedadam_eta,
                                  tau=settings.fedadam_tau, **fedavg_args)
    else:
        fedavg = robust_fedavg(settings, fedavg_args)
    num_sampled = num_sampled or settings.min_nodes

    def cast(inner: Strategy) -> Strategy:  # the wire's precision, where it is not float32
        return inner if precision == "float32" else TransferPrecision(inner, precision,
                                                                      template)

    privacy: FlowerAccount | PrivacyLedger | None = None
    if dp_on and flower_accounts_for(settings, fedavg):
        privacy = FlowerAccount(settings, num_sampled, dp_releases)
        checks = UpdateChecks(cast(dp_wrapper(settings, fedavg, num_sampled,
                                              privacy.accountant)),
                              uniform_weights=True, structures=settings.structure_names,
                              precision=precision)
        outer: Strategy = checks
    else:
        checks = UpdateChecks(cast(dp_wrapper(settings, fedavg, num_sampled)),
                              uniform_weights=dp_on, structures=settings.structure_names,
                              precision=precision)
        outer = checks
        if dp_on:
            privacy = PrivacyLedger(settings.dp_noise_multiplier, settings.dp_delta,
                                    settings.dp_max_epsilon, releases=dp_releases)
            outer = PrivacyBudget(checks, privacy)
    if settings.server_learning_rate != 1.0:  # outside DP and the checks: post-processing
        outer = ServerStep(outer, settings.server_learning_rate)
    recorder = SiteRecorder(outer, Declared.of(settings))
    recorder.privacy = privacy
    recorder.evaluate_due = lambda r: ((rounds_done + r) % settings.evaluate_every == 0
                                       or rounds_done + r == settings.num_rounds)
    recorder.rounds_done = rounds_done
    recorder.min_nodes, recorder.node_wait = settings.min_nodes, settings.node_wait
    recorder.max_short_rounds = settings.max_short_rounds
    recorder.keep_every = settings.keep_model_every
    recorder.dp_sampled = num_sampled if dp_on else 0
    recorder.last_round = settings.num_rounds - rounds_done
    recorder.site_structures = not settings.named_structures
    checks.on_reject = recorder.note_failure
    if isinstance(fedavg, SecAggPlusFedAvg):
        fedavg.on_round = recorder.secure_round
    return recorder
