"""``fedseg bench quality``: does joining the federation beat training alone,
and how close does it come to pooling everyone's data?

For the same site folders and the same number of passes over each site's
training data, it trains and scores, on each site's own test cases:

* local-only: one model per site, on that site alone;
* pooled: one model on all sites' training cases together (the upper
  reference; it needs the data in one place, which is what the federation avoids);
* FedAvg, FedProx and FedAdam (a server optimiser, for sites that differ),
  each through the real Flower simulation.

Local and pooled training call ``common.training`` directly, with the same
settings, model and seeds the federated clients use.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from common import wire
from common.config import RunSettings
from common.data.harmonise import Harmonisation, parse_spacing
from common.data.harmonise import combine as harmonise_sites
from common.data.labels import scored_at_site, structure_disagreement
from common.data.site import Case
from common.errors import ConfigError, FedsegError
from common.metrics import METRICS, combine
from common.model import pick_device
from common.site_algorithm import ROUNDS_IN_CALL, SiteAlgorithm
from common.training import cpu_has_bf16, evaluate, low_precision
from common.wire import eval_metrics
from server.runs import read_metrics
from server.simulation import Site, simulate

log = logging.getLogger(__name__)

STRATEGIES = ("fedavg", "fedprox", "fednova", "fedadam")  # any of these can be asked for
METHODS = ("local", "pooled", "fedavg", "fedprox", "fednova")  # the default table



def cpu_name() -> str:
    """The CPU's model as the system names it ("AMD EPYC 7B13", "Intel(R)
    Xeon(R) Processor"): two "2-core" machines may differ 1.5 times in speed."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return " ".join(line.split(":", 1)[1].split())
    except OSError:
        pass
    return platform.processor() or "CPU of unknown model"


def machine() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    bf16 = "native bf16" if cpu_has_bf16() else "no native bf16"
    return (f"{platform.machine()}, {cpu_name()} ({bf16}), {os.cpu_count()} cores, {gpu}, "
            f"Python {platform.python_version()}, torch {torch.__version__}")


def _centralised(algo: SiteAlgorithm, tests: dict[str, list[Case]]
                 ) -> tuple[dict[str, dict], list[dict]]:
    """Train ``algo`` (one site's data, or all sites' pooled) for ``num-rounds`` x
    ``local-epochs`` epochs through the same site algorithm the federation's
    nodes use, on the federated runs' learning-rate schedule; score it on each
    site's tests every ``evaluate-every`` rounds and after the last. Returns
    the final per-site metrics and the Dice curve."""
    settings = algo.settings
    rounds, curve, scores = settings.num_rounds, [], {}
    scored = sorted({*range(settings.evaluate_every, rounds + 1, settings.evaluate_every),
                     rounds})
    # One train call per scored stretch (the data is prepared once per call, not
    # once per round), on the same schedule as the federated rounds it stands for.
    for before, r in zip([0, *scored], scored, strict=False):
        algo.train(None, {wire.SERVER_ROUND: before + 1, ROUNDS_IN_CALL: r - before})
        scores = {s: algo.evaluate(None, cases=cases) for s, cases in tests.items()}
        curve.append({"round": r, "dice": {s: v["dice"] for s, v in scores.items()}})
    return scores, curve


def harmonisations(sites: list[Site], settings: RunSettings
                   ) -> tuple[Harmonisation | None, dict[str, Harmonisation | None]]:
    """What the federation fixes from the sites' fingerprints (as
    ``server/fingerprint.py`` does at a run's start), and what each site
    alone would fix from its own (local-only's). None: ``harmonise = off``."""
    if settings.harmonise == "off":
        return None, {site.name: None for site in sites}
    target = parse_spacing(settings.target_spacing)
    prints = {site.name: SiteAlgorithm(settings, site.name, site.data_dir,
                                       device="cpu").fingerprint() for site in sites}
    own = {name: harmonise_sites({name: fp}, settings.harmonise, target)
           for name, fp in prints.items()}
    return harmonise_sites(prints, settings.harmonise, target,
                           each_site_once=settings.robust_aggregation), own


