"""Settings, parsed and checked once.

Two sources, never mixed:

* run config (``[tool.flwr.app.config]`` plus per-run overrides) reaches every
  node; it holds only run-wide scalars, never a path or a secret;
* node config (``flower-supernode --node-config``) stays at the hospital: data
  folder, device, CPU threads, the site's public name.

Nothing outside this module reads a raw key.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import Field, dataclass, field, fields
from pathlib import Path
from typing import Any

from common.errors import ConfigError
from common.packing import PRECISIONS

INPUT_CHANNELS = {"grey": 1, "rgb": 3, "red": 1, "green": 1, "blue": 1}
STRATEGIES = ("fedavg", "fedprox", "fednova", "fedadam")
# How FedAvg combines the updates: its weighted mean, or one of Flower's robust
# rules (FedMedian, FedTrimmedAvg, Krum, MultiKrum, Bulyan); docs/robustness.md.
AGGREGATIONS = ("mean", "median", "trimmed-mean", "krum", "multi-krum", "bulyan")
LR_SCHEDULES = ("cosine", "constant")
OPTIMIZERS = ("adam", "sgd")
HARMONISE = ("auto", "intensity", "off")
DP_MODES = ("off", "server-fixed", "server-adaptive", "client-fixed", "client-adaptive")


@dataclass(frozen=True)
class Check:
    """A rule one setting's value must keep, and how to say it."""

    ok: Callable[[Any], bool]
    says: str  # completes "<key> must be ..."


def at_least(low: float) -> Check:
    return Check(lambda v: v >= low, f"at least {low}")


def positive() -> Check:
    return Check(lambda v: v > 0, "positive")


def within(low: float, high: float, *, low_open: bool = False, high_open: bool = False
           ) -> Check:
    def ok(v: float) -> bool:
        return (v > low if low_open else v >= low) and (v < high if high_open else v <= high)

    brackets = ("(" if low_open else "[", ")" if high_open else "]")
    return Check(ok, f"in {brackets[0]}{low}, {high}{brackets[1]}")


def one_of(*choices: Any) -> Check:
    return Check(lambda v: v in choices, f"one of {', '.join(map(str, choices))}")


def setting(default: Any, help: str, check: Check | None = None) -> Any:  # noqa: A002
    """Declare a run setting: its default, help text and rule. Its key is the
    field's name in kebab-case; its type is the field's annotation."""
    return field(default=default, metadata={"help": help, "check": check})


_TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def coerce(key: str, kind: type, value: Any) -> Any:
    """``value`` as ``kind``, from a Python scalar or command-line text; a
    ConfigError naming ``key`` and the expected type otherwise."""
    wrong = ConfigError(f"setting '{key}' must be {_TYPE_WORDS[kind]}, got {value!r}")
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        raise wrong
    if kind is int:
        if isinstance(value, bool):
            raise wrong
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                raise wrong from None
        raise wrong
    if kind is float:
        if isinstance(value, bool):
            raise wrong
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                raise wrong from None
        raise wrong
    if isinstance(value, str):
        return value
    raise wrong


def nearest(key: str, known: Iterable[str]) -> str:
    """' (did you mean ...?)' for a mistyped key, or ''."""
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


@dataclass(frozen=True)
class ModelSettings:
    """The shared U-Net's shape, derived from the model-* run settings. Every
    node must build the same one."""

    spatial_dims: int = 2
    channels: tuple[int, ...] = (16, 32, 64, 128, 256)
    res_units: int = 2
    dropout: float = 0.0
    in_channels: int = 1
    out_channels: int = 2  # background + foreground

    @property
    def divisor(self) -> int:
        """Spatial sizes fed to the network must be multiples of this."""
        return 2 ** (len(self.channels) - 1)


FOREGROUND = "foreground"  # the one structure of a run that names none
BACKGROUND = "background"


