from __future__ import annotations

import numpy as np
import pytest
import torch

from cellnest.cli import main
from cellnest.data import TargetConfig
from cellnest.io import read_labels
from cellnest.modelfile import ModelFile, ModelFileError, NetworkSpec
from cellnest.models import ClassicalSegmenter, Segmenter, SizeInfo, load_segmenter
from cellnest.postprocess import PostprocessConfig
from cellnest.predict import PredictorConfig


TINY = NetworkSpec("unet", {"channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1})


def _save_tiny(path, half=False, **post):
    torch.manual_seed(0)
    model = TINY.build()
    saved = ModelFile.of(model, TINY, TargetConfig(), PredictorConfig(tile=64), PostprocessConfig(**post), {"note": "test"})
    (saved.half() if half else saved).save(path)
    return model


@pytest.mark.parametrize("half", [False, True])
def test_model_file_round_trip(tmp_path, half):
    model = _save_tiny(tmp_path / "m.pt", half=half)
    saved = ModelFile.load(tmp_path / "m.pt")
    assert saved.meta == {"note": "test"} and saved.predictor.tile == 64 and saved.network == TINY
    segmenter = load_segmenter(str(tmp_path / "m.pt"), device="cpu")
    reloaded = segmenter.predictor.models[0]
    for (k, a), b in zip(model.state_dict().items(), reloaded.state_dict().values()):
        tol = 1e-3 if half and a.is_floating_point() else 0
        torch.testing.assert_close(a.float(), b.float(), atol=tol, rtol=tol)
    labels = segmenter(np.random.default_rng(0).integers(0, 255, (70, 90, 3)).astype(np.uint8))
    assert labels.shape == (70, 90) and labels.dtype == np.int32


def test_run_folder_and_ensemble(tmp_path):
    (tmp_path / "run").mkdir()
    _save_tiny(tmp_path / "run" / "model.pt")
    _save_tiny(tmp_path / "b.pt")
    segmenter = load_segmenter([str(tmp_path / "run"), str(tmp_path / "b.pt")], device="cpu")
    assert len(segmenter.predictor.models) == 2


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "model file not found"),
        (b"garbage", "not a readable model file"),
        ("wrong-format", "not a cellnest model file"),
        ("bad-weights", "weights do not fit the network"),
    ],
)
def test_bad_model_files(tmp_path, content, message):
    path = tmp_path / "m.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content == "wrong-format":
        torch.save({"format": "something-else"}, path)
    elif content == "bad-weights":
        _save_tiny(path)
        bundle = torch.load(path, weights_only=True)
        bundle["network"]["cfg"]["channels"] = [8, 16, 32]
        torch.save(bundle, path)
    with pytest.raises(ModelFileError, match=message) as err:
        load_segmenter(str(path), device="cpu")
    assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)


def test_unknown_model_name():
    with pytest.raises(ValueError, match="unknown model 'nope'.*classical"):
        load_segmenter("nope")


def test_cli_segment_with_model_file_and_all_outputs(tmp_path, synthetic_folder):
    _save_tiny(tmp_path / "m.pt")
    out = tmp_path / "out"
    inputs = sorted((synthetic_folder / "images").iterdir())[:2]
    argv = ["-q", "segment", *map(str, inputs), "--out", str(out), "--model", str(tmp_path / "m.pt"),
            "--device", "cpu", "--tile", "128", "--overlap", "0.1", "--overlay", "--measure", "--geojson", "--rois"]
    assert main(argv) == 0
    assert len(list(out.glob("*_label.tiff"))) == 2
    for suffix in ("_overlay.png", "_cells.csv", "_cells.geojson", "_rois.zip"):
        assert len(list(out.glob(f"*{suffix}"))) == 2
    label = read_labels(next(out.glob("*_label.tiff")))
    assert label.ndim == 2


def test_tune_command_chooses_post_processing(tmp_path, synthetic_folder, monkeypatch, capsys):
    monkeypatch.setenv("CELLNEST_CACHE", str(tmp_path / "cache"))
    _save_tiny(tmp_path / "m.pt", method="components")
    argv = ["-q", "tune", "--model", str(tmp_path / "m.pt"), "--data", str(synthetic_folder), "--out", str(tmp_path / "tuned.pt"),
            "--limit", "2", "--device", "cpu"]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert all(f"| {m} |" in table for m in ("components", "closing", "watershed"))
    meta = ModelFile.load(tmp_path / "tuned.pt").meta
    assert set(meta["postprocess_methods_f1"]) == {"components", "closing", "watershed"}
    assert meta["postprocess_tuned_f1"] == max(meta["postprocess_methods_f1"].values())
    assert main(argv[:-4] + ["--out", str(tmp_path / "m.pt")]) == 2  # never overwrites its input


class _Phantom(Segmenter):
    """Finds one cell everywhere: stands in for a network that hallucinates on no signal."""

    def segment_normalized(self, image, tile=None):
        return np.ones(image.shape[:2], np.int32)


@pytest.mark.parametrize("image", [np.zeros((64, 64, 3), np.uint8), np.full((64, 64, 3), 77, np.uint16),
                                   np.ones((64, 64, 3), bool), np.full((64, 64, 3), -3.5, np.float32)])
def test_blank_or_constant_image_gives_zero_cells(image, caplog):
    with caplog.at_level("WARNING", logger="cellnest.models"):
        labels, size = _Phantom().run(image)
    assert labels.shape == (64, 64) and labels.max() == 0 and size == SizeInfo()
    assert "no contrast" in caplog.text


@pytest.mark.parametrize("dtype, top", [(np.uint8, 255), (np.float32, 1.0)])
def test_two_level_image_keeps_its_cells(dtype, top):
    from cellnest.synthetic import SyntheticSpec, synthetic_cells

    _, truth = synthetic_cells(SyntheticSpec(shape=(128, 128), n_cells=12, min_gap=1.2), seed=4)
    binary = np.repeat(((truth > 0) * top).astype(dtype)[..., None], 3, axis=-1)  # 0/255 mask-like image
    found = ClassicalSegmenter()(binary)
    assert found.max() >= 0.8 * truth.max()


def test_blocks_bound_the_network_window(tmp_path):
    """A huge image goes block by block with windows of at most ``block_tile``; a whole
    image keeps the model's own tile."""
    _save_tiny(tmp_path / "m.pt")  # tile 64
    segmenter = load_segmenter(str(tmp_path / "m.pt"), device="cpu", backend="torch")
    segmenter.block_tile, segmenter.block, segmenter.max_whole_pixels = 32, 96, 100 * 100
    windows = []
    net = segmenter.predictor.models[0]
    net.register_forward_pre_hook(lambda module, args: windows.append(tuple(args[0].shape[-2:])))
    image = np.random.default_rng(0).integers(0, 255, (90, 90, 3), np.uint8)
    segmenter(image)
    assert windows and max(max(w) for w in windows) > 32  # whole: windows of the model's own tile (64)
    windows.clear()
    segmenter(np.tile(image, (2, 2, 1)))  # 180 x 180 > max_whole_pixels: blocks
    assert windows and max(max(w) for w in windows) <= 32


def test_a_network_refuses_an_image_of_the_wrong_channel_count(tmp_path):
    """A runtime given one channel aborts the process (OpenVINO); the segmenter says so first."""
    _save_tiny(tmp_path / "m.pt")
    segmenter = load_segmenter(str(tmp_path / "m.pt"), device="cpu")
    with pytest.raises(ValueError, match="takes 3-channel images, got 1"):
        segmenter(np.random.default_rng(0).integers(0, 255, (40, 40, 1), np.uint8))
