"""The hospital's commands: ``fedseg keygen`` (this hospital's own key pair)
and ``fedseg node`` (this hospital's SuperNode). Nothing of the coordinator's."""

from __future__ import annotations

import argparse
from pathlib import Path

from common.console import console, warn_insecure


def cmd_keygen(args: argparse.Namespace) -> int:
    from common.keys import hospital_keypair

    result = hospital_keypair(Path(args.out), args.name, force=args.force)
    for path, _ in result.written:
        console.print(str(path))
    if result.kept:
        console.print(f"kept existing {result.kept[0]} (pass --force to rotate it)")
        return 1
    console.print(f"Send {args.name}.pub to the coordinator; {args.name}.key stays here.")
    return 0


def cmd_node(args: argparse.Namespace) -> int:
    if args.action == "audit":
        return cmd_node_audit(args)
    if args.action == "models":
        return cmd_node_models(args)
    missing = [f"--{k.replace('_', '-')}" for k in ("superlink", "data_dir", "name")
               if not getattr(args, k)]
    if missing:
        console.print(f"error: fedseg node needs {', '.join(missing)}")
        return 2
    from common.config import check_node_config

    check_node_config({"data-dir": args.data_dir, "site-name": args.name,
                       "device": args.device, "threads": args.threads or 0})
    from client.node import NodeSettings, preflight, run_node
    from common.processes import base_env

    settings = NodeSettings(
        superlink=args.superlink, data_dir=Path(args.data_dir), name=args.name,
        key=Path(args.key) if args.key else None, ca=Path(args.ca) if args.ca else None,
        insecure=args.insecure, threads=args.threads or 0, device=args.device, port=args.port,
        max_wait=args.max_wait, state=Path(args.state or f"fedseg-site-{args.name}"),
        policy=Path(args.policy) if args.policy else None, run_user=args.run_user,
        data_user=args.data_user)
    if args.insecure:
        warn_insecure("this node")
    check = run_site_check(settings.data_dir, show_all=False)  # unusable cases, named
    preflight(settings, check)
    return run_node(settings, base_env())


def cmd_node_models(args: argparse.Namespace) -> int:
    """The runs' final models this site kept, from their model cards."""
    import json

    from rich.table import Table

    from client.node import SiteState

    if not (args.state or args.name):
        console.print("error: fedseg node models needs --state (or --name, for "
                      "./fedseg-site-NAME)")
        return 2
    folder = SiteState(Path(args.state or f"fedseg-site-{args.name}").resolve(), None).models
    # each run's model, then any kept before it under the same run name
    cards = sorted([*folder.glob("*/model-card.json"), *folder.glob("*/earlier-*/model-card.json")],
                   key=lambda p: (p.relative_to(folder).parts[0], len(p.parts), p.parent.name))
    if not cards:
        console.print(f"no models kept in {folder}")
        return 0
    table = Table(title=f"models kept at this site ({folder})")
    for col in ("run", "rounds", "saved", "federation Dice", "Dice here", "sha256", "file"):
        table.add_column(col)
    for path in cards:
        card = json.loads(path.read_text())
        fed, here = card.get("federation_dice"), card.get("site_scores", {}).get("dice")
        of = card.get("federation_dice_round")  # the round before the model's own
        earlier = " (earlier)" if path.parent.name.startswith("earlier-") else ""
        table.add_row(card["run"] + earlier, str(card["rounds"]), card["saved"],
                      "" if fed is None else f"{fed:.3f}" + (f" (round {of})" if of else ""),
                      "" if here is None else f"{here:.3f}",
                      card["sha256"][:16], str(path.with_name("final_model.pt")))
    console.print(table)
    return 0


def cmd_node_audit(args: argparse.Namespace) -> int:
    """Every message this site's node sent (or refused), from its audit log."""
    from rich.table import Table

    from client.audit import AuditLog
    from client.node import SiteState

    if not (args.state or args.name):
        console.print("error: fedseg node audit needs --state (or --name, for "
                      "./fedseg-site-NAME)")
        return 2
    state = Path(args.state or f"fedseg-site-{args.name}")
    log = AuditLog(SiteState(state.resolve(), None).audit)
    entries = log.entries()
    if not entries:
        console.print(f"no messages recorded in {log.path}")
        return 0
    table = Table(title=f"what left this site ({log.path})")
    for col in ("time", "run", "round", "kind", "outcome", "records (keys)", "bytes",
                "message id", "why / notes"):
        table.add_column(col)
    for e in entries:
        records = "; ".join(f"{name}: {', '.join(r.get('keys', []))}"
                            for name, r in (e.get("records") or {}).items())
        table.add_row(e["time"], str(e["run"]), str(e.get("round") or ""), e["kind"],
                      e["outcome"], records, str(e.get("bytes", 0)),
                      (e.get("message_id") or "")[:16], e.get("reason") or "")
    console.print(table)
    console.print("the message id is what the server received the message under "
                  "(FEDSEG_AUDIT_DIR keeps each reply in a file named with it)")
    return 0


