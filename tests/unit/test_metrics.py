"""Metrics against values worked out by hand."""

import math

import numpy as np
import pytest

from common.metrics import case_metrics, combine, summarize


def squares():
    pred = np.zeros((1, 10, 10), np.uint8)
    label = np.zeros((1, 10, 10), np.uint8)
    pred[0, 2:6, 2:6] = 1  # 16 pixels
    label[0, 3:7, 3:7] = 1  # 16 pixels, 9 shared
    return pred, label


def test_overlap_metrics_by_hand():
    m = case_metrics(*squares())
    assert m["dice"] == pytest.approx(2 * 9 / (16 + 16))  # 0.5625
    assert m["iou"] == pytest.approx(9 / (16 + 16 - 9))
    assert m["sensitivity"] == pytest.approx(9 / 16)
    # negatives in the label: 100 - 16 = 84, of which 84 - 7 predicted negative
    assert m["specificity"] == pytest.approx(77 / 84)


def test_hd95_of_two_points_is_their_distance_in_mm():
    pred = np.zeros((1, 10, 10), np.uint8)
    label = np.zeros((1, 10, 10), np.uint8)
    pred[0, 0, 0], label[0, 3, 4] = 1, 1
    assert case_metrics(pred, label)["hd95"] == pytest.approx(5.0)
    assert case_metrics(pred, label, spacing=(2.0, 1.0))["hd95"] == pytest.approx(
        math.hypot(6.0, 4.0), rel=1e-5)


def test_perfect_3d_prediction():
    label = np.zeros((1, 8, 8, 4), np.uint8)
    label[0, 2:5, 2:6, 1:3] = 1
    m = case_metrics(label, label, spacing=(1.0, 1.0, 3.0))
    assert (m["dice"], m["iou"], m["hd95"], m["sensitivity"], m["specificity"]) == (
        1.0, 1.0, 0.0, 1.0, 1.0)


def test_empty_masks_follow_the_documented_convention():
    empty = np.zeros((1, 6, 6), np.uint8)
    m = case_metrics(empty, empty)
    assert m["dice"] == 1.0 and m["iou"] == 1.0
    assert math.isnan(m["hd95"]) and math.isnan(m["sensitivity"])
    pred = empty.copy()
    pred[0, 0, 0] = 1
    m = case_metrics(pred, empty)
    assert m["dice"] == 0.0 and math.isnan(m["hd95"])


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="must both be"):
        case_metrics(np.zeros((1, 4, 4)), np.zeros((1, 4, 5)))


def test_site_summary_skips_undefined_values_and_counts_cases():
    cases = [
        {"dice": 0.5, "iou": 0.4, "hd95": 2.0, "sensitivity": 0.6, "specificity": 0.9},
        {"dice": 1.0, "iou": 1.0, "hd95": math.nan, "sensitivity": math.nan,
         "specificity": 1.0},
    ]
    s = summarize(cases)
    assert s["num-examples"] == 2
    assert s["dice"] == pytest.approx(0.75)
    assert s["hd95"] == pytest.approx(2.0)  # NaN left out, not counted as 0
    assert s["sensitivity"] == pytest.approx(0.6)


def test_across_sites_weighted_by_case_count():
    a = {"dice": 0.9, "iou": 0.8, "hd95": 1.0, "sensitivity": 0.9, "specificity": 0.99,
         "num-examples": 3}
    b = {"dice": 0.5, "iou": 0.4, "hd95": math.nan, "sensitivity": 0.5, "specificity": 0.9,
         "num-examples": 1}
    c = combine([a, b])
    assert c["dice"] == pytest.approx((0.9 * 3 + 0.5 * 1) / 4)
    assert c["hd95"] == pytest.approx(1.0)
    assert c["num-examples"] == 4
