"""``fedseg bench patches``: what a 2D or 3D U-Net costs at each patch size,
side by side on this machine, so a federation can pick ``model-spatial-dims``
and ``patch-size`` for its sites' hardware (docs/data.md, "2D or 3D").

Each configuration runs in a fresh process (its own peak memory): the run's
U-Net (``model-channels``, one output per structure plus background), a
batch of random patches, Adam on Dice + cross-entropy as the sites train,
``steps`` timed training steps after one warm-up, then sliding-window
inference over one volume (2D: slice by slice) as ``fedseg predict`` and the
scoring do. Random inputs: the cost of a step does not depend on the data.
"""

from __future__ import annotations

import multiprocessing
import resource
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import torch

# (spatial dims, patch size): 2D references, then 3D patches from small to large
DEFAULT_CONFIGS = ((2, 64), (2, 128), (3, 32), (3, 64), (3, 96), (3, 128))


def _one(dims: int, patch: int, overrides: dict[str, Any], steps: int,
         volume: tuple[int, int, int], device: str, layout: bool = True) -> dict[str, Any]:
    """One configuration's figures (runs in its own process)."""
    import numpy as np
    from monai.losses import DiceCELoss

    from common.config import RunSettings
    from common.model import build_model
    from common.training import _autocast, low_precision, predict

    settings = RunSettings.from_run_config({
        **overrides, "model-spatial-dims": dims, "patch-size": patch})
    dev = torch.device(device)
    torch.manual_seed(0)
    model = build_model(settings.model, few_channel_layout=layout).to(dev)
    batch = settings.batch_size
    shape = (batch, settings.model.in_channels, *(patch,) * dims)
    image = torch.randn(shape, device=dev)
    label = torch.randint(0, settings.model.out_channels, (batch, 1, *(patch,) * dims),
                          device=dev)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    dtype = low_precision(dev, settings)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with _autocast(dev, dtype):
            logits = model(image)
        loss_fn(logits.float(), label).backward()
        optimizer.step()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    step()  # warm-up: allocations, kernels chosen
    start = time.perf_counter()
    for _ in range(steps):
        step()
    step_s = (time.perf_counter() - start) / steps
    model.eval()
    scan = np.random.default_rng(0).normal(size=(settings.model.in_channels, *volume)
                                           ).astype(np.float32)
    start = time.perf_counter()
    predict(model, scan, settings, dev)
    infer_s = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else
            (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
    return {"dims": dims, "patch": patch, "batch": batch, "step_s": step_s, "layout": layout,
            "voxels_per_s": batch * patch ** dims / step_s, "infer_s": infer_s,
            "peak_mib": peak, "parameters": sum(p.numel() for p in model.parameters())}


def patch_cost(configs: list[tuple[int, int]], overrides: dict[str, Any], *, steps: int,
               volume: tuple[int, int, int], device: str,
               layouts: tuple[bool, ...] = (True,)) -> list[dict[str, Any]]:
    """Every configuration in ``configs``, each in a fresh process, in order;
    with ``layouts`` (True, False), each with and then without the few-channel
    convolutions in channels-last order (``common.model``), side by side."""
    out = []
    context = multiprocessing.get_context("spawn")
    for dims, patch in configs:
        for layout in layouts:
            with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
                out.append(pool.submit(_one, dims, patch, overrides, steps, volume,
                                       device, layout).result())
    return out


def markdown(rows: list[dict[str, Any]], volume: tuple[int, int, int]) -> str:
    """The table docs/data.md shows; ratios against the first row."""
    first = rows[0]
    both = len({r.get("layout", True) for r in rows}) > 1
    lines = ["| model | patch | batch | s / step | x first row | patch voxels / s | "
             f"s to segment {' x '.join(map(str, volume))} | peak memory (MiB) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        shown = (f"{r['dims']}D, few-channel convolutions "
                 f"{'channels-last' if r['layout'] else 'as they come'}") if both else (
            f"{r['dims']}D")
        lines.append(
            f"| {shown} | {r['patch']} | {r['batch']} | {r['step_s']:.3g} | "
            f"{r['step_s'] / first['step_s']:.1f} | {r['voxels_per_s'] / 1e3:.0f} k | "
            f"{r['infer_s']:.1f} | {r['peak_mib']:.0f} |")
    return "\n".join(lines)