def cmd_site_resample(args: argparse.Namespace) -> int:
    """A NIfTI site written again at ``--spacing`` (docs/data.md)."""
    from rich.progress import Progress

    from common.data.harmonise import parse_spacing
    from common.data.respace import resample_site
    from common.errors import ConfigError, DataError

    try:
        spacing = parse_spacing(args.spacing)
        if spacing is None:
            raise ConfigError("--spacing needs 2 or 3 mm values, e.g. 1.5,1.5,3")
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("resampling", total=None)

            def on_case(split: str, done: int, total: int) -> None:
                progress.update(task, description=f"{split}", completed=done, total=total)

            record = resample_site(Path(args.site_dir), Path(args.out), spacing, on_case)
    except (ConfigError, DataError) as exc:
        console.print(f"error: {str(exc).replace('target-spacing', '--spacing')}",
                      soft_wrap=True)
        return 2
    console.print(f"wrote {args.out} at {' x '.join(f'{v:g}' for v in spacing)} mm (from "
                  f"{', '.join(' x '.join(f'{v:g}' for v in z) for z in record['source_spacings'])}"
                  f" mm)", soft_wrap=True)
    return 0


def cmd_site_check(args: argparse.Namespace) -> int:
    """Every case of a site folder: usable or not, and why (exit 1 when the
    site cannot join: no usable training case; with --strict, when any case
    is unusable)."""
    from common.errors import ConfigError

    site_dir = Path(args.site_dir)
    try:
        result = run_site_check(site_dir, show_all=not args.problems_only,
                                structures=args.structures)
    except ConfigError as exc:
        console.print(f"error: {exc}")
        return 2
    console.print(f"{site_dir}: {result.summary()}", soft_wrap=True)
    if not result.can_join:
        console.print("[red]this site cannot join a run: no usable training case[/red]")
        return 1
    if args.strict and not result.all_usable:
        return 1
    return 0


def run_site_check(site_dir: Path, show_all: bool = True, structures: str | None = None):
    """Check ``site_dir`` with a progress bar; print the per-case table (every
    case, or only those with a problem or a note). Returns the ``SiteCheck``."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
    from rich.table import Table

    from common.config import RunSettings
    from common.data.check import check_site, count_cases

    total = count_cases(site_dir)
    with Progress(TextColumn("checking cases"), BarColumn(), MofNCompleteColumn(),
                  console=console, transient=True, disable=total < 20) as progress:
        task = progress.add_task("check", total=total)
        result = check_site(site_dir, on_case=lambda _: progress.advance(task),
                            settings=None if structures is None
                            else RunSettings(structures=structures))
    rows = [c for c in result.cases if show_all or not c.usable or c.note]
    if rows:
        table = Table(title=f"cases of {site_dir}")
        for col in ("split", "#", "case", "usable", "shape", "foreground", "why / note"):
            table.add_column(col)
        for c in rows:
            table.add_row(c.split, str(c.index), c.case_id,
                          "yes" if c.usable else "[red]no[/red]",
                          "x".join(map(str, c.shape)),
                          c.shown_foreground(), c.problem or c.note)
        console.print(table)
    return result


def cmd_predict(args: argparse.Namespace) -> int:
    """Segment new images with a saved model; one output per input, in the
    form its viewers open (docs/using-the-model.md)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from common.errors import FedsegError
    from common.inference import check_label, load_model, segment, write_result
    from common.model import pick_device

    if getattr(args, "dicomweb", None):  # from the hospital's PACS (client/pacs.py)
        from client.pacs import cmd_predict_pacs

        return cmd_predict_pacs(args)
    if not args.inputs or not args.out:
        console.print("error: fedseg predict needs INPUT... and --out DIR (or --dicomweb URL)")
        return 2
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        console.print(f"error: {out} is not empty: fedseg predict does not overwrite; "
                      f"give a new folder")
        return 2
    missing = [p for p in args.inputs if not Path(p).exists()]
    if missing:
        console.print(f"error: input(s) not found: {', '.join(missing)}")
        return 2
    saved = load_model(Path(args.model))
    check_label(saved, args.label)
    device = pick_device(args.device)
    out.mkdir(parents=True, exist_ok=True)
    console.print(f"model {saved.path} (sha256 {saved.sha256[:16]}), "
                  f"{saved.settings.model.spatial_dims}D, input {saved.settings.input_channels}"
                  f", structures {', '.join(saved.settings.structure_names)}, on {device}",
                  soft_wrap=True)
    failed = 0
    with Progress(TextColumn("segmenting"), BarColumn(), MofNCompleteColumn(),
                  console=console, disable=len(args.inputs) < 2) as progress:
        task = progress.add_task("predict", total=len(args.inputs))
        for source in map(Path, args.inputs):
            try:
                result = segment(saved, source, device)
                written = write_result(saved, result, out, fractional=args.fractional,
                                       label=args.label)
                counts = ", ".join(f"{name} {n}" for name, n in result.voxels().items())
                console.print(f"{source} -> {', '.join(str(p) for p in written)} "
                              f"(voxels: {counts})", soft_wrap=True)
                for note in result.notes:  # what the source lacked, and what was done
                    console.print(f"[yellow]  note: {note}[/yellow]", soft_wrap=True)
            except FedsegError as exc:
                failed += 1
                console.print(f"[red]{source}: {exc}[/red]", soft_wrap=True)
            progress.advance(task)
    if failed:
        console.print(f"[red]{failed} of {len(args.inputs)} input(s) not segmented[/red]")
    return 1 if failed else 0


