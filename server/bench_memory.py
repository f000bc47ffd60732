"""``fedseg bench memory``: a site larger than memory, measured.

Writes a synthetic NIfTI site whose prepared volumes (float32) add up to
``--size-gib`` (20 GiB by default), then, each in a fresh worker process as
a node's worker would run it:

* the big site through the on-disk path (``common/data/store.py``):
  preparing every case into a state folder, then training ``--steps`` steps
  of a 3D U-Net; the process's peak resident memory (``ru_maxrss``: its
  anonymous memory and the mapped file pages it touched), against the
  model's and the batch's own bytes;
* a site that fits (``--fit-cases`` of the same volumes) trained the same
  steps in memory and from disk: steps a second of each, side by side.

Prints a markdown table and the exact command (docs/performance.md). The
synthetic site and the prepared copies are deleted afterwards unless
``--keep``.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

GIB = 2**30
DEFAULT_SHAPE = (384, 384, 192)  # a CT-like volume: 113 MB as float32
BENCH_CONFIG = {"model-spatial-dims": 3, "model-channels": "8,16,32,64", "model-res-units": 1,
                "patch-size": 64, "batch-size": 2, "patches-per-image": 2,
                "local-epochs": 1, "num-rounds": 1, "harmonise": "off"}


def cases_for(size_gib: float, shape: tuple[int, ...]) -> int:
    """Cases of ``shape`` whose float32 images reach ``size_gib``."""
    per = int(np.prod(shape)) * 4
    return max(2, -(-int(size_gib * GIB) // per))


def write_site(root: Path, n: int, shape: tuple[int, ...], on_case=None) -> Path:
    """``n`` synthetic CT-like cases (int16 NIfTI images, a sphere label
    each) in ``imagesTr/`` + ``labelsTr/``, and 2 test cases; a case already
    written (an earlier, stopped call) is kept."""
    import nibabel as nib

    rng = np.random.default_rng(0)
    # one smooth body and one noise field, shifted per case: cheap to vary
    grid = np.ogrid[tuple(slice(0, s) for s in shape)]
    body = sum(((g - s / 2) / (s / 2.4)) ** 2 for g, s in zip(grid, shape, strict=True))
    base = np.where(body < 1, 40.0, -1000.0).astype(np.float32)
    noise = rng.normal(0, 25, shape).astype(np.float32)
    affine = np.diag([0.8, 0.8, 2.0, 1.0])
    jobs = [("imagesTr", "labelsTr", f"case{i:04d}") for i in range(n)]
    jobs += [("imagesTs", "labelsTs", f"test{i:04d}") for i in range(2)]
    for folder in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for k, (images, labels, name) in enumerate(jobs):
        image_path = root / images / f"{name}.nii"
        label_path = root / labels / f"{name}.nii.gz"
        if not (image_path.exists() and label_path.exists()):
            shift = tuple(int(v) for v in rng.integers(0, 1000, len(shape)))
            image = base + np.roll(noise, shift, axis=tuple(range(len(shape))))
            centre = [int(rng.integers(s // 4, 3 * s // 4)) for s in shape]
            radius = min(shape) / 8
            sphere = sum(((g - c) / radius) ** 2 for g, c in zip(grid, centre, strict=True)) < 1
            image[sphere] += 60
            label = sphere.astype(np.uint8)
            tmp = image_path.with_name(image_path.name + ".tmp.nii")
            nib.save(nib.Nifti1Image(image.astype(np.int16), affine), str(tmp))
            nib.save(nib.Nifti1Image(label, affine), str(label_path))
            os.replace(tmp, image_path)
        if on_case is not None:
            on_case(k + 1, len(jobs))
    return root


def fitting_site(root: Path, big: Path, n: int) -> Path:
    """A site of the big site's first ``n`` cases (a dataset.json pointing at them)."""
    root.mkdir(parents=True, exist_ok=True)
    names = sorted(p.name for p in (big / "imagesTr").iterdir() if p.suffix == ".nii")[:n]
    tests = sorted(p.name for p in (big / "imagesTs").iterdir() if p.suffix == ".nii")
    rel = os.path.relpath(big, root)

    def entry(images: str, labels: str, name: str) -> dict[str, str]:
        return {"image": f"{rel}/{images}/{name}", "label": f"{rel}/{labels}/{name}.gz"}

    (root / "dataset.json").write_text(json.dumps({
        "training": [entry("imagesTr", "labelsTr", f) for f in names],
        "test": [entry("imagesTs", "labelsTs", f) for f in tests]}))
    return root


# ------------------------------------------------------------------ the worker

def _rss() -> dict[str, int]:
    """This process's resident memory now (bytes: total, anonymous, mapped files)."""
    out = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


