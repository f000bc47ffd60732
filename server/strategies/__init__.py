"""The server's strategies, one concept per module: ``base`` (the wrapper
pattern), ``declared`` (what a reply may bring: the run's declared keys),
``recorder`` (per-site records), ``checks`` (update checks), ``transfer``
(the weights at the run's transfer precision),
``budget`` (fedseg's privacy ledger where Flower's accountant does not reach),
``dp`` (Flower's DP wrappers), ``fednova``, ``fedadam`` (scheduled FedAdam),
``secagg`` (SecAgg+ with Message-API apps) and ``factory`` (what a run's
settings ask for)."""

from server.strategies.budget import PrivacyBudgetExhausted
from server.strategies.factory import build_strategy
from server.strategies.recorder import REGISTRY_ENV, RoundRecord, SiteRecorder, TooFewSites

__all__ = ["REGISTRY_ENV", "PrivacyBudgetExhausted", "RoundRecord", "SiteRecorder",
           "TooFewSites", "build_strategy"]
