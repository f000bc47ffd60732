"""``fedseg site prepare``: a site's cases prepared for a run ahead of it, on
disk in the site's state folder (``common/data/store.py``), with a progress
bar; stopped (Ctrl-C) and run again, it goes on with the cases not yet
written. The node's worker reads the same folder, so the run's first round
finds them prepared."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common.console import console


def harmonisation_of(path: Path):
    """The harmonisation in a run's ``summary.json``, a kept model's
    ``model-card.json`` or a ``harmonisation.json`` (its ``harmonisation``
    entry, or the file itself)."""
    from common.data.harmonise import Harmonisation
    from common.errors import ConfigError

    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--harmonisation {path}: cannot read it ({exc})") from None
    if isinstance(data, dict) and "harmonisation" in data:
        data = data["harmonisation"]
    if data is None:
        return None  # a run without one: cases as read, each z-scored
    if isinstance(data, dict) and "federation" in data:  # harmonisation.json of a run
        data = data["federation"]
    return Harmonisation.from_dict(data)


def cmd_site_prepare(args: argparse.Namespace) -> int:
    """Prepare a site's training and test cases as a run with these settings
    would, into ``STATE/prepared``."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from client.node import SiteState
    from common.config import check_run_overrides, parse_key_values
    from common.data.site import left_out_summary
    from common.errors import ConfigError, DataError
    from common.site_algorithm import SiteAlgorithm

    if not args.state and not args.name:
        console.print("error: fedseg site prepare needs --state (the node's state folder) or "
                      "--name (for ./fedseg-site-NAME)")
        return 2
    state = SiteState(Path(args.state or f"fedseg-site-{args.name}").resolve(), None)
    data_dir = Path(args.site_dir).resolve()
    if state.root == data_dir or data_dir in state.root.parents:
        console.print(f"error: the state folder {state.root} must be outside the data folder")
        return 2
    try:
        overrides = parse_key_values(args.config or [])
        if args.structures:
            overrides["structures"] = args.structures
        settings = check_run_overrides(overrides)
        algo = SiteAlgorithm(settings, args.name or "site", data_dir, device="cpu",
                             store=state.prepared)
        algo.harmonisation = (harmonisation_of(Path(args.harmonisation))
                              if args.harmonisation else None)
        console.print(f"preparing {data_dir} into {state.prepared}: "
                      f"{algo.preparation()}", soft_wrap=True)
        for split in ("training", "test"):
            with Progress(TextColumn(f"{split:8}"), BarColumn(), MofNCompleteColumn(),
                          TimeElapsedColumn(), TimeRemainingColumn(), console=console,
                          transient=False) as progress:
                task = progress.add_task(split, total=None)

                def advance(done: int, listed: int, task=task, progress=progress) -> None:
                    progress.update(task, completed=done, total=listed)

                try:
                    cases = algo.cases(split, progress=advance)
                except DataError as exc:  # no usable case of this split
                    console.print(f"{split}: {exc}", soft_wrap=True)
                    if split == "training":
                        return 1
                    continue
            left = algo.left_out.get(split) or []
            from common.data.cache import last_store_read

            console.print(f"{split}: {len(cases)} cases ready ({last_store_read['written']} "
                          f"prepared now, {last_store_read['reused']} kept from before)"
                          + (f", {len(left)} left out: {left_out_summary(left)}" if left
                             else ""), soft_wrap=True)
            for exc in left:
                console.print(f"  #{exc.case_index} {exc}", soft_wrap=True)
    except ConfigError as exc:
        console.print(f"error: {exc}", soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        console.print("stopped: the cases prepared so far are kept; the same command goes "
                      "on with the rest")
        return 130
    return 0


def add_prepare_command(ssub: argparse._SubParsersAction) -> None:
    c = ssub.add_parser("prepare", help="prepare a site's cases for a run ahead of it, on "
                        "disk in the node's state folder (progress bar; stop and resume)")
    c.add_argument("site_dir", metavar="DIR")
    c.add_argument("--state", help="the node's state folder (fedseg node --state; default "
                   "./fedseg-site-NAME)")
    c.add_argument("--name", help="this hospital's public name (for the default --state)")
    c.add_argument("--structures", metavar="NAMES",
                   help="the run's structures (run setting `structures`)")
    c.add_argument("--harmonisation", metavar="FILE",
                   help="the run's scale: its summary.json, a kept model's model-card.json "
                        "or harmonisation.json (default: cases as read, each z-scored, as a "
                        "run with harmonise = off)")
    c.add_argument("--config", action="append", metavar="KEY=VALUE",
                   help="the run's other settings that shape the cases (input-channels, "
                        "model-spatial-dims; docs/settings.md)")
    c.set_defaults(func=cmd_site_prepare)
