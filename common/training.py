"""Local training and evaluation of the shared U-Net at one site.

Plain functions over a model and loaded cases: no Flower here. CUDA when the
site has it (with mixed precision), else the CPU.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from monai.data import DataLoader, Dataset, ThreadDataLoader, get_track_meta, set_track_meta
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from monai.utils import set_determinism

from common.config import RunSettings
from common.data.harmonise import resize
from common.data.site import Case
from common.data.transforms import MIRROR_AXES, prepare_case, training_items, training_transform
from common.errors import EmptyDatasetError, FedsegError
from common.metrics import case_metrics, summarize

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    num_cases: int  # FedAvg's weight: cases, not batches or patches
    mean_loss: float
    steps: int
    seconds: float
    # Adam's moments after the last step, flat (see ``optimizer_arrays``), when
    # ``keep-optimizer-state`` is on: the site keeps them for its next round.
    optimizer_state: dict[str, np.ndarray] = field(default_factory=dict, repr=False,
                                                   compare=False)


def optimizer_arrays(optimizer: torch.optim.Optimizer) -> dict[str, np.ndarray]:
    """The per-parameter part of ``optimizer.state_dict()`` as flat named
    arrays (``"<param index>.<name>"``), which a Flower ``ArrayRecord`` can hold."""
    return {f"{i}.{name}": torch.as_tensor(value).detach().cpu().numpy().copy()
            for i, per_param in optimizer.state_dict()["state"].items()
            for name, value in per_param.items()}


def load_optimizer_arrays(optimizer: torch.optim.Optimizer,
                          arrays: dict[str, np.ndarray]) -> bool:
    """Restore what ``optimizer_arrays`` saved through ``load_state_dict``
    (which places each tensor on its parameter's device); ``False``, with
    nothing changed, when it does not fit this model's parameters (torch
    checks the count of parameters, not their shapes)."""
    params = optimizer.param_groups[0]["params"]
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in arrays.items():
        index, _, name = key.partition(".")
        if not index.isdigit() or int(index) >= len(params):
            return False
        tensor = torch.as_tensor(value)
        if tensor.ndim and tensor.shape != params[int(index)].shape:
            return False
        state.setdefault(int(index), {})[name] = tensor
    optimizer.load_state_dict({**optimizer.state_dict(), "state": state})
    return True


@dataclass(frozen=True)
class EvalResult:
    per_case: list[dict[str, float]]
    seconds: float

    @property
    def summary(self) -> dict[str, float]:
        return summarize(self.per_case)


@contextlib.contextmanager
def _plain_tensors():
    """MONAI's transforms without their metadata (MetaTensor) bookkeeping,
    which training never reads: a retina batch's patches took 112 ms with it
    and 35 ms without on a 2-core CPU, the same patches either way."""
    before = get_track_meta()
    set_track_meta(False)
    try:
        yield
    finally:
        set_track_meta(before)


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX); elsewhere
    torch emulates bf16 and it is slower than fp32."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def low_precision(device: torch.device, settings: RunSettings) -> torch.dtype | None:
    """The type convolutions run in under ``mixed-precision``: fp16 on a CUDA
    GPU (with loss scaling), bf16 for a 2D model on a CPU with native bf16 (a
    retina training step 1.45x faster on a 2-core AMD EPYC,
    docs/performance.md), else ``None`` (fp32). A 3D model on a CPU stays in
    fp32: its bf16 updates held NaN on a bf16 CPU (issue 27) and emulated bf16
    is slower than fp32."""
    if not settings.mixed_precision:
        return None
    if device.type == "cuda":
        return torch.float16
    if device.type == "cpu" and settings.model.spatial_dims == 2 and cpu_has_bf16():
        return torch.bfloat16
    return None


class TrainingDivergedError(FedsegError):
    """Training met non-finite losses or gradients step after step, in fp32."""

    kind = "training error"


# nnU-Net clips each step's gradient norm at 12; the same here keeps one bad
# patch from throwing the weights off, and measures the norm for the check below.
GRAD_CLIP = 12.0
# Steps in a row with a non-finite loss or gradient norm (each skipped) before
# the low-precision type is given up for fp32, or, in fp32, training stops.
# fp16's loss scaler meets a few while it finds its scale: it gets more.
NONFINITE_LIMIT = {torch.float16: 30, torch.bfloat16: 3, None: 3}


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device_type=device.type, dtype=dtype or torch.float32,
                          enabled=dtype is not None)


def train(
    model: torch.nn.Module,
    cases: list[Case],
    settings: RunSettings,
    device: torch.device,
    seed: int = 0,
    epochs: int | None = None,
    proximal_mu: float = 0.0,
    progress: tuple[float, float] = (0.0, 1.0),
    optimizer_state: dict[str, np.ndarray] | None = None,
) -> TrainResult:
    """Train ``model`` in place for ``epochs`` (default ``settings.local_epochs``)
    passes over ``cases``.

    ``progress``: the share of the whole training schedule (all rounds) done
    before and after this call; with ``lr-schedule = "cosine"`` the learning
    rate follows one cosine from ``learning-rate`` down to
    ``lr-min-ratio`` x that over the whole schedule, so a round-``r`` call of an
    ``R``-round run passes ``((r-1)/R, r/R)``.

    ``proximal_mu`` > 0 adds FedProx's proximal term ``mu/2 * ||w - w_start||^2``
    (Li et al. 2020), which keeps a site's model near the global one it started from.

    ``optimizer_state``: Adam's moments from this site's previous call (the
    result's ``optimizer_state``), to continue from instead of a fresh Adam;
    ignored, with a log line, when they do not fit the model.
    """
    if not cases:
        raise EmptyDatasetError("no training case to train on")
    start = time.perf_counter()
    set_determinism(seed=seed)
    dims = settings.model.spatial_dims
    items = training_items(cases, dims, settings.input_channels)
    # On a GPU a thread draws the next batch while the GPU runs this one; on a
    # CPU the same thread would only compete with the training threads.
    loader = (ThreadDataLoader if device.type == "cuda" else DataLoader)(
        Dataset(items, transform=training_transform(settings.patch_size, dims,
                                                    settings.patches_per_image)),
        batch_size=max(1, settings.batch_size // settings.patches_per_image),
        shuffle=True,
        num_workers=0,
    )
    # A loader batch holds whole images' patches; a batch-size below
    # patches-per-image takes each image's patches in several steps.
    per_loader_batch = max(1, settings.patches_per_image // settings.batch_size)
    model.to(device).train()
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    optimizer = make_optimizer(model, settings)
    if optimizer_state and not load_optimizer_arrays(optimizer, optimizer_state):
        log.warning("the saved optimiser state does not fit this model; starting afresh")
    start_weights = [p.detach().clone() for p in model.parameters()] if proximal_mu else []
    dtype = low_precision(device, settings)
    # fp16 gradients need loss scaling; bf16 has fp32's range and does not
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    losses, steps, nonfinite = [], 0, 0
    total_steps = max(1, (epochs or settings.local_epochs) * len(loader) * per_loader_batch)
    with warnings.catch_warnings(), _plain_tensors():
        # RandCropByPosNegLabel warns on slices without foreground; it falls back
        # to background patches, which is what we want there.
        warnings.simplefilter("ignore")
        for _epoch in range(epochs or settings.local_epochs):
            for batch in _steps(loader, settings.batch_size, per_loader_batch):
                done = progress[0] + (progress[1] - progress[0]) * steps / total_steps
                steps += 1
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate_at(done, settings)
                image = batch["image"].to(device)
                label = batch["label"].to(device)
                optimizer.zero_grad(set_to_none=True)
                with _autocast(device, dtype):
                    logits = model(image)
                loss = loss_fn(logits.float(), label)
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
                value = float(loss.detach())
                if proximal_mu:
                    value += _add_proximal_gradient(model, start_weights, proximal_mu)
                norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP))
                if math.isfinite(value) and math.isfinite(norm):
                    nonfinite = 0
                    losses.append(value)
                    scaler.step(optimizer)
                else:  # skipped: no weight moves on a NaN (fp16's scaler also backs off)
                    nonfinite += 1
                    optimizer.zero_grad(set_to_none=True)
                scaler.update()
                if nonfinite >= NONFINITE_LIMIT[dtype]:
                    if dtype is None:
                        raise TrainingDivergedError(
                            f"training diverged: {nonfinite} steps in a row gave a non-finite "
                            f"loss or gradient (step {steps}, learning rate "
                            f"{optimizer.param_groups[0]['lr']:.3g}); the weights are left "
                            "as they were before those steps")
                    log.warning("%d steps in a row were not finite in %s; training goes on "
                                "in fp32", nonfinite, str(dtype).split(".")[-1])
                    dtype, nonfinite = None, 0
                    scaler = torch.amp.GradScaler(device.type, enabled=False)
    seconds = time.perf_counter() - start
    log.info("trained %d steps on %d cases in %.1f s", steps, len(cases), seconds)
    if not losses:
        raise TrainingDivergedError(f"no training step of {steps} gave a finite loss")
    return TrainResult(len(cases), float(np.mean(losses)), steps, seconds,
                       optimizer_arrays(optimizer) if settings.keep_optimizer_state else {})


@torch.no_grad()
def _add_proximal_gradient(model: torch.nn.Module, start: list[torch.Tensor],
                           mu: float) -> float:
    """FedProx's term ``mu/2 * ||w - w_start||^2``: add its gradient,
    ``mu * (w - w_start)``, to each parameter's (unscaled) gradient, and
    return its value for the reported loss. The same update as adding the
    term to the loss before ``backward``, without differentiating it: that
    took 14% of a FedProx round of the hippocampus U-Net's training, this
    takes a few fused operations."""
    params = list(model.parameters())
    for p in params:
        if p.grad is None:  # a parameter the loss did not reach still feels the term
            p.grad = torch.zeros_like(p)
    diffs = torch._foreach_sub(params, start)
    torch._foreach_add_([p.grad for p in params], diffs, alpha=mu)
    return mu / 2 * float(torch.stack(torch._foreach_norm(diffs)).square().sum())


def make_optimizer(model: torch.nn.Module, settings: RunSettings) -> torch.optim.Optimizer:
    """The sites' optimiser (``optimizer``): Adam, or SGD with Nesterov
    momentum ``sgd-momentum`` (nnU-Net's). Its learning rate is set each step
    by :func:`learning_rate_at`."""
    if settings.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=settings.learning_rate,
                               momentum=settings.sgd_momentum, nesterov=settings.sgd_momentum > 0)
    return torch.optim.Adam(model.parameters(), lr=settings.learning_rate)


def _steps(loader, batch_size: int, parts: int):
    """The loader's batches, each cut into ``parts`` batches of ``batch_size``
    patches (an image's patches in equal parts); whole when ``parts`` is 1."""
    for batch in loader:
        if parts == 1:
            yield batch
            continue
        for i in range(0, len(batch["image"]), batch_size):
            yield {"image": batch["image"][i:i + batch_size],
                   "label": batch["label"][i:i + batch_size]}


def learning_rate_at(done: float, settings: RunSettings) -> float:
    """The learning rate once ``done`` (0..1) of the whole schedule is behind."""
    if settings.lr_schedule == "constant":
        return settings.learning_rate
    floor = settings.lr_min_ratio
    done = min(max(done, 0.0), 1.0)
    return settings.learning_rate * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * done)))


