from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from conftest import disk
from scipy import ndimage as ndi

from cellnest.metrics import score_image
from cellnest.postprocess import METHODS, PostprocessConfig, fill_small_holes, probabilities_to_instances
from cellnest.synthetic import SyntheticSpec, probabilities_from_instances, synthetic_cells
from cellnest.validate import tune_postprocess
from cellnest.targets import instances_to_classes

TOUCHING = SyntheticSpec(shape=(96, 96), n_cells=16, radius=(5, 9), min_gap=0.45)  # many cells touch
SEPARATE = SyntheticSpec(shape=(96, 96), n_cells=10, radius=(5, 9), min_gap=1.3)  # none touch
SEEDS = range(4)


def _mean_f1(method_kwargs: dict, spec: SyntheticSpec, blur: float, noise: float, at: float = 0.5) -> float:
    scores = []
    for seed in SEEDS:
        labels = synthetic_cells(spec, seed)[1]
        probs = probabilities_from_instances(labels, blur=blur, noise=noise, seed=seed)
        pred = probabilities_to_instances(probs, PostprocessConfig(**method_kwargs))
        scores.append(score_image(labels, pred).f1_at[at])
    return float(np.mean(scores))


# Bars: the mean F1 over SEEDS measured when these were written, minus a small margin.
@pytest.mark.parametrize(
    "kwargs, spec, blur, noise, measured, bar",
    [
        ({"method": "watershed"}, TOUCHING, 0.0, 0.0, 1.000, 0.98),
        ({"method": "watershed"}, TOUCHING, 1.5, 0.1, 1.000, 0.98),
        ({"method": "watershed"}, TOUCHING, 1.5, 0.2, 0.988, 0.95),
        ({"method": "components"}, TOUCHING, 0.0, 0.0, 0.985, 0.95),
        ({"method": "components", "grow": True}, TOUCHING, 0.0, 0.0, 1.000, 0.98),
        ({"method": "components"}, SEPARATE, 1.5, 0.2, 1.000, 0.98),
        ({"method": "closing"}, SEPARATE, 0.0, 0.0, 1.000, 0.98),
        ({"method": "closing"}, SEPARATE, 1.5, 0.2, 1.000, 0.98),
        ({"method": "closing", "grow": True}, SEPARATE, 1.0, 0.1, 1.000, 0.98),
    ],
)
def test_methods_recover_synthetic_instances(kwargs, spec, blur, noise, measured, bar):
    assert _mean_f1(kwargs, spec, blur, noise) >= bar


def test_closing_merges_touching_cells_by_construction():
    # A closing bridges the 2-pixel gap between touching interiors: the documented limit.
    assert _mean_f1({"method": "closing"}, TOUCHING, 0.0, 0.0) < 0.5  # measured 0.272


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        ({"method": "watershed"}, 1.0),
        ({"method": "components"}, 0.0),  # the interior alone: IoU < 0.9 for every cell
        ({"method": "components", "grow": True}, 1.0),
        ({"method": "closing"}, 0.0),
        ({"method": "closing", "grow": True}, 1.0),
    ],
)
def test_growing_restores_the_boundary_band(kwargs, expected):
    assert _mean_f1(kwargs, SEPARATE, 0.0, 0.0, at=0.9) == pytest.approx(expected)


def _two_touching_disks() -> np.ndarray:
    labels = np.zeros((48, 64), np.int32)
    labels[disk(labels.shape, (24, 22), 11)] = 1
    labels[disk(labels.shape, (24, 42), 11)] = 2  # overlaps: cell 2 occludes cell 1
    return labels


def test_watershed_separates_touching_cells_that_the_foreground_merges():
    labels = _two_touching_disks()
    probs = probabilities_from_instances(labels, blur=1.0)
    assert ndi.label(1 - probs[0] > 0.5)[1] == 1  # one foreground blob
    pred = probabilities_to_instances(probs, PostprocessConfig(method="watershed"))
    assert pred.max() == 2
    assert score_image(labels, pred, keep_border_cells=True).f1_at[0.9] == 1.0