def structures_scored(sites: list[Site], settings: RunSettings) -> dict[str, str]:
    """Each site's structure(s) as its label map names them and the values
    that hold them. Where the run names no structure, each site's one
    structure is learned as the same class: sites whose maps name different
    ones (``membrane`` at one, ``vessel`` at another) are refused, as the
    table would compare two tasks as one."""
    own, words = {}, {}
    for site in sites:
        own[site.name], words[site.name] = scored_at_site(site.data_dir, settings)
    named = {name for name in own.values() if name}
    unnamed = [site for site, name in own.items() if name is None]
    if named and unnamed:  # one names it, another only marks it: said in the table too
        log.warning("site(s) %s have no label map: their non-zero values are scored as the "
                    "%s the other sites name", ", ".join(unnamed), " / ".join(sorted(named)))
    problem = structure_disagreement(own, "--config structures=NAME")
    if problem:
        raise ConfigError(problem)
    return words


def read_sites(sites: list[Site], settings: RunSettings,
               harmonisation: Mapping[str, Harmonisation | None] | None = None
               ) -> tuple[dict[str, list[Case]], dict[str, list[Case]], dict[str, dict[str, int]]]:
    """Every site's training and test cases read exactly as its federated node
    reads them (``SiteAlgorithm.cases``: the site's label map against the run's
    structures, its input channels, the run's harmonisation (by site name),
    unusable cases left out with a warning), so local-only and pooled learn
    and are scored on the same task as the federated methods; and how many
    cases of each split were left out."""
    train_sets, tests, left_out = {}, {}, {}
    for site in sites:
        reader = SiteAlgorithm(settings, site.name, site.data_dir, device="cpu")
        reader.harmonisation = (harmonisation or {}).get(site.name)
        train_sets[site.name] = reader.cases("training")
        tests[site.name] = reader.cases("test")
        left_out[site.name] = {split: len(errors) for split, errors in reader.left_out.items()}
    return train_sets, tests, left_out


def _with_and_without_flips(algo: SiteAlgorithm, tests: dict[str, list[Case]],
                            scored: dict[str, dict]) -> dict[str, Any]:
    """The pooled model's mean Dice over the sites with test-time flips and
    without (the setting is kept only where it helps: issue 27)."""
    other = dataclasses.replace(algo.settings, test_time_flips=not algo.settings.test_time_flips)
    again = {site: evaluate(algo.model, cases, other, algo.device).summary
             for site, cases in tests.items()}
    on, off = (scored, again) if algo.settings.test_time_flips else (again, scored)
    return {"spatial_dims": algo.settings.model.spatial_dims,
            "dice_with": combine(list(on.values()))["dice"],
            "dice_without": combine(list(off.values()))["dice"]}