def _peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Prepare a site (on disk, or in memory) and train ``steps`` steps, in
    this process; what it measured."""
    import logging

    import torch

    from common.config import RunSettings
    from common.site_algorithm import SiteAlgorithm
    from common.training import train

    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"  [{spec['label']}] %(message)s")
    torch.set_num_threads(spec["threads"])
    settings = RunSettings.from_run_config(spec["config"])
    store = Path(spec["store"]) if spec["store"] else None
    algo = SiteAlgorithm(settings, "bench", Path(spec["site"]), device="cpu", store=store)
    model_bytes = sum(p.numel() * p.element_size() for p in algo.model.parameters())
    start_rss = _rss().get("VmRSS", 0)
    t0 = time.perf_counter()
    cases = algo.cases("training")
    prepare_s = time.perf_counter() - t0
    peak_prepare, after_prepare = _peak(), _rss()
    n = min(spec["steps"], len(cases))
    chosen = [cases[int(i)] for i in np.linspace(0, len(cases) - 1, n)]
    result = train(algo.model, chosen, settings, torch.device("cpu"), seed=0, epochs=1)
    patch = settings.patch_size ** settings.model.spatial_dims
    return {
        "label": spec["label"], "path": "disk" if store else "memory", "cases": len(cases),
        "prepare_s": round(prepare_s, 1), "steps": result.steps,
        "train_s": round(result.seconds, 2),
        "steps_per_s": round(result.steps / result.seconds, 3),
        "start_rss": start_rss, "peak_prepare": peak_prepare, "after_prepare": after_prepare,
        "peak": _peak(), "end": _rss(),
        # the model, its gradients and Adam's two moments; one batch in and out
        "model_bytes": 4 * model_bytes,
        "batch_bytes": settings.batch_size * patch * 4 * (settings.model.in_channels + 1),
    }


def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """``worker(spec)`` in a fresh process (the worker's memory, alone)."""
    proc = subprocess.run([sys.executable, "-m", "server.bench_memory", json.dumps(spec)],
                          stdout=subprocess.PIPE, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    if proc.returncode != 0:
        raise RuntimeError(f"the bench worker ({spec['label']}) failed with exit code "
                           f"{proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------ the report

def mib(n: float) -> str:
    return f"{n / 2**20:,.0f}"


def markdown(rows: list[dict[str, Any]], decoded: dict[str, float], shape) -> str:
    lines = ["| site | path | cases | decoded (GiB, float32) | prepare (s) | peak RSS (MiB) "
             "| RSS after preparing (MiB) | model+Adam, batch (MiB) | steps | steps/s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['label']} | {r['path']} | {r['cases']} | {decoded[r['label']]:.1f} "
            f"| {r['prepare_s']} | {mib(r['peak'])} | {mib(r['after_prepare'].get('VmRSS', 0))} "
            f"| {mib(r['model_bytes'])}, {mib(r['batch_bytes'])} | {r['steps']} "
            f"| {r['steps_per_s']:.2f} |")
    by = {(r["label"], r["path"]): r for r in rows}
    mem, disk = by.get(("fits", "memory")), by.get(("fits", "disk"))
    if mem and disk:
        lines += ["", f"From disk against in memory on the site that fits: "
                      f"{disk['steps_per_s'] / mem['steps_per_s']:.2f}x the steps a second "
                      f"(volumes {'x'.join(map(str, shape))}; the best of "
                      f"{len(mem['all_steps_per_s'])} fresh workers each, in turn: memory "
                      f"{mem['all_steps_per_s']}, disk {disk['all_steps_per_s']})."]
    return "\n".join(lines) + "\n"


def bench(work: Path, size_gib: float, shape: tuple[int, ...], steps: int, fit_cases: int,
          threads: int, console, keep: bool = False, repeat: int = 2) -> str:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    n = cases_for(size_gib, shape)
    per = int(np.prod(shape)) * 4
    work.mkdir(parents=True, exist_ok=True)
    big = work / "site"
    console.print(f"synthetic site: {n} cases of {'x'.join(map(str, shape))} "
                  f"({n * per / GIB:.1f} GiB as float32) in {big}", soft_wrap=True)
    t0 = time.perf_counter()
    with Progress(TextColumn("writing the site"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=console) as progress:
        task = progress.add_task("write", total=n + 2)
        write_site(big, n, shape, on_case=lambda done, _t: progress.update(task,
                                                                           completed=done))
    written_s = time.perf_counter() - t0
    fit_n = min(fit_cases, n)
    fits = fitting_site(work / "fits", big, fit_n)
    config = dict(BENCH_CONFIG)
    # the site that fits: in memory and from disk in turn, ``repeat`` times each
    # (the best of each: other work on the machine only ever slows a run down)
    specs = [{"label": "big", "site": str(big), "store": str(work / "state-big" / "prepared")}]
    for _ in range(repeat):
        specs += [{"label": "fits", "site": str(fits), "store": None},
                  {"label": "fits", "site": str(fits),
                   "store": str(work / "state-fits" / "prepared")}]
    runs = []
    try:
        for spec in specs:
            spec.update(config=config, steps=steps, threads=threads)
            console.print(f"worker: {spec['label']} site, "
                          f"{'on disk' if spec['store'] else 'in memory'}", soft_wrap=True)
            runs.append(run_worker(spec))
    finally:
        if not keep:
            for path in (big, fits, work / "state-big", work / "state-fits"):
                shutil.rmtree(path, ignore_errors=True)
    rows = []
    for label, path in (("big", "disk"), ("fits", "memory"), ("fits", "disk")):
        of = [r for r in runs if (r["label"], r["path"]) == (label, path)]
        best = max(of, key=lambda r: r["steps_per_s"])
        rows.append({**best, "peak": max(r["peak"] for r in of),
                     "all_steps_per_s": [r["steps_per_s"] for r in of]})
    decoded = {"big": n * per / GIB, "fits": fit_n * per / GIB}
    table = markdown(rows, decoded, shape)
    console.print(table, soft_wrap=True)
    console.print(f"site written in {written_s:.0f} s; each worker a fresh process, "
                  f"{threads} thread(s); peak RSS = ru_maxrss (anonymous memory and the "
                  f"mapped file pages touched)", soft_wrap=True)
    (work / "memory.md").write_text(table)
    (work / "memory.json").write_text(json.dumps({"rows": rows, "runs": runs,
                                                  "write_s": written_s,
                                                  "shape": shape, "cases": n}, indent=1))
    return table


if __name__ == "__main__":
    print(json.dumps(worker(json.loads(sys.argv[1]))), flush=True)
