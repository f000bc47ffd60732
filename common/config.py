"""Settings, parsed and checked once.

Two sources, never mixed:

* run config (``[tool.flwr.app.config]`` plus per-run overrides) reaches every
  node; it holds only run-wide scalars, never a path or a secret;
* node config (``flower-supernode --node-config``) stays at the hospital: data
  folder, device, CPU threads, the site's public name.

Nothing outside this module reads a raw key.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from common.errors import ConfigError

INPUT_CHANNELS = {"grey": 1, "rgb": 3, "red": 1, "green": 1, "blue": 1}
STRATEGIES = ("fedavg", "fedprox", "fednova", "fedadam")
LR_SCHEDULES = ("cosine", "constant")
DP_MODES = ("off", "server-fixed", "server-adaptive", "client-fixed", "client-adaptive")


def _get(cfg: Mapping[str, Any], key: str, kind: type, default: Any) -> Any:
    value = cfg.get(key, default)
    if kind is bool:
        if isinstance(value, str):
            if value.lower() in ("true", "1", "yes"):
                return True
            if value.lower() in ("false", "0", "no", ""):
                return False
            raise ConfigError(f"setting '{key}' must be true or false, got {value!r}")
        return bool(value)
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"setting '{key}' must be {kind.__name__}, got {value!r}"
        ) from None


@dataclass(frozen=True)
class ModelSettings:
    """The shared U-Net's shape. Every node must build the same one."""

    spatial_dims: int = 2
    channels: tuple[int, ...] = (16, 32, 64, 128, 256)
    res_units: int = 2
    dropout: float = 0.0
    in_channels: int = 1
    out_channels: int = 2  # background + foreground

    def __post_init__(self) -> None:
        if self.spatial_dims not in (2, 3):
            raise ConfigError(f"model-spatial-dims must be 2 or 3, got {self.spatial_dims}")
        if len(self.channels) < 2:
            raise ConfigError("model-channels needs at least two levels, e.g. '16,32'")
        if any(c <= 0 for c in self.channels):
            raise ConfigError(f"model-channels must be positive, got {self.channels}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model-dropout must be in [0, 1), got {self.dropout}")

    @property
    def divisor(self) -> int:
        """Spatial sizes fed to the network must be multiples of this."""
        return 2 ** (len(self.channels) - 1)