def _cracked_cell() -> np.ndarray:
    labels = np.zeros((40, 40), np.int32)
    labels[disk(labels.shape, (20, 20), 13)] = 1
    probs = probabilities_from_instances(labels)
    probs[:, 8:33, 20] = [[1.0], [0.0], [0.0]]  # a 1-pixel background crack through the interior
    return probs


@pytest.mark.parametrize("morphology, n_cells", [("none", 2), ("opening", 2), ("closing", 1), ("both", 1)])
def test_closing_fills_a_one_pixel_crack(morphology, n_cells):
    pred = probabilities_to_instances(_cracked_cell(), PostprocessConfig(method="closing", morphology=morphology))
    assert pred.max() == n_cells


def _cells_and_specks() -> np.ndarray:
    labels = np.zeros((64, 64), np.int32)
    for i, centre in enumerate([(14, 14), (14, 48), (48, 30)], start=1):
        labels[disk(labels.shape, centre, 8)] = i
    probs = probabilities_from_instances(labels)
    for r, c in [(30, 4), (40, 58), (58, 4)]:
        probs[:, r : r + 2, c : c + 2] = [[[0.0]], [[1.0]], [[0.0]]]  # 4-pixel specks: below min_size
    probs[:, 30:34, 50:53] = [[[0.0]], [[1.0]], [[0.0]]]  # 12 pixels: above min_size, below 0.15 * typical
    return probs


@pytest.mark.parametrize("method", sorted(METHODS))
def test_small_objects_are_removed(method):
    probs = _cells_and_specks()
    assert probabilities_to_instances(probs, PostprocessConfig(method=method)).max() == 3
    keep_all = PostprocessConfig(method=method, min_size=0, min_size_fraction=0.0)
    assert probabilities_to_instances(probs, keep_all).max() == 7


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_hole_inside_a_cell_is_filled(method):
    labels = np.zeros((40, 40), np.int32)
    labels[disk(labels.shape, (20, 20), 13)] = 1
    probs = probabilities_from_instances(labels)
    probs[:, 19:22, 10:13] = [[[1.0]], [[0.0]], [[0.0]]]  # a 3x3 background hole
    pred = probabilities_to_instances(probs, PostprocessConfig(method=method, morphology="none"))
    assert pred.max() == 1 and (pred[19:22, 10:13] == 1).all()


@pytest.mark.parametrize(
    "labels, max_area, expected",
    [
        # hole enclosed by one cell -> filled
        ([[1, 1, 1], [1, 0, 1], [1, 1, 1]], 9, [[1, 1, 1], [1, 1, 1], [1, 1, 1]]),
        # hole not smaller than max_area -> kept
        ([[1, 1, 1], [1, 0, 1], [1, 1, 1]], 1, [[1, 1, 1], [1, 0, 1], [1, 1, 1]]),
        # gap between two cells -> kept
        ([[1, 1, 2], [1, 0, 2], [1, 2, 2]], 9, [[1, 1, 2], [1, 0, 2], [1, 2, 2]]),
        # background on the image edge -> kept
        ([[1, 1, 1], [1, 1, 0], [1, 1, 1]], 9, [[1, 1, 1], [1, 1, 0], [1, 1, 1]]),
    ],
)
def test_fill_small_holes(labels, max_area, expected):
    out = fill_small_holes(np.array(labels, np.int32), max_area)
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("fill", ["background", "uniform"])
def test_no_cells_gives_all_zeros(method, fill):
    probs = np.zeros((3, 24, 32), np.float32)
    if fill == "background":
        probs[0] = 1.0
    else:
        probs[:] = 1.0 / 3.0
    pred = probabilities_to_instances(probs, PostprocessConfig(method=method))
    assert pred.dtype == np.int32 and pred.shape == (24, 32) and not pred.any()


def test_empty_image():
    assert probabilities_to_instances(np.zeros((3, 0, 5), np.float32)).shape == (0, 5)


