"""Scheduled FedAdam: the server's step follows the sites' schedule."""

import math

import pytest

from common.config import RunSettings
from server.strategies import build_strategy
from server.strategies.fedadam import ScheduledFedAdam


def test_fedadam_server_rate_follows_the_run_schedule():
    """After two rounds of a resumed four-round run, FedAdam's server step is
    scaled like the sites' learning rate at the half-way point."""
    settings = RunSettings.from_run_config({"strategy": "fedadam", "num-rounds": 4,
                                            "fedadam-eta": 0.01, "lr-min-ratio": 0.01,
                                            "evaluate-every": 4})
    recorder = build_strategy(settings, rounds_done=2)
    fedadam = recorder
    while not isinstance(fedadam, ScheduledFedAdam):
        fedadam = fedadam.inner
    fedadam.aggregate_train(1, [])  # round 3 of the run
    assert fedadam.eta == pytest.approx(0.01 * (0.01 + 0.99 * 0.5))
    fedadam.aggregate_train(2, [])  # round 4
    assert fedadam.eta == pytest.approx(0.01 * (0.01 + 0.99 * 0.5 * (1 + math.cos(0.75
                                                                              * math.pi))))
    # Sites score the model in round 4 of the run (the last), not in round 3.
    assert [recorder.evaluate_due(r) for r in (1, 2)] == [False, True]
