"""What a site does for a federation, as a closed set of requests.

:class:`SiteService` answers ``train``, ``evaluate``, ``fingerprint`` (the
aggregates of its training cases a run's harmonisation starts from,
``common/data/harmonise.py``) and ``describe`` for the
site's data, through one :class:`~common.site_algorithm.SiteAlgorithm` per
run (model, decoded cases, Adam's moments kept between rounds). It is the
same code in both transports:

* in a deployment the site worker (``client/worker.py``) runs it, the only
  process that reads the data folder; the hospital's executor in that process
  (``client/executor.py``) asks it for every message the node receives;
* in a simulation the ClientApp calls it in process.

Its replies hold only weights of the run's model, packed as
``common/packing.py`` says, with the sizes of the model the run's settings
build, and the metrics ``common.wire`` names.
Anything else is refused.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from client.policy import SitePolicy
from common import wire
from common.config import RunSettings
from common.data.harmonise import Harmonisation
from common.data.site import left_out_summary
from common.errors import FedsegError, scrub, write_local_log
from common.packing import Template, pack, packed_template, template_of, unpack

log = logging.getLogger(__name__)

DESCRIBE_METRICS = ("training-cases", "test-cases")


class RequestRefused(FedsegError):
    """A request outside the closed set, or weights that are not the run's model."""

    kind = "request refused by the site"

    def scrubbed(self) -> str:
        return f"{self.kind}: {self}"


def _allowed_metrics(kind: str, structures: tuple[str, ...]) -> set[str]:
    """The metric keys a ``kind`` reply of a run that learns ``structures`` may carry."""
    scores = wire.eval_metrics(structures)
    if kind == "train":
        return {*wire.TRAIN_METRICS, *(wire.GLOBAL_PREFIX + k for k in scores)}
    if kind == "evaluate":
        return set(scores)
    if kind == wire.FINGERPRINT:
        return set(wire.FINGERPRINT_METRICS)
    return set(DESCRIBE_METRICS)


def keep_model(models_dir: Path, site: str, settings: RunSettings,
               weights: Mapping[str, np.ndarray], round_config: Mapping[str, Any],
               scores: Mapping[str, Any], run_id: int = 0, at_round: int | None = None
               ) -> Path:
    """Save a run's final model (``at_round``: the global model of that round,
    in ``round-NNN/``) in the site's own state, with its card (run, rounds,
    settings, this site's scores of it with their units, the federation's
    Dice of the round before it, named by round, the file's SHA-256, the
    date and the fedseg version). Returns the model's path."""
    import hashlib
    import json
    import time

    import torch

    from common.inference import SCORE_UNITS, fedseg_version

    run = settings.run_name or f"flower-run-{run_id}"
    folder = Path(models_dir) / run
    if at_round is not None:
        folder = folder / f"round-{at_round:03d}"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "final_model.pt"
    rounds = at_round if at_round is not None else int(
        round_config.get(wire.SERVER_ROUND, 0)) + int(round_config.get(wire.ROUNDS_DONE, 0))
    set_aside(folder, (run_id, rounds))
    torch.save({k: torch.as_tensor(np.asarray(v)) for k, v in weights.items()}, path)
    federation = round_config.get(wire.FEDERATION_DICE)
    card = {
        "run": run, "flower_run_id": run_id, "site": site, "rounds": rounds,
        "saved": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "fedseg_version": fedseg_version(),
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        # the model's own scores at this site: the final figures a site has
        "site_scores": dict(scores),
        "units": SCORE_UNITS,
        # the federation's mean Dice is known only of the model before this one (the
        # final model's is in the run's summary.json and report.html): said which round
        "federation_dice": federation,
        "federation_dice_round": rounds - 1 if federation is not None else None,
        "config": settings.to_run_config(),
        # what predict must resample and scale inputs by (None: a run without it)
        "harmonisation": (Harmonisation.from_wire(round_config[wire.HARMONISATION]).to_dict()
                          if wire.HARMONISATION in round_config else None),
    }
    (folder / "model-card.json").write_text(json.dumps(card, indent=2) + "\n")
    log.info("kept the final model of run %s in %s (sha256 %s)", run, folder,
             card["sha256"][:16])
    return path