def test_output_is_int32_with_sequential_ids():
    labels = synthetic_cells(TOUCHING, 0)[1]
    pred = probabilities_to_instances(probabilities_from_instances(labels, blur=1.0))
    assert pred.dtype == np.int32
    np.testing.assert_array_equal(np.unique(pred), np.arange(pred.max() + 1))


@pytest.mark.parametrize(
    "probs, message",
    [
        (np.zeros((32, 32), np.float32), r"shape \(3, H, W\).*\(32, 32\)"),
        (np.zeros((32, 32, 3), np.float32), "channel-last"),
        (np.zeros((2, 32, 32), np.float32), r"\(2, 32, 32\)"),
        (np.zeros((1, 3, 32, 32), np.float32), r"\(1, 3, 32, 32\)"),
        (np.full((3, 8, 8), 4.0, np.float32), "logits"),
        (np.full((3, 8, 8), np.nan, np.float32), "NaN"),
        (np.zeros((3, 8, 8), bool), "dtype"),
    ],
)
def test_bad_probabilities_are_rejected(probs, message):
    with pytest.raises(ValueError, match=message):
        probabilities_to_instances(probs)


def test_tune_postprocess_beats_a_bad_threshold():
    truths = [synthetic_cells(TOUCHING, seed)[1] for seed in range(3)]
    probs = [probabilities_from_instances(t, blur=1.5, noise=0.1, seed=i) for i, t in enumerate(truths)]
    base = PostprocessConfig(method="watershed")
    best, f1 = tune_postprocess(probs, truths, base, {"seed_threshold": [0.3, 0.5, 0.7], "foreground_threshold": [0.5]})
    low = PostprocessConfig(seed_threshold=0.3)
    bad = np.mean([score_image(t, probabilities_to_instances(p, low)).f1 for p, t in zip(probs, truths)])
    assert best.seed_threshold == 0.7 and best.method == "watershed"
    assert f1 >= bad + 0.2  # measured: 1.000 vs 0.359 (0.534 at 0.5)
    again = np.mean([score_image(t, probabilities_to_instances(p, best)).f1 for p, t in zip(probs, truths)])
    assert f1 == pytest.approx(again)


def test_tune_postprocess_keeps_the_first_of_equal_scores():
    truth = synthetic_cells(SEPARATE, 0)[1]
    best, f1 = tune_postprocess([probabilities_from_instances(truth)], [truth], PostprocessConfig(), {"min_size": [8, 9, 10]})
    assert best.min_size == 8 and f1 == 1.0


@pytest.mark.parametrize(
    "probs, truths, grid, message",
    [
        ([np.ones((3, 8, 8)) / 3], [], {}, "1 probability maps but 0"),
        ([], [], {}, "at least one"),
        ([np.ones((3, 8, 8)) / 3], [np.zeros((8, 8), int)], {"seed_treshold": [0.5]}, "seed_treshold"),
        ([np.ones((3, 8, 8)) / 3], [np.zeros((8, 8), int)], {"seed_threshold": []}, "no values"),
        ([np.ones((3, 8, 8)) / 3], [np.zeros((8, 9), int)], {}, "does not match"),
        ([np.ones((3, 8, 8)) / 3], [np.zeros((8, 8), int)], {"seed_threshold": [2.0]}, "seed_threshold"),
    ],
)
def test_tune_postprocess_rejects_bad_input(probs, truths, grid, message):
    with pytest.raises(ValueError, match=message):
        tune_postprocess(probs, truths, PostprocessConfig(), grid)


def test_config_round_trips_through_json():
    config = PostprocessConfig(method="closing", interior_threshold=0.4, morphology="both", grow=True, connectivity=2)
    assert PostprocessConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert PostprocessConfig.from_dict({"method": "components"}) == PostprocessConfig(method="components")


def test_config_from_a_numpy_grid_is_json_ready():
    config = PostprocessConfig(seed_threshold=np.linspace(0.5, 0.7, 3)[1], min_size=np.int64(4))
    assert json.loads(json.dumps(config.to_dict()))["seed_threshold"] == pytest.approx(0.6)
    assert type(config.min_size) is int


