"""Shipping a run: float16 weights that load, and a card whose figures are measured on them."""

from __future__ import annotations

import shutil

import pytest
import torch

from cellnest.cli import main
from cellnest.data import load_folder
from cellnest.evaluate import score_segmenter
from cellnest.metrics import summarize
from cellnest.models import load_segmenter
from cellnest.ship import ship_model, training_sources
from cellnest.synthetic import write_synthetic_folder


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A two-step run of a tiny UNet on synthetic images, and its validation folder."""
    root = tmp_path_factory.mktemp("ship")
    write_synthetic_folder(root / "train", count=4, seed=3)
    write_synthetic_folder(root / "val", count=2, seed=7)
    args = ["-q", "train", "--recipe", "unet", "--data", str(root / "train"), "--val", str(root / "val"),
            "--out", str(root / "run"), "--device", "cpu", "--steps", "2", "--cache", str(root / "cache"),
            "--set", "model.cfg={channels: [8, 16, 32], strides: [2, 2], num_res_units: 1}",
            "--set", "data.patch_size=64", "--set", "data.batch_size=2", "--set", "predictor.tile=128"]
    assert main(args) == 0
    return root


def test_ship_writes_half_weights_and_a_measured_card(run, tmp_path):
    train = tmp_path / "train"
    shutil.copytree(run / "train", train)
    names = [p.stem for p in sorted((train / "images").iterdir())]
    sources = [("lab1", "DIC", "CC0-1.0")] * (len(names) - 1) + [("lab2", "fluorescence", "MIT")]
    (train / "manifest.csv").write_text("name,modality,source,license\n" + "".join(f"{n},{m},{s},{lic}\n" for n, (s, m, lic) in zip(names, sources)))
    shipped = ship_model(run / "run", "tiny", run / "val", tmp_path / "weights", tmp_path / "train", "cellnest train ...", speed_side=256)
    state = torch.load(shipped.weights, weights_only=True)["state_dict"]
    assert all(v.dtype == torch.float16 for v in state.values() if v.is_floating_point())
    # the card's table is what the shipped file scores now
    again = summarize(score_segmenter(load_segmenter(str(shipped.weights), device="cpu"), load_folder(run / "val"))[0])
    assert again == shipped.summary
    card = shipped.card.read_text()
    assert f"| all | 2 | {again['all']['mean_f1']:.4f} | {again['all']['median_f1']:.4f} |" in card
    assert f"| lab1 | DIC | CC0-1.0 | {len(names) - 1} |" in card and "| lab2 | fluorescence | MIT | 1 |" in card
    assert "`cellnest train ...`" in card and "256 x 256 RGB image" in card
    assert shipped.seconds_large > 0 and shipped.seconds_per_image > 0
    diameter = torch.load(shipped.weights, weights_only=True)["meta"]["cell_diameter"]
    assert 5 < diameter < 60 and f"{diameter} px" in card  # synthetic cells: semi-axes 6-14 px


def test_ship_cli_from_a_model_file_without_sources(run, tmp_path, capsys):
    args = ["-q", "ship", str(run / "run" / "model.pt"), "--name", "tiny", "--val", str(run / "val"), "--out", str(tmp_path),
            "--speed-side", "128"]
    assert main(args) == 0
    card = (tmp_path / "tiny.md").read_text()
    assert "Training data: not recorded" in card and "| all | 2 |" in capsys.readouterr().out
    assert "optimistic by that selection" in card  # --val is the run's validation folder
    assert main(args) == 2 and "already exists; use --force" in capsys.readouterr().err
    assert main(args + ["--force", "--tile", "96"]) == 0
    assert torch.load(tmp_path / "tiny.pt", weights_only=True)["predictor"]["tile"] == 96
    assert "'tile': 96" in (tmp_path / "tiny.md").read_text()


def test_ship_refuses_bad_input_before_writing(run, tmp_path):
    with pytest.raises(ValueError, match="must be lower-case"):
        ship_model(run / "run", "Bad Name", run / "val", tmp_path)
    with pytest.raises(ValueError, match="lacks column"):
        training_sources(run / "train")  # the synthetic manifest has no licence column
    header_only = tmp_path / "data"
    header_only.mkdir()
    (header_only / "manifest.csv").write_text("name,modality,source,license\n")
    with pytest.raises(ValueError, match="lists no images"):
        ship_model(run / "run", "tiny", run / "val", tmp_path / "out", train_data=header_only)
    with pytest.raises(ValueError, match="is the model being shipped"):
        ship_model(run / "run", "model", run / "val", run / "run")
    assert not (tmp_path / "out").exists() and (run / "run" / "model.pt").is_file()