def set_aside(folder: Path, this: tuple[int, int]) -> Path | None:
    """Move a model kept earlier in ``folder`` (another run of the same name,
    or an earlier part of this one) to ``folder/earlier-<its saved time>/``
    instead of writing over it: a site never loses a model it kept. ``this``:
    the Flower run and round of the model about to be kept; the same model
    kept again (a repeated request) is written over. The folder the earlier
    model went to, or None."""
    import json

    files = [folder / n for n in ("final_model.pt", "model-card.json")]
    if not files[0].exists():
        return None
    try:
        card = json.loads(files[1].read_text())
        if (card.get("flower_run_id"), card.get("rounds")) == this:
            return None
        stamp = str(card["saved"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(files[0].stat().st_mtime))
    stamp = "".join(c for c in stamp if c.isalnum() or c in "-+T")
    aside = folder / f"earlier-{stamp}"
    n = 1
    while aside.exists():
        n += 1
        aside = folder / f"earlier-{stamp}-{n}"
    aside.mkdir()
    for f in files:
        if f.exists():
            f.replace(aside / f.name)
    log.warning("run %s: a model was already kept in %s (saved %s); it is now in %s",
                folder.name, folder, stamp, aside)
    return aside


def structure_note(algo, run_config: Mapping[str, Any]) -> dict[str, str]:
    """``wire.STRUCTURE`` for a run of wire 3 or later that names no
    structure: the one structure this site's label map names, so the server
    can tell sites that learn different ones apart; nothing without a map."""
    version = run_config.get(wire.VERSION_KEY)
    if (isinstance(version, bool) or not isinstance(version, int) or version < 3
            or algo.settings.named_structures):
        return {}
    own = algo.own_structure()
    return {wire.STRUCTURE: own} if own else {}


class SiteService:
    """One site's answers. ``policy``: the hospital's (none in a simulation)."""

    REQUESTS = ("train", "evaluate", wire.FINGERPRINT, "describe")

    def __init__(self, site: str, data_dir: Path, device: str = "auto",
                 policy: SitePolicy | None = None, models_dir: Path | None = None,
                 prepared_dir: Path | None = None) -> None:
        self.models_dir = models_dir  # where the site keeps the runs' final models
        # where it keeps its prepared cases (common/data/store.py); None: in memory
        self.prepared_dir = prepared_dir
        self.site = site
        self.data_dir = Path(data_dir)
        self.device = device
        self.policy = policy or SitePolicy()
        self._run: tuple[int, RunSettings] | None = None
        self._algorithm: Any = None
        self._template: Template = {}
        self._shapes: Template = {}  # the packed weights' (common/packing.py)
        self.rounds_trained: dict[int, int] = {}

    def algorithm(self, run_id: int, run_config: Mapping[str, Any]):
        """The run's algorithm, built once per run (a new run replaces it)."""
        settings = RunSettings.from_run_config(run_config)
        self.policy.check(settings)
        if self._run != (run_id, settings):
            from common.site_algorithm import SiteAlgorithm

            self._algorithm = None  # free the old run's model and cases first
            algo = SiteAlgorithm(settings, self.site, self.data_dir, device=self.device,
                                 store=self.prepared_dir)
            self._template = template_of(algo.weights())
            self._shapes = packed_template(self._template)
            self._algorithm, self._run = algo, (run_id, settings)
            self.rounds_trained = {run_id: self.rounds_trained.get(run_id, 0)}
        return self._algorithm

    def check_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        """The run's model, name for name and shape for shape, or refused."""
        if set(weights) != set(self._shapes):
            missing, extra = set(self._shapes) - set(weights), set(weights) - set(self._shapes)
            raise RequestRefused(f"the weights are not the run's model ({len(missing)} "
                                 f"missing, {len(extra)} unknown)")
        for name, (shape, dtype) in self._shapes.items():
            if tuple(weights[name].shape) != shape or weights[name].dtype.name != dtype:
                raise RequestRefused(f"weight {name!r} is {weights[name].dtype.name} "
                                     f"{tuple(weights[name].shape)}, the run's model has "
                                     f"{dtype} {shape}")

    def handle(self, kind: str, run_id: int, run_config: Mapping[str, Any],
               round_config: Mapping[str, Any], weights: Mapping[str, np.ndarray] | None
               ) -> tuple[dict[str, np.ndarray], dict[str, int | float], dict[str, str]]:
        """The reply: weights, metrics, and notes (scrubbed texts: a failed
        scoring of the incoming model, which does not stop the training)."""
        if kind not in self.REQUESTS:
            raise RequestRefused(f"unknown request {str(kind)[:40]!r}; this site answers "
                                 f"{', '.join(self.REQUESTS)}")
        from common.site_algorithm import ROUNDS_IN_CALL

        if ROUNDS_IN_CALL in round_config:  # the benchmark's, in process; never a run's
            raise RequestRefused(f"round instruction '{ROUNDS_IN_CALL}' is not one a run "
                                 f"may send")
        algo = self.algorithm(run_id, run_config)
        algo.left_out = {}  # what this reply leaves out, from the reads below
        if kind == "describe":
            from common.data.site import list_cases

            return {}, {"training-cases": len(list_cases(self.data_dir, "training")),
                        "test-cases": len(list_cases(self.data_dir, "test"))}, {}
        notes: dict[str, str] = {}
        if kind == wire.FINGERPRINT:
            if not self.policy.share_fingerprint:
                from client.policy import PolicyRefusal

                raise PolicyRefusal("this site does not send its fingerprint "
                                    "(share-fingerprint = false)")
            fingerprint = algo.fingerprint()
            log.info("fingerprint of run %d: %d training cases, modality %s", run_id,
                     fingerprint.cases, fingerprint.modality)
            metrics = fingerprint.to_metrics()
            notes[wire.MODALITY] = fingerprint.modality
            notes.update(structure_note(algo, run_config))
            if algo.left_out.get("training"):
                notes[wire.LEFT_OUT] = f"training: {left_out_summary(algo.left_out['training'])}"
            stray = set(metrics) - _allowed_metrics(kind, algo.settings.structure_names)
            if stray:  # a programming error here, never sent
                raise RuntimeError(f"metrics outside the wire's names: {sorted(stray)}")
            return {}, metrics, notes
        if weights is None or not weights:
            raise RequestRefused(f"a {kind} request needs the global model's weights")
        self.check_weights(weights)
        weights = unpack(weights, self._template)
        out: dict[str, np.ndarray] = {}
        if kind == "evaluate":
            keep = round_config.get(wire.KEEP_MODEL) and self.models_dir is not None
            try:
                metrics = algo.evaluate(weights, round_config)
            except Exception:
                if keep:  # the site keeps the model even where it cannot score it
                    keep_model(self.models_dir, self.site, algo.settings, weights,
                               round_config, {}, run_id)
                raise
            if keep:
                keep_model(self.models_dir, self.site, algo.settings, weights, round_config,
                           metrics, run_id)
        else:
            self.policy.check_round(self.rounds_trained.get(run_id, 0))
            scored = {}
            if round_config.get(wire.EVALUATE_INCOMING):
                try:
                    scored = algo.evaluate(weights, round_config)
                except Exception as exc:  # noqa: BLE001 - scoring failed; training goes on
                    log.error("scoring the incoming model failed at this site: %s", exc,
                              exc_info=not isinstance(exc, FedsegError))
                    notes[wire.EVALUATE_ERROR] = scrub(exc)
                    write_local_log(self.site, "evaluate", exc)  # simulation only
            if round_config.get(wire.KEEP_MODEL) and self.models_dir is not None:
                from common.site_algorithm import run_round  # the incoming model's round

                keep_model(self.models_dir, self.site, algo.settings, weights, round_config,
                           scored, run_id, at_round=run_round(round_config) - 1)
            new, metrics = algo.train(weights, round_config)
            self.rounds_trained[run_id] = self.rounds_trained.get(run_id, 0) + 1
            if algo.settings.cross_site and self.policy.share_local_model:
                notes[wire.SHARE_LOCAL] = "yes"
            notes.update(structure_note(algo, run_config))
            metrics.update({wire.GLOBAL_PREFIX + k: v for k, v in scored.items()})
            out = pack(new)
            self.check_weights(out)  # never anything but the model
        left_out = [f"{split}: {left_out_summary(errors)}"
                    for split, errors in sorted(algo.left_out.items()) if errors]
        if left_out:
            notes[wire.LEFT_OUT] = "; ".join(left_out)
        allowed = _allowed_metrics(kind, algo.settings.structure_names)
        stray = set(metrics) - allowed
        if stray:  # a programming error here, never sent
            raise RuntimeError(f"metrics outside the wire's names: {sorted(stray)}")
        return out, metrics, notes
