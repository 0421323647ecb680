"""The size model: features that see cell size, a ridge fit, and its trip through a model file."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import tifffile
import torch

from cellnest.data import Item, TargetConfig
from cellnest.io import write_labels
from cellnest.modelfile import ModelFile, NetworkSpec
from cellnest.models import load_segmenter
from cellnest.nets import build_model
from cellnest.normalize import image_percentiles
from cellnest.postprocess import PostprocessConfig
from cellnest.predict import PredictorConfig
from cellnest.sizemodel import SizeModel, estimate_diameter, fit_size_model, pooled_features, ridge
from test_diameter import disk_image

NETWORK = {"name": "attn_unetpp", "cfg": {"features": [4, 4, 8, 16, 32, 4], "gates": []}, "in_channels": 3, "out_channels": 3}


@pytest.fixture(scope="module")
def disk_items(tmp_path_factory) -> list[Item]:
    """30 images of disks with median diameters from 8 to 120 px (log-uniform)."""
    root = tmp_path_factory.mktemp("disks")
    rng = np.random.default_rng(0)
    items = []
    for i in range(30):
        diameter = float(2 ** rng.uniform(3, np.log2(120)))
        image, labels = disk_image(diameter, int(min(max(diameter * 7, 160), 560)), seed=i)
        tifffile.imwrite(root / f"{i}.tif", image)
        write_labels(root / f"{i}_label.tiff", labels)
        items.append(Item(str(i), root / f"{i}.tif", root / f"{i}_label.tiff", "synthetic"))
    return items


@pytest.fixture(scope="module")
def network() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(NETWORK["name"], **NETWORK["cfg"])


def test_pooled_features_have_one_length_for_any_image_size(network):
    small = pooled_features(network, np.random.default_rng(0).random((3, 64, 64), np.float32))
    large = pooled_features(network, np.random.default_rng(1).random((3, 160, 96), np.float32))
    assert small.shape == large.shape and small.ndim == 1 and small.size >= 64 and np.all(np.isfinite(small))


def test_ridge_recovers_a_linear_law():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 5))
    y = x @ np.array([1.0, -2.0, 0.0, 0.5, 0.0]) + 3.0
    mean, scale, coef, intercept = ridge(x, y, alpha=1e-6)
    assert np.allclose(((x - mean) / scale) @ coef + intercept, y, atol=1e-3)


def test_size_model_estimates_known_diameters(disk_items, network, tmp_path):
    # Even an untrained network's pooled features see cell size, to within 1.5x here (the
    # refinement pass of --diameter auto then corrects it on the cells found); a trained
    # network's error on real images is measured by benchmarks/diameter.py.
    fitted, stats = fit_size_model(network, disk_items, max_images=30, draws=3, window=256, progress=False)
    assert stats["windows"] >= 60 and stats["alpha"] in (0.01, 0.1, 1.0, 10.0)
    for diameter in (10.0, 30.0, 90.0):
        image, _ = disk_image(diameter, int(max(diameter * 7, 160)), seed=100 + int(diameter))
        estimate = estimate_diameter(network, fitted, image, image_percentiles(image))
        assert abs(np.log2(estimate / diameter)) < np.log2(1.5), (diameter, estimate)

    # Stored in a model file as plain numbers, read back by load_segmenter as its estimator.
    path = replace(ModelFile.of(network, NetworkSpec(**NETWORK), TargetConfig(), PredictorConfig(), PostprocessConfig(),
                                {"cell_diameter": 30.0, "size_normalised": True}), size_model=fitted.to_dict()).save(tmp_path / "m.pt")
    segmenter = load_segmenter(str(path), device="cpu")
    assert segmenter.diameter == "auto" and segmenter.estimator == "size_model"
    assert SizeModel.from_dict(torch.load(path, weights_only=True)["size_model"]) == fitted
    assert load_segmenter(str(path), device="cpu", diameter="native").diameter is None
    assert load_segmenter(str(path), device="cpu", estimator="search").estimator == "search"