EVALUATE_SPLITS = ("test", "training", "all")


def _split_size(site: Path, split: str) -> int:
    """How many cases a site folder lists under ``split`` (0 when none, or no
    such list or folder); a malformed ``dataset.json`` still raises."""
    from common.data.site import list_cases
    from common.errors import EmptyDatasetError

    try:
        return len(list_cases(site, split))
    except EmptyDatasetError:
        return 0


def evaluation_cases(site: Path, split: str, classes_of, volumes: bool = False):
    """The usable cases of ``split`` (``test``, ``training`` or ``all``: both)
    of a folder to score a model on, and the cases left out; ``classes_of()``
    reads the folder's label map against the model's structures, once the
    folder is known to list cases (an empty folder is said to be one, not a
    folder without a label map). A split that
    lists no case, or none usable, while the folder's other split has cases
    is a :class:`ConfigError` naming the ``--split`` to use: a held-out folder
    in the Decathlon's form lists its (labelled) cases under ``training``,
    and its ``test`` list, when there is one, holds unlabelled images."""
    from functools import partial

    from common.data.site import NoUsableCaseError, list_cases, load_case, read_site
    from common.errors import ConfigError, MissingLabelError

    chosen = ("training", "test") if split == "all" else (split,)
    sizes = {s: _split_size(site, s) for s in ("test", "training")}
    others = [s for s in sizes if s not in chosen and sizes[s]]
    hint = "; ".join(f"it lists {sizes[s]} {s} case(s): score them with --split {s} (or "
                     f"--split all)" for s in others)
    if not any(sizes[s] for s in chosen):
        if hint:
            raise ConfigError(f"{site} lists no {split} case; {hint}")
        list_cases(site, chosen[0])  # raises, saying what the folder lacks
    classes = classes_of()
    cases, left_out = [], []
    unlabelled = []  # test images listed without a label (the Decathlon's test lists)
    for s in (s for s in chosen if sizes[s]):
        try:
            read = read_site(site, s, classes=classes,
                             load=partial(load_case, volumes=volumes))
        except NoUsableCaseError as exc:
            if split != "all":
                if hint:
                    raise ConfigError(f"{exc}; {hint}") from None
                raise
            left_out += exc.left_out
            unlabelled += [e for e in exc.left_out
                           if s == "test" and isinstance(e, MissingLabelError)]
            continue
        cases += read.cases
        left_out += read.left_out
        unlabelled += [e for e in read.left_out
                       if s == "test" and isinstance(e, MissingLabelError)]
    if not cases:
        raise NoUsableCaseError("training or test", left_out)
    return cases, left_out, unlabelled


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Score a saved model on a site's test cases (``--split``: its training
    cases, or all), at the site: per-case metrics and their means (a table,
    and a CSV that stays here). With several structures the headline columns
    are the mean over structures, and the table has a block per structure
    (the CSV a column per structure and score)."""
    import csv

    from rich.table import Table

    from common.data.labels import site_classes
    from common.data.site import left_out_summary
    from common.data.transforms import prepared
    from common.errors import ConfigError
    from common.inference import load_model
    from common.model import pick_device
    from common.training import evaluate
    from common.wire import SCORES, score_keys, structure_key

    saved = load_model(Path(args.model))
    site = Path(args.site_dir)  # its labels as the model's structures, as a run reads them
    out = _evaluate_csv(args.csv, saved.sha256, site, args.split)  # before the scoring
    found, left_out, unlabelled = evaluation_cases(
        site, args.split, lambda: site_classes(site, saved.settings),
        volumes=saved.settings.model.spatial_dims == 3)
    from common.data.harmonise import site_modality
    from common.data.site import list_cases
    from common.data.transforms import Preparation

    splits = [s for s in ("training", "test") if _split_size(site, s)]
    modality = site_modality(site, list_cases(site, splits[0])[0].image if splits else None)
    # as the run prepared its cases; resampled ones are scored on the grid they were read on
    cases = prepared(found, Preparation.of(saved.settings.input_channels, saved.harmonisation,
                                           modality), keep_source=True)
    result = evaluate(saved.model, cases, saved.settings, pick_device(args.device))
    shown = "training and test" if args.split == "all" else args.split
    scored = (f"{len(cases)} of {len(cases) + len(left_out)} {shown} cases scored, "
              f"{len(left_out)} left out" if left_out else f"{shown} cases")
    table = Table(title=f"{saved.path.name} on {args.site_dir} ({scored})")
    for col in ("case", *SCORES):
        table.add_column(col, justify="right")
    rows = [(c.case_id, m) for c, m in zip(cases, result.per_case, strict=True)]
    summary = result.summary
    structures = saved.settings.structure_names
    blocks = [("", SCORES)] + [(f"{s}: ", [structure_key(k, s) for k in SCORES])
                               for s in (structures if len(structures) > 1 else ())]
    for prefix, keys in blocks:
        table.add_section()
        for case_id, m in rows:
            table.add_row(prefix + case_id, *(f"{m[k]:.4f}" for k in keys))
        table.add_row(f"{prefix}mean", *(f"{summary[k]:.4f}" for k in keys))
    console.print(table)
    columns = score_keys(structures)
    try:  # "x" (exclusive): a file that appeared since the check is not overwritten either
        fh = open(out, "x", newline="")  # noqa: SIM115 - closed below, errors said
    except OSError as exc:
        raise ConfigError(f"cannot write {out}: {exc.strerror or exc} (the scores are in "
                          f"the table above)") from None
    with fh:
        writer = csv.writer(fh)
        writer.writerow(["case", *columns, "note"])
        writer.writerows([case_id, *(m[k] for k in columns), ""] for case_id, m in rows)
        writer.writerows([exc.case, *([""] * len(columns)), f"left out: {exc.problem}"]
                         for exc in left_out)
        writer.writerow(["mean", *(summary[k] for k in columns),
                         f"mean of {len(rows)} scored case(s)"])
    console.print(f"per-case metrics written to {out} (they stay at this site)")
    unread = [e for e in left_out if all(e is not u for u in unlabelled)]
    if left_out:  # each was named as it was read, and is in the CSV
        console.print(f"[yellow]{len(cases)} of {len(cases) + len(left_out)} case(s) scored; "
                      f"{left_out_summary(left_out)} left out[/yellow]")
    # a case that could not be scored is a failure; a test image listed without a
    # label (the Decathlon's test lists) only has nothing to be scored against
    return 1 if unread else 0


def _evaluate_csv(given: str | None, sha256: str, site: Path, split: str) -> Path:
    """Where ``fedseg evaluate`` writes its CSV, checked before any scoring:
    ``--csv`` must be a new file in an existing folder (nothing is
    overwritten); the default names the model, the folder and the split, with
    ``-2``, ``-3``... where such a file is already there."""
    import os

    from common.errors import ConfigError

    if given:
        out = Path(given)
        if out.exists() or out.is_symlink():
            raise ConfigError(f"--csv {out} exists; give a new file name (nothing is "
                              f"overwritten)")
        if not out.parent.is_dir():
            raise ConfigError(f"--csv {out}: folder {out.parent} does not exist")
        if not os.access(out.parent, os.W_OK):
            raise ConfigError(f"--csv {out}: folder {out.parent} is not writable here")
        return out
    stem = f"fedseg-evaluate-{sha256[:12]}-{site.resolve().name or 'root'}-{split}"
    if not os.access(".", os.W_OK):
        raise ConfigError("the current folder is not writable here: give --csv a file in "
                          "one that is")
    out, n = Path(f"{stem}.csv"), 1
    while out.exists() or out.is_symlink():
        n += 1
        out = Path(f"{stem}-{n}.csv")
    return out


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="hospital: segment new images with a saved model")
    p.add_argument("model", help="a final_model.pt: a run folder's (its summary.json beside it), a "
                   "site's kept copy (its model-card.json beside it) or a bench "
                   "method's (self-contained)")
    p.add_argument("inputs", nargs="*", metavar="INPUT",
                   help="DICOM series folders, NIfTI files, PNG/JPEG images")
    p.add_argument("--out", help="a new (or empty) folder for the results")
    p.add_argument("--fractional", action="store_true",
                   help="DICOM SEG of each structure's probability instead of its mask")
    p.add_argument("--label", help="the segment's label of a one-structure model (default: "
                                   "its structure's name, 'foreground' when the run named "
                                   "none); several structures' segments take their names")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda:N")
    from client.pacs import add_predict_options, add_pull_command

    add_predict_options(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("evaluate", help="hospital: score a saved model on a site's test cases "
                                        "(or a held-out folder's: --split)")
    p.add_argument("model", help="a final_model.pt: a run folder's (its summary.json beside it), a "
                   "site's kept copy (its model-card.json beside it) or a bench "
                   "method's (self-contained)")
    p.add_argument("site_dir", metavar="SITE_DIR")
    p.add_argument("--split", choices=EVALUATE_SPLITS, default="test",
                   help="the cases to score: the folder's test cases (default), its "
                        "training cases (a held-out folder in the Decathlon's form lists "
                        "its labelled cases under 'training'), or all of them")
    p.add_argument("--csv", help="per-case CSV to write, a new file (default "
                   "./fedseg-evaluate-HASH-FOLDER-SPLIT.csv)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda:N")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("site", help="hospital: check a site folder before it joins; "
                                    "resample one; pull one from the PACS")
    ssub = p.add_subparsers(dest="site", required=True)
    c = ssub.add_parser("check", help="read every case: what is usable, what is not and why")
    c.add_argument("site_dir", metavar="DIR")
    c.add_argument("--strict", action="store_true",
                   help="exit 1 if any case is unusable (default: only if none can train)")
    c.add_argument("--problems-only", action="store_true",
                   help="list only the cases with a problem or a note")
    c.add_argument("--structures", metavar="NAMES",
                   help="read the labels as a run learning these structures would "
                        "(run setting `structures`, e.g. liver,lesion); default: those "
                        "the site's label map names")
    c.set_defaults(func=cmd_site_check)
    from client.prepare_cli import add_prepare_command

    add_prepare_command(ssub)
    c = ssub.add_parser("resample", help="write a NIfTI site again at another voxel spacing "
                                         "(as another scanner would give it)")
    c.add_argument("site_dir", metavar="DIR")
    c.add_argument("out", metavar="OUT", help="a new folder")
    c.add_argument("--spacing", required=True, metavar="X,Y,Z",
                   help="mm per voxel along the files' array axes, e.g. 1.5,1.5,3")
    c.set_defaults(func=cmd_site_resample)
    add_pull_command(ssub)

    p = sub.add_parser("keygen", help="hospital: make this hospital's own key pair")
    p.add_argument("out")
    p.add_argument("--name", required=True)
    p.add_argument("--force", action="store_true", help="replace an existing key (rotation)")
    p.set_defaults(func=cmd_keygen)

    p = sub.add_parser("node", help="hospital: run this hospital's node (site worker and "
                                    "SuperNode); `fedseg node audit`: what left this site")
    p.add_argument("action", nargs="?", default="run", choices=["run", "audit", "models"],
                   help="run (default) the node, print its audit log, or list the final "
                        "models it kept")
    p.add_argument("--superlink", help="host:port of the SuperLink")
    p.add_argument("--data-dir", help="this hospital's site folder")
    p.add_argument("--name", help="this hospital's public name")
    p.add_argument("--state",
                   help="this site's state folder: worker socket, audit log, Flower's files "
                        "(default ./fedseg-site-NAME; never inside the data folder)")
    p.add_argument("--policy", help="this hospital's policy file (TOML; docs/deploy.md)")
    p.add_argument("--run-user", default="fedseg-run",
                   help="as root: the user the SuperNode and the ClientApps run as")
    p.add_argument("--data-user",
                   help="as root: the user the site worker runs as (default: the data "
                        "folder's owner)")
    p.add_argument("--key", help="this hospital's private key (OpenSSH ECDSA)")
    p.add_argument("--ca", help="the federation's CA certificate")
    p.add_argument("--threads", type=int, help="CPU threads for training (default: all)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda:N")
    p.add_argument("--port", type=int, default=9094, help="local Runtime API port")
    p.add_argument("--max-wait", type=float, help="give up connecting after this many seconds")
    p.add_argument("--insecure", action="store_true", help="no TLS (test only)")
    p.set_defaults(func=cmd_node)
