"""One site's training and evaluation for a run, free of any FL framework.

The pattern is MONAI's ``monai.fl.client.ClientAlgo``: an object that owns
what a site needs across a run's rounds — the model, the device and its
precision, the prepared training and test cases, Adam's moments between
rounds, the per-round seed and the learning-rate schedule — and answers two
calls:

* ``train(weights, round_config) -> (weights, metrics)``
* ``evaluate(weights, round_config) -> metrics``

with plain arrays and dicts keyed by :mod:`common.wire`'s names. The Flower
ClientApp (``client/app.py``) is a few lines over it, and the benchmark's
local-only and pooled baselines (``server/bench.py``) train through it too, so
baselines and federation share one code path.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common import wire
from common.config import RunSettings
from common.data.cache import load_prepared
from common.data.labels import Classes, site_classes
from common.data.site import Case
from common.errors import ConfigError, DataError
from common.model import build_model, pick_device
from common.training import evaluate, train

# Not a wire key: how many rounds' worth of local epochs one call trains (the
# benchmark's baselines train a whole scored stretch in one call). Default 1.
ROUNDS_IN_CALL = "rounds-in-call"


def round_seed(run_seed: int, run_round: int, site: str) -> int:
    """The seed of a site's round: from the run's seed, the run's round and the
    site's name (a stable hash, not Python's salted ``hash``), so sites draw
    different augmentations even where Flower gives every node partition 0."""
    return (run_seed * 1_000_003 + run_round * 1_009 + zlib.crc32(site.encode())) % 2**31


def run_round(round_config: Mapping[str, Any]) -> int:
    """The run's round: Flower's round of this call plus the rounds a resumed
    run already had behind it. Each a whole number from 0 to a million, or a
    ConfigError naming the key (never a value that could break the schedule)."""
    total = 0
    for key in (wire.SERVER_ROUND, wire.ROUNDS_DONE):
        value = round_config.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 10**6:
            raise ConfigError(f"round instruction '{key}' must be a whole number from 0 to "
                              f"1000000")
        total += value
    return total


class SiteAlgorithm:
    """A site's part of one run.

    ``data_dir``: the site's folder (read lazily, prepared once, read again
    when a file changes); or give the cases directly (``train_cases``,
    ``test_cases``), as the pooled baseline does.
    """

    def __init__(self, settings: RunSettings, site: str, data_dir: Path | None = None, *,
                 device: str | torch.device = "auto",
                 train_cases: list[Case] | None = None,
                 test_cases: list[Case] | None = None) -> None:
        self.settings = settings
        self.site = site
        self.data_dir = data_dir
        self.device = device if isinstance(device, torch.device) else pick_device(device)
        self.model = build_model(settings.model)
        self.optimizer_state: dict[str, np.ndarray] | None = None
        self._cases = {"training": train_cases, "test": test_cases}
        self.left_out: dict[str, list[DataError]] = {}  # by split, at the last read
        self.classes: Classes | None = None  # the site's labels as the run's classes

    def cases(self, split: str) -> list[Case]:
        """The usable cases of ``split``; those left out (a warning in this
        site's log each) are in ``self.left_out[split]``."""
        given = self._cases[split]
        if given is not None:
            return given
        if self.data_dir is None:
            raise ValueError(f"site {self.site} has neither a data folder nor {split} cases")
        if self.classes is None:  # the site's map against the run's: refused before any case
            self.classes = site_classes(self.data_dir, self.settings)
        cases, self.left_out[split] = load_prepared(self.data_dir, split,
                                                    self.settings.input_channels, self.classes)
        return cases

    def _load(self, weights: Mapping[str, Any] | None) -> None:
        if weights is not None:
            self.model.load_state_dict({k: torch.as_tensor(v) for k, v in weights.items()})

    def weights(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in self.model.state_dict().items()}

    def train(self, weights: Mapping[str, Any] | None, round_config: Mapping[str, Any]
              ) -> tuple[dict[str, torch.Tensor], dict[str, int | float]]:
        """Train from ``weights`` (None: go on from this object's model) for the
        round(s) of ``round_config``; the new weights and the train metrics."""
        self._load(weights)
        s = self.settings
        first = run_round(round_config)
        rounds = int(round_config.get(ROUNDS_IN_CALL, 1))
        keep = s.keep_optimizer_state
        result = train(self.model, self.cases("training"), s, self.device,
                       seed=round_seed(s.seed, first, self.site),
                       epochs=rounds * s.local_epochs,
                       proximal_mu=float(round_config.get(wire.PROXIMAL_MU, 0.0)),
                       progress=((first - 1) / s.num_rounds,
                                 (first - 1 + rounds) / s.num_rounds),
                       optimizer_state=self.optimizer_state if keep else None)
        self.optimizer_state = result.optimizer_state if keep else None
        metrics = {wire.NUM_EXAMPLES: result.num_cases, wire.TRAIN_LOSS: result.mean_loss,
                   wire.TRAIN_SECONDS: result.seconds, wire.TRAIN_STEPS: result.steps}
        return self.weights(), metrics

    def evaluate(self, weights: Mapping[str, Any] | None,
                 round_config: Mapping[str, Any] | None = None, *,
                 cases: list[Case] | None = None) -> dict[str, int | float]:
        """Score ``weights`` (None: this object's model) on the site's test cases
        (or ``cases``); the means over cases of the run's scores
        (``wire.score_keys``), the only numbers that may leave."""
        self._load(weights)
        summary = evaluate(self.model, self.cases("test") if cases is None else cases,
                           self.settings, self.device).summary
        scores = wire.score_keys(self.settings.structure_names)
        return {**{k: float(summary[k]) for k in scores},
                wire.NUM_EXAMPLES: int(summary[wire.NUM_EXAMPLES])}
