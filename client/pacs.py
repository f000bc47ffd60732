"""The hospital's commands that read from and write to its own PACS over
DICOMweb (docs/using-the-model.md, docs/data.md):

* ``fedseg predict MODEL --dicomweb URL --series UID [--study UID] --store``:
  a series (or every image series of a study the model can take) retrieved,
  segmented exactly as the same series in a folder is (its instances are
  written to a private temporary folder, read by the same reader), and the
  DICOM SEG stored back in the series' study (STOW-RS) or written to --out.
* ``fedseg site pull --dicomweb URL --studies LIST OUT``: a site folder of
  image series and their SEG or RTSTRUCT, with a seeded training/test split
  and the label map to fill in; resumable.

Everything goes between this machine and the hospital's PACS only.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from client.dicomweb import (
    EXIT_PACS,
    EXIT_PARTLY,
    EXIT_USAGE,
    LABEL_MODALITIES,
    Pacs,
    PacsError,
    PacsNotFoundError,
    SeriesInfo,
    add_options,
    connect,
    save_atomic,
)
from common.console import console
from common.errors import ConfigError, FedsegError

UID_PATTERN = re.compile(r"[0-9]+(\.[0-9]+)*")
STATE = ".fedseg-pull"  # a pulled site's record of the studies it holds


class NotAnImageError(ConfigError):
    """A series that holds no image to segment."""


# ----------------------------------------------------------------------------- predict


def add_predict_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dicomweb", metavar="URL",
                   help="the hospital's PACS's DICOMweb root (e.g. https://pacs/dicom-web): "
                        "segment --series or --study from it instead of INPUT folders")
    p.add_argument("--series", metavar="UID", help="with --dicomweb: the series to segment")
    p.add_argument("--study", metavar="UID",
                   help="with --dicomweb: every image series of this study the model can "
                        "take (with --series: the study that holds it)")
    p.add_argument("--store", action="store_true",
                   help="with --dicomweb: store each DICOM SEG back in the PACS, in the "
                        "series' study (STOW-RS)")
    add_options(p)


def why_not(series: SeriesInfo, saved) -> str | None:
    """Why the model cannot take ``series`` (None: it can)."""
    from common.data.harmonise import modality_of

    what = series.not_image()
    if what:
        return f"{what}, not an image"
    known = sorted(saved.harmonisation.intensity) if saved.harmonisation else []
    found = modality_of(series.modality)
    if known and "other" not in known and found not in known:
        return (f"{series.modality or 'no modality'}: the model learnt from "
                f"{', '.join(known)} images")
    return None


def cmd_predict_pacs(args: argparse.Namespace) -> int:
    """``fedseg predict --dicomweb``: exit 0 when every series was segmented
    (and stored), 1 when some were not, 2 for a wrong command, file or UID, 3
    when the PACS could not be reached or refused."""
    from common.inference import check_label, load_model
    from common.model import pick_device

    problem = (
        "give INPUT folders or --dicomweb, not both" if args.inputs else
        "--dicomweb needs --series UID or --study UID" if not (args.series or args.study) else
        "--dicomweb needs --store (the SEG back to the PACS) or --out DIR"
        if not (args.store or args.out) else None)
    if problem:
        console.print(f"error: {problem}")
        return EXIT_USAGE
    out = Path(args.out) if args.out else None
    if out is not None and out.exists() and any(out.iterdir()):
        console.print(f"error: {out} is not empty: fedseg predict does not overwrite; "
                      f"give a new folder")
        return EXIT_USAGE
    saved = load_model(Path(args.model))
    check_label(saved, args.label)
    device = pick_device(args.device)
    try:
        pacs = connect(args.dicomweb, args.dicomweb_auth, args.dicomweb_ca)
        console.print(f"model {saved.path} (sha256 {saved.sha256[:16]}), "
                      f"{saved.settings.model.spatial_dims}D, structures "
                      f"{', '.join(saved.settings.structure_names)}, on {device}; PACS "
                      f"{pacs.url}", soft_wrap=True)
        pacs.check()
        targets = _targets(pacs, args, saved)
    except PacsError as exc:
        console.print(f"[red]error:[/] {exc}", soft_wrap=True)
        return EXIT_PACS
    except ConfigError as exc:
        console.print(f"[red]error:[/] {exc}", soft_wrap=True)
        return EXIT_USAGE
    if not targets:
        console.print(f"study {args.study}: no series the model can take")
        return EXIT_PARTLY
    failed = done = 0
    for series in targets:
        try:
            _predict_one(pacs, saved, series, device, args, out)
            done += 1
        except PacsError as exc:
            console.print(f"[red]error:[/] {exc}", soft_wrap=True)
            return EXIT_PACS
        except NotAnImageError as exc:
            if args.series:
                console.print(f"[red]error: {series.shown}: {exc}[/red]", soft_wrap=True)
                return EXIT_USAGE
            console.print(f"skipped {series.shown}: {exc}", soft_wrap=True)
        except FedsegError as exc:
            failed += 1
            console.print(f"[red]{series.shown}: {exc}[/red]", soft_wrap=True)
    if failed:
        console.print(f"[red]{failed} of {len(targets)} series not segmented[/red]")
        return EXIT_PARTLY
    if not done:
        console.print(f"study {args.study}: no series the model can take")
        return EXIT_PARTLY
    return 0


def _targets(pacs: Pacs, args: argparse.Namespace, saved) -> list[SeriesInfo]:
    if args.series:
        series = pacs.series(args.series, args.study)
        what = series.not_image()
        if what:
            raise NotAnImageError(f"series {series.series} is {what}, not an image: fedseg "
                                  f"predict segments image series (CT, MR, ...)")
        reason = why_not(series, saved)
        if reason:
            console.print(f"[yellow]note: series {series.series} is {reason}; segmenting it "
                          f"as asked[/yellow]", soft_wrap=True)
        return [series]
    targets = []
    for series in pacs.series_of_study(args.study):
        reason = why_not(series, saved)
        if reason:
            console.print(f"skipped {series.shown}: {reason}", soft_wrap=True)
        else:
            targets.append(series)
    return targets


def _predict_one(pacs: Pacs, saved, series: SeriesInfo, device, args, out: Path | None
                 ) -> None:
    import pydicom

    from common.inference import segment, write_result

    instances = pacs.instances(series)
    images = [i for i in instances if i.is_image]
    if not images:
        raise NotAnImageError(f"holds no image instance ({len(instances)} instance(s))")
    if saved.settings.model.spatial_dims == 3 and len(images) == 1 and images[0].frames < 2:
        raise NotAnImageError("one 2D image; the model is 3D")
    # the instances as the PACS stores them, in a folder only this user can open
    with tempfile.TemporaryDirectory(prefix="fedseg-pacs-") as tmp:
        folder = Path(tmp) / series.series
        pacs.download(series, folder, images)
        result = segment(saved, folder, device)
        written = write_result(saved, result, out or Path(tmp) / "seg",
                               fractional=args.fractional, label=args.label)
        counts = ", ".join(f"{name} {n}" for name, n in result.voxels().items())
        console.print(f"{series.shown}, {len(images)} instance(s): voxels {counts}",
                      soft_wrap=True)
        for note in result.notes:
            console.print(f"[yellow]  note: {note}[/yellow]", soft_wrap=True)
        segs = [pydicom.dcmread(p) for p in written]
        if args.store:
            pacs.store(segs, series.study)
        for path, seg in zip(written, segs, strict=True):
            where = f"stored in study {series.study}" if args.store else ""
            if out is not None:
                where = ", ".join(x for x in (where, f"written to {path}") if x)
            console.print(f"  SEG SOP Instance UID {seg.SOPInstanceUID}, Series Instance UID "
                          f"{seg.SeriesInstanceUID}: {where}", soft_wrap=True)


# ----------------------------------------------------------------------------- site pull


def add_pull_command(ssub) -> None:
    c = ssub.add_parser("pull", help="build a site folder from the hospital's PACS: image "
                                     "series and their SEG or RTSTRUCT (DICOMweb)")
    c.add_argument("out", metavar="OUT", help="the site folder (new, or a stopped pull's "
                                              "to resume it)")
    c.add_argument("--dicomweb", required=True, metavar="URL",
                   help="the PACS's DICOMweb root (e.g. https://pacs/dicom-web)")
    c.add_argument("--studies", required=True, metavar="LIST",
                   help="a file of Study Instance UIDs, one a line (# comments)")
    c.add_argument("--seed", type=int, default=0, help="of the training/test split")
    c.add_argument("--test-fraction", type=float, default=0.2,
                   help="share of the cases held out as test cases (default 0.2)")
    add_options(c)
    c.set_defaults(func=cmd_site_pull)


def read_study_list(path: Path) -> list[str]:
    """Study UIDs, one a line; blank lines and ``#`` comments skipped,
    repeats dropped; a line that is no UID is a ConfigError naming it."""
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--studies {path}: {exc}") from None
    studies = []
    for n, line in enumerate(lines, start=1):
        uid = line.split("#", 1)[0].strip()
        if not uid:
            continue
        if len(uid) > 64 or not UID_PATTERN.fullmatch(uid):
            raise ConfigError(f"--studies {path} line {n}: {uid[:70]!r} is not a Study "
                              f"Instance UID (digits and dots, 64 at most)")
        if uid not in studies:
            studies.append(uid)
    if not studies:
        raise ConfigError(f"--studies {path} lists no study UID")
    return studies


@dataclass
class StudyPull:
    """What one study gave: its cases, and why anything was left out."""

    study: str
    cases: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    problem: str | None = None
    skipped: bool = False  # pulled before: nothing fetched


@dataclass
class PullResult:
    out: Path
    studies: list[StudyPull]
    dataset: dict | None = None

    @property
    def cases(self) -> list[dict]:
        return [c for s in self.studies for c in s.cases]


def _made_by_fedseg(ds) -> bool:
    if str(ds.get("Manufacturer", "")).strip().lower() == "fedseg":
        return True
    return any(str(a.get("AlgorithmName", "")).strip().lower() == "fedseg"
               for s in ds.get("SegmentSequence", [])
               for a in s.get("SegmentationAlgorithmIdentificationSequence", []))


def _referenced_series(ds) -> str | None:
    """The image series a SEG or RTSTRUCT was drawn on."""
    for item in ds.get("ReferencedSeriesSequence", []):
        if item.get("SeriesInstanceUID"):
            return str(item.SeriesInstanceUID)
    for ref in ds.get("ReferencedFrameOfReferenceSequence", []):
        for study in ref.get("RTReferencedStudySequence", []):
            for series in study.get("RTReferencedSeriesSequence", []):
                if series.get("SeriesInstanceUID"):
                    return str(series.SeriesInstanceUID)
    return None


def _names(ds) -> list[str]:
    """A SEG's segment labels, an RTSTRUCT's ROI names."""
    if "SegmentSequence" in ds:
        return [str(s.get("SegmentLabel", "")).strip() for s in ds.SegmentSequence]
    return [str(r.get("ROIName", "")).strip() for r in ds.get("StructureSetROISequence", [])]


def _newest(ds) -> tuple:
    return tuple(str(ds.get(k, "") or "") for k in (
        "ContentDate", "ContentTime", "StructureSetDate", "StructureSetTime", "SeriesDate",
        "SeriesTime", "InstanceNumber"))


def _atomic_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def _pulled_before(out: Path, study: str) -> StudyPull | None:
    """The record of a study pulled in full before, if its files are all there."""
    record = out / STATE / f"{study}.json"
    if not record.is_file():
        return None
    try:
        data = json.loads(record.read_text())
    except ValueError:
        return None
    cases = data.get("cases") or []
    if not cases or not all((out / c["image"]).is_dir() and (out / c["label"]).is_file()
                            for c in cases):
        return None
    return StudyPull(study, cases, list(data.get("notes") or []), skipped=True)


Report = Callable[..., None]


def pull_study(pacs: Pacs, study: str, out: Path, report: Report) -> StudyPull:
    """One study's labelled image series into ``out`` (images/<series UID>/,
    labels/<series UID>.dcm), then its record in ``out/.fedseg-pull``."""
    pulled = StudyPull(study)
    try:
        series = pacs.series_of_study(study)
    except PacsNotFoundError:
        pulled.problem = "the PACS has no such study"
        return pulled
    images = {s.series: s for s in series if s.not_image() is None}
    found: dict[str, list] = {}
    for s in (s for s in series if s.modality.upper() in LABEL_MODALITIES):
        for inst in pacs.instances(s):
            ds = pacs.instance(s, inst.sop_instance)
            what = f"{s.modality} {inst.sop_instance} (series {s.series})"
            if _made_by_fedseg(ds):
                pulled.notes.append(f"{what} was made by fedseg predict, not drawn by a "
                                    f"person: not a reference label; left out")
                continue
            ref = _referenced_series(ds)
            if ref not in images:
                pulled.notes.append(f"{what} was drawn on series {ref}, which is no image "
                                    f"series of this study; left out")
                continue
            found.setdefault(ref, []).append((s, ds))
    for uid, s in images.items():
        if uid not in found:
            pulled.notes.append(f"{s.shown} has no SEG or RTSTRUCT: left out")
    for uid, labels in found.items():
        label_series, ds = max(labels, key=lambda pair: _newest(pair[1]))
        if len(labels) > 1:
            pulled.notes.append(f"series {uid} has {len(labels)} labels; took the newest, "
                                f"{label_series.modality} {ds.SOPInstanceUID}")
        image_dir = out / "images" / uid
        if not image_dir.is_dir():
            instances = [i for i in pacs.instances(images[uid]) if i.is_image]
            report("series", study=study, series=uid, total=len(instances))
            partial = out / "images" / f".{uid}.partial"
            pacs.download(images[uid], partial, instances,
                          on_instance=lambda: report("instance"))
            os.replace(partial, image_dir)
        label = out / "labels" / f"{uid}.dcm"
        save_atomic(ds, label)
        pulled.cases.append({"case": uid, "image": f"images/{uid}", "label": f"labels/{uid}.dcm",
                             "study": study, "kind": label_series.modality.upper(),
                             "names": _names(ds)})
    if not pulled.cases:
        pulled.problem = ("no image series with a SEG or RTSTRUCT drawn on it" if images
                          else "no image series")
        return pulled
    _atomic_json(out / STATE / f"{study}.json",
                 {"study": study, "cases": pulled.cases, "notes": pulled.notes,
                  "pulled": datetime.now(UTC).isoformat(timespec="seconds")})
    return pulled


def pull_site(pacs: Pacs, studies: list[str], out: Path, *, seed: int = 0,
              test_fraction: float = 0.2, report: Report | None = None) -> PullResult:
    """Pull ``studies`` into the site folder ``out`` (resuming a stopped pull:
    studies pulled in full before are skipped), then write its
    ``dataset.json``. ``report(event, **details)``: ``study``, ``series``,
    ``instance``, ``done`` as they happen (progress)."""
    if not 0 <= test_fraction < 1:
        raise ConfigError(f"--test-fraction must be at least 0 and below 1, not {test_fraction}")
    if out.exists() and any(out.iterdir()) and not (out / STATE).is_dir():
        raise ConfigError(f"{out} exists and is not a pulled site: give a new folder (or the "
                          f"folder of a stopped pull, to resume it)")
    report = report or (lambda event, **_: None)
    for sub in ("images", "labels", STATE):
        (out / sub).mkdir(parents=True, exist_ok=True)
    result = PullResult(out, [])
    for n, study in enumerate(studies):
        report("study", study=study, index=n, total=len(studies))
        pulled = _pulled_before(out, study) or pull_study(pacs, study, out, report)
        result.studies.append(pulled)
        report("done", pulled=pulled)
    if result.cases:
        result.dataset = write_dataset(out, result, pacs.url, seed, test_fraction)
    return result


def write_dataset(out: Path, result: PullResult, url: str, seed: int,
                  test_fraction: float) -> dict:
    """``dataset.json`` (docs/data.md): the cases split with ``seed``, the
    label map of the names every case's label holds, and every name found
    (to fill the map in). A map or aliases the hospital already wrote are kept."""
    import numpy as np

    from common.config import normal_name
    from common.data.partition import held_out_count

    cases = sorted(result.cases, key=lambda c: c["case"])
    n = len(cases)
    held = set(np.random.default_rng(seed).permutation(n)[:held_out_count(n, test_fraction)]
               .tolist())
    found: dict[str, dict] = {}
    for c in cases:
        for name in dict.fromkeys(x for x in c["names"] if x):
            entry = found.setdefault(name, {"cases": 0, "in": []})
            entry["cases"] += 1
            if c["kind"] not in entry["in"]:
                entry["in"].append(c["kind"])
    common = [name for name, e in found.items()
              if e["cases"] == n and normal_name(name) != "background"]
    path = out / "dataset.json"
    old = {}
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            old = {}
    spec = {"name": out.resolve().name,
            "description": "pulled from the hospital's PACS by fedseg site pull"}
    if "labels" in old:
        spec["labels"] = old["labels"]
    elif common:
        spec["labels"] = {"0": "background", **{str(i + 1): name
                                                for i, name in enumerate(common)}}
    if "label_aliases" in old:
        spec["label_aliases"] = old["label_aliases"]
    spec["label_names_found"] = found
    spec["training"] = [{"image": c["image"], "label": c["label"]}
                        for i, c in enumerate(cases) if i not in held]
    spec["test"] = [{"image": c["image"], "label": c["label"]}
                    for i, c in enumerate(cases) if i in held]
    spec["pull"] = {"dicomweb": url, "studies": [s.study for s in result.studies],
                    "seed": seed, "test_fraction": test_fraction,
                    "written": datetime.now(UTC).isoformat(timespec="seconds")}
    _atomic_json(path, spec)
    return spec


def cmd_site_pull(args: argparse.Namespace) -> int:
    """``fedseg site pull``: exit 0 when every study gave a case, 1 when some
    gave none (named), 2 for a wrong command or file, 3 when the PACS could
    not be reached or refused; 130 when stopped (run it again to resume)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    out = Path(args.out)
    try:
        studies = read_study_list(Path(args.studies))
        pacs = connect(args.dicomweb, args.dicomweb_auth, args.dicomweb_ca)
        pacs.check()
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeRemainingColumn(), console=console) as progress:
            overall = progress.add_task("studies", total=len(studies))
            current = progress.add_task("instances", total=None, visible=False)

            def report(event: str, **kw) -> None:
                if event == "series":
                    progress.update(current, description=f"series {kw['series'][-24:]}",
                                    completed=0, total=kw["total"], visible=True)
                elif event == "instance":
                    progress.advance(current)
                elif event == "done":
                    pulled = kw["pulled"]
                    progress.update(current, visible=False)
                    progress.advance(overall)
                    state = ("already pulled" if pulled.skipped else
                             f"[red]no case: {pulled.problem}[/red]" if pulled.problem
                             else "pulled")
                    progress.console.print(f"study {pulled.study}: {state} "
                                           f"({len(pulled.cases)} case(s))", soft_wrap=True)
                    for note in [] if pulled.skipped else pulled.notes:
                        progress.console.print(f"[yellow]  note: {note}[/yellow]",
                                               soft_wrap=True)

            result = pull_site(pacs, studies, out, seed=args.seed,
                               test_fraction=args.test_fraction, report=report)
    except PacsError as exc:
        console.print(f"[red]error:[/] {exc}", soft_wrap=True)
        console.print("what was pulled in full is kept; run the same command again to resume")
        return EXIT_PACS
    except ConfigError as exc:
        console.print(f"[red]error:[/] {exc}", soft_wrap=True)
        return EXIT_USAGE
    except KeyboardInterrupt:
        console.print("[yellow]stopped; run the same command again to resume[/yellow]")
        return 130
    for partial in (out / "images").glob(".*.partial"):
        shutil.rmtree(partial, ignore_errors=True)  # of a series no study now needs
    failed = [s for s in result.studies if s.problem]
    if result.dataset is None:
        console.print(f"[red]no case pulled into {out}: no study had an image series with a "
                      f"SEG or RTSTRUCT[/red]")
        return EXIT_PARTLY
    spec = result.dataset
    console.print(f"{out}: {len(result.cases)} case(s) from {len(studies) - len(failed)} "
                  f"of {len(studies)} studies: {len(spec['training'])} training, "
                  f"{len(spec['test'])} test (seed {args.seed}); dataset.json written",
                  soft_wrap=True)
    names = ", ".join(f"{k!r} ({v['cases']} case(s), {'/'.join(v['in'])})"
                      for k, v in spec["label_names_found"].items())
    console.print(f"label names found: {names or 'none'}", soft_wrap=True)
    if "labels" in spec:
        console.print(f"label map: {json.dumps(spec['labels'])}; edit 'labels' (and "
                      f"'label_aliases') in dataset.json to name what the runs learn "
                      f"(docs/data.md), then: fedseg site check {out}", soft_wrap=True)
    else:
        console.print("[yellow]no name is held by every case's label: fill in 'labels' "
                      "(and 'label_aliases' for other spellings) in dataset.json "
                      f"(docs/data.md), then: fedseg site check {out}[/yellow]",
                      soft_wrap=True)
    for s in failed:
        console.print(f"[red]study {s.study}: {s.problem}[/red]", soft_wrap=True)
    return EXIT_PARTLY if failed else 0
