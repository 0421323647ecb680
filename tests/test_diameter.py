"""Cell-size rescaling: diameters are measured right, and labels come back at the input's size."""

from __future__ import annotations

import numpy as np
import pytest

from cellnest.diameter import cell_diameters, median_diameter, resize_labels, scale_for, segment_at_diameter
from cellnest.models import ClassicalSegmenter
from conftest import disk


def _disks(shape=(120, 120), radius=10.0):
    labels = np.zeros(shape, np.int32)
    for i, centre in enumerate([(30, 30), (30, 90), (90, 30), (90, 90)], start=1):
        labels[disk(shape, centre, radius)] = i
    return labels


def test_equivalent_diameters():
    diameters = cell_diameters(_disks(radius=10.0))
    assert diameters.shape == (4,) and np.allclose(diameters, 20.0, atol=0.5)
    assert median_diameter(np.zeros((8, 8), np.int32)) is None


def test_scale_is_clipped_and_checked():
    assert scale_for(30.0, 15.0) == 2.0 and scale_for(30.0, 1.0) == 4.0 and scale_for(30.0, 1000.0) == 0.25
    with pytest.raises(ValueError, match="must be > 0"):
        scale_for(30.0, 0.0)


def test_labels_come_back_at_the_input_size():
    labels = _disks()
    back = resize_labels(resize_labels(labels, (240, 240)), labels.shape)
    assert back.shape == labels.shape and set(np.unique(back)) == set(np.unique(labels))


def test_segment_at_diameter_rescales_then_maps_back():
    seen = []

    def fake_segment(image):  # records what the "model" sees; cells of 20 px at the model's scale
        seen.append(image.shape)
        return _disks(image.shape[:2], radius=10.0 * image.shape[0] / 120)

    image = np.zeros((120, 120, 3), np.float32)
    labels, scale = segment_at_diameter(fake_segment, image, model_diameter=40.0, diameter=20.0)
    assert scale == 2.0 and seen == [(240, 240, 3)] and labels.shape == (120, 120)
    seen.clear()
    labels, scale = segment_at_diameter(fake_segment, image, model_diameter=21.0, diameter="auto")
    assert scale == 1.0 and seen == [(120, 120, 3)]  # first pass found ~20 px cells: within tolerance, one pass
    seen.clear()
    labels, scale = segment_at_diameter(fake_segment, image, model_diameter=60.0, diameter="auto")
    assert scale == pytest.approx(3.0, rel=0.05) and len(seen) == 2 and labels.shape == (120, 120)


def test_rescaling_refuses_images_it_cannot_hold(monkeypatch):
    import cellnest.diameter as diameter

    monkeypatch.setattr(diameter, "MAX_RESCALED_PIXELS", 100 * 100)
    with pytest.raises(ValueError, match="would exceed"):
        segment_at_diameter(lambda im: np.zeros(im.shape[:2], np.int32), np.zeros((80, 80, 3), np.float32), 40.0, 20.0)


def test_diameter_needs_a_model_that_records_one():
    with pytest.raises(ValueError, match="does not record its training cell diameter"):
        ClassicalSegmenter(diameter="auto")
    with pytest.raises(ValueError, match="diameter must be 'auto' or a number"):
        ClassicalSegmenter(cell_diameter=20.0, diameter="big")
    image = np.zeros((64, 64, 3), np.uint8)
    image[20:40, 20:40] = 200
    labels = ClassicalSegmenter(cell_diameter=20.0, diameter=10.0)(image)  # runs at 2x, returns at 1x
    assert labels.shape == (64, 64) and labels.max() >= 1
