"""Segmentation metrics per case, from MONAI, and their aggregation.

Per case (binary foreground vs background): Dice, IoU (Jaccard), HD95 (95th
percentile Hausdorff distance, in mm when the voxel spacing is known, else in
pixels), sensitivity and specificity.

Conventions for empty masks: when both prediction and ground truth are empty,
Dice and IoU are 1 (MONAI's ``ignore_empty=False``); HD95 is undefined (NaN)
when either mask is empty, and sensitivity is undefined when the ground truth
is empty. Undefined values are left out of means, never counted as 0.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch
from monai.metrics import (
    compute_confusion_matrix_metric,
    compute_dice,
    compute_hausdorff_distance,
    compute_iou,
    get_confusion_matrix,
)
from monai.networks.utils import one_hot

from common.wire import NUM_EXAMPLES, SCORES

METRICS = SCORES


def case_metrics(
    pred: np.ndarray | torch.Tensor,
    label: np.ndarray | torch.Tensor,
    spacing: Sequence[float] | None = None,
) -> dict[str, float]:
    """Metrics of one case.

    ``pred`` and ``label``: binary masks ``1 x spatial`` of the same shape.
    ``spacing``: voxel size per spatial axis, for HD95 in mm.
    """
    pred, label = np.asarray(pred), np.asarray(label)
    if pred.shape != label.shape or pred.shape[0] != 1:
        raise ValueError(
            f"prediction {pred.shape} and label {label.shape} must both be 1 x spatial"
        )
    p, y = torch.as_tensor(pred)[None].bool(), torch.as_tensor(label)[None].bool()
    p_oh, y_oh = one_hot(p.long(), 2), one_hot(y.long(), 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI warns on empty masks; handled below
        dice = compute_dice(p_oh, y_oh, include_background=False, ignore_empty=False)
        iou = compute_iou(p_oh, y_oh, include_background=False, ignore_empty=False)
        if p.any() and y.any():
            sp = list(spacing)[: p.ndim - 2] if spacing is not None else None
            hd95 = compute_hausdorff_distance(
                p_oh, y_oh, include_background=False, percentile=95, spacing=sp
            ).item()
        else:
            hd95 = math.nan
        cm = get_confusion_matrix(p_oh, y_oh, include_background=False)
        sens = compute_confusion_matrix_metric("sensitivity", cm).item()
        spec = compute_confusion_matrix_metric("specificity", cm).item()
    return {
        "dice": float(dice.item()),
        "iou": float(iou.item()),
        "hd95": float(hd95),
        "sensitivity": float(sens) if y.any() else math.nan,
        "specificity": float(spec) if (~y).any() else math.nan,
    }


def nanmean(values: Iterable[float]) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


def summarize(per_case: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """A site's aggregate: the mean of each metric over its cases, plus
    ``num-examples`` (the number of cases, used as the site's weight)."""
    out = {m: nanmean(c[m] for c in per_case) for m in METRICS}
    out[NUM_EXAMPLES] = len(per_case)
    return out


def weighted_mean(sites: Iterable[Mapping[str, float]], key: str) -> float:
    """The case-weighted mean of ``key`` over sites (weights: their
    ``num-examples``, 1 where absent), skipping sites where it is undefined;
    NaN when no site has it. The one place this mean is written."""
    pairs = [(s[key], s.get(NUM_EXAMPLES, 1.0)) for s in sites
             if key in s and s[key] is not None and math.isfinite(s[key])]
    weight = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / weight if weight else math.nan


def combine(sites: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Across sites: each metric weighted by the sites' case counts."""
    out: dict[str, float] = {m: weighted_mean(sites, m) for m in METRICS}
    out[NUM_EXAMPLES] = sum(int(s.get(NUM_EXAMPLES, 0)) for s in sites)
    return out
