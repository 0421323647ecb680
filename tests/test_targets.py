from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage.segmentation import find_boundaries

from cellnest.synthetic import SyntheticSpec, synthetic_cells
from cellnest.targets import BOUNDARY, INTERIOR, class_balance_weights, instances_to_classes, two_nearest_distances, weight_map


def _labels(seed: int, shape=(64, 80), n=12) -> np.ndarray:
    return synthetic_cells(SyntheticSpec(shape=shape, n_cells=n, radius=(4, 8), min_gap=0.45), seed=seed)[1].astype(np.int32)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_width_one_boundary_matches_skimage_inner(seed):
    labels = _labels(seed)
    classes = instances_to_classes(labels)
    boundary = find_boundaries(labels, mode="inner")
    np.testing.assert_array_equal(classes == BOUNDARY, boundary & (labels > 0))
    np.testing.assert_array_equal(classes == INTERIOR, (labels > 0) & ~boundary)


def test_boundary_width_on_a_square():
    labels = np.zeros((12, 12), np.int32)
    labels[2:10, 2:10] = 1  # 8x8 cell
    for width, interior_side in [(1, 6), (2, 4), (3, 2)]:
        classes = instances_to_classes(labels, boundary_width=width)
        assert (classes == INTERIOR).sum() == interior_side**2
        assert (classes == BOUNDARY).sum() == 64 - interior_side**2


def test_touching_cells_get_a_boundary_on_both_sides():
    labels = np.zeros((6, 10), np.int32)
    labels[:, :5], labels[:, 5:] = 1, 2
    classes = instances_to_classes(labels)
    assert (classes[2:4, 4:6] == BOUNDARY).all()  # the shared edge, on both cells
    assert (classes[2:4, 2:4] == INTERIOR).all()


def test_class_balance_weights_are_inverse_frequency():
    classes = np.array([[0, 0, 0, 1], [0, 0, 0, 1]])  # 6 background, 2 cells
    w = class_balance_weights(classes, 3)
    np.testing.assert_allclose(w, [8 / (2 * 6), 8 / (2 * 2), 0.0])
    assert np.isclose(w[classes].mean(), 1.0)


def brute_force_weight_map(labels, classes, w0, sigma, border_on="background"):
    """Reference: one full-image distance transform per cell, sorted per pixel."""
    ids = [i for i in np.unique(labels) if i]
    dists = np.stack([ndi.distance_transform_edt(labels != i) for i in ids]) if ids else np.empty((0,) + labels.shape)
    dists.sort(axis=0)
    w_c = class_balance_weights(classes, max(int(classes.max()) + 1, 2))[classes]
    if len(ids) < 2:
        return w_c
    border = w0 * np.exp(-((dists[0] + dists[1]) ** 2) / (2 * sigma**2))
    if border_on == "background":
        border = border * (labels == 0)
    return w_c + border


@pytest.mark.parametrize("seed, w0, sigma, border_on", [(0, 10, 5, "background"), (1, 10, 5, "all"), (2, 5, 3, "background"), (3, 10, 8, "all")])
def test_weight_map_matches_brute_force(seed, w0, sigma, border_on):
    labels = _labels(seed)
    classes = instances_to_classes(labels)
    fast = weight_map(labels, classes, w0=w0, sigma=sigma, border_on=border_on, tolerance=1e-6)
    reference = brute_force_weight_map(labels, classes, w0, sigma, border_on)
    np.testing.assert_allclose(fast, reference, atol=1e-5, rtol=1e-5)


def test_default_tolerance_error_is_bounded():
    labels = _labels(4)
    fast = weight_map(labels, tolerance=1e-3)
    reference = brute_force_weight_map(labels, (labels > 0).astype(np.uint8), 10, 5)
    assert np.abs(fast - reference).max() <= 1e-3 + 1e-5


def test_two_nearest_distances_order_and_cutoff():
    labels = np.zeros((1, 21), np.int32)
    labels[0, 0], labels[0, 20] = 1, 2
    d1, d2 = two_nearest_distances(labels, radius=15)
    assert d1[0, 10] == 10 and d2[0, 10] == 10
    assert d1[0, 3] == 3 and np.isinf(d2[0, 3])  # cell 2 is 17 away, beyond the radius
    assert (d1 <= d2).all()


def test_weight_map_edge_cases():
    assert np.allclose(weight_map(np.zeros((5, 5), np.int32)), 1.0)  # only background: w_c = 1
    one = np.zeros((9, 9), np.int32)
    one[3:6, 3:6] = 1
    w = weight_map(one)  # a single cell has no second-nearest cell: no border term
    np.testing.assert_allclose(w, class_balance_weights((one > 0).astype(int), 2)[(one > 0).astype(int)])
    with pytest.raises(ValueError, match="border_on"):
        weight_map(one, border_on="cells")
