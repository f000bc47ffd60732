"""The hospital's policy: what runs this site takes part in.

A TOML file the hospital writes and ``fedseg node --policy FILE`` reads; it
never leaves the site. Every key is optional::

    require-secure-aggregation = true   # SecAgg+ on
    require-dp = true                   # differential privacy on (any mode)
    max-epsilon = 8.0                   # DP with a budget of at most this epsilon
    min-sites = 3                       # the run's min-nodes at least this
    max-rounds = 100                    # the run's rounds at most this
    max-local-epochs = 5                # local epochs per round at most this
    allowed-strategies = ["fedavg", "fedprox"]
    share-local-model = true            # this site's last local model may be scored at
                                        # the other sites (a run's cross-site; off by default)
    max-model-parameters = 100000000    # the U-Net a run may build here (default 1e8)
    max-batch-voxels = 134217728        # batch-size x patch voxels (default 2**27)

The last two bound the memory a run can make the worker take, whatever the
coordinator declares (the default U-Net has 1.6 million parameters and
32,768 voxels a batch; they hold unless the policy sets them otherwise).

The site worker checks each request's run settings against it and refuses a
run that breaks it: the full reason in the hospital's log, the rule that was
broken (no value of the site's) to the server. Rounds and local epochs are
also bounded by what the worker itself does: it counts the rounds it trained
for a run and trains the epochs it was asked for only within the bound. What
the worker cannot see for itself (that the server really masks or adds noise)
it takes from the run's settings; docs/privacy.md says what that means.
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
    max_model_parameters: int | None = 100_000_000
    max_batch_voxels: int | None = 1 << 27

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
                        "share-local-model": bool, "max-model-parameters": int,
                        "max-batch-voxels": int}[key]
            if isinstance(value, bool) and expected is not bool or not isinstance(value,
                                                                                  expected):
                raise ConfigError(f"{where}: {key} must be "
                                  f"{getattr(expected, '__name__', 'a number')}, got {value!r}")
            if key == "allowed-strategies":
                value = tuple(str(v) for v in value)
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
        if (self.require_dp or self.max_epsilon) and s.dp == "off":
            out.append("differential privacy is required")
        if self.max_epsilon and s.dp != "off" and not (
                0 < s.dp_max_epsilon <= self.max_epsilon):
            out.append("a DP budget (dp-max-epsilon) within the site's limit is required")
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

    def check(self, s: RunSettings) -> None:
        broken = self.violations(s)
        if broken:
            raise PolicyRefusal("; ".join(broken))

    def check_round(self, rounds_trained: int) -> None:
        """The worker's own count of a run's rounds, whatever the run declares."""
        if self.max_rounds and rounds_trained >= self.max_rounds:
            raise PolicyRefusal("fewer rounds (num-rounds) are required")
