"""Differential-privacy accounting with Google's ``dp-accounting`` (RDP).

Each round that releases a new global model is one Gaussian mechanism with
noise multiplier ``z`` on the sum of clipped client updates (client-level DP,
add-or-remove-one neighbouring, as in DP-FedAvg, McMahan et al. 2018). fedseg
claims no amplification by sampling: Flower samples a fixed number of nodes
without the Poisson sampling the amplification bounds assume, so every round
counts in full. With adaptive clipping the model's noise is raised so that the
round, clipped-count query included, costs the same as one Gaussian mechanism
with multiplier ``z`` (Andrew et al. 2021); the same event is composed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

from dp_accounting import dp_event, rdp


class PrivacyAccount(Protocol):
    """What the run folder reads of a run's privacy account (fedseg's ledger or
    Flower's accountant, see ``server.strategies.budget``)."""

    @property
    def epsilon(self) -> float: ...

    @property
    def releases(self) -> int: ...


@dataclass
class PrivacyLedger:
    """Epsilon spent so far, and whether one more round fits a budget."""

    noise_multiplier: float
    delta: float
    max_epsilon: float = 0.0  # 0: no budget
    releases: int = 0

    def epsilon_after(self, releases: int) -> float:
        """Epsilon at ``delta`` after ``releases`` rounds (0 rounds: 0)."""
        if releases == 0:
            return 0.0
        if self.noise_multiplier <= 0:
            return math.inf
        accountant = rdp.RdpAccountant()
        accountant.compose(dp_event.GaussianDpEvent(self.noise_multiplier), releases)
        return float(accountant.get_epsilon(self.delta))

    @property
    def epsilon(self) -> float:
        return self.epsilon_after(self.releases)

    def next_round_fits(self) -> bool:
        return not self.max_epsilon or self.epsilon_after(self.releases + 1) <= self.max_epsilon

    def rounds_within_budget(self, limit: int = 100_000) -> int:
        """How many rounds the budget allows (``limit`` when there is none)."""
        if not self.max_epsilon:
            return limit
        n = 0
        while n < limit and self.epsilon_after(n + 1) <= self.max_epsilon:
            n += 1
        return n
