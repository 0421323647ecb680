from __future__ import annotations

import numpy as np
import pytest
import torch

from cellnest.nets import build_model
from cellnest.predict import Predictor, PredictorConfig

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


def test_tta_of_a_flip_equivariant_model_changes_nothing():
    # A 1x1 convolution commutes with flips, so flip TTA must return the plain prediction.
    model = torch.nn.Conv2d(3, 3, 1)
    image = np.random.default_rng(2).random((3, 40, 50), dtype=np.float32)
    plain = Predictor(model, PredictorConfig(tile=32, overlap=0.25), device="cpu")(image)
    tta = Predictor(model, PredictorConfig(tile=32, overlap=0.25, tta=True), device="cpu")(image)
    np.testing.assert_allclose(tta, plain, atol=1e-5)


def test_ensemble_averages_probabilities():
    a, b = torch.nn.Conv2d(3, 3, 1), torch.nn.Conv2d(3, 3, 1)
    image = np.random.default_rng(3).random((3, 20, 20), dtype=np.float32)
    config = PredictorConfig(tile=32)
    mean = (Predictor(a, config, "cpu")(image) + Predictor(b, config, "cpu")(image)) / 2
    np.testing.assert_allclose(Predictor([a, b], config, "cpu")(image), mean, atol=1e-6)


@pytest.mark.parametrize(
    "values, message",
    [({"tile": 8}, "tile must be >= 16"), ({"overlap": 1.0}, "overlap"), ({"blend": "max"}, "blend"), ({"tiles": 3}, "unknown predictor setting")],
)
def test_bad_predictor_settings(values, message):
    with pytest.raises(ValueError, match=message):
        PredictorConfig.from_dict(values)