def normal_name(name: str) -> str:
    """A structure name as compared: case, spaces, ``_`` and ``-`` do not count
    (``Lung_L`` = ``lung l`` = ``LUNG-L``)."""
    return re.sub(r"[\s_\-]+", " ", str(name)).strip().casefold()


def structure_list(text: str) -> tuple[str, ...]:
    """The ``structures`` setting's names: comma-separated, each once, never
    ``background``."""
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    seen: dict[str, str] = {}
    for name in names:
        key = normal_name(name)
        if key == BACKGROUND:
            raise ConfigError("setting 'structures' names the structures to learn; "
                              "background is always class 0, leave it out")
        if key in seen:
            raise ConfigError(f"setting 'structures' names {seen[key]!r} twice"
                              + (f" (as {name!r})" if name != seen[key] else ""))
        if not re.fullmatch(r"[\w .()+\-]{1,64}", name):
            raise ConfigError(f"setting 'structures': {name!r} is not a structure name "
                              "(letters, digits, spaces, . ( ) + - _, at most 64)")
        seen[key] = name
    return names


def _channels(text: str) -> tuple[int, ...]:
    try:
        channels = tuple(int(c) for c in text.split(",") if c.strip())
    except ValueError:
        raise ConfigError(
            f"setting 'model-channels' must be comma-separated integers, got {text!r}"
        ) from None
    if len(channels) < 2 or any(c <= 0 for c in channels):
        raise ConfigError("setting 'model-channels' needs at least two positive levels, "
                          f"e.g. '16,32', got {text!r}")
    return channels