@dataclass(frozen=True)
class RunSettings:
    """Run-wide settings, identical on the server and every node."""

    run_name: str = ""
    resume: bool = False
    num_rounds: int = 5
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    evaluate_every: int = 1  # rounds between the sites' scoring (and always the last)
    min_nodes: int = 2
    local_epochs: int = 1
    learning_rate: float = 1e-3
    lr_schedule: str = "cosine"  # cosine | constant, over all rounds
    lr_min_ratio: float = 0.01  # the cosine ends at learning-rate x this
    batch_size: int = 8
    seed: int = 0
    input_channels: str = "grey"
    patch_size: int = 64
    patches_per_image: int = 2
    test_time_flips: bool = True  # average predictions over mirrored images
    sw_overlap: float = 0.5  # sliding-window overlap at inference (nnU-Net's half-patch step)
    keep_optimizer_state: bool = True  # a site's Adam moments carry over between its rounds
    # fp16 on a CUDA GPU, bf16 on a CPU with bf16 instructions, else fp32 (see
    # common.training.low_precision); weights, optimiser and loss stay fp32
    mixed_precision: bool = True
    synthetic_train_cases: int = 6
    synthetic_test_cases: int = 3
    strategy: str = "fedavg"  # fedavg | fedprox | fednova | fedadam
    fedprox_mu: float = 0.01
    fedadam_eta: float = 0.01  # server learning rate
    fedadam_tau: float = 1e-3
    # Privacy (see docs/privacy.md)
    secure_aggregation: bool = False
    secagg_clipping_range: float = 8.0  # weights are cut to +-this before quantisation
    secagg_max_weight: float = 1000.0  # the largest case count a site may report
    secagg_reconstruction_threshold: float = 0.6  # share of neighbours needed to unmask
    secagg_timeout: float = 600.0  # seconds to wait for each protocol stage
    dp: str = "off"
    dp_noise_multiplier: float = 1.0
    dp_clipping_norm: float = 1.0  # the initial norm for adaptive clipping
    dp_delta: float = 1e-5
    dp_max_epsilon: float = 0.0  # 0: no budget
    dp_clipped_count_stddev: float = 0.0  # adaptive clipping; 0: max(nodes/20, noise)
    model: ModelSettings = field(default_factory=ModelSettings)

    def __post_init__(self) -> None:
        checks = [
            (self.num_rounds >= 1, "num-rounds must be at least 1"),
            (0.0 < self.fraction_train <= 1.0, "fraction-train must be in (0, 1]"),
            (0.0 <= self.fraction_evaluate <= 1.0, "fraction-evaluate must be in [0, 1]"),
            (self.min_nodes >= 1, "min-nodes must be at least 1"),
            (self.evaluate_every >= 1, "evaluate-every must be at least 1"),
            (self.local_epochs >= 1, "local-epochs must be at least 1"),
            (self.learning_rate > 0, "learning-rate must be positive"),
            (self.lr_schedule in LR_SCHEDULES,
             f"lr-schedule must be one of {', '.join(LR_SCHEDULES)}"),
            (0.0 <= self.lr_min_ratio <= 1.0, "lr-min-ratio must be in [0, 1]"),
            (self.batch_size >= 1, "batch-size must be at least 1"),
            (0.0 <= self.sw_overlap < 1.0, "sw-overlap must be in [0, 1)"),
            (self.patches_per_image >= 1, "patches-per-image must be at least 1"),
            (self.input_channels in INPUT_CHANNELS,
             f"input-channels must be one of {sorted(INPUT_CHANNELS)}"),
            (self.patch_size % self.model.divisor == 0,
             f"patch-size must be a multiple of {self.model.divisor} for "
             f"{len(self.model.channels)} U-Net levels, got {self.patch_size}"),
            ("/" not in self.run_name and "\\" not in self.run_name and self.run_name != "..",
             "run-name is a name, not a path"),
            (self.strategy in STRATEGIES, f"strategy must be one of {', '.join(STRATEGIES)}"),
            (not (self.secure_aggregation and self.strategy in ("fedadam", "fednova")),
             f"secure aggregation runs with fedavg or fedprox, not {self.strategy}"),
            (not (self.dp != "off" and self.strategy == "fednova"),
             "fednova weighs each site's update by its own step count, which differential "
             "privacy's equal-weight clipped updates do not allow: use fedavg or fedprox"),
            (self.fedprox_mu >= 0, "fedprox-mu must be >= 0"),
            (self.secagg_clipping_range > 0, "secagg-clipping-range must be positive"),
            (self.secagg_max_weight > 0, "secagg-max-weight must be positive"),
            (0 < self.secagg_reconstruction_threshold <= 1,
             "secagg-reconstruction-threshold must be in (0, 1]"),
            (self.dp in DP_MODES, f"dp must be one of {', '.join(DP_MODES)}"),
            (self.dp_noise_multiplier >= 0, "dp-noise-multiplier must be >= 0"),
            (self.dp_clipping_norm > 0, "dp-clipping-norm must be positive"),
            (0 < self.dp_delta < 1, "dp-delta must be in (0, 1)"),
            (self.dp_max_epsilon >= 0, "dp-max-epsilon must be >= 0 (0: no budget)"),
            (not (self.dp_max_epsilon and self.dp == "off"),
             "dp-max-epsilon needs differential privacy on (dp = client-fixed, ...)"),
            (not (self.secure_aggregation and self.dp.startswith("server")),
             "server-side DP clipping needs every update in the clear, which secure "
             "aggregation hides: use dp = client-fixed or client-adaptive with it"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    @classmethod
    def from_run_config(cls, cfg: Mapping[str, Any]) -> RunSettings:
        """Parse Flower's run config (kebab-case keys, scalars only)."""
        channels_text = str(cfg.get("model-channels", "16,32,64,128,256"))
        try:
            channels = tuple(int(c) for c in channels_text.split(",") if c.strip())
        except ValueError:
            raise ConfigError(
                f"model-channels must be comma-separated integers, got {channels_text!r}"
            ) from None
        input_channels = str(cfg.get("input-channels", "grey")).lower()
        model = ModelSettings(
            spatial_dims=_get(cfg, "model-spatial-dims", int, 2),
            channels=channels,
            res_units=_get(cfg, "model-res-units", int, 2),
            dropout=_get(cfg, "model-dropout", float, 0.0),
            in_channels=INPUT_CHANNELS.get(input_channels, 1),
        )
        return cls(
            run_name=str(cfg.get("run-name", "")),
            resume=_get(cfg, "resume", bool, False),
            num_rounds=_get(cfg, "num-rounds", int, 5),
            fraction_train=_get(cfg, "fraction-train", float, 1.0),
            fraction_evaluate=_get(cfg, "fraction-evaluate", float, 1.0),
            min_nodes=_get(cfg, "min-nodes", int, 2),
            evaluate_every=_get(cfg, "evaluate-every", int, 1),
            local_epochs=_get(cfg, "local-epochs", int, 1),
            learning_rate=_get(cfg, "learning-rate", float, 1e-3),
            lr_schedule=str(cfg.get("lr-schedule", "cosine")),
            lr_min_ratio=_get(cfg, "lr-min-ratio", float, 0.01),
            batch_size=_get(cfg, "batch-size", int, 8),
            seed=_get(cfg, "seed", int, 0),
            input_channels=input_channels,
            patch_size=_get(cfg, "patch-size", int, 64),
            patches_per_image=_get(cfg, "patches-per-image", int, 2),
            test_time_flips=_get(cfg, "test-time-flips", bool, True),
            sw_overlap=_get(cfg, "sw-overlap", float, 0.5),
            keep_optimizer_state=_get(cfg, "keep-optimizer-state", bool, True),
            mixed_precision=_get(cfg, "mixed-precision", bool, True),
            synthetic_train_cases=_get(cfg, "synthetic-train-cases", int, 6),
            synthetic_test_cases=_get(cfg, "synthetic-test-cases", int, 3),
            strategy=str(cfg.get("strategy", "fedavg")),
            fedprox_mu=_get(cfg, "fedprox-mu", float, 0.01),
            fedadam_eta=_get(cfg, "fedadam-eta", float, 0.01),
            fedadam_tau=_get(cfg, "fedadam-tau", float, 1e-3),
            secure_aggregation=_get(cfg, "secure-aggregation", bool, False),
            secagg_clipping_range=_get(cfg, "secagg-clipping-range", float, 8.0),
            secagg_max_weight=_get(cfg, "secagg-max-weight", float, 1000.0),
            secagg_reconstruction_threshold=_get(cfg, "secagg-reconstruction-threshold",
                                                 float, 0.6),
            secagg_timeout=_get(cfg, "secagg-timeout", float, 600.0),
            dp=str(cfg.get("dp", "off")),
            dp_noise_multiplier=_get(cfg, "dp-noise-multiplier", float, 1.0),
            dp_clipping_norm=_get(cfg, "dp-clipping-norm", float, 1.0),
            dp_delta=_get(cfg, "dp-delta", float, 1e-5),
            dp_max_epsilon=_get(cfg, "dp-max-epsilon", float, 0.0),
            dp_clipped_count_stddev=_get(cfg, "dp-clipped-count-stddev", float, 0.0),
            model=model,
        )

    def to_run_config(self) -> dict[str, bool | int | float | str]:
        """The inverse of :meth:`from_run_config` (for overrides and run folders)."""
        flat = {k: v for k, v in asdict(self).items() if k != "model"}
        out: dict[str, bool | int | float | str] = {
            k.replace("_", "-"): v for k, v in flat.items()
        }
        out.update(
            {
                "model-spatial-dims": self.model.spatial_dims,
                "model-channels": ",".join(str(c) for c in self.model.channels),
                "model-res-units": self.model.res_units,
                "model-dropout": self.model.dropout,
            }
        )
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
        the simulation's site list (see :func:`simulation_sites`)."""
        partition_id = int(node_cfg.get("partition-id", 0))
        device = str(node_cfg.get("device", os.environ.get("FEDSEG_DEVICE", "auto")))
        threads = int(node_cfg.get("threads", os.environ.get("FEDSEG_THREADS", 0)))
        if "data-dir" in node_cfg:
            data_dir: Path | None = Path(str(node_cfg["data-dir"]))
            name = str(node_cfg.get("site-name", f"site-{partition_id}"))
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
        if device not in ("auto", "cpu") and not device.startswith("cuda"):
            raise ConfigError(f"device must be auto, cpu or cuda[:N], got {device!r}")
        return cls(name=name, data_dir=data_dir, device=device, threads=threads,
                   partition_id=partition_id)


SIM_SITES_ENV = "FEDSEG_SIM_SITES"


def simulation_sites() -> list[dict[str, str]] | None:
    """The site list of a simulation started by ``fedseg simulate``.

    The simulation driver writes it to a local file and names that file in the
    ``FEDSEG_SIM_SITES`` environment variable of the processes it starts, so the
    folders never enter run config.
    """
    import json

    path = os.environ.get(SIM_SITES_ENV)
    if not path:
        return None
    try:
        sites = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the simulation site list {path}: {exc}") from None
    return list(sites)


def fedseg_home() -> Path:
    """Where fedseg keeps its caches (synthetic data, Flower's home in CLI runs)."""
    return Path(os.environ.get("FEDSEG_HOME", Path.home() / ".cache" / "fedseg"))