def _keep(algo: SiteAlgorithm, path: Path, harmonisation: Harmonisation | None) -> None:
    """A baseline's final model as a self-contained checkpoint (weights, run
    settings, harmonisation), which ``fedseg predict`` and ``fedseg evaluate``
    read as they read a federated run's ``final_model.pt``: every method of a
    table can be scored again, on cases no method saw."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {k: v.detach().cpu() for k, v in algo.model.state_dict().items()},
                "config": algo.settings.to_run_config(),
                "harmonisation": harmonisation.to_dict() if harmonisation else None}, path)


def _baseline(settings: RunSettings, name: str, train_cases: list[Case],
              device: torch.device) -> SiteAlgorithm:
    torch.manual_seed(settings.seed)  # the same initial model as every method
    return SiteAlgorithm(settings, name, device=device, train_cases=train_cases)


@dataclasses.dataclass
class BaselineJob:
    """One model of a baseline: local-only at one site (``name`` the site's),
    or pooled (``name`` "pooled"), trained and scored on ``tests``, its final
    model kept at ``keep``; ``flips``: also score it with test-time flips the
    other way (the pooled model). ``threads``: the torch threads of the process
    it runs in (None: as they are)."""

    method: str
    name: str
    settings: RunSettings
    train_cases: list[Case]
    tests: dict[str, list[Case]]
    keep: Path
    harmonisation: Harmonisation | None
    flips: bool = False
    threads: int | None = None


def run_baseline(job: BaselineJob) -> dict[str, Any]:
    """Train and score one baseline model (in this process or a worker's):
    its final per-site scores, its Dice curve, the flip comparison if asked,
    and when it started and ended (``time.time()``)."""
    started = time.time()
    if job.threads:
        torch.set_num_threads(job.threads)
    device = pick_device(os.environ.get("FEDSEG_DEVICE", "auto"))
    algo = _baseline(job.settings, job.name, job.train_cases, device)
    scores, curve = _centralised(algo, job.tests)
    _keep(algo, job.keep, job.harmonisation)
    flips = _with_and_without_flips(algo, job.tests, scores) if job.flips else {}
    return {"scores": scores, "curve": curve, "flips": flips, "started": started,
            "ended": time.time()}


def baseline_workers(requested: int | None, jobs: int, device: torch.device,
                     cores: int | None = None) -> tuple[int, int | None]:
    """How many processes train the baseline models side by side, and the
    torch threads of each (None: in this process, as they are). On a CPU,
    one process a core by default: two 1-thread trainings on 2 cores did 1.2
    to 1.4 x the steps of one 2-thread training (docs/performance.md). On a
    GPU one at a time, on the GPU. ``requested``: 1 keeps them in this process."""
    cores = cores or os.cpu_count() or 1
    if requested is None:
        requested = 1 if device.type == "cuda" else cores
    workers = max(1, min(requested, jobs))
    if workers == 1:
        return 1, None
    return workers, max(1, cores // workers)


def run_baselines(jobs: list[BaselineJob], workers: int) -> list[dict[str, Any]]:
    """Every job's :func:`run_baseline` result, in order: in this process
    one after another (``workers`` 1), else in ``workers`` fresh processes
    (spawned: a forked child of a process whose torch already ran threads
    can hang) side by side, the longest first."""
    if workers <= 1 or len(jobs) <= 1:
        return [run_baseline(job) for job in jobs]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    order = sorted(range(len(jobs)), key=lambda i: -len(jobs[i].train_cases))
    try:
        with ProcessPoolExecutor(max_workers=workers,
                                 mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {i: pool.submit(run_baseline, jobs[i]) for i in order}
            return [futures[i].result() for i in range(len(jobs))]
    except BrokenProcessPool as exc:
        raise FedsegError("a process training the baselines stopped without a word (each "
                          "holds its own copy of the cases it trains on: out of memory?); "
                          "--baseline-jobs 1 trains them in this process, one after "
                          "another") from exc


def quality(sites: list[Site], out: Path, overrides: dict[str, Any], *, rounds: int,
            local_epochs: int, methods: tuple[str, ...] = METHODS,
            on_result: Callable[[str, dict[str, Any]], None] | None = None,
            baseline_jobs: int | None = 1) -> dict[str, Any]:
    """Run every method; write ``quality.json``, ``quality.md`` and ``dice.png`` to ``out``.

    Local-only and pooled go first, side by side in ``baseline_jobs``
    processes (None: :func:`baseline_workers`' choice; 1: in this process,
    one after another); then each federated method alone on the machine."""
    began = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    settings = RunSettings.from_run_config({**overrides, "num-rounds": rounds,
                                            "local-epochs": local_epochs})
    epochs = rounds * local_epochs
    device = pick_device(os.environ.get("FEDSEG_DEVICE", "auto"))  # local and pooled models
    scored = structures_scored(sites, settings)
    federation, own = harmonisations(sites, settings)
    train_sets, tests, left_out = read_sites(sites, settings,
                                             {site.name: federation for site in sites})
    results: dict[str, Any] = {}
    curves: dict[str, list[dict]] = {}
    flips: dict[str, Any] = {}

    def record(method: str, per_site: dict[str, dict], seconds: float,
               curve: list[dict]) -> None:
        per_site = {s: {k: m[k] for k in eval_metrics(settings.structure_names)}
                    for s, m in per_site.items()}
        results[method] = {"sites": per_site, "overall": combine(list(per_site.values())),
                           "seconds": round(seconds, 1)}
        curves[method] = curve
        if on_result:
            on_result(method, results[method])

    jobs: list[BaselineJob] = []
    if "local" in methods:
        alone = (train_sets, tests) if all(h == federation for h in own.values()) \
            else read_sites(sites, settings, own)[:2]  # each site on its own fingerprint
        jobs += [BaselineJob("local", name, settings, alone[0][name], {name: alone[1][name]},
                             out / "local" / name / "final_model.pt",
                             federation if alone[0] is train_sets else own[name])
                 for name in train_sets]
    if "pooled" in methods:
        jobs.append(BaselineJob("pooled", "pooled", settings,
                                [c for cases in train_sets.values() for c in cases], tests,
                                out / "pooled" / "final_model.pt", federation, flips=True))
    workers, threads = baseline_workers(baseline_jobs, len(jobs), device)
    for job in jobs:
        job.threads = threads
    if jobs:
        log.info("baselines: %d model(s) in %s", len(jobs),
                 "this process" if workers == 1 else
                 f"{workers} processes side by side, {threads} thread(s) each")
    done = dict(zip(((j.method, j.name) for j in jobs), run_baselines(jobs, workers),
                    strict=True))

    for method in methods:
        start = time.perf_counter()
        if method == "local":
            ran = {name: done["local", name] for name in train_sets}
            per_site = {name: r["scores"][name] for name, r in ran.items()}
            curve = [{"round": r["round"], "dice": {n: ran[n]["curve"][i]["dice"][n]
                                                    for n in ran}}
                     for i, r in enumerate(next(iter(ran.values()))["curve"])]
            record(method, per_site, max(r["ended"] for r in ran.values())
                   - min(r["started"] for r in ran.values()), curve)
        elif method == "pooled":
            result = done["pooled", "pooled"]
            record(method, result["scores"], result["ended"] - result["started"],
                   result["curve"])
            flips = result["flips"]
        else:
            run_dir = out / method
            config = {**overrides, "num-rounds": rounds, "local-epochs": local_epochs,
                      "strategy": method, "min-nodes": len(sites), "run-name": method}
            summary = simulate(sites, run_dir, config, timeout=6 * 3600)
            curve = [{"round": r["round"], "dice": r["dice"]} for r in read_metrics(run_dir)
                     if r["dice"]]  # the rounds the sites scored (evaluate-every)
            record(method, summary["final"]["sites"], time.perf_counter() - start, curve)
    dtype = low_precision(device, settings)
    report = {"machine": machine(), "precision": str(dtype or torch.float32).split(".")[-1],
              "seconds": round(time.perf_counter() - began, 1),
              "baselines": {"processes": workers, "threads": threads},
              "rounds": rounds, "local_epochs": local_epochs,
              "epochs_per_site": epochs, "settings": settings.to_run_config(),
              "cases": {name: {"training": len(train_sets[name]), "test": len(tests[name]),
                               "left_out": left_out[name]} for name in train_sets},
              "structures_scored": scored,
              "test_time_flips": flips, "results": results, "curves": curves,
              "harmonisation": {"federation": federation.to_dict() if federation else None,
                                "described": federation.describe() if federation else
                                "off: cases as read, each z-scored"}}
    (out / "quality.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "quality.md").write_text(markdown(report))
    plot(curves, out / "dice.png")
    return report


def markdown(report: dict[str, Any]) -> str:
    results = report["results"]
    sites = sorted({s for r in results.values() for s in r["sites"]})
    lines = [f"Machine: {report['machine']}; convolutions in {report['precision']} "
             f"(`mixed-precision`). {report['rounds']} rounds x "
             f"{report['local_epochs']} local epochs = {report['epochs_per_site']} passes over "
             f"each site's training cases for every method.", "",
             *_case_counts(report.get("cases", {})),
             *(["Scored, as each site's label map names it: " + "; ".join(
                 f"{site}: {words}" for site, words in report["structures_scored"].items())
                + ".", ""] if report.get("structures_scored") else []),
             *([f"Harmonisation (every method; local-only from its own site's fingerprint): "
                f"{report['harmonisation']['described']}.", ""]
               if report.get("harmonisation") else []),
             "| method | site | Dice | IoU | HD95 | sensitivity | specificity | wall time (s) |",
             "|---|---|---|---|---|---|---|---|"]
    for method, r in results.items():
        for site in sites:
            m = r["sites"].get(site)
            if m is None:
                continue
            vals = " | ".join("n/a" if m.get(k) is None else f"{m[k]:.3f}" for k in METRICS)
            lines.append(f"| {method} | {site} | {vals} | {r['seconds']:.0f} |")
    lines += _per_structure(report, sites)
    flips = report.get("test_time_flips") or {}
    if flips.get("dice_with") is not None and flips.get("dice_without") is not None:
        lines += ["", f"Test-time flips ({flips['spatial_dims']}D, the pooled model): mean Dice "
                      f"{flips['dice_with']:.3f} with, {flips['dice_without']:.3f} without."]
    side = report.get("baselines") or {}
    if side.get("processes", 1) > 1 and {"local", "pooled"} & set(results):
        lines += ["", f"Local-only and pooled trained side by side in {side['processes']} "
                      f"processes of {side['threads']} thread(s): their wall times overlap."]
    total = report.get("seconds") or sum(r["seconds"] for r in results.values())
    lines += ["", f"Total wall time: {total / 60:.1f} min.", ""]
    lines += [f"- {site}: {text}" for site, text in federation_vs_references(results).items()]
    return "\n".join(lines) + "\n"


def _per_structure(report: dict[str, Any], sites: list[str]) -> list[str]:
    """With several structures: each one's Dice and HD95 (mm), method by site."""
    names = [n for n in str(report.get("settings", {}).get("structures", "")).split(",") if n]
    if len(names) < 2:
        return []
    head = " | ".join(f"Dice {n} | HD95 {n} (mm)" for n in names)
    lines = ["", "Per structure:", "", f"| method | site | {head} |",
             "|---|---|" + "---|" * (2 * len(names))]
    for method, r in report["results"].items():
        for site in sites:
            m = r["sites"].get(site)
            if m is None:
                continue
            vals = " | ".join(
                " | ".join("n/a" if m.get(f"{k}/{n}") is None else f"{m[f'{k}/{n}']:.3f}"
                           for k in ("dice", "hd95")) for n in names)
            lines.append(f"| {method} | {site} | {vals} |")
    return lines


def _case_counts(cases: dict[str, dict]) -> list[str]:
    """The cases each site trained and was scored on, read as its node reads
    them; those left out (unusable) named by count."""
    if not cases:
        return []
    parts = []
    for site, c in sorted(cases.items()):
        out = sum(c.get("left_out", {}).values())
        parts.append(f"{site} {c['training']} training / {c['test']} test"
                     + (f" ({out} left out as unusable)" if out else ""))
    return ["Cases, read as each site's node reads them: " + "; ".join(parts) + ".", ""]


def federation_vs_references(results: dict[str, Any]) -> dict[str, str]:
    """Per site: the best federated method's Dice against pooled and local-only."""
    federated = [m for m in results if m not in ("local", "pooled")]
    out = {}
    for site in sorted({s for r in results.values() for s in r["sites"]}):
        dice = {m: results[m]["sites"][site]["dice"] for m in federated
                if site in results[m]["sites"] and results[m]["sites"][site]["dice"] is not None}
        if not dice:
            continue
        best = max(dice, key=dice.get)
        pooled, local = (results.get(ref, {}).get("sites", {}).get(site, {}).get("dice")
                         for ref in ("pooled", "local"))
        text = f"best federated {best} Dice {dice[best]:.3f}"
        if pooled:
            text += f"; {dice[best] / pooled:.3f} x pooled ({pooled:.3f})"
        if local:
            text += f"; {dice[best] - local:+.3f} against local-only ({local:.3f})"
        out[site] = text + "."
    return out


def plot(curves: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sites = sorted({s for c in curves.values() for r in c for s in r["dice"]})
    fig, axes = plt.subplots(1, len(sites), figsize=(5 * len(sites), 4), dpi=100,
                             squeeze=False)
    for ax, site in zip(axes[0], sites, strict=True):
        values = []
        for method, curve in curves.items():
            pts = [(r["round"], r["dice"][site]) for r in curve
                   if r["dice"].get(site) is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=method)
                values += [v for _, v in pts]
        # The methods differ by hundredths: a 0-1 axis would draw one line.
        low = max(0.0, min(values, default=0.0) - 0.02)
        high = min(1.0, max(values, default=1.0) + 0.01)
        ax.set(title=site, xlabel="round (local epochs each)", ylabel="test Dice",
               ylim=(low, high if high > low else low + 0.05))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
