"""The privacy budget.

Fixed clipping with FedAvg or FedProx uses Flower's own ``RdpAccountant`` and
``max_epsilon`` (the DP wrapper checks each round before it runs and stops
with Flower's ``PrivacyBudgetExhausted``). Where Flower's accountant does not
reach — adaptive clipping, FedAdam, secure aggregation, or no noise — fedseg's
RDP ledger (``common.privacy.accounting``) counts releases and stops the same
way. Either is read by the run folder through ``epsilon`` and ``releases``.
"""

from __future__ import annotations

from flwr.serverapp.strategy import FedAvg, Strategy
from flwr.supercore.privacy_accounting import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    PrivacyConfig,
    SamplingMethod,
)
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

from common.config import RunSettings
from common.errors import FedsegError
from common.privacy.accounting import PrivacyLedger
from server.strategies.base import StrategyWrapper


class PrivacyBudgetExhausted(FedsegError):
    kind = "privacy budget exhausted"

class PrivacyBudget(StrategyWrapper):
    """Count DP releases (rounds that produced a new global model) and refuse
    to start a round whose release would exceed the epsilon budget."""

    def __init__(self, inner: Strategy, ledger: PrivacyLedger) -> None:
        super().__init__(inner)
        self.ledger = ledger

    def configure_train(self, server_round, arrays, config, grid):
        if not self.ledger.next_round_fits():
            raise PrivacyBudgetExhausted(
                f"the next round would raise epsilon from {self.ledger.epsilon:.3f} to "
                f"{self.ledger.epsilon_after(self.ledger.releases + 1):.3f}, over the budget "
                f"of {self.ledger.max_epsilon} (delta {self.ledger.delta})")
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round, replies):
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is not None:
            self.ledger.releases += 1
        return arrays, metrics


def flower_accounts_for(settings: RunSettings, strategy: Strategy) -> bool:
    """Whether Flower's accountant covers this run: fixed clipping, noise,
    Flower's own FedAvg aggregation (FedAvg, FedProx), no secure aggregation."""
    return (settings.dp in ("server-fixed", "client-fixed")
            and settings.dp_noise_multiplier > 0 and not settings.secure_aggregation
            and isinstance(strategy, FedAvg)
            and type(strategy).aggregate_train is FedAvg.aggregate_train)


class FlowerAccount:
    """Flower's ``RdpAccountant`` for a run (client-level DP, add-or-remove-one,
    no amplification by sampling: Flower samples a fixed number of nodes),
    re-fed a resumed run's past releases."""

    def __init__(self, settings: RunSettings, num_sampled: int, releases: int = 0) -> None:
        self.noise_multiplier = settings.dp_noise_multiplier
        self.num_sampled = num_sampled
        self.accountant = RdpAccountant(PrivacyConfig(
            target_delta=settings.dp_delta, population_size=num_sampled,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION,
            max_epsilon=settings.dp_max_epsilon or None))
        if releases:
            self.accountant.compose(self.event(), count=releases)

    def event(self) -> GaussianPrivacyEvent:
        return GaussianPrivacyEvent(noise_multiplier=self.noise_multiplier,
                                    sample_size=self.num_sampled,
                                    population_size=self.num_sampled)

    @property
    def releases(self) -> int:
        return self.accountant.num_releases

    @property
    def epsilon(self) -> float:
        return self.accountant.get_privacy_spent().epsilon if self.releases else 0.0
