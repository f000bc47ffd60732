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
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common import wire
from common.config import RunSettings
from common.data.cache import load_prepared
from common.data.harmonise import (
    FingerprintAccumulator,
    Harmonisation,
    SiteFingerprint,
    site_modality,
)
from common.data.labels import Classes, site_classes
from common.data.site import Case, load_case
from common.data.transforms import Preparation
from common.errors import ConfigError, DataError
from common.model import build_model, pick_device
from common.training import evaluate, train

# The last fingerprint this process took, with the signature of the files it
# read (``SiteAlgorithm.fingerprint``)
_FINGERPRINTS: dict[tuple, tuple] = {}

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


def store_layout(settings: RunSettings) -> str:
    """How a run's cases are kept on disk (``common.data.store``): slice by
    slice for a 2D model (which reads 3D cases a slice at a time), else whole."""
    return "slices" if settings.model.spatial_dims == 2 else "volume"


def logged_progress(split: str, every: float = 30.0):
    """A ``progress(done, listed)`` that logs how far the reading of a
    split's cases is, at each tenth and at least every ``every`` seconds (a
    node's log shows a large site's first preparation advancing)."""
    import logging
    import time

    log = logging.getLogger("common.data")
    last = [time.monotonic(), -1]

    def progress(done: int, listed: int) -> None:
        tenth = done * 10 // max(1, listed)
        now = time.monotonic()
        if listed >= 10 and (tenth > last[1] or now - last[0] >= every or done == listed):
            log.info("reading %s cases: %d of %d (%d%%)", split, done, listed,
                     100 * done // listed)
            last[:] = [now, tenth]

    return progress


class SiteAlgorithm:
    """A site's part of one run.

    ``data_dir``: the site's folder (read lazily, prepared once, read again
    when a file changes); or give the cases directly (``train_cases``,
    ``test_cases``), as the pooled baseline does. ``store``: where the site
    keeps its prepared cases on disk (its state's ``prepared/`` folder;
    ``common.data.store``), read by memory mapping; None: in memory.
    """

    def __init__(self, settings: RunSettings, site: str, data_dir: Path | None = None, *,
                 device: str | torch.device = "auto",
                 train_cases: list[Case] | None = None,
                 test_cases: list[Case] | None = None,
                 store: Path | None = None) -> None:
        self.settings = settings
        self.site = site
        self.data_dir = data_dir
        self.store = store
        self.device = device if isinstance(device, torch.device) else pick_device(device)
        self.model = build_model(settings.model)
        self.optimizer_state: dict[str, np.ndarray] | None = None
        self._cases = {"training": train_cases, "test": test_cases}
        self.left_out: dict[str, list[DataError]] = {}  # by split, at the last read
        self.classes: Classes | None = None  # the site's labels as the run's classes
        # The run's harmonisation, as the server's instructions say (None: cases as
        # read, each z-scored: a run without a fingerprint); the pooled baseline
        # sets it directly. ``modality``: this site's, read once.
        self.harmonisation: Harmonisation | None = None
        self._modality: str | None = None
        self._own_structure: tuple[str | None] | None = None  # (name,) once read

    @property
    def modality(self) -> str:
        if self._modality is None:
            first = None
            if self.data_dir is not None:
                from common.data.site import list_cases

                for split in ("training", "test"):  # a site may hold test cases only
                    try:
                        first = list_cases(self.data_dir, split)[0].image
                        break
                    except DataError:
                        continue
            self._modality = (site_modality(self.data_dir, first)
                              if self.data_dir is not None else "other")
        return self._modality

    def own_structure(self) -> str | None:
        """Where the run names no structure: the one its site's label map
        names (compared form), which this site learns as the run's one class;
        None without a map, or in a run that names its structures."""
        if self.data_dir is None or self.settings.named_structures:
            return None
        if self._own_structure is None:  # read once a run, not every round
            from common.data.labels import scored_at_site

            self._own_structure = (scored_at_site(self.data_dir, self.settings)[0],)
        return self._own_structure[0]

    def preparation(self) -> Preparation:
        """How this site's cases become model inputs in this run."""
        return Preparation.of(self.settings.input_channels, self.harmonisation, self.modality)

    def follow(self, round_config: Mapping[str, Any]) -> None:
        """Take the run's harmonisation from the server's instructions (checked;
        a malformed one is refused with a ConfigError naming it)."""
        text = round_config.get(wire.HARMONISATION)
        self.harmonisation = None if text is None else Harmonisation.from_wire(text)

    def fingerprint(self) -> SiteFingerprint:
        """This site's fingerprint (``common.data.harmonise``): aggregates of
        its training cases as read, one case in memory at a time."""
        from common.data.site import read_site
        from common.data.transforms import select_channels

        if self.data_dir is None:
            raise ValueError(f"site {self.site} has no data folder to take a fingerprint of")
        if self.classes is None:
            self.classes = site_classes(self.data_dir, self.settings)
        from common.data.cache import files_signature

        # A node's next run on unchanged files has the same fingerprint: not decoded again
        key = (str(Path(self.data_dir).resolve()), self.settings.input_channels,
               repr(self.classes), self.settings.seed)
        signature = files_signature(Path(self.data_dir).resolve(), "training")
        kept = _FINGERPRINTS.get(key)
        if kept is not None and kept[0] == signature:
            self.left_out["training"] = list(kept[2])
            return kept[1]
        acc = FingerprintAccumulator(self.modality, seed=self.settings.seed)

        def add(_ref, _index, case) -> None:
            if isinstance(case, Case):
                acc.add(select_channels(case.image, self.settings.input_channels),
                        case.label, case.spacing)

        read = read_site(self.data_dir, "training", on_case=add, keep=False,
                         classes=self.classes,
                         load=partial(load_case, volumes=self.settings.model.spatial_dims == 3))
        self.left_out["training"] = read.left_out
        result = acc.result()
        _FINGERPRINTS.clear()  # one site's, as the prepared cases' cache keeps few
        _FINGERPRINTS[key] = (signature, result, list(read.left_out))
        return result

    def cases(self, split: str, progress=None) -> list[Case]:
        """The usable cases of ``split``; those left out (a warning in this
        site's log each) are in ``self.left_out[split]``. ``progress(done,
        listed)`` after each case read (default: a log line at each tenth)."""
        given = self._cases[split]
        if given is not None:
            return given
        if self.data_dir is None:
            raise ValueError(f"site {self.site} has neither a data folder nor {split} cases")
        if self.classes is None:  # the site's map against the run's: refused before any case
            self.classes = site_classes(self.data_dir, self.settings)
        cases, self.left_out[split] = load_prepared(
            self.data_dir, split, self.preparation(), self.classes, store=self.store,
            layout=store_layout(self.settings), progress=progress or logged_progress(split))
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
        self.follow(round_config)
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
        if round_config is not None:
            self.follow(round_config)
        summary = evaluate(self.model, self.cases("test") if cases is None else cases,
                           self.settings, self.device).summary
        scores = wire.score_keys(self.settings.structure_names)
        return {**{k: float(summary[k]) for k in scores},
                wire.NUM_EXAMPLES: int(summary[wire.NUM_EXAMPLES])}
