"""ONNX Runtime and OpenVINO backends: same outputs as eager PyTorch, cached exports, fallbacks."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import MMCELLS

from cellnest import runtime
from cellnest.io import list_images, read_image
from cellnest.models import load_segmenter
from cellnest.nets import build_model
from cellnest.runtime import RuntimeNet, available_backends, cached_onnx, network_key, on_backend
from cellnest.sizemodel import pooled_features

RUNTIMES = [pytest.param(b, marks=pytest.mark.skipif(b not in available_backends(), reason=f"{b} not installed"))
            for b in ("onnx", "openvino")]
CPU = torch.device("cpu")
DEMO = Path(__file__).resolve().parents[1] / "demo"
# Float32 on every backend; summation order differs, so logits agree to ~1e-4 (measured:
# 7.5e-5 ONNX Runtime, 2.1e-4 OpenVINO on the shipped attn-unetpp).
LOGIT_TOLERANCE = 1e-3
PROBABILITY_TOLERANCE = 1e-3  # measured on real crops: 1.3e-4 (OpenVINO)


@pytest.fixture()
def small_net():
    torch.manual_seed(0)
    return build_model("attn_unetpp", features=[4, 4, 8, 8, 16, 4], gates=["1,2", "0,3"]).eval()


@pytest.mark.parametrize("backend", RUNTIMES)
@pytest.mark.parametrize("shape", [(1, 3, 64, 64), (2, 3, 48, 80), (1, 3, 37, 23)])
def test_backend_logits_equal_eager(small_net, backend, shape, tmp_path):
    fast = on_backend(small_net, backend, CPU, cache=tmp_path)
    assert isinstance(fast.net, RuntimeNet) and fast.net.backend == backend
    x = torch.rand(*shape)
    with torch.no_grad():
        expected = small_net(x)
        got = fast(x)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got.numpy(), expected.numpy(), atol=LOGIT_TOLERANCE)


@pytest.mark.parametrize("backend", RUNTIMES)
def test_backend_size_features_equal_eager(small_net, backend, tmp_path):
    image = np.random.default_rng(0).random((3, 96, 72), dtype=np.float32)
    expected = pooled_features(small_net, image)
    got = pooled_features(on_backend(small_net, backend, CPU, cache=tmp_path), image)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_export_is_cached_by_weights(small_net, tmp_path):
    path = cached_onnx(small_net.net, tmp_path)
    stamp = path.stat().st_mtime_ns
    assert cached_onnx(small_net.net, tmp_path) == path and path.stat().st_mtime_ns == stamp  # reused, not re-exported
    before = network_key(small_net.net)
    with torch.no_grad():
        next(small_net.parameters()).add_(1.0)
    assert network_key(small_net.net) != before
    assert cached_onnx(small_net.net, tmp_path) != path  # new weights, new file


def test_missing_runtime_falls_back_to_torch_with_a_note(small_net, monkeypatch, caplog, tmp_path):
    monkeypatch.setattr(runtime, "available_backends", lambda: ["torch"])
    with caplog.at_level(logging.WARNING, logger="cellnest.runtime"):
        assert on_backend(small_net, "onnx", CPU, cache=tmp_path) is small_net
    assert "onnxruntime is not installed" in caplog.text
    assert on_backend(small_net, "auto", CPU, cache=tmp_path) is small_net


def test_network_that_does_not_export_stays_on_torch(small_net, monkeypatch, caplog, tmp_path):
    if "onnx" not in available_backends():
        pytest.skip("onnxruntime not installed")

    def refuse(*_args, **_kwargs):
        raise RuntimeError("unsupported operator aten::foo")

    monkeypatch.setattr(runtime, "export_onnx", refuse)
    with caplog.at_level(logging.WARNING, logger="cellnest.runtime"):
        assert on_backend(small_net, "onnx", CPU, cache=tmp_path) is small_net
    assert "aten::foo" in caplog.text and "using PyTorch" in caplog.text


def test_unknown_backend_is_refused(small_net):
    with pytest.raises(ValueError, match="backend must be one of"):
        on_backend(small_net, "tensorrt", CPU)


@pytest.mark.parametrize("backend", RUNTIMES)
def test_shipped_model_segments_real_images_as_eager(backend, tmp_path, monkeypatch, mmcells_or_demo):
    """The default model's probabilities and cells on real images match eager PyTorch."""
    monkeypatch.setenv("CELLNEST_CACHE", str(tmp_path))
    eager = load_segmenter("attn-unetpp", device="cpu", backend="torch")
    fast = load_segmenter("attn-unetpp", device="cpu", backend=backend)
    assert isinstance(fast.predictor.models[0].net, RuntimeNet)
    for path in mmcells_or_demo:
        image = read_image(path)[:384, :384]  # a crop keeps the three runs short
        labels, size = eager.run(image)
        fast_labels, fast_size = fast.run(image)
        assert fast_size.diameter == pytest.approx(size.diameter, rel=1e-3), path.name
        assert np.mean(fast_labels == labels) >= 0.999, path.name
        normalised = np.asarray(image[:256, :256] / max(float(image.max()), 1), np.float32)
        np.testing.assert_allclose(fast.probabilities(normalised), eager.probabilities(normalised), atol=PROBABILITY_TOLERANCE)


@pytest.fixture()
def mmcells_or_demo() -> list[Path]:
    """One real image per modality of tuning/ when the data is present, else two demo images."""
    manifest = MMCELLS / "tuning" / "manifest.csv"
    if not manifest.is_file():
        return list_images(DEMO / "images")[:2]
    by_stem = {p.stem: p for p in list_images(MMCELLS / "tuning" / "images")}
    first: dict[str, Path] = {}
    for row in csv.DictReader(manifest.open()):
        if row["name"] in by_stem:
            first.setdefault(row["modality"], by_stem[row["name"]])
    return list(first.values())
