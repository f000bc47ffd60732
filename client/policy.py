"""The hospital's policy: what runs this site takes part in.

A TOML file the hospital writes and ``fedseg node --policy FILE`` reads; it
never leaves the site. Every key is optional::

    require-secure-aggregation = true   # SecAgg+ on
    require-dp = true                   # this site clips and noises its own update
    max-epsilon = 8.0                   # the site's DP budget, over all runs on its data
    dp-delta = 1e-5                     # the delta the site's budget is counted at
    min-sites = 3                       # the run's min-nodes at least this
    max-rounds = 100                    # the run's rounds at most this
    max-local-epochs = 5                # local epochs per round at most this
    allowed-strategies = ["fedavg", "fedprox"]
    share-local-model = true            # this site's last local model may be scored at
                                        # the other sites (a run's cross-site; off by default)
    max-model-parameters = 100000000    # the U-Net a run may build here (default 1e8)
    max-batch-voxels = 134217728        # batch-size x patch voxels (default 2**27)
    allowed-wire-versions = [1]         # fedseg wire versions this site takes runs of
    allowed-bundles = ["<sha256>"]      # only runs of these app bundles (their SHA-256)

The last two bound the memory a run can make the worker take, whatever the
coordinator declares (the default U-Net has 1.6 million parameters and
32,768 voxels a batch; they hold unless the policy sets them otherwise).

The hospital's executor (``client/executor.py``) checks each message's run
against it and refuses a run that breaks it: the full reason in the
hospital's log, the rule that was broken (no value of the site's) to the
server. What the site does itself does not depend on what the run declares:
with ``require-secure-aggregation`` this site's update is masked by its own
fedseg or does not leave (a run that only claims SecAgg+ gets a refusal); with
``require-dp`` or ``max-epsilon`` it clips its update and adds Gaussian noise
itself, and ``max-epsilon`` is counted in the site's own ledger
(``client/privacy.py``) across every run on its data; the worker counts the
rounds it trained for a run itself.
"""

from __future__ import annotations

import difflib
import functools
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path

from common.config import RunSettings
from common.errors import ConfigError, FedsegError


def parameters(s: RunSettings) -> int:
    """The parameters of the U-Net ``s`` declares, counted without allocating it."""
    return _parameters(s.model)


@functools.lru_cache(maxsize=16)
def _parameters(model) -> int:
    import torch

    from common.model import build_model

    with torch.device("meta"):
        return sum(p.numel() for p in build_model(model).parameters())


class PolicyRefusal(FedsegError):
    """A run this site's policy does not allow; the text names the rule only."""

    kind = "refused by the site's policy"

    def scrubbed(self) -> str:
        return f"{self.kind}: {self}"


