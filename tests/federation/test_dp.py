"""Differential privacy in real Flower simulations: noise level, accounting,
the budget stop, server-side clipping."""

from __future__ import annotations

import math

import pytest
import torch
from dp_accounting import dp_event, rdp

from common.config import RunSettings
from common.data.synthetic import write_federation
from common.model import build_model
from server.runs import read_metrics
from server.simulation import Site, simulate

pytestmark = pytest.mark.federation

SMALL = {"synthetic-train-cases": 2, "seed": 0}


@pytest.fixture(scope="module")
def three_sites(tmp_path_factory) -> list[Site]:
    folders = write_federation(tmp_path_factory.mktemp("dp"), 3, n_train=2, n_test=1, seed=4)
    return [Site(f"site-{i}", f) for i, f in enumerate(folders)]


def independent_epsilon(z: float, rounds: int, delta: float) -> float:
    accountant = rdp.RdpAccountant()
    accountant.compose(dp_event.GaussianDpEvent(z), rounds)
    return accountant.get_epsilon(delta)


def update_vector(run_dir, seed: int = 0) -> torch.Tensor:
    """Final global model minus the initial one, flattened."""
    torch.manual_seed(seed)
    initial = build_model(RunSettings().model).state_dict()
    final = torch.load(run_dir / "final_model.pt", weights_only=True)
    return torch.cat([(final[k] - initial[k]).flatten() for k in initial])


def test_noise_epsilon_and_budget_stop(three_sites, tmp_path, no_leftover_processes):
    z, clip, delta = 1.0, 0.1, 1e-5
    eps = [independent_epsilon(z, n, delta) for n in (1, 2, 3)]
    budget = (eps[1] + eps[2]) / 2  # two rounds fit, the third would not
    run_dir = tmp_path / "dp"
    summary = simulate(three_sites, run_dir, {
        **SMALL, "num-rounds": 4, "learning-rate": 1e-12,  # updates ~0: only noise moves
        "dp": "client-fixed", "dp-noise-multiplier": z, "dp-clipping-norm": clip,
        "dp-delta": delta, "dp-max-epsilon": budget}, timeout=400)
    rows = read_metrics(run_dir)
    assert [r["round"] for r in rows] == [1, 2]  # stopped before round 3
    assert [r["epsilon"] for r in rows] == pytest.approx(eps[:2], rel=1e-9)
    assert summary["stopped"].startswith("privacy budget")
    assert summary["privacy"]["epsilon"] == pytest.approx(eps[1], rel=1e-9)
    assert summary["privacy"]["epsilon"] <= budget
    # Two releases of Gaussian noise, std z * clip / nodes each, on the average.
    noise = update_vector(run_dir)
    expected = math.sqrt(2) * z * clip / 3
    assert noise.std().item() == pytest.approx(expected, rel=0.02)
    assert abs(noise.mean().item()) < 0.01 * expected


def test_server_side_clipping_bounds_the_aggregate_update(three_sites, tmp_path,
                                                          no_leftover_processes):
    clip = 0.01
    run_dir = tmp_path / "clip"
    summary = simulate(three_sites, run_dir, {
        **SMALL, "num-rounds": 1, "learning-rate": 0.01, "dp": "server-fixed",
        "dp-noise-multiplier": 0.0, "dp-clipping-norm": clip}, timeout=400)
    assert summary["rounds_completed"] == 1
    norm = update_vector(run_dir).norm().item()
    # each update is clipped to `clip`, so their average cannot be longer
    assert 0 < norm <= clip * (1 + 1e-4)
    assert summary["privacy"]["epsilon"] is None  # no noise: no finite epsilon claimed
