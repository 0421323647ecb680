from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cellnest.nets import build_model
from cellnest.predict import Predictor, PredictorConfig, window_size

TINY_UNET = {"channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1}


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return build_model("unet", **TINY_UNET)


def test_one_window_equals_whole_image_forward(tiny_model):
    image = np.random.default_rng(0).random((3, 60, 70), dtype=np.float32)
    predictor = Predictor(tiny_model, PredictorConfig(tile=128), device="cpu")
    probs = predictor(image)
    with torch.inference_mode():
        expected = torch.softmax(tiny_model(torch.from_numpy(image)[None]), 1)[0].numpy()
    assert probs.shape == (3, 60, 70) and probs.dtype == np.float32
    np.testing.assert_allclose(probs, expected, atol=1e-5)
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-5)


def test_overlapping_windows_blend_to_probabilities(tiny_model):
    image = np.random.default_rng(1).random((3, 150, 97), dtype=np.float32)
    for blend in ("gaussian", "constant"):
        probs = Predictor(tiny_model, PredictorConfig(tile=64, overlap=0.5, blend=blend), device="cpu")(image)
        assert probs.shape == (3, 150, 97)
        np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-4)


def test_tta_averages_the_flipped_predictions():
    # A 3x3 convolution with random weights is not flip-equivariant: TTA must differ from
    # the plain prediction and equal the mean of the four un-flipped predictions.
    torch.manual_seed(0)
    model = torch.nn.Conv2d(3, 3, 3, padding=1)
    image = np.random.default_rng(2).random((3, 40, 50), dtype=np.float32)
    config = PredictorConfig(tile=64, overlap=0.25)  # one window: the whole image
    plain = Predictor(model, config, device="cpu")(image)
    tta = Predictor(model, PredictorConfig(tile=64, overlap=0.25, tta=True), device="cpu")(image)
    x = torch.from_numpy(image)[None]
    with torch.no_grad():
        expected = sum(torch.softmax(model(x.flip(d) if d else x), 1).flip(d) if d else torch.softmax(model(x), 1)
                       for d in ((), (2,), (3,), (2, 3))) / 4
    np.testing.assert_allclose(plain, torch.softmax(model(x), 1)[0].detach().numpy(), atol=1e-5)
    np.testing.assert_allclose(tta, expected[0].numpy(), atol=1e-5)
    assert np.abs(tta - plain).max() > 1e-3


def test_ensemble_averages_probabilities():
    a, b = torch.nn.Conv2d(3, 3, 1), torch.nn.Conv2d(3, 3, 1)
    image = np.random.default_rng(3).random((3, 20, 20), dtype=np.float32)
    config = PredictorConfig(tile=32)
    mean = (Predictor(a, config, "cpu")(image) + Predictor(b, config, "cpu")(image)) / 2
    np.testing.assert_allclose(Predictor([a, b], config, "cpu")(image), mean, atol=1e-6)


@pytest.mark.parametrize(
    "values, message",
    [({"tile": 8}, "tile must be 16..8192"), ({"tile": 8193}, "tile must be 16..8192"), ({"overlap": 1.0}, "overlap"), ({"blend": "max"}, "blend"), ({"tiles": 3}, "unknown predictor setting")],
)
def test_bad_predictor_settings(values, message):
    with pytest.raises(ValueError, match=message):
        PredictorConfig.from_dict(values)


@pytest.mark.parametrize("side, tile, overlap, expected", [
    (60, 128, 0.25, 60),      # smaller than a tile: one window of its own size
    (1045, 1024, 0.25, 1045), # just above a tile: still one window, not four
    (1500, 1024, 0.25, 858),  # two windows, shrunk evenly: 2 * 858 - 0.25 * 858 >= 1500
    (4000, 1024, 0.25, 1000), # five windows either way, each a little smaller
])
def test_window_size_covers_the_side_with_the_least_work(side, tile, overlap, expected):
    size = window_size(side, tile, overlap)
    assert size == expected
    count = 1 if size >= side else math.ceil((side - size) / int(size * (1 - overlap))) + 1  # MONAI's window count
    assert count == (1 if side <= tile * 1.125 else math.ceil((side - tile * overlap) / (tile * (1 - overlap))))


def test_image_just_above_the_tile_runs_as_one_window(tiny_model):
    calls = []
    hook = tiny_model.register_forward_hook(lambda _m, inputs, _o: calls.append(tuple(inputs[0].shape)))
    try:
        Predictor(tiny_model, PredictorConfig(tile=64, batch_size=8), device="cpu")(np.zeros((3, 70, 66), np.float32))
    finally:
        hook.remove()
    assert calls == [(1, 3, 70, 66)]


def test_windows_run_one_at_a_time_on_the_cpu(tiny_model):
    calls = []
    hook = tiny_model.register_forward_hook(lambda _m, inputs, _o: calls.append(inputs[0].shape[0]))
    try:
        Predictor(tiny_model, PredictorConfig(tile=32, batch_size=8), device="cpu")(np.zeros((3, 96, 96), np.float32))
    finally:
        hook.remove()
    assert len(calls) > 1 and set(calls) == {1}  # batch_size applies on a GPU; the CPU takes cpu_batch_size (1)