def mirror_sets(spatial_dims: int) -> list[tuple[int, ...]]:
    """Test-time flips: every non-empty set of the axes training mirrors along,
    as axes of a ``B x C x spatial`` tensor."""
    axes = tuple(2 + a for a in MIRROR_AXES if a < spatial_dims)
    return [c for k in range(1, len(axes) + 1) for c in itertools.combinations(axes, k)]


SW_BATCH = 32  # windows per forward pass in inference (3.3 ms a window on CPU; 4.5 at 8)
MAX_BATCH_VOXELS = 2**26  # mirrored copies stacked for one sliding window: at most this many values


@torch.no_grad()
def predict(
    model: torch.nn.Module, image: np.ndarray, settings: RunSettings, device: torch.device,
    probabilities: bool = False,
) -> np.ndarray:
    """Label map ``1 x spatial`` (uint8, class indices: 0 background, ``i``
    the ``i``-th of ``settings.structure_names``) of a prepared image ``C x
    spatial`` (``probabilities``: every class's probability instead, ``K x
    spatial`` float32 with K = 1 + structures, summing to 1 per voxel),
    by sliding-window inference at full resolution (slice by slice for a 2D
    model on a volume), windows overlapping by ``sw-overlap`` and blended with
    Gaussian weights. With ``test-time-flips`` the class probabilities are
    averaged over the image and its mirror images along the axes training
    mirrors along (``MIRROR_AXES``, as nnU-Net does along its own), never others."""
    model.to(device).eval()
    dtype = low_precision(device, settings)
    dims = settings.model.spatial_dims
    roi = (settings.patch_size,) * dims
    flips = [()]
    if settings.test_time_flips:
        flips += mirror_sets(dims)

    def infer(x: np.ndarray) -> np.ndarray:
        inputs = torch.as_tensor(x, device=device)[None]
        # The mirrored copies go through one sliding window together, so each
        # forward pass takes SW_BATCH windows whatever the image size; in groups
        # that keep the stacked copies under MAX_BATCH_VOXELS for large volumes.
        group = max(1, min(len(flips), MAX_BATCH_VOXELS // max(1, inputs.numel())))
        probs = 0
        for start in range(0, len(flips), group):
            chunk = flips[start:start + group]
            batch = torch.cat([torch.flip(inputs, axes) if axes else inputs for axes in chunk])
            with _autocast(device, dtype):
                logits = sliding_window_inference(
                    batch, roi, sw_batch_size=SW_BATCH, predictor=model,
                    overlap=settings.sw_overlap, mode="gaussian")
            p = logits.float().softmax(dim=1)
            for k, axes in enumerate(chunk):
                probs = probs + (torch.flip(p[k:k + 1], axes) if axes else p[k:k + 1])
        if probabilities:
            return (probs[0] / len(flips)).float().cpu().numpy()  # K x spatial
        return probs.argmax(dim=1).to(torch.uint8).cpu().numpy()  # 1 x spatial

    if image.ndim - 1 == dims:
        return infer(image)
    if image.ndim - 1 == 3 and dims == 2:
        return np.stack([infer(image[..., k]) for k in range(image.shape[-1])], axis=-1)
    raise ValueError(f"a {dims}D model cannot segment a {image.ndim - 1}D image")


def on_grid(probabilities: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The label map (spatial uint8) of class ``probabilities`` (``K x
    spatial``) on a grid of ``shape``: resampled linearly, then the most
    probable class (as nnU-Net brings its predictions back to the input's
    own grid)."""
    if tuple(probabilities.shape[1:]) != tuple(shape):
        probabilities = resize(probabilities, shape)
    return probabilities.argmax(axis=0).astype(np.uint8)


def evaluate(
    model: torch.nn.Module, cases: list[Case], settings: RunSettings, device: torch.device
) -> EvalResult:
    """Score ``model`` on ``cases``; per-case metrics of the run's structures,
    keyed as ``common.wire.score_keys`` says (they stay at the site). A case
    resampled to the run's target spacing is scored on the grid it was read
    on (its prediction brought back), so runs with and without harmonisation
    are scored alike."""
    if not cases:
        raise EmptyDatasetError("no test case to evaluate on")
    start = time.perf_counter()
    per_case = []
    for case in cases:
        ready = prepare_case(case, settings.input_channels)  # as prepared, or z-scored
        if ready.source is None:
            pred = predict(model, ready.image, settings, device)
            label, spacing = ready.label, ready.spacing
        else:  # resampled to the run's spacing: scored on the grid the case was read on
            label, spacing = ready.source
            pred = on_grid(predict(model, ready.image, settings, device, probabilities=True),
                           label.shape[1:])[None]
        per_case.append(case_metrics(pred, label, spacing, settings.structure_names))
    return EvalResult(per_case, time.perf_counter() - start)
