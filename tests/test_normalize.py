from __future__ import annotations

import numpy as np
import pytest

from cellnest.normalize import apply_image_percentiles, channel_percentiles, image_percentiles, normalize_channel, normalize_image


def test_percentiles_of_nonzero_pixels():
    channel = np.zeros((10, 10), np.uint16)
    channel[:5] = np.arange(1, 51).reshape(5, 10)  # non-zero values 1..50, half the image zero
    lo, hi = np.percentile(np.arange(1, 51), [1, 99])
    out = normalize_channel(channel)
    expected = np.clip((channel.astype(np.float32) - lo) / (hi - lo), 0, 1)
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    assert out.dtype == np.float32 and out.min() == 0 and out.max() == 1


@pytest.mark.parametrize("value", [0, 7])
def test_zero_and_flat_channels_stay_zero(value):
    out = normalize_channel(np.full((6, 6), value, np.uint8))
    assert out.dtype == np.float32 and not out.any()


def test_image_channels_independent_and_grey_shortcut():
    rng = np.random.default_rng(1)
    grey = rng.integers(0, 4000, (32, 32)).astype(np.float32)
    rgb = np.stack([grey, grey * 3 + 5, np.zeros_like(grey)], -1)
    out = normalize_image(rgb)
    np.testing.assert_allclose(out[..., 0], normalize_channel(grey))
    np.testing.assert_allclose(out[..., 1], normalize_channel(grey * 3 + 5), atol=1e-6)
    assert not out[..., 2].any()
    repeated = normalize_image(np.repeat(grey[..., None], 3, -1))
    np.testing.assert_array_equal(repeated[..., 2], repeated[..., 0])


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="lower < upper"):
        normalize_channel(np.ones((3, 3)), 99, 1)
    with pytest.raises(ValueError, match=r"\(H, W, C\)"):
        normalize_image(np.ones((3, 3)))


@pytest.mark.parametrize("dtype, top", [(np.uint8, 255), (np.uint16, 65535), (np.uint16, 900), (np.int32, 5000)])
def test_histogram_percentiles_equal_numpy(dtype, top):
    rng = np.random.default_rng(top)
    channel = rng.integers(0, top + 1, size=(97, 53)).astype(dtype)
    channel[:10] = 0
    for lower, upper in [(1, 99), (0, 100), (2.5, 97.5), (50, 51)]:
        expected = np.percentile(channel[channel != 0].astype(np.float64), [lower, upper])
        np.testing.assert_allclose(channel_percentiles(channel, lower, upper), expected, rtol=0, atol=1e-9)
    np.testing.assert_allclose(normalize_channel(channel), normalize_channel(channel.astype(np.float32)), atol=1e-6)


def test_blockwise_application_equals_whole_image():
    rng = np.random.default_rng(3)
    image = rng.integers(0, 4096, size=(64, 48, 3)).astype(np.uint16)
    bounds = image_percentiles(image)
    blocks = np.concatenate([apply_image_percentiles(image[:30], bounds), apply_image_percentiles(image[30:], bounds)])
    np.testing.assert_array_equal(blocks, normalize_image(image))
