"""Cell size: diameters measured right, labels resampled without merging or inventing cells,
training samples brought to one size, and per-image estimates at inference."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cellnest.data import TargetConfig, prepare_sample
from cellnest.diameter import (cell_diameters, log2_error, median_diameter, rescale_labels, resize_labels, scale_for,
                               search_diameter, training_scale, window_slices)
from cellnest.models import ClassicalSegmenter
from cellnest.normalize import image_percentiles
from conftest import disk


def _disks(shape=(120, 120), radius=10.0):
    labels = np.zeros(shape, np.int32)
    for i, centre in enumerate([(30, 30), (30, 90), (90, 30), (90, 90)], start=1):
        labels[disk(shape, centre, radius)] = i
    return labels


def disk_image(diameter: float, side: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Bright disks of one diameter on a grid with jitter: (side, side, 3) uint8 image, labels."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((side, side), np.int32)
    step = diameter * 1.8
    n = 0
    for y in np.arange(step / 2, side - diameter / 2, step):
        for x in np.arange(step / 2, side - diameter / 2, step):
            n += 1
            centre = (y + rng.uniform(-0.2, 0.2) * diameter, x + rng.uniform(-0.2, 0.2) * diameter)
            labels[disk(labels.shape, centre, diameter / 2)] = n
    image = np.where(labels > 0, 200, 20).astype(np.uint8)
    image = np.clip(image + rng.normal(0, 5, image.shape), 0, 255).astype(np.uint8)
    return np.repeat(image[..., None], 3, axis=-1), labels


def test_equivalent_diameters():
    diameters = cell_diameters(_disks(radius=10.0))
    assert diameters.shape == (4,) and np.allclose(diameters, 20.0, atol=0.5)
    assert median_diameter(np.zeros((8, 8), np.int32)) is None


def test_scale_is_clipped_and_checked():
    assert scale_for(30.0, 15.0) == 2.0 and scale_for(30.0, 1.0) == 4.0 and scale_for(30.0, 1000.0) == 0.25
    assert training_scale(10.0, None) == 1.0 and training_scale(None, 30.0) == 1.0 and training_scale(10.0, 30.0) == 3.0
    with pytest.raises(ValueError, match="must be > 0"):
        scale_for(30.0, 0.0)


def test_labels_come_back_at_the_input_size():
    labels = _disks()
    back = resize_labels(resize_labels(labels, (240, 240)), labels.shape)
    assert back.shape == labels.shape and set(np.unique(back)) == set(np.unique(labels))


def test_rescale_labels_keeps_every_surviving_cell_once_and_drops_specks():
    # Known answer: two touching 40 x 40 squares (ids 7 and 9), a 20 x 20 square (id 3), a
    # 2 x 2 speck (id 5). At 1/4, the squares become 10 x 10 and 5 x 5, the speck 0-1 pixel.
    labels = np.zeros((120, 120), np.uint16)
    labels[0:40, 0:40] = 7
    labels[0:40, 40:80] = 9
    labels[80:100, 80:100] = 3
    labels[60:62, 20:22] = 5
    small, dropped = rescale_labels(labels, 0.25, min_pixels=4)
    assert small.shape == (30, 30) and small.dtype == labels.dtype
    assert sorted(np.unique(small)) == [0, 3, 7, 9]  # no invented id, the speck is gone
    assert np.bincount(small.ravel())[[7, 9, 3]].tolist() == [100, 100, 25]  # touching cells stay apart
    assert np.all(small[dropped] == 0) and dropped.sum() == np.count_nonzero(resize_labels(labels, (30, 30)) == 5)
    big, dropped = rescale_labels(labels, 2.0)
    assert sorted(np.unique(big)) == [0, 3, 5, 7, 9] and not dropped.any()
    assert np.bincount(big.ravel())[[7, 9, 3, 5]].tolist() == [6400, 6400, 1600, 16]


def test_training_samples_are_brought_to_the_target_diameter():
    image, labels = disk_image(12.0, 96)
    sample = prepare_sample(image, labels, TargetConfig(weight_maps=True), diameter=36.0)
    assert sample.meta["scale"] == pytest.approx(36.0 / sample.meta["diameter"])
    side = round(96 * sample.meta["scale"])
    assert sample.image.shape == (3, side, side) and 280 < side < 300 and sample.labels.shape == sample.classes.shape == sample.weights.shape
    assert median_diameter(sample.labels) == pytest.approx(36.0, rel=0.05)
    assert set(np.unique(sample.labels)) == set(np.unique(labels))  # every cell, one id each
    native = prepare_sample(image, labels, TargetConfig(weight_maps=False))
    assert native.meta["scale"] == 1.0 and native.image.shape == (3, 96, 96)


def test_window_slices_stay_inside_the_image():
    windows = window_slices((100, 300), 128, count=5)
    assert windows[0] == (slice(0, 100), slice(86, 214))
    assert all(r.stop <= 100 and c.stop <= 300 and r.start >= 0 and c.start >= 0 for r, c in windows)


def test_fixed_diameter_runs_at_the_model_scale_and_returns_at_the_input_size():
    image, labels = disk_image(10.0, 64)
    segmenter = ClassicalSegmenter(cell_diameter=20.0, diameter=10.0)
    seen = []
    segment = segmenter.segment_normalized
    segmenter.segment_normalized = lambda im, tile=None: seen.append(im.shape) or segment(im, tile)
    found, size = segmenter.run(image)
    assert seen == [(128, 128, 3)] and found.shape == (64, 64) and size.scale == 2.0 and size.diameter == 10.0
    assert median_diameter(found) == pytest.approx(10.0, rel=0.15)


def test_blocks_at_a_scale_equal_the_whole_image():
    image, _ = disk_image(10.0, 200, seed=3)
    whole = ClassicalSegmenter(cell_diameter=20.0, diameter=10.0)(image)
    blocks = ClassicalSegmenter(cell_diameter=20.0, diameter=10.0, max_whole_pixels=100 * 100, block=128, margin=16)(image)
    assert whole.max() == blocks.max() > 50
    # One-to-one: each cell's pixels go (almost all) to one cell of the other map, and back.
    overlap = np.zeros((whole.max() + 1, blocks.max() + 1), np.int64)
    np.add.at(overlap, (whole.ravel(), blocks.ravel()), 1)
    cells = overlap[1:, 1:]
    assert np.all(cells.max(axis=1) >= 0.9 * overlap[1:].sum(axis=1))  # no whole-image cell split at a seam
    assert len(set(cells.argmax(axis=1).tolist())) == whole.max()  # nor two merged


@pytest.mark.parametrize("diameter", [10.0, 30.0, 90.0])
def test_auto_estimates_known_diameters_within_15_percent(diameter):
    image, labels = disk_image(diameter, int(diameter * 9))
    segmenter = ClassicalSegmenter(cell_diameter=30.0, diameter="auto")
    bounds = image_percentiles(image)
    estimate = search_diameter(lambda crop, s: segmenter.segment_window(crop, bounds, s), image, 30.0)
    assert abs(estimate / diameter - 1) < 0.15
    found, size = segmenter.run(image)
    assert abs(size.diameter / diameter - 1) < 0.15 and size.scale == pytest.approx(30.0 / size.diameter)
    assert found.shape == labels.shape and abs(median_diameter(found) / diameter - 1) < 0.15


def test_search_prefers_the_scale_where_cells_have_the_model_size():
    # A fake model that finds 30-px disks only where the input's cells are 24-38 px.
    def segment_window(crop, scale):
        shape = (int(round(crop.shape[0] * scale)), int(round(crop.shape[1] * scale)))
        cell = 12.0 * scale
        return _disks(shape, radius=cell / 2) if 24 <= cell <= 38 else np.zeros(shape, np.int32)

    image = np.zeros((400, 400, 3), np.float32)
    assert search_diameter(segment_window, image, 30.0, min_cells=1) == pytest.approx(12.0, rel=0.1)
    assert search_diameter(lambda crop, s: np.zeros(crop.shape[:2], np.int32), image, 30.0) is None
    assert log2_error(None, 10.0) == 2.0 and log2_error(20.0, 10.0) == pytest.approx(1.0)


def test_diameter_needs_a_model_that_records_one():
    with pytest.raises(ValueError, match="does not record its training cell diameter"):
        ClassicalSegmenter(diameter="auto")
    with pytest.raises(ValueError, match="diameter must be 'auto' or a number"):
        ClassicalSegmenter(cell_diameter=20.0, diameter="big")
    with pytest.raises(ValueError, match="estimator must be"):
        ClassicalSegmenter(estimator="guess")
    assert math.isclose(scale_for(20.0, 10.0), 2.0)
