"""The privacy budget: Flower's accountant for fixed clipping, fedseg's ledger
elsewhere; both continue a resumed run's count and stop before the budget."""

import pytest
from dp_accounting import dp_event, rdp

from common.config import RunSettings
from common.privacy.accounting import PrivacyLedger
from server.strategies.budget import FlowerAccount, PrivacyBudget, PrivacyBudgetExhausted


def independent_epsilon(z: float, releases: int, delta: float) -> float:
    accountant = rdp.RdpAccountant()
    accountant.compose(dp_event.GaussianDpEvent(z), releases)
    return accountant.get_epsilon(delta)


def test_flowers_account_resumes_with_the_past_releases():
    settings = RunSettings.from_run_config({"dp": "client-fixed", "dp-noise-multiplier": 1.2})
    account = FlowerAccount(settings, num_sampled=3, releases=4)
    assert account.releases == 4
    assert account.epsilon == pytest.approx(independent_epsilon(1.2, 4, 1e-5), rel=1e-9)
    assert FlowerAccount(settings, 3).epsilon == 0.0


def test_the_ledger_stops_before_the_budget():
    eps = [independent_epsilon(1.0, n, 1e-5) for n in (1, 2)]
    ledger = PrivacyLedger(1.0, 1e-5, max_epsilon=(eps[0] + eps[1]) / 2, releases=1)
    budget = PrivacyBudget(None, ledger)
    with pytest.raises(PrivacyBudgetExhausted, match="over the budget"):
        budget.configure_train(2, None, None, None)
