"""What each run setting builds: the wrappers, from the outside in."""

import pytest
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
    FedProx,
)

from common.config import RunSettings
from common.privacy.accounting import PrivacyLedger
from server.strategies import build_strategy
from server.strategies.budget import FlowerAccount, PrivacyBudget
from server.strategies.checks import UpdateChecks
from server.strategies.fedadam import ScheduledFedAdam
from server.strategies.fednova import FedNova
from server.strategies.secagg import SecAggPlusFedAvg
from server.strategies.transfer import TransferPrecision


def chain(config: dict) -> list[type]:
    strategy = build_strategy(RunSettings.from_run_config(config), num_sampled=3)
    out = []
    while strategy is not None:
        out.append(type(strategy))
        strategy = getattr(strategy, "inner", None) or getattr(strategy, "strategy", None)
    return out[1:]  # below the recorder


@pytest.mark.parametrize(("config", "expected"), [
    ({}, [UpdateChecks, FedAvg]),
    ({"strategy": "fedprox"}, [UpdateChecks, FedProx]),
    ({"strategy": "fednova"}, [UpdateChecks, FedNova]),
    ({"strategy": "fedadam"}, [UpdateChecks, ScheduledFedAdam]),
    ({"secure-aggregation": True}, [UpdateChecks, SecAggPlusFedAvg]),
    ({"dp": "server-fixed"}, [UpdateChecks, DifferentialPrivacyServerSideFixedClipping, FedAvg]),
    ({"dp": "client-fixed", "strategy": "fedprox"},
     [UpdateChecks, DifferentialPrivacyClientSideFixedClipping, FedProx]),
    ({"dp": "client-adaptive"},
     [PrivacyBudget, UpdateChecks, DifferentialPrivacyClientSideAdaptiveClipping, FedAvg]),
    ({"dp": "client-fixed", "secure-aggregation": True},
     [PrivacyBudget, UpdateChecks, DifferentialPrivacyClientSideFixedClipping,
      SecAggPlusFedAvg]),
    ({"transfer-precision": "float16"}, [UpdateChecks, TransferPrecision, FedAvg]),
    ({"transfer-precision": "float16", "dp": "server-fixed"},
     [UpdateChecks, TransferPrecision, DifferentialPrivacyServerSideFixedClipping, FedAvg]),
    ({"transfer-precision": "float16", "dp": "client-adaptive"},
     [PrivacyBudget, UpdateChecks, TransferPrecision,
      DifferentialPrivacyClientSideAdaptiveClipping, FedAvg]),
])
def test_each_setting_builds_its_chain(config, expected):
    assert chain(config) == expected


def test_fixed_clipping_is_accounted_by_flowers_accountant_else_by_the_ledger():
    fixed = build_strategy(RunSettings.from_run_config({"dp": "client-fixed"}), 3)
    assert isinstance(fixed.privacy, FlowerAccount)
    adaptive = build_strategy(RunSettings.from_run_config({"dp": "server-adaptive"}), 3)
    assert isinstance(adaptive.privacy, PrivacyLedger)
    no_noise = build_strategy(RunSettings.from_run_config(
        {"dp": "server-fixed", "dp-noise-multiplier": 0.0}), 3)
    assert isinstance(no_noise.privacy, PrivacyLedger)  # Flower's needs noise
    assert build_strategy(RunSettings.from_run_config({}), 3).privacy is None