@dataclass(frozen=True)
class RunSettings:
    """Run-wide settings, identical on the server and every node.

    Each field is the one declaration of a run setting: key (the field name in
    kebab-case), type, default, rule and help. Parsing, ``to_run_config``,
    pyproject.toml's ``[tool.flwr.app.config]`` (held equal by a test) and
    docs/settings.md (generated: ``python -m common.config``) follow from it.
    """

    run_name: str = setting("", "run folder name under the runs root; empty: a timestamp")
    resume: bool = setting(False, "continue the run folder of run-name from its last saved round")
    num_rounds: int = setting(5, "federated rounds", at_least(1))
    fraction_train: float = setting(1.0, "share of connected sites that train each round",
                                    within(0, 1, low_open=True))
    fraction_evaluate: float = setting(1.0, "share of connected sites that score the final "
                                            "model; an earlier round's model is scored by the "
                                            "sites the next round trains (fraction-train)",
                                       within(0, 1))
    evaluate_every: int = setting(1, "rounds between the sites scoring the model (and always "
                                     "the last)", at_least(1))
    min_nodes: int = setting(2, "fewest sites a round needs", at_least(1))
    node_wait: float = setting(300.0, "seconds to wait for min-nodes sites to be connected "
                                      "before a round; then the run stops (resumable)",
                               positive())
    round_timeout: float = setting(600.0, "seconds a round waits for replies; then the "
                                          "replies in hand count, the rest are failures",
                                   positive())
    cross_site: bool = setting(False, "at the end, each site's last local model is scored at "
                                      "the other sites, where the site's policy allows it "
                                      "(share-local-model; in a simulation this setting is "
                                      "every site's consent)")
    keep_model_every: int = setting(0, "every N rounds each site also keeps that round's "
                                       "global model (its final one always); 0: the final "
                                       "only", at_least(0))
    max_short_rounds: int = setting(3, "rounds in a row with fewer than min-nodes replies "
                                       "(each skipped, the model unchanged) before the run "
                                       "stops (resumable)", at_least(1))
    local_epochs: int = setting(1, "passes over a site's training cases per round",
                                at_least(1))
    optimizer: str = setting("adam", "the sites' optimiser: adam, or sgd (SGD with Nesterov "
                                     "momentum, as nnU-Net trains)", one_of(*OPTIMIZERS))
    sgd_momentum: float = setting(0.99, "momentum of optimizer = sgd (nnU-Net's)",
                                  within(0, 1, high_open=True))
    learning_rate: float = setting(1e-3, "the sites' learning rate (nnU-Net's SGD: 0.01)",
                                   positive())
    lr_schedule: str = setting("cosine", "learning rate over the run's rounds",
                               one_of(*LR_SCHEDULES))
    lr_min_ratio: float = setting(0.01, "the cosine ends at learning-rate x this",
                                  within(0, 1))
    batch_size: int = setting(8, "training patches per step", at_least(1))
    seed: int = setting(0, "run seed: model initialisation and (with round and site) each "
                           "site's augmentations")
    model_spatial_dims: int = setting(2, "2 (slices, images) or 3 (volumes)", one_of(2, 3))
    model_channels: str = setting("16,32,64,128,256",
                                  "U-Net channels per level, comma-separated (run config "
                                  "holds scalars only)")
    model_res_units: int = setting(2, "residual units per U-Net level", at_least(0))
    model_dropout: float = setting(0.0, "dropout in the U-Net", within(0, 1, high_open=True))
    structures: str = setting("", "the structures the model learns, comma-separated names "
                                  "as in the sites' label maps (dataset.json `labels`), "
                                  "e.g. `liver,lesion`; empty: one structure, each site's "
                                  "single foreground (docs/data.md)")
    input_channels: str = setting("grey", "input channels taken from the images",
                                  one_of(*INPUT_CHANNELS))
    patch_size: int = setting(64, "training patch and sliding-window size, in pixels",
                              at_least(8))
    patches_per_image: int = setting(2, "random patches drawn per training image per epoch",
                                     at_least(1))
    harmonise: str = setting("auto", "scanners brought to one scale from the sites' "
                                     "fingerprints (docs/data.md): auto = resample to the "
                                     "federation's target spacing, and CT clipped and "
                                     "normalised with the federation's foreground statistics "
                                     "(other modalities z-scored per case); intensity = "
                                     "intensities only; off = cases as read, each z-scored",
                             one_of(*HARMONISE))
    target_spacing: str = setting("", "mm per voxel axis every case is resampled to, "
                                      "comma-separated in array order (e.g. `1,1,3`); empty: "
                                      "from the sites' fingerprints (harmonise = auto)")
    test_time_flips: bool = setting(True, "inference averages over mirrored images "
                                          "(as nnU-Net)")
    sw_overlap: float = setting(0.5, "sliding windows overlap (nnU-Net's half-patch step)",
                                within(0, 1, high_open=True))
    keep_optimizer_state: bool = setting(True, "a site's optimiser state (Adam's moments, "
                                               "SGD's momentum) carries over to its next "
                                               "round (it stays at the site)")
    mixed_precision: bool = setting(True, "fp16 on a CUDA GPU, bf16 on a CPU with bf16 "
                                          "instructions, else fp32; weights stay fp32")
    transfer_precision: str = setting("float32", "how the weights cross the wire, both ways: "
                                                 "float32, or float16 (half the bytes; the "
                                                 "server still aggregates and keeps float32, "
                                                 "sites train in float32; docs/performance.md)",
                                      one_of(*PRECISIONS))
    synthetic_train_cases: int = setting(6, "built-in phantoms per node without a data-dir: "
                                            "training", at_least(1))
    synthetic_test_cases: int = setting(3, "built-in phantoms per node without a data-dir: "
                                           "test", at_least(1))
    strategy: str = setting("fedavg", "server aggregation", one_of(*STRATEGIES))
    fedprox_mu: float = setting(0.01, "FedProx proximal term weight", at_least(0))
    server_learning_rate: float = setting(1.0, "the server's step along the sites' aggregated "
                                               "update (1: the aggregate itself; fedavg, "
                                               "fedprox, fednova)", within(0, 10, low_open=True))
    aggregation: str = setting("mean", "fedavg's rule: the case-weighted mean, or a robust "
                                       "rule against a broken or poisoned site "
                                       "(docs/robustness.md)", one_of(*AGGREGATIONS))
    robust_trim: float = setting(0.25, "trimmed-mean: share of the sites' values cut at each "
                                       "end, weight by weight", within(0, 0.5, high_open=True))
    robust_malicious: int = setting(1, "krum, multi-krum, bulyan: sites assumed malicious "
                                       "(f)", at_least(0))
    robust_select: int = setting(0, "multi-krum: updates averaged; 0: sites - f",
                                 at_least(0))
    fedadam_eta: float = setting(0.01, "FedAdam server learning rate", positive())
    fedadam_tau: float = setting(1e-3, "FedAdam adaptivity", positive())
    secure_aggregation: bool = setting(False, "SecAgg+: the server sees only the sum of "
                                              "updates (docs/privacy.md)")
    secagg_clipping_range: float = setting(8.0, "weights are cut to +-this before "
                                                "quantisation", positive())
    secagg_max_weight: float = setting(1000.0, "the largest case count a site may report",
                                       positive())
    secagg_reconstruction_threshold: float = setting(
        0.6, "share of a node's neighbours needed to unmask it", within(0, 1, low_open=True))
    secagg_timeout: float = setting(600.0, "seconds to wait for each of the 4 protocol stages",
                                    positive())
    dp: str = setting("off", "differential privacy (docs/privacy.md)", one_of(*DP_MODES))
    dp_noise_multiplier: float = setting(1.0, "Gaussian noise std / clipping norm",
                                         at_least(0))
    dp_clipping_norm: float = setting(1.0, "L2 bound on each update (initial value when "
                                           "adaptive)", positive())
    dp_delta: float = setting(1e-5, "DP delta", within(0, 1, low_open=True, high_open=True))
    dp_max_epsilon: float = setting(0.0, "privacy budget: the run stops before exceeding it; "
                                         "0: none", at_least(0))
    dp_clipped_count_stddev: float = setting(0.0, "adaptive clipping only; 0: max(nodes/20, "
                                                  "noise multiplier)", at_least(0))

    def __post_init__(self) -> None:
        for f in fields(self):
            check = f.metadata["check"]
            value = getattr(self, f.name)
            if check is not None and not check.ok(value):
                raise ConfigError(f"setting '{key_of(f.name)}' must be {check.says}, "
                                  f"got {value!r}")
        if "/" in self.run_name or "\\" in self.run_name or self.run_name in (".", ".."):
            raise ConfigError("setting 'run-name' is a name, not a path")
        model = self.model  # checks model-channels and structures
        from common.data.harmonise import parse_spacing

        parse_spacing(self.target_spacing)  # a ConfigError names the setting
        rules = [
            (not self.target_spacing.strip() or self.harmonise == "auto",
             f"target-spacing resamples every case, which harmonise = {self.harmonise} "
             f"does not: use harmonise = auto, or leave target-spacing empty"),
            (self.patch_size % model.divisor == 0,
             f"patch-size must be a multiple of {model.divisor} for "
             f"{len(model.channels)} U-Net levels, got {self.patch_size}"),
            (self.batch_size % self.patches_per_image == 0
             or self.patches_per_image % self.batch_size == 0,
             f"batch-size {self.batch_size} must be a multiple or a divisor of "
             f"patches-per-image {self.patches_per_image} (a step takes whole images' "
             f"patches, or an image's patches in equal parts)"),
            (self.server_learning_rate == 1.0 or self.strategy != "fedadam",
             "server-learning-rate steps fedavg, fedprox and fednova; fedadam has its own "
             "(fedadam-eta)"),
            (not (self.secure_aggregation and self.strategy in ("fedadam", "fednova")),
             f"secure aggregation runs with fedavg or fedprox, not {self.strategy}"),
            (not (self.dp != "off" and self.strategy == "fednova"),
             "fednova weighs each site's update by its own step count, which differential "
             "privacy's equal-weight clipped updates do not allow: use fedavg or fedprox"),
            (not (self.dp_max_epsilon and self.dp == "off"),
             "dp-max-epsilon needs differential privacy on (dp = client-fixed, ...)"),
            (self.aggregation == "mean" or self.strategy == "fedavg",
             f"aggregation {self.aggregation} replaces fedavg's mean: use strategy fedavg, "
             f"not {self.strategy}"),
            (self.aggregation == "mean" or not self.secure_aggregation,
             f"aggregation {self.aggregation} looks at each site's update, which secure "
             f"aggregation hides (the server sees only the sum): use one or the other"),
            (self.aggregation == "mean" or self.dp == "off",
             f"differential privacy calibrates its noise to a mean of clipped updates; "
             f"aggregation {self.aggregation} is not one: use one or the other"),
            (self.aggregation != "trimmed-mean" or int(self.robust_trim * self.min_nodes) >= 1,
             f"trimmed-mean with robust-trim {self.robust_trim} and min-nodes "
             f"{self.min_nodes} cuts nothing: raise robust-trim to at least "
             f"{1 / max(1, self.min_nodes):.2f}"),
            (self.aggregation not in ("krum", "multi-krum")
             or self.min_nodes >= 2 * self.robust_malicious + 3,
             f"{self.aggregation} tolerates robust-malicious {self.robust_malicious} only with "
             f"min-nodes >= {2 * self.robust_malicious + 3} (n > 2f + 2)"),
            (self.aggregation != "bulyan" or self.min_nodes >= 4 * self.robust_malicious + 3,
             f"bulyan tolerates robust-malicious {self.robust_malicious} only with min-nodes "
             f">= {4 * self.robust_malicious + 3} (n >= 4f + 3)"),
            (not self.cross_site or (not self.secure_aggregation and self.dp == "off"),
             "cross-site scores each site's own local model at the others: secure "
             "aggregation hides it and differential privacy would be defeated by sharing it"),
            (not (self.secure_aggregation and self.dp.startswith("server")),
             "server-side DP clipping needs every update in the clear, which secure "
             "aggregation hides: use dp = client-fixed or client-adaptive with it"),
        ]
        for ok, message in rules:
            if not ok:
                raise ConfigError(message)

    @property
    def structure_names(self) -> tuple[str, ...]:
        """The structures the model learns, in class order (class ``i`` is
        ``structure_names[i - 1]``; 0 is background); ``("foreground",)`` when
        the run names none."""
        return structure_list(self.structures) or (FOREGROUND,)

    @property
    def named_structures(self) -> bool:
        """Whether the run names its structures (each site's label map must then
        hold exactly those names)."""
        return bool(structure_list(self.structures))

    @property
    def robust_aggregation(self) -> bool:
        """Whether a robust rule replaces FedAvg's weighted mean: each site then
        counts once, in the model's aggregate and in the harmonisation."""
        return self.aggregation != "mean"

    @property
    def model(self) -> ModelSettings:
        return ModelSettings(spatial_dims=self.model_spatial_dims,
                             channels=_channels(self.model_channels),
                             res_units=self.model_res_units, dropout=self.model_dropout,
                             in_channels=INPUT_CHANNELS[self.input_channels],
                             out_channels=1 + len(self.structure_names))

    @classmethod
    def declared(cls) -> dict[str, Field]:
        """Key -> the field declaring it."""
        return {key_of(f.name): f for f in fields(cls)}

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        return {key: f.default for key, f in cls.declared().items()}

    @classmethod
    def from_run_config(cls, cfg: Mapping[str, Any], strict: bool = False) -> RunSettings:
        """Parse run config (kebab-case keys, scalars). ``strict``: refuse keys
        that are not settings (what a user typed); Flower's merged run config
        is read leniently."""
        declared = cls.declared()
        if strict:
            for key in cfg:
                if key not in declared:
                    raise ConfigError(f"unknown setting '{key}'{nearest(key, declared)}; "
                                      "see docs/settings.md")
        values = {}
        for key, f in declared.items():
            if key in cfg:
                values[f.name] = coerce(key, TYPES[f.type], cfg[key])
        if "input-channels" in cfg:
            values["input_channels"] = str(values["input_channels"]).lower()
        return cls(**values)

    def to_run_config(self) -> dict[str, bool | int | float | str]:
        """The inverse of :meth:`from_run_config` (for overrides and run folders)."""
        return {key: getattr(self, f.name) for key, f in self.declared().items()}


