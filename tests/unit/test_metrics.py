"""Metrics against values worked out by hand."""

import math

import numpy as np
import pytest

from common.metrics import case_metrics, combine, summarize
from common.wire import SCORES


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


# ------------------------------------------------------------------ several structures


def two_structures():
    """Structure a (class 1): 16 labelled pixels, 9 of them predicted as a;
    structure b (class 2): 4 labelled pixels, all predicted as b, plus 4 more."""
    pred = np.zeros((1, 10, 10), np.uint8)
    label = np.zeros((1, 10, 10), np.uint8)
    pred[0, 2:6, 2:6] = 1  # 16 pixels
    label[0, 3:7, 3:7] = 1  # 16 pixels, 9 shared
    label[0, 8:10, 0:2] = 2  # 4 pixels
    pred[0, 8:10, 0:4] = 2  # 8 pixels, the 4 labelled ones among them
    return pred, label


def test_each_structure_is_scored_against_the_rest():
    pred, label = two_structures()
    m = case_metrics(pred, label, structures=("a", "b"))
    assert m["dice/a"] == pytest.approx(2 * 9 / 32)
    assert m["iou/a"] == pytest.approx(9 / 23)
    assert m["dice/b"] == pytest.approx(2 * 4 / (8 + 4))
    assert m["sensitivity/b"] == 1.0
    assert m["specificity/b"] == pytest.approx(92 / 96)  # 4 of b's 96 negatives predicted b
    for k, s in enumerate(("a", "b"), 1):  # each structure as a binary mask would score it
        binary = case_metrics(pred == k, label == k)
        assert binary == pytest.approx({key: m[f"{key}/{s}"] for key in SCORES})
    # the headline: the mean over structures
    assert m["dice"] == pytest.approx((m["dice/a"] + m["dice/b"]) / 2)
    assert m["hd95"] == pytest.approx((m["hd95/a"] + m["hd95/b"]) / 2)
    assert set(m) == {*SCORES, *(f"{k}/{s}" for s in ("a", "b") for k in SCORES)}


def test_an_absent_structure_is_undefined_where_the_convention_says_and_left_out():
    pred, label = two_structures()
    label[label == 2] = 0  # b is absent from the label, still predicted
    m = case_metrics(pred, label, structures=("a", "b"))
    assert math.isnan(m["sensitivity/b"]) and math.isnan(m["hd95/b"])
    assert m["dice/b"] == 0.0  # predicted where there is none
    assert m["sensitivity"] == m["sensitivity/a"]  # the undefined value is left out
    assert m["hd95"] == m["hd95/a"]
    assert m["dice"] == pytest.approx(m["dice/a"] / 2)  # a defined 0 counts
    pred[pred == 2] = 0  # ... and not predicted either: both empty, Dice 1
    m = case_metrics(pred, label, structures=("a", "b"))
    assert m["dice/b"] == 1.0 and m["dice"] == pytest.approx((m["dice/a"] + 1) / 2)


def test_one_structure_gives_the_headline_keys_only():
    pred, label = squares()
    assert case_metrics(pred, label, structures=("liver",)) == case_metrics(pred, label)
    assert set(case_metrics(pred, label)) == set(SCORES)


def test_a_label_value_beyond_the_structures_is_refused():
    pred, label = two_structures()
    with pytest.raises(ValueError, match="class indices 0 to 1"):
        case_metrics(pred, label)


def test_per_structure_keys_are_summarized_and_combined_like_the_headline():
    cases = [
        {"dice": 0.5, "dice/a": 0.4, "dice/b": 0.6, "hd95": 3.0, "hd95/a": 3.0,
         "hd95/b": math.nan},
        {"dice": 0.8, "dice/a": 0.8, "dice/b": math.nan, "hd95": math.nan,
         "hd95/a": math.nan, "hd95/b": math.nan},
    ]
    site = summarize(cases)
    assert site["dice"] == pytest.approx(0.65)  # the mean of the cases' headlines
    assert site["dice/a"] == pytest.approx(0.6) and site["dice/b"] == pytest.approx(0.6)
    assert math.isnan(site["hd95/b"]) and site["num-examples"] == 2
    other = {"dice": 0.2, "dice/a": 0.1, "dice/b": 0.3, "hd95/b": 2.0, "num-examples": 1}
    both = combine([site, other])
    assert both["dice/a"] == pytest.approx((0.6 * 2 + 0.1) / 3)
    assert both["hd95/b"] == pytest.approx(2.0)  # undefined at the first site: left out
    assert both["dice"] == pytest.approx((0.65 * 2 + 0.2) / 3)
    assert both["num-examples"] == 3
