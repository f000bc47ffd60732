"""The hospital's own differential privacy: its noise, its ledger, its budget.

With ``require-dp`` or ``max-epsilon`` in the site's policy, this site clips
each training update it sends to the run's ``dp-clipping-norm`` and adds
Gaussian noise of standard deviation ``dp-noise-multiplier x clipping norm``
itself, in the hospital's installed fedseg, after everything else the run
asked for (Flower's clipping mod) and before SecAgg+ masks it. What the
server does with it (its own noise, its accountant) is the run's business;
the site's guarantee rests only on what the site did:

* each noised update is one Gaussian mechanism on the site's data with noise
  multiplier ``z`` (sensitivity: the clipping norm; the site's data in or
  out, as client-level DP), whoever sees it;
* the site's **ledger** (``<state>/privacy/ledger.json``) records every such
  release, across every run on this site's data: run id and name are kept
  for the record, never used to reset it. Epsilon at the policy's
  ``dp-delta`` is the RDP composition of all of them (Google's
  ``dp-accounting``, as ``common/privacy/accounting.py``); a round that would
  take it over ``max-epsilon`` is refused before any training.

The clipping norm and the noise come from the run's declared settings, which
the policy's rules bound, never from what a message carries (Flower's
clipping mod takes the norm from the server's message).
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.supercore.differential_privacy import compute_clip_model_update

from client.policy import PolicyRefusal, SitePolicy
from common import wire
from common.config import RunSettings
from common.errors import FedsegError

log = logging.getLogger(__name__)


class LedgerError(FedsegError):
    kind = "site privacy ledger error"


@dataclass(frozen=True)
class Release:
    noise_multiplier: float


def add_noise(arrays: list[np.ndarray], std: float) -> None:
    """Gaussian noise of ``std`` on every value, in place, drawn from the
    operating system's entropy: never from numpy's global generator, which a
    run's ``seed`` sets (whoever knows the seed could subtract the noise)."""
    rng = np.random.default_rng(np.random.SeedSequence(int.from_bytes(os.urandom(32), "big")))
    for array in arrays:
        array += rng.normal(0.0, std, array.shape).astype(array.dtype)


def epsilon_of(releases: list[Release], delta: float) -> float:
    """Epsilon at ``delta`` of ``releases`` composed (RDP)."""
    if not releases:
        return 0.0
    if any(r.noise_multiplier <= 0 for r in releases):
        return math.inf
    from dp_accounting import dp_event, rdp

    accountant = rdp.RdpAccountant()
    for r in releases:
        accountant.compose(dp_event.GaussianDpEvent(r.noise_multiplier))
    return float(accountant.get_epsilon(delta))


class SiteLedger:
    """The site's record of every noised update it sent, in its state folder.
    One writer at a time (a file lock); each change written whole, then
    renamed, so a crash never leaves half a ledger."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def entries(self) -> list[dict]:
        if not self.path.exists():
            return []
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError) as exc:
            # Never start again from zero on a damaged ledger: that would reset the budget.
            raise LedgerError(f"the site's privacy ledger {self.path} cannot be read "
                              f"({exc}); restore it from backup: no DP round runs "
                              f"without it") from None
        return list(data.get("releases", []))

    def epsilon(self, delta: float) -> float:
        return epsilon_of([Release(float(e["noise_multiplier"])) for e in self.entries()],
                          delta)

    @contextmanager
    def _locked(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def epsilon_after(self, noise_multiplier: float, delta: float) -> float:
        """Epsilon at ``delta`` if one more release of ``noise_multiplier`` were made."""
        return epsilon_of([*(Release(float(e["noise_multiplier"])) for e in self.entries()),
                           Release(noise_multiplier)], delta)

    def check_fits(self, noise_multiplier: float, policy: SitePolicy) -> float:
        """Epsilon after one more release; a :class:`PolicyRefusal` when that
        would take the site over its ``max-epsilon``."""
        after = self.epsilon_after(noise_multiplier, policy.dp_delta)
        if policy.max_epsilon is not None and after > policy.max_epsilon:
            log.warning("the site's privacy budget: one more update would take epsilon to "
                        "%.3f, over its max-epsilon %s (delta %g); refused", after,
                        policy.max_epsilon, policy.dp_delta)
            raise PolicyRefusal("the site's privacy budget (max-epsilon) is spent")
        return after

    def spend(self, *, noise_multiplier: float, policy: SitePolicy, run_id: int,
              run_name: str, server_round: int | None) -> float:
        """Record one release if the budget allows it; the epsilon after it.
        A :class:`PolicyRefusal` (nothing recorded) when it would go over."""
        with self._locked():
            after = self.check_fits(noise_multiplier, policy)
            entries = [*self.entries(), {
                "time": datetime.now(UTC).isoformat(timespec="seconds"), "run": run_id,
                "run_name": run_name, "round": server_round,
                "noise_multiplier": noise_multiplier, "epsilon_after": after,
                "delta": policy.dp_delta}]
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"releases": entries}, indent=1) + "\n")
            os.chmod(tmp, 0o600)
            os.replace(tmp, self.path)
            return after


def site_dp_mod(policy: SitePolicy, ledger: SiteLedger,
                server_round: Callable[[Message], int | None]) -> Mod:
    """The train mod that clips and noises this site's update and spends its
    budget (a no-op where the policy asks for neither). It checks the budget
    before the handler trains, so a refused round costs no training."""

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        if not policy.site_dp:
            return call_next(msg, context)
        settings = RunSettings.from_run_config(context.run_config)
        policy.check(settings)  # client-fixed with noise (the executor checked it already)
        z, c = settings.dp_noise_multiplier, settings.dp_clipping_norm
        ledger.check_fits(z, policy)  # before the training, so a refused round costs none
        incoming = msg.content[wire.ARRAYS].to_numpy_ndarrays()
        reply = call_next(msg, context)
        if reply.has_error():
            return reply
        record = reply.content[wire.ARRAYS]
        names = list(record.keys())
        update = record.to_numpy_ndarrays()
        compute_clip_model_update(update, incoming, c)  # new = old + clipped update
        add_noise(update, z * c)
        eps = ledger.spend(noise_multiplier=z, policy=policy, run_id=context.run_id,
                           run_name=settings.run_name, server_round=server_round(msg))
        log.info("this site clipped its update to %g, added noise of std %g, epsilon now "
                 "%.3f (delta %g)", c, z * c, eps, policy.dp_delta)
        reply.content[wire.ARRAYS] = ArrayRecord({k: Array(v) for k, v in
                                                  zip(names, update, strict=True)})
        return reply

    return mod