def test_config_rejects_unknown_keys():
    with pytest.raises(ValueError, match="colsing_radius"):
        PostprocessConfig.from_dict({"method": "closing", "colsing_radius": 3})


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"method": "stardist"}, "method"),
        ({"morphology": "open_close"}, "morphology"),
        ({"interior_threshold": 1.5}, "interior_threshold"),
        ({"seed_threshold": "0.5"}, "seed_threshold"),
        ({"closing_radius": -1}, "closing_radius"),
        ({"min_size": 2.5}, "min_size"),
        ({"min_size_fraction": 2.0}, "min_size_fraction"),
        ({"grow": "yes"}, "grow"),
        ({"connectivity": 3}, "connectivity"),
    ],
)
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PostprocessConfig(**kwargs)


def test_registry_is_read_only():
    assert set(METHODS) == {"closing", "components", "watershed"}
    with pytest.raises(TypeError):
        METHODS["mine"] = lambda probs, config: probs[0]  # type: ignore[index]


@pytest.mark.parametrize("blur, noise", [(0.0, 0.0), (1.0, 0.0), (1.0, 0.2)])
def test_probabilities_from_instances_is_a_softmax_map(blur, noise):
    labels = synthetic_cells(TOUCHING, 1)[1]
    probs = probabilities_from_instances(labels, blur=blur, noise=noise, seed=3)
    assert probs.shape == (3,) + labels.shape and probs.dtype == np.float32
    assert probs.min() >= 0 and np.allclose(probs.sum(axis=0), 1.0, atol=1e-5)
    if blur == 0 and noise == 0:
        np.testing.assert_array_equal(probs.argmax(axis=0), instances_to_classes(labels))
    if noise:
        np.testing.assert_array_equal(probs, probabilities_from_instances(labels, blur=blur, noise=noise, seed=3))
        assert not np.array_equal(probs, probabilities_from_instances(labels, blur=blur, noise=noise, seed=4))


def test_boundary_width_round_trip():
    labels = synthetic_cells(SEPARATE, 2)[1]
    probs = probabilities_from_instances(labels, boundary_width=2)
    assert score_image(labels, probabilities_to_instances(probs)).f1_at[0.9] == 1.0


def test_tune_postprocess_can_weigh_every_group_alike():
    # Group "a" (3 images): 4 big cells and 8 specks the network invents; group "b" (1
    # image): 4 small real cells. min_size 200 removes the specks and b's cells: image mean
    # 0.75 against 0.625 for min_size 8, but mean over groups 0.5 against 0.75.
    def disks(radius, centres):
        labels = np.zeros((100, 100), np.int32)
        for i, centre in enumerate(centres, 1):
            labels[disk(labels.shape, centre, radius)] = i
        return labels

    big = disks(12, [(25, 25), (25, 75), (75, 25), (75, 75)])
    specks = big.copy()
    for i, (r, c) in enumerate([(50, 8 + 12 * k) for k in range(8)], start=5):
        specks[r - 3:r + 4, c - 3:c + 4] = i
    small = disks(5, [(25, 25), (25, 75), (75, 25), (75, 75)])
    probs = [probabilities_from_instances(specks)] * 3 + [probabilities_from_instances(small)]
    truths = [big] * 3 + [small]
    grid = {"min_size": [8, 200]}
    base = PostprocessConfig(method="components")
    by_image, f1_image = tune_postprocess(probs, truths, base, grid)
    by_group, f1_group = tune_postprocess(probs, truths, base, grid, groups=["a", "a", "a", "b"])
    assert (by_image.min_size, f1_image) == (200, pytest.approx(0.75))
    assert (by_group.min_size, f1_group) == (8, pytest.approx(0.75))
    with pytest.raises(ValueError, match="groups"):
        tune_postprocess(probs, truths, base, grid, groups=["a"])