@dataclass(frozen=True)
class SitePolicy:
    require_secure_aggregation: bool = False
    require_dp: bool = False
    max_epsilon: float | None = None
    min_sites: int | None = None
    max_rounds: int | None = None
    max_local_epochs: int | None = None
    allowed_strategies: tuple[str, ...] | None = None
    share_local_model: bool = False
    share_fingerprint: bool = True
    max_model_parameters: int | None = 100_000_000
    max_batch_voxels: int | None = 1 << 27
    dp_delta: float = 1e-5
    allowed_wire_versions: tuple[int, ...] | None = None
    allowed_bundles: tuple[str, ...] | None = None

    @property
    def site_dp(self) -> bool:
        """Whether this site clips and noises its own updates."""
        return self.require_dp or self.max_epsilon is not None

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name.replace("_", "-") for f in fields(cls)]

    @classmethod
    def load(cls, path: Path | None) -> SitePolicy:
        if path is None:
            return cls()
        try:
            raw = tomllib.loads(Path(path).read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read the site policy {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"site policy {path} is not valid TOML: {exc}") from None
        return cls.from_dict(raw, str(path))

    @classmethod
    def from_dict(cls, raw: dict, where: str = "site policy") -> SitePolicy:
        known = cls.keys()
        values = {}
        for key, value in raw.items():
            if key not in known:
                near = difflib.get_close_matches(key, known, n=1)
                hint = f" (did you mean {near[0]!r}?)" if near else ""
                raise ConfigError(f"{where}: unknown key {key!r}{hint}; known: "
                                  f"{', '.join(known)}")
            expected = {"require-secure-aggregation": bool, "require-dp": bool,
                        "max-epsilon": (int, float), "min-sites": int, "max-rounds": int,
                        "max-local-epochs": int, "allowed-strategies": list,
                        "share-local-model": bool, "share-fingerprint": bool,
                        "max-model-parameters": int,
                        "max-batch-voxels": int, "dp-delta": float,
                        "allowed-wire-versions": list, "allowed-bundles": list}[key]
            if isinstance(value, bool) and expected is not bool or not isinstance(value,
                                                                                  expected):
                raise ConfigError(f"{where}: {key} must be "
                                  f"{getattr(expected, '__name__', 'a number')}, got {value!r}")
            if key == "allowed-strategies":
                value = tuple(str(v) for v in value)
            elif key == "allowed-wire-versions":
                if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
                    raise ConfigError(f"{where}: {key} must be a list of whole numbers, "
                                      f"got {value!r}")
                value = tuple(value)
            elif key == "allowed-bundles":
                if not all(isinstance(v, str) and len(v) == 64 and set(v.lower()) <= set(
                        "0123456789abcdef") for v in value):
                    raise ConfigError(f"{where}: {key} must list SHA-256 hashes (64 hex "
                                      f"digits, as `fedseg node audit` shows them)")
                value = tuple(v.lower() for v in value)
            elif key == "dp-delta":
                if not 0 < value < 1:
                    raise ConfigError(f"{where}: dp-delta must be between 0 and 1, got {value}")
            elif key != "max-epsilon" and not isinstance(value, bool) and value < 1:
                raise ConfigError(f"{where}: {key} must be at least 1, got {value}")
            elif key == "max-epsilon" and value <= 0:
                raise ConfigError(f"{where}: max-epsilon must be positive, got {value}")
            values[key.replace("-", "_")] = value
        return cls(**values)

    def violations(self, s: RunSettings) -> list[str]:
        """The rules ``s`` breaks, in words that may go to the server."""
        out = []
        if self.require_secure_aggregation and not s.secure_aggregation:
            out.append("secure aggregation is required")
        if self.site_dp and (s.dp != "client-fixed" or s.dp_noise_multiplier <= 0):
            out.append("client-side differential privacy (dp = client-fixed, a positive "
                       "dp-noise-multiplier) is required: this site clips and noises its "
                       "own update")
        if self.min_sites and s.min_nodes < self.min_sites:
            out.append("more sites per round (min-nodes) are required")
        if self.max_rounds and s.num_rounds > self.max_rounds:
            out.append("fewer rounds (num-rounds) are required")
        if self.max_local_epochs and s.local_epochs > self.max_local_epochs:
            out.append("fewer local epochs are required")
        if self.allowed_strategies and s.strategy not in self.allowed_strategies:
            out.append(f"strategy {s.strategy!r} is not allowed")
        if self.max_batch_voxels and (s.batch_size * s.patch_size ** s.model.spatial_dims
                                      > self.max_batch_voxels):
            out.append("smaller training batches (batch-size x patch voxels) are required")
        if self.max_model_parameters and parameters(s) > self.max_model_parameters:
            out.append("a smaller model (model-channels, model-res-units) is required")
        return out

    def bundle_violations(self, wire_version: int | None, bundle: str) -> list[str]:
        """The pins a run's bundle breaks: its fedseg wire version and its hash."""
        out = []
        if self.allowed_wire_versions is not None and wire_version not in \
                self.allowed_wire_versions:
            out.append(f"fedseg wire version {wire_version} is not among this site's "
                       f"allowed-wire-versions")
        if self.allowed_bundles is not None and bundle.lower() not in self.allowed_bundles:
            out.append("the run's app bundle is not among this site's allowed-bundles")
        return out

    def check(self, s: RunSettings) -> None:
        broken = self.violations(s)
        if broken:
            raise PolicyRefusal("; ".join(broken))

    def check_round(self, rounds_trained: int) -> None:
        """The worker's own count of a run's rounds, whatever the run declares."""
        if self.max_rounds and rounds_trained >= self.max_rounds:
            raise PolicyRefusal("fewer rounds (num-rounds) are required")
