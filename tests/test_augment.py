"""Training augmentation: shapes, label integrity, spatial consistency, determinism, config."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from cellnest.augment import AugmentConfig, build_augmentation

OFF = AugmentConfig(
    flip_prob=0, rot90_prob=0, rotate_prob=0, scale_prob=0, histogram_prob=0,
    gamma_prob=0, brightness_prob=0, blur_prob=0, noise_prob=0,
)  # fmt: skip
SPATIAL = replace(OFF, flip_prob=0.5, rot90_prob=0.5, rotate_prob=0.5, scale_prob=0.5)
ALL_ON = AugmentConfig(rotate_prob=1, scale_prob=1, histogram_prob=1, gamma_prob=1, brightness_prob=1, blur_prob=1, noise_prob=1)


def blocky_item(size: int = 64, seed: int = 0, weights: bool = True) -> dict:
    """Classes in 8x8 blocks (few edges), image channel 0 = classes / 2, read-only arrays."""
    rng = np.random.default_rng(seed)
    classes = np.kron(rng.integers(0, 3, (size // 8, size // 8)), np.ones((8, 8), int)).astype(np.uint8)
    image = np.stack([classes / 2, rng.random((size, size)), np.full((size, size), 0.5)]).astype(np.float32)
    item = {"image": image, "classes": classes}
    if weights:
        item["weights"] = (1 + classes).astype(np.float32)
    for array in item.values():
        array.flags.writeable = False
    return item


@pytest.mark.parametrize("config", [AugmentConfig(), ALL_ON, OFF])
@pytest.mark.parametrize("with_weights", [True, False])
def test_shapes_dtypes_and_label_values(config, with_weights):
    aug = build_augmentation(config)
    item = blocky_item(weights=with_weights)
    for seed in range(6):
        out = aug(item, seed=seed)
        assert set(out) == set(item)
        assert out["image"].shape == (3, 64, 64) and out["image"].dtype == np.float32
        assert out["classes"].shape == (64, 64) and out["classes"].dtype == np.int64
        assert set(np.unique(out["classes"])) <= {0, 1, 2}
        assert np.isfinite(out["image"]).all()
        assert out["image"].min() >= 0 and out["image"].max() <= 1
        if with_weights:
            assert out["weights"].shape == (64, 64) and out["weights"].dtype == np.float32


def test_flips_and_rot90_move_image_and_classes_together():
    aug = build_augmentation(replace(OFF, flip_prob=0.5, rot90_prob=0.5))
    item = blocky_item()
    changed = 0
    for seed in range(8):
        out = aug(item, seed=seed)
        np.testing.assert_array_equal(out["image"][0] * 2, out["classes"])
        np.testing.assert_array_equal(out["weights"], 1 + out["classes"])
        changed += not np.array_equal(out["classes"], item["classes"])
    assert changed >= 4


def test_rotation_and_scaling_keep_image_and_classes_aligned():
    aug = build_augmentation(replace(OFF, rotate_prob=1, scale_prob=1))
    item = blocky_item()
    for seed in range(6):
        out = aug(item, seed=seed)
        agree = np.mean(np.rint(out["image"][0] * 2) == out["classes"])
        assert agree > 0.9, (seed, agree)  # bilinear vs nearest differ only on block edges
        assert not np.array_equal(out["classes"], item["classes"])


def test_reflection_padding_leaves_no_black_corners():
    aug = build_augmentation(replace(OFF, rotate_prob=1, scale_prob=1, scale_range=(0.7, 0.8)))
    item = blocky_item()
    for seed in range(6):
        out = aug(item, seed=seed)
        assert out["image"][2].min() > 0.49  # the constant channel stays constant
        assert out["weights"].min() > 0.99


def test_same_seed_same_output_regardless_of_call_order():
    item = blocky_item()
    first = build_augmentation(ALL_ON)(item, seed=7)
    aug = build_augmentation(ALL_ON)
    aug(item, seed=1)
    aug(item, seed=2)
    again = aug(item, seed=7)
    for key in item:
        np.testing.assert_array_equal(first[key], again[key])
    other = aug(item, seed=8)
    assert not np.array_equal(first["image"], other["image"])


def test_missing_weights_do_not_change_image_or_classes():
    aug = build_augmentation(ALL_ON)
    with_w = aug(blocky_item(), seed=3)
    without = aug(blocky_item(weights=False), seed=3)
    np.testing.assert_array_equal(with_w["image"], without["image"])
    np.testing.assert_array_equal(with_w["classes"], without["classes"])


def test_all_probabilities_zero_is_identity():
    item = blocky_item()
    out = build_augmentation(OFF)(item, seed=5)
    for key in item:
        np.testing.assert_array_equal(out[key], item[key])


def test_intensity_transforms_touch_only_the_image():
    intensity = replace(OFF, histogram_prob=1, gamma_prob=1, brightness_prob=1, blur_prob=1, noise_prob=1)
    item = blocky_item()
    out = build_augmentation(intensity)(item, seed=0)
    np.testing.assert_array_equal(out["classes"], item["classes"])
    np.testing.assert_array_equal(out["weights"], item["weights"])
    assert not np.array_equal(out["image"], item["image"])


def test_config_round_trip_and_unknown_key():
    config = AugmentConfig(gamma_range=(0.8, 1.2), noise_prob=0.0)
    values = config.to_dict()
    assert values["gamma_range"] == [0.8, 1.2]
    assert AugmentConfig.from_dict(values) == config
    with pytest.raises(ValueError, match="flip_probability"):
        AugmentConfig.from_dict({"flip_probability": 0.5})


@pytest.mark.parametrize(
    "values",
    [{"flip_prob": 1.5}, {"gamma_range": [1.5, 0.7]}, {"histogram_points": 2}, {"rotate_degrees": 270}, {"clip_range": [1, 1]}],
)
def test_invalid_settings_rejected(values):
    with pytest.raises(ValueError):
        AugmentConfig.from_dict(values)


def test_output_does_not_depend_on_torch_thread_count():
    # torch's multi-channel CPU bilinear resize rounds differently with 1 and 2 threads;
    # DataLoader workers run with 1 thread, the main process with more.
    aug = build_augmentation(replace(OFF, scale_prob=1, scale_range=(1.2, 1.4), rotate_prob=1, blur_prob=1))
    item = blocky_item()
    threads = torch.get_num_threads()
    try:
        outputs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            outputs.append([aug(item, seed=seed) for seed in range(3)])
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(*outputs):
        for key in item:
            np.testing.assert_array_equal(one[key], two[key])


def test_colour_grey_and_inversion():
    item = blocky_item()
    inverted = build_augmentation(replace(OFF, invert_prob=1.0))(item, seed=0)
    assert np.allclose(inverted["image"], 1.0 - item["image"], atol=1e-6)
    assert np.array_equal(inverted["classes"], item["classes"])  # labels never change with intensity
    grey = build_augmentation(replace(OFF, grey_prob=1.0))(item, seed=0)["image"]
    assert np.allclose(grey, item["image"].mean(axis=0, keepdims=True), atol=1e-6)
    coloured = build_augmentation(replace(OFF, colour_prob=1.0, colour_range=(0.5, 0.9)))(item, seed=0)["image"]
    gains = coloured[2] / item["image"][2]  # channel 2 is constant 0.5
    assert np.allclose(gains, gains.flat[0]) and 0.5 <= gains.flat[0] <= 0.9
    assert np.array_equal(build_augmentation(replace(OFF, colour_prob=1.0))(item, seed=4)["image"],
                          build_augmentation(replace(OFF, colour_prob=1.0))(item, seed=4)["image"])
