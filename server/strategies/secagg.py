"""Secure aggregation (SecAgg+, Bell et al. 2020) for the Message-API FedAvg.

Flower 1.42 ships SecAgg+ only in its legacy API (``SecAggPlusWorkflow`` on the
server, ``secaggplus_mod`` on the client). ``SecAggPlusFedAvg`` runs that
workflow, unchanged, from inside the new FedAvg's ``configure_train``:

* it samples the nodes as FedAvg does and hands the workflow a
  ``LegacyContext`` whose strategy (``_Capture``) only offers those nodes and
  keeps the aggregate the workflow computes;
* the workflow's setup stage is the one place overridden: each node's training
  content becomes this app's own ``{"arrays", "config"}`` records, one record
  dict per node, because the workflow writes per-node key shares into it;
* the model goes to the sites as the run's ``transfer-precision`` casts it
  (``to_wire``); the sites' uploads are SecAgg+'s masked integers whatever
  that precision (each site hands SecAgg+ its float32 update to quantise);
* ``configure_train`` returns no messages (the protocol has already run its
  four round trips); ``aggregate_train`` returns the captured aggregate mapped
  back to the parameter names and dtypes, after checking it is finite.

The server holds the sum of masked, quantised updates, never one hospital's
update: masks cancel only in the sum. Clients whose training fails after
sharing keys are dropped and their masks reconstructed from the others' shares
(down to ``reconstruction_threshold``). The case count and the named metrics
still travel in plaintext, as without secure aggregation; they are kept as
received (``SecureRound.replies``) for ``SiteRecorder.secure_round``, which
keeps only what the run declared (``server/strategies/declared.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from logging import WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.logger import log
from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from common import wire
from server.wire import audit, content_bytes


@dataclass
class SecureRound:
    """What a secure round produced."""

    aggregate: list[np.ndarray] | None = None
    # node id -> the plaintext part of its reply, as received: the legacy fit
    # result's one flat record (its name under ``site``, its notes, its metrics)
    replies: dict[int, dict[str, Any]] = field(default_factory=dict)
    failures: int = 0
    halted: bool = False  # the protocol stopped: too few sites to unmask
    bytes_down: int = 0
    bytes_up: int = 0


class _Capture(LegacyStrategy):
    """A legacy strategy that offers fixed nodes and keeps the aggregate."""

    def __init__(self, proxies: list[ClientProxy], fit_ins: FitIns) -> None:
        self.proxies, self.fit_ins = proxies, fit_ins
        self.result = SecureRound()

    def configure_fit(self, server_round, parameters, client_manager):
        return [(proxy, self.fit_ins) for proxy in self.proxies]

    def aggregate_fit(self, server_round, results, failures):
        if results:  # every result carries the same, unmasked aggregate
            self.result.aggregate = parameters_to_ndarrays(results[0][1].parameters)
        for proxy, res in results:
            self.result.replies[proxy.node_id] = dict(res.metrics)
        self.result.failures = len(failures)
        return (results[0][1].parameters if results else None), {}

    # The workflow uses none of these.
    def initialize_parameters(self, client_manager) -> Parameters | None:
        return None

    def configure_evaluate(self, server_round, parameters, client_manager
                           ) -> list[tuple[ClientProxy, EvaluateIns]]:
        return []

    def aggregate_evaluate(self, server_round, results: list[tuple[ClientProxy, EvaluateRes]],
                           failures) -> tuple[float | None, dict[str, Scalar]]:
        return None, {}

    def evaluate(self, server_round, parameters) -> tuple[float, dict[str, Scalar]] | None:
        return None


class _Workflow(SecAggPlusWorkflow):
    """Flower's SecAgg+ workflow; nodes receive this app's own training records."""

    def __init__(self, content: Callable[[], RecordDict], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._content = content

    def setup_stage(self, grid, context, state) -> bool:
        ok = super().setup_stage(grid, context, state)
        for nid in state.nid_to_fitins:
            state.nid_to_fitins[nid] = self._content()  # one record dict per node
        return ok


class _CountingGrid:
    """The grid as the workflow sees it: counts the bytes each way."""

    def __init__(self, grid: Grid, result: SecureRound, server_round: int) -> None:
        self._grid, self._result, self._round = grid, result, server_round
        self._stage = 0

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None
                         ) -> Iterable[Message]:
        messages = list(messages)
        self._result.bytes_down += sum(content_bytes(m.content) for m in messages)
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        self._result.bytes_up += sum(content_bytes(m.content) for m in replies
                                     if not m.has_error())
        for msg in replies:
            audit(self._round, f"secagg{self._stage}", msg)
        self._stage += 1
        return replies

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


class SecAggPlusFedAvg(FedAvg):
    """FedAvg whose training aggregate is computed by SecAgg+."""

    def __init__(self, *, clipping_range: float, max_weight: float,
                 reconstruction_threshold: float = 0.6, timeout: float = 600.0,
                 proximal_mu: float = 0.0,
                 on_round: Callable[[int, SecureRound], None] | None = None,
                 to_wire: Callable[[ArrayRecord], ArrayRecord] = lambda arrays: arrays,
                 **fedavg: Any) -> None:
        super().__init__(**fedavg)
        self.to_wire = to_wire  # the global model as it travels (transfer-precision)
        self.clipping_range = clipping_range
        self.max_weight = max_weight
        self.reconstruction_threshold = reconstruction_threshold
        self.timeout = timeout
        self.proximal_mu = proximal_mu  # FedProx under secure aggregation
        self.on_round = on_round
        self._rounds: dict[int, tuple[SecureRound, ArrayRecord]] = {}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        num_nodes = int(len(list(grid.get_node_ids())) * self.fraction_train)
        node_ids, _ = sample_nodes(grid, self.min_available_nodes,
                                   max(num_nodes, self.min_train_nodes))
        config[wire.SERVER_ROUND] = server_round
        if self.proximal_mu:
            config[wire.PROXIMAL_MU] = self.proximal_mu
        train_config = ConfigRecord(dict(config))
        proxies = [GridClientProxy(nid, grid, grid.run.run_id) for nid in node_ids]
        parameters = ndarrays_to_parameters(arrays.to_numpy_ndarrays())
        capture = _Capture(proxies, FitIns(parameters, {}))
        state = RecordDict({
            MAIN_PARAMS_RECORD: ArrayRecord(arrays.to_numpy_ndarrays()),
            MAIN_CONFIGS_RECORD: ConfigRecord({WorkflowKey.CURRENT_ROUND: server_round}),
        })
        context = LegacyContext(Context(run_id=grid.run.run_id, node_id=0, node_config={},
                                        state=state, run_config={}),
                                strategy=capture, client_manager=SimpleClientManager())
        sent = self.to_wire(arrays)  # the sites' copy; the aggregate is checked against arrays
        workflow = _Workflow(
            lambda: RecordDict({wire.ARRAYS: sent,
                                wire.CONFIG: ConfigRecord(dict(train_config))}),
            num_shares=1.0, reconstruction_threshold=self.reconstruction_threshold,
            max_weight=self.max_weight, clipping_range=self.clipping_range,
            timeout=self.timeout)
        workflow(_CountingGrid(grid, capture.result, server_round), context)
        capture.result.halted = capture.result.aggregate is None
        self._rounds[server_round] = (capture.result, arrays)
        if self.on_round:
            self.on_round(server_round, capture.result)
        return []  # the protocol's own messages have been exchanged already

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        result, sent = self._rounds.pop(server_round, (None, None))
        if result is None or result.aggregate is None or sent is None:
            log(WARNING, "round %d: secure aggregation produced no aggregate", server_round)
            return None, None
        names = list(sent.keys())
        reference = sent.to_numpy_ndarrays()
        if len(result.aggregate) != len(names) or any(
                a.shape != r.shape for a, r in zip(result.aggregate, reference, strict=True)):
            log(WARNING, "round %d: secure aggregate has the wrong shapes; round skipped",
                server_round)
            return None, None
        if not all(np.isfinite(a).all() for a in result.aggregate):
            log(WARNING, "round %d: secure aggregate is not finite; round skipped", server_round)
            return None, None
        arrays = ArrayRecord({n: _array(a.astype(r.dtype))
                              for n, a, r in zip(names, result.aggregate, reference,
                                                 strict=True)})
        # Flower's aggregated train metrics: the declared two, from numbers only
        sites = [m for m in result.replies.values()
                 if _finite(m.get(wire.NUM_EXAMPLES)) and m[wire.NUM_EXAMPLES] >= 0]
        metrics: dict[str, float | int] = {
            wire.NUM_EXAMPLES: int(sum(m[wire.NUM_EXAMPLES] for m in sites))}
        losses = [(m[wire.TRAIN_LOSS], m[wire.NUM_EXAMPLES]) for m in sites
                  if _finite(m.get(wire.TRAIN_LOSS))]
        if losses and sum(w for _, w in losses) > 0:
            metrics[wire.TRAIN_LOSS] = (sum(v * w for v, w in losses)
                                        / sum(w for _, w in losses))
        return arrays, MetricRecord(metrics)


def _finite(value: Any) -> bool:
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and math.isfinite(value))


def _array(a: np.ndarray):
    from flwr.app import Array

    return Array(np.ascontiguousarray(a))
