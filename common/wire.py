"""What crosses the wire between the server and the hospitals, named once.

Every record and key of a message between the ServerApp and a hospital's
ClientApp is a constant here; both apps and the run folder use these names,
and docs/architecture.md's table is :func:`table_markdown` (a test holds them
equal). Nothing else leaves a hospital: the audit folder (``FEDSEG_AUDIT_DIR``)
keeps every reply as received, to check that. SecAgg+ rounds add Flower's own
protocol records (masked shares, public keys), and client-side DP Flower's
clipping records; see docs/privacy.md.

Plain strings, no Flower import: ``common`` stays free of the framework.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

# The contract's version. A run's bundle declares the version it speaks in its
# run config; a hospital's executor runs it only if its installed fedseg speaks
# that version (CHANGELOG.md records every change to it, the keys and settings).
VERSION = 3  # 2: the fingerprint query and the harmonisation instruction; 3: ``structure``
SPOKEN = (1, 2, 3)  # the versions this install answers
VERSION_KEY = "fedseg-wire"  # run config ([tool.flwr.app.config]): the bundle's version

# Records of a message
ARRAYS = "arrays"  # the U-Net's weights (ArrayRecord)
CONFIG = "config"  # the round's instructions (ConfigRecord)
METRICS = "metrics"  # aggregate numbers (MetricRecord)
SITE = "site"  # the site's public name (ConfigRecord)

# Keys
SITE_NAME = "name"  # in SITE
EVALUATE_ERROR = "evaluate-error"  # in SITE: scoring the incoming model failed (scrubbed)
LEFT_OUT = "left-out"  # in SITE: unusable cases left out of this reply (counts and kinds)
SHARE_LOCAL = "share-local-model"  # in SITE (train): the site's policy lets others score it
MODALITY = "modality"  # in SITE (query): the site's modality, CT, MR or other
# in SITE (train, query; wire 3): the one structure the site's label map names, where
# the run names none (``common.data.labels.scored_at_site``); the server compares sites
STRUCTURE = "structure"
SITE_NOTES = (EVALUATE_ERROR, LEFT_OUT, SHARE_LOCAL, MODALITY, STRUCTURE)  # what SITE may add
CROSS_SITE_OF = "cross-site-of"  # in CONFIG (evaluate): whose local model the weights are
SERVER_ROUND = "server-round"  # in CONFIG, written by Flower's strategies
ROUNDS_DONE = "rounds-done"  # in CONFIG: rounds of a resumed run already behind
PROXIMAL_MU = "proximal-mu"  # in CONFIG, written by Flower's FedProx
EVALUATE_INCOMING = "evaluate-incoming"  # in CONFIG: score the weights received first
KEEP_MODEL = "keep-model"  # in CONFIG: the site keeps a copy of the global model received
FEDERATION_DICE = "federation-dice"  # in CONFIG (with KEEP_MODEL): for the site's model card
HARMONISATION = "harmonisation"  # in CONFIG: the run's target spacing and intensity scheme
QUERY = "query"  # in CONFIG of a query message: what is asked (FINGERPRINT)
FINGERPRINT = "fingerprint"  # the query at a run's start: aggregates of the training cases
GLOBAL_PREFIX = "global-"  # a train reply's scores of the incoming global model
NUM_EXAMPLES = "num-examples"  # in METRICS: training cases (FedAvg's weight) or test cases
TRAIN_LOSS = "train-loss"
TRAIN_SECONDS = "train-seconds"
TRAIN_STEPS = "train-steps"  # FedNova normalises by it
SCORES = ("dice", "iou", "hd95", "sensitivity", "specificity")  # means over test cases
STRUCTURE_SEP = "/"  # a score of one structure: "dice/liver" (no structure name holds it)
ERROR_SITE = "site"  # in a failed reply's error reason (JSON): the site's public name
ERROR_TEXT = "error"  # ... and the scrubbed cause

TRAIN_METRICS = (NUM_EXAMPLES, TRAIN_LOSS, TRAIN_SECONDS, TRAIN_STEPS)
# A fingerprint reply's METRICS (common/data/harmonise.py): nothing of any one case
FINGERPRINT_METRICS = ("cases", "fg-voxels", "fg-mean", "fg-std", "fg-low", "fg-high",
                       *(f"{what}-p{q}" for q in (10, 50, 90) for what in ("spacing", "size")))
EVAL_METRICS = (NUM_EXAMPLES, *SCORES)  # of a run with one structure


def structure_key(score: str, structure: str) -> str:
    """The key of ``score`` for one structure of a run with several
    (``dice/liver``). Structure names come from the run's settings
    (``structures``), which every node has: the key says nothing of a site."""
    return f"{score}{STRUCTURE_SEP}{structure}"


def score_keys(structures: Sequence[str]) -> tuple[str, ...]:
    """The scores of a run that learns ``structures`` (in class order): the
    headline :data:`SCORES` (with several structures, per case the mean over
    structures of the defined values), then, with several, each score per
    structure, structure by structure."""
    if len(structures) < 2:
        return SCORES
    return (*SCORES, *(structure_key(m, s) for s in structures for m in SCORES))


def eval_metrics(structures: Sequence[str]) -> tuple[str, ...]:
    """What an evaluate reply of a run that learns ``structures`` carries
    (:data:`EVAL_METRICS` with one structure)."""
    return (NUM_EXAMPLES, *score_keys(structures))


def is_score(key: str) -> bool:
    """Whether ``key`` is a score: a headline one or one of a structure."""
    return key.partition(STRUCTURE_SEP)[0] in SCORES


@dataclass(frozen=True)
class Entry:
    key: str
    record: str
    direction: str
    meaning: str


DOWN, UP = "server → site", "site → server"

TABLE = (
    Entry(VERSION_KEY, "run config", DOWN, "the fedseg wire version the run's app speaks "
          "(its pyproject.toml); a hospital's node answers only runs of a version its install "
          "speaks (CHANGELOG.md)"),
    Entry(ARRAYS, ARRAYS, "both", "the U-Net's weights: the global model down (train and "
          "evaluate), the site's new weights up (train); packed, one vector per dtype "
          "(`weights-float32`), in float16 where the run's `transfer-precision` says so"),
    Entry(SERVER_ROUND, CONFIG, DOWN, "the round of this call (Flower counts from 1 again "
          "when a run resumes)"),
    Entry(ROUNDS_DONE, CONFIG, DOWN, "rounds of a resumed run already behind; with "
          f"`{SERVER_ROUND}` the run's round, for the learning-rate schedule and the seed"),
    Entry(PROXIMAL_MU, CONFIG, DOWN, "FedProx's proximal weight (FedProx only)"),
    Entry(EVALUATE_INCOMING, CONFIG, DOWN, "train: first score the global model received "
          "(the previous round's) on the test cases; one message a round does both"),
    Entry(KEEP_MODEL, CONFIG, DOWN, "the site keeps a copy of the global model received, with "
          "a model card, in its own state: the final model (the last round's evaluate) and, "
          "with `keep-model-every`, every N rounds' (train)"),
    Entry(FEDERATION_DICE, CONFIG, DOWN, "with `keep-model`: the federation's last mean Dice, "
          "for the site's model card"),
    Entry(NUM_EXAMPLES, METRICS, UP, "training cases (train: FedAvg's weight) or test cases "
          "(evaluate)"),
    Entry(TRAIN_LOSS, METRICS, UP, "mean training loss over the round's steps"),
    Entry(TRAIN_SECONDS, METRICS, UP, "seconds the site trained"),
    Entry(TRAIN_STEPS, METRICS, UP, "optimiser steps taken (FedNova's normaliser)"),
    *(Entry(score, METRICS, UP, "mean over the site's test cases (evaluate)")
      for score in SCORES),
    *(Entry(GLOBAL_PREFIX + k, METRICS, UP, "train with `evaluate-incoming`: "
            f"`{k}` of the global model received, before training")
      for k in EVAL_METRICS),
    Entry(structure_key("<score>", "<structure>"), METRICS, UP, "evaluate, and train with "
          f"`evaluate-incoming` (prefixed `{GLOBAL_PREFIX}`), when the run's `structures` "
          "names several: each score above of one structure (`dice/liver`: its class against "
          "the rest), "
          "mean over the site's test cases; the scores above are then per case the mean "
          "over structures (undefined values left out). The names are the run's setting, "
          "never a site's"),
    Entry(HARMONISATION, CONFIG, DOWN, "train and evaluate: the run's harmonisation (JSON: "
          "target spacing in mm, intensity scheme by modality: CT clip bounds, mean and std), "
          "fixed at the start from the sites' fingerprints; every site resamples and "
          "normalises its cases by it (docs/data.md)"),
    Entry(QUERY, CONFIG, DOWN, "a query message: what is asked (the one query: "
          f"`{FINGERPRINT}`)"),
    Entry(FINGERPRINT, f"{QUERY} value", DOWN, "at the start of a run whose `harmonise` is "
          "not off, each site is asked for its fingerprint (the aggregates below)"),
    *(Entry(key, METRICS, UP, f"query `{FINGERPRINT}`: {meaning}")
      for key, meaning in zip(FINGERPRINT_METRICS, (
          "the site's usable training cases",
          "labelled voxels (label > 0) over those cases",
          "mean intensity of the labelled voxels (first input channel)",
          "their standard deviation",
          "their 0.5th percentile (of up to 10,000 sampled a case)",
          "their 99.5th percentile (likewise)",
          *(f"the {q}th percentile over cases of the {what}, one value per axis"
            for q in (10, 50, 90) for what in ("voxel spacing (mm)", "image size (voxels)"))),
          strict=True)),
    Entry(MODALITY, SITE, UP, "query `fingerprint`: the site's modality (CT, MR or other), "
          "from its dataset.json or DICOM"),
    Entry(STRUCTURE, SITE, UP, "train and query `fingerprint`, in a run whose `structures` "
          "names none (wire 3): the one structure the site's label map names (case, spaces, "
          "`_` and `-` not counting), which the site learns as the run's one class; sites "
          "naming different ones where they first say theirs stop the run; once the run's is "
          "fixed, a site naming another is left out, its scores not counted (a site without "
          "a label map sends none; a run that names its structure does not read it)"),
    Entry(SITE_NAME, SITE, UP, "the site's public name (node setting `site-name`)"),
    Entry(EVALUATE_ERROR, SITE, UP, "train with `evaluate-incoming`: why scoring the incoming "
          "model failed (scrubbed, as a failed reply's cause); the site trained all the same"),
    Entry(LEFT_OUT, SITE, UP, "cases of the site that could not be used and were left out "
          "of this reply's training or scoring: counts and kinds per split (`training: 1 "
          "(missing label)`), never a name"),
    Entry(SHARE_LOCAL, SITE, UP, "train, with the run's `cross-site` on: the site's policy "
          "(`share-local-model`) lets its local model be scored at the other sites"),
    Entry(CROSS_SITE_OF, CONFIG, DOWN, "evaluate at the end of a `cross-site` run: the weights "
          "are that site's last local model, not the global one"),
    Entry(ERROR_SITE, "error reason", UP, "a failed reply: the site's public name"),
    Entry(ERROR_TEXT, "error reason", UP, "a failed reply: the scrubbed cause (kind of "
          "failure, case position), never a path, file or case name or DICOM value"),
)


def table_markdown() -> str:
    """The table docs/architecture.md shows."""
    rows = ["| key | record | direction | meaning |", "|---|---|---|---|"]
    rows += [f"| `{e.key}` | `{e.record}` | {e.direction} | {e.meaning} |" for e in TABLE]
    return "\n".join(rows) + "\n"
