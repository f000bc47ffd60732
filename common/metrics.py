"""Segmentation metrics per case, from MONAI, and their aggregation.

Per case and per structure (the structure's class against all others):
Dice, IoU (Jaccard), HD95 (95th percentile Hausdorff distance, in mm when the
voxel spacing is known, else in pixels), sensitivity and specificity.

Conventions for empty masks: when both prediction and ground truth are empty,
Dice and IoU are 1 (MONAI's ``ignore_empty=False``); HD95 is undefined (NaN)
when either mask is empty, and sensitivity is undefined when the ground truth
is empty. Undefined values are left out of means, never counted as 0.

The keys are :mod:`common.wire`'s. With one structure a case has the five
headline scores only (``dice`` ...). With several it has each score per
structure (``dice/liver``, :func:`common.wire.structure_key`) and, as the
headline, the mean over structures of that case's defined values. Every key
then goes on the same way: a site's value is the mean over its cases
(:func:`summarize`), the value across sites the case-weighted mean of the
sites' (:func:`combine`), so the headline across sites is the case-weighted
mean of the sites' headlines.
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

from common.config import FOREGROUND
from common.wire import NUM_EXAMPLES, SCORES, is_score, structure_key

METRICS = SCORES


def case_metrics(
    pred: np.ndarray | torch.Tensor,
    label: np.ndarray | torch.Tensor,
    spacing: Sequence[float] | None = None,
    structures: Sequence[str] = (FOREGROUND,),
) -> dict[str, float]:
    """Metrics of one case, keyed as :func:`common.wire.score_keys` says.

    ``pred`` and ``label``: label maps ``1 x spatial`` of the same shape, of
    class indices (0 background, ``k`` the ``k``-th of ``structures``; a
    binary mask with one structure). ``spacing``: voxel size per spatial
    axis, for HD95 in mm.
    """
    pred, label = np.asarray(pred), np.asarray(label)
    if pred.shape != label.shape or pred.shape[0] != 1:
        raise ValueError(
            f"prediction {pred.shape} and label {label.shape} must both be 1 x spatial"
        )
    n = len(structures)
    p, y = torch.as_tensor(pred)[None].long(), torch.as_tensor(label)[None].long()
    if min(p.min(), y.min()) < 0 or max(p.max(), y.max()) > n:
        raise ValueError(f"label values must be class indices 0 to {n} ({n} structure(s))")
    p_oh, y_oh = one_hot(p, n + 1), one_hot(y, n + 1)  # 1 x (1 + structures) x spatial
    in_p = p_oh.flatten(2).amax(-1)[0, 1:] > 0  # per structure: in the prediction, label
    in_y = y_oh.flatten(2).amax(-1)[0, 1:] > 0
    all_y = y_oh.flatten(2).amin(-1)[0, 1:] > 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI warns on empty masks; handled below
        dice = compute_dice(p_oh, y_oh, include_background=False, ignore_empty=False)[0]
        iou = compute_iou(p_oh, y_oh, include_background=False, ignore_empty=False)[0]
        hd95 = torch.full((n,), math.nan)
        if (in_p & in_y).any():
            sp = list(spacing)[: p.ndim - 2] if spacing is not None else None
            hd95 = compute_hausdorff_distance(
                p_oh, y_oh, include_background=False, percentile=95, spacing=sp
            )[0]
        cm = get_confusion_matrix(p_oh, y_oh, include_background=False)
        sens = compute_confusion_matrix_metric("sensitivity", cm)[0]
        spec = compute_confusion_matrix_metric("specificity", cm)[0]
    per = {s: {
        "dice": float(dice[k]),
        "iou": float(iou[k]),
        "hd95": float(hd95[k]) if in_p[k] and in_y[k] else math.nan,
        "sensitivity": float(sens[k]) if in_y[k] else math.nan,
        "specificity": float(spec[k]) if not all_y[k] else math.nan,
    } for k, s in enumerate(structures)}
    if n == 1:
        return per[structures[0]]
    out = {m: nanmean(v[m] for v in per.values()) for m in SCORES}
    out.update({structure_key(m, s): v[m] for s, v in per.items() for m in SCORES})
    return out


def nanmean(values: Iterable[float]) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


def scores_in(rows: Iterable[Mapping[str, float]]) -> list[str]:
    """The score keys of ``rows``: the headline ones always, then those per
    structure that any row holds, in their order."""
    keys = dict.fromkeys(SCORES)
    keys.update(dict.fromkeys(k for row in rows for k in row if is_score(k)))
    return list(keys)


def summarize(per_case: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """A site's aggregate: the mean of each score over its cases (the headline
    too: the mean of the cases' headlines), plus ``num-examples`` (the number
    of cases, used as the site's weight)."""
    out = {m: nanmean(c.get(m, math.nan) for c in per_case) for m in scores_in(per_case)}
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
    """Across sites: each score (headline and per structure) weighted by the
    sites' case counts."""
    out: dict[str, float] = {m: weighted_mean(sites, m) for m in scores_in(sites)}
    out[NUM_EXAMPLES] = sum(int(s.get(NUM_EXAMPLES, 0)) for s in sites)
    return out
