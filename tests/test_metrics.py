from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from conftest import disk
from cellnest.metrics import Counts, iou_pairs, match_counts, relabel, remove_border_cells, score_image, summarize
from cellnest.synthetic import SyntheticSpec, synthetic_cells


def official_tp(true, pred, threshold=0.5):
    """The challenge's dense Hungarian matching, as a reference."""
    n_true, n_pred = true.max(), pred.max()
    if n_pred == 0 or n_true == 0:
        return 0
    overlap = np.zeros((n_true + 1, n_pred + 1))
    np.add.at(overlap, (true.ravel(), pred.ravel()), 1)
    union = overlap.sum(0, keepdims=True) + overlap.sum(1, keepdims=True) - overlap
    iou = (overlap / np.maximum(union, 1))[1:, 1:]
    costs = -(iou >= threshold).astype(float) - iou / (2 * min(iou.shape))
    rows, cols = linear_sum_assignment(costs)
    return int((iou[rows, cols] >= threshold).sum())


def cells(shape, *specs):
    labels = np.zeros(shape, np.int32)
    for i, (centre, radius) in enumerate(specs, start=1):
        labels[disk(shape, centre, radius)] = i
    return labels


def test_perfect_prediction_scores_one():
    gt = cells((60, 60), ((15, 15), 6), ((40, 40), 8))
    s = score_image(gt, gt)
    assert (s.tp, s.fp, s.fn, s.f1) == (2, 0, 0, 1.0)


def test_hand_computed_case():
    # 3 true cells; prediction: one exact, one shifted too far (IoU < 0.5), one spurious.
    gt = cells((80, 80), ((15, 15), 6), ((40, 40), 6), ((60, 20), 6))
    pred = cells((80, 80), ((15, 15), 6), ((40, 48), 6), ((65, 65), 5))
    s = score_image(gt, pred)
    # TP 1, FP 2, FN 2 -> P = 1/3, R = 1/3, F1 = 1/3
    assert (s.tp, s.fp, s.fn) == (1, 2, 2)
    assert s.precision == pytest.approx(1 / 3) and s.recall == pytest.approx(1 / 3) and s.f1 == pytest.approx(1 / 3)


def test_iou_of_two_squares():
    true = np.zeros((10, 10), np.int32)
    pred = np.zeros((10, 10), np.int32)
    true[2:6, 2:6] = 1  # 16 px
    pred[2:6, 4:8] = 1  # 16 px, overlap 8 -> IoU 8 / 24
    rows, cols, iou = iou_pairs(true, pred)
    assert rows.tolist() == [0] and cols.tolist() == [0] and iou[0] == pytest.approx(1 / 3)


def test_iou_exactly_half_counts():
    true = np.zeros((10, 10), np.int32)
    pred = np.zeros((10, 10), np.int32)
    true[3:7, 3:7] = 1  # 16 px
    pred[3:7, 3:5] = 1  # 8 px inside: IoU = 8 / 16 = 0.5
    assert score_image(true, pred).tp == 1


def test_border_cells_removed_from_both_sides():
    gt = cells((50, 50), ((1, 25), 4), ((25, 25), 6))  # first cell touches the top frame
    pred = cells((50, 50), ((25, 25), 6))
    s = score_image(gt, pred)
    assert (s.tp, s.fp, s.fn, s.f1) == (1, 0, 0, 1.0)
    kept = score_image(gt, pred, keep_border_cells=True)
    assert (kept.tp, kept.fn) == (1, 1)


def test_frame_is_two_pixels_wide():
    labels = np.zeros((20, 20), np.int32)
    labels[2:5, 8:11] = 1  # touches row 2 -> inside the 2-px frame? rows 0,1 are the frame
    labels[1:4, 14:17] = 2  # touches row 1 -> removed
    out = remove_border_cells(labels)
    assert out.max() == 1 and out[3, 9] == 1 and out[2, 15] == 0


@pytest.mark.parametrize("pred_empty, gt_empty", [(True, False), (False, True), (True, True)])
def test_empty_images_score_zero(pred_empty, gt_empty):
    some = cells((40, 40), ((20, 20), 6))
    none = np.zeros((40, 40), np.int32)
    s = score_image(none if gt_empty else some, none if pred_empty else some)
    assert s.f1 == 0.0 and s.tp == 0
    assert s.fn == (0 if gt_empty else 1) and s.fp == (0 if pred_empty else 1)


def test_relabel_dense_and_sparse_ids():
    labels = np.array([[0, 5, 5], [9, 0, 3_000_000_000]], np.uint32)
    np.testing.assert_array_equal(relabel(labels), [[0, 1, 1], [2, 0, 3]])
    np.testing.assert_array_equal(relabel(labels, drop=[5]), [[0, 0, 0], [1, 0, 2]])


@pytest.mark.parametrize("seed", range(6))
def test_matches_the_official_hungarian_count(seed):
    rng = np.random.default_rng(seed)
    _, gt = synthetic_cells(SyntheticSpec(shape=(96, 96), n_cells=25, radius=(3, 7), min_gap=0.4), seed=seed)
    gt = gt.astype(np.int32)
    pred = np.roll(gt, rng.integers(-3, 4, size=2), axis=(0, 1))
    pred[pred == rng.integers(1, pred.max() + 1)] = 0  # a missed cell
    pred = relabel(pred)
    for t in (0.5, 0.7, 0.9):
        (counts,) = match_counts(gt, pred, (t,), keep_border_cells=True)
        assert counts.tp == official_tp(gt, pred, t)


def test_large_images_scored_in_tiles():
    # 5000 x 5000 = 25 MP: tiles of 2000 padded to 6000 x 6000; a cell cut by a tile edge
    # is dropped in both maps (border rule per tile), so a perfect prediction still scores 1.
    gt = np.zeros((5000, 5000), np.int32)
    gt[100:120, 100:120] = 1
    gt[1990:2010, 500:520] = 2  # crosses the first tile edge: dropped
    gt[3000:3030, 4500:4530] = 3
    (counts,) = match_counts(gt, gt)
    assert counts == Counts(2, 0, 0)
    shifted = np.roll(gt, 15, axis=1)  # IoU 5/35 < 0.5 for every cell
    (counts,) = match_counts(gt, shifted)
    assert counts.tp == 0 and counts.fn == 2


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shape mismatch"):
        score_image(np.zeros((4, 4), int), np.zeros((4, 5), int))


def test_summary_per_modality():
    gt = cells((40, 40), ((20, 20), 6))
    scores = [score_image(gt, gt, "a", "fluo"), score_image(gt, 0 * gt, "b", "fluo"), score_image(gt, gt, "c", "DIC")]
    summary = summarize(scores)
    assert summary["fluo"]["mean_f1"] == 0.5 and summary["fluo"]["median_f1"] == 0.5
    assert summary["DIC"]["n"] == 1 and summary["all"]["mean_f1"] == pytest.approx(2 / 3)
    assert list(summary) == ["DIC", "fluo", "all"]
