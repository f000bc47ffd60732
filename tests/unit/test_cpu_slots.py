"""How many simulated sites a private Ray runs at once (server/simulation.py)."""

from __future__ import annotations

import pytest

from server.simulation import cpu_slots


@pytest.mark.parametrize("sites, cores, threads, slots", [
    (3, 2, 1, 3),    # 2 then 1 alone would idle a core half the round: all three at once
    (2, 2, 1, 2),
    (1, 2, 1, 2),    # Ray's slots, not sites: one site cannot use more
    (4, 2, 1, 2),    # twice the cores: two full waves
    (20, 2, 1, 2),   # many sites: no more processes than cores (memory)
    (6, 4, 1, 6),
    (7, 4, 1, 4),
    (3, 4, 2, 3),    # 2 slots of 2 threads; 3 sites at once, 6 threads on 4 cores
    (5, 1, 1, 1),
    (2, 1, 1, 1),    # one core: 2 > 1.5 slots, one at a time
    (3, 2, 4, 1),    # threads beyond the cores: one slot
])
def test_slots(sites, cores, threads, slots):
    assert cpu_slots(sites, cores, threads) == slots