TYPES = {"bool": bool, "int": int, "float": float, "str": str}


def key_of(name: str) -> str:
    return name.replace("_", "-")


def check_run_overrides(overrides: Mapping[str, Any]) -> RunSettings:
    """What a user typed (``--config KEY=VALUE``, options): every key must be a
    setting and every value of its type; the settings they make, checked."""
    return RunSettings.from_run_config(overrides, strict=True)


def parse_key_values(items: Iterable[str], what: str = "--config") -> dict[str, str]:
    """Repeated ``KEY=VALUE`` command-line arguments, as text."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{what} takes KEY=VALUE, got {item!r}")
        out[key.strip()] = value.strip().strip("\"'")
    return out


def _device_ok(value: str) -> bool:
    return value in ("auto", "cpu", "cuda") or (
        value.startswith("cuda:") and value[5:].isdigit())


@dataclass(frozen=True)
class NodeSetting:
    """The one declaration of a node setting (``--node-config KEY=VALUE``)."""

    key: str
    kind: type
    help: str
    check: Check | None = None


NODE_SETTINGS = (
    NodeSetting("data-dir", str, "the hospital's data folder (docs/data.md); never leaves it"),
    NodeSetting("site-name", str, "the site's public name (as the coordinator registered it)"),
    NodeSetting("device", str, "auto (CUDA when present), cpu or cuda[:N]",
                Check(_device_ok, "auto, cpu or cuda[:N]")),
    NodeSetting("threads", int, "CPU threads for torch; 0: torch's default", at_least(0)),
    NodeSetting("partition-id", int, "set by Flower's simulation: which simulated site",
                at_least(0)),
    NodeSetting("num-partitions", int, "set by Flower's simulation: how many sites",
                at_least(1)),
)


def check_node_config(values: Mapping[str, Any], strict: bool = True) -> dict[str, Any]:
    """Node settings, each of its declared type and rule. ``strict``: refuse
    keys that are not node settings (what a user typed)."""
    declared = {s.key: s for s in NODE_SETTINGS}
    out = {}
    for key, value in values.items():
        decl = declared.get(key)
        if decl is None:
            if strict:
                raise ConfigError(f"unknown node setting '{key}'{nearest(key, declared)}; "
                                  "node settings: " + ", ".join(declared))
            continue
        value = coerce(key, decl.kind, value)
        if decl.check is not None and not decl.check.ok(value):
            raise ConfigError(f"node setting '{key}' must be {decl.check.says}, got {value!r}")
        out[key] = value
    return out


@dataclass(frozen=True)
class SiteSettings:
    """Settings local to one hospital; never sent anywhere.

    ``data_dir`` is None only in a simulation without site folders, where the
    node builds a synthetic hospital of its own.
    """

    name: str
    data_dir: Path | None
    device: str = "auto"
    threads: int = 0  # 0 = leave torch's default
    partition_id: int = 0

    @classmethod
    def from_node_config(
        cls, node_cfg: Mapping[str, Any], sim_sites: list[dict[str, str]] | None = None
    ) -> SiteSettings:
        """Read node config; in simulation, ``partition-id`` picks the site from
        the simulation's site list (see :func:`simulation_sites`). Device and
        threads fall back to ``$FEDSEG_DEVICE`` / ``$FEDSEG_THREADS``."""
        fallback = {k: v for k, v in (("device", os.environ.get("FEDSEG_DEVICE")),
                                      ("threads", os.environ.get("FEDSEG_THREADS")))
                    if v is not None}
        cfg = check_node_config({**fallback, **node_cfg}, strict=False)
        partition_id = cfg.get("partition-id", 0)
        if "data-dir" in cfg:
            data_dir: Path | None = Path(cfg["data-dir"])
            name = cfg.get("site-name", f"site-{partition_id}")
        elif sim_sites is not None:
            if partition_id >= len(sim_sites):
                raise ConfigError(
                    f"simulation has {len(sim_sites)} site folders but node "
                    f"partition-id is {partition_id}: num-supernodes is too large"
                )
            entry = sim_sites[partition_id]
            data_dir, name = Path(entry["data_dir"]), entry["name"]
        else:
            data_dir, name = None, f"hospital-{partition_id}"
        return cls(name=name, data_dir=data_dir, device=cfg.get("device", "auto"),
                   threads=cfg.get("threads", 0), partition_id=partition_id)


SIM_SITES_ENV = "FEDSEG_SIM_SITES"
# A simulation's worker log: one JSON line per message a simulated site answers
# (process, host, Ray node, sites' cases held, peak memory); see client/app.py.
SIM_WORKERS_ENV = "FEDSEG_SIM_WORKERS"


def simulation_sites() -> list[dict[str, str]] | None:
    """The site list of a simulation started by ``fedseg simulate``.

    The simulation driver writes it to a local file and names that file in the
    ``FEDSEG_SIM_SITES`` environment variable of the processes it starts, so the
    folders never enter run config. On a Ray cluster, whose other machines
    cannot read that file, the variable holds the list itself (JSON).
    """
    import json

    value = os.environ.get(SIM_SITES_ENV)
    if not value:
        return None
    try:
        sites = json.loads(value if value.lstrip().startswith("[")
                           else Path(value).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the simulation site list {value[:200]}: {exc}"
                          ) from None
    return list(sites)


def fedseg_home() -> Path:
    """Where fedseg keeps its caches (synthetic data, Flower's home in CLI runs)."""
    return Path(os.environ.get("FEDSEG_HOME", Path.home() / ".cache" / "fedseg"))


def settings_markdown() -> str:
    """docs/settings.md, from the declarations."""
    def row(key: str, kind: str, default: Any, help: str, check: Check | None) -> str:  # noqa: A002
        rule = f" Must be {check.says}." if check else ""
        shown = "" if default is None else f"`{json.dumps(default)}`"
        return f"| `{key}` | {kind} | {shown} | {help}.{rule} |"

    lines = [
        "# Settings",
        "",
        "Generated from `common/config.py` (the one declaration of each setting) by",
        "`python -m common.config > docs/settings.md`; a test keeps this file equal to it.",
        "",
        "## Run settings",
        "",
        "Run-wide, the same at the server and every hospital: `fedseg simulate|demo|run",
        "--config KEY=VALUE`, `[tool.flwr.app.config]` in pyproject.toml. They travel to",
        "every node, so none is a path or a secret.",
        "",
        "| key | type | default | meaning |",
        "|---|---|---|---|",
    ]
    for key, f in RunSettings.declared().items():
        lines.append(row(key, str(f.type), f.default, f.metadata["help"], f.metadata["check"]))
    lines += [
        "",
        "## Node settings",
        "",
        "Local to one hospital, never sent anywhere: `flower-supernode --node-config`,",
        "`fedseg node` options, `fedseg simulate|demo --node-config KEY=VALUE`.",
        "",
        "| key | type | default | meaning |",
        "|---|---|---|---|",
    ]
    for decl in NODE_SETTINGS:
        lines.append(row(decl.key, decl.kind.__name__, None, decl.help, decl.check))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(settings_markdown(), end="")
