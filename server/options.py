"""Run and node settings as typed on the command line, checked against their
declarations (common.config) before anything starts; shared by the
coordinator's, the benchmarks' and the simulation commands."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from common.config import check_node_config, check_run_overrides, parse_key_values
from common.errors import ConfigError


def run_overrides(args: argparse.Namespace, base: Mapping[str, Any] | None = None
                  ) -> dict[str, Any]:
    """The run settings typed on the command line, checked against their
    declarations before anything starts (unknown key, wrong type, rule).
    ``base``: settings the command applies beneath them (a benchmark's
    preset), so that rules across keys see what the run will use."""
    out: dict[str, Any] = {}
    for key, attr in (("num-rounds", "rounds"), ("local-epochs", "local_epochs"),
                      ("learning-rate", "lr"), ("patch-size", "patch_size"),
                      ("input-channels", "channels"), ("seed", "seed"),
                      ("min-nodes", "min_nodes"), ("fraction-train", "fraction_train")):
        value = getattr(args, attr, None)
        if value is not None:
            out[key] = value
    out.update(parse_key_values(args.config or []))
    typed = check_run_overrides({**(base or {}), **out}).to_run_config()
    return {key: typed[key] for key in out}


def node_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """``--node-config`` of a simulation: the simulated hospitals' device and
    threads (their folders and names come from the command line)."""
    values = check_node_config(parse_key_values(args.node_config or [], "--node-config"))
    fixed = sorted(set(values) - {"device", "threads"})
    if fixed:
        raise ConfigError(f"node setting {', '.join(fixed)} is set by the simulation itself "
                          "(site folders and --names); --node-config takes device, threads")
    return values


def add_run_options(p: argparse.ArgumentParser, local: bool = True) -> None:
    p.add_argument("--rounds", type=int, help="federated rounds (num-rounds)")
    p.add_argument("--local-epochs", type=int, help="local epochs per round")
    p.add_argument("--lr", type=float, help="learning rate")
    p.add_argument("--patch-size", type=int, help="training patch / sliding window, pixels")
    p.add_argument("--channels", choices=["grey", "rgb", "red", "green", "blue"],
                   help="input channels taken from colour images")
    p.add_argument("--seed", type=int)
    p.add_argument("--min-nodes", type=int, help="fewest nodes a round needs")
    p.add_argument("--fraction-train", type=float)
    p.add_argument("--config", action="append", metavar="KEY=VALUE",
                   help="any other run-config key (repeatable)")
    if local:
        p.add_argument("--threads", type=int, default=1,
                       help="CPU threads per simulated hospital")
        p.add_argument("--node-config", action="append", metavar="KEY=VALUE",
                       help="the simulated hospitals' node settings: device, threads "
                            "(docs/settings.md)")
        p.add_argument("--out", help="run folder (default runs/<kind>-<time>)")


def default_out(prefix: str) -> Path:
    """A new run folder under ./runs, named by its kind and the time."""
    return Path("runs") / f"{prefix}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
