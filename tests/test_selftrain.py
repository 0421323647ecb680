"""One round of each semi-supervised method on synthetic images, a few steps each."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from cellnest.cli import main
from cellnest.io import read_labels
from cellnest.modelfile import ModelFile
import cellnest.selftrain
from cellnest.selftrain import _turn
from cellnest.synthetic import write_synthetic_folder

TINY = [
    "model.name=unet", "model.cfg={channels: [8, 16, 32], strides: [2, 2], num_res_units: 1}",
    "data.patch_size=64", "data.batch_size=2", "data.patches_per_epoch=4", "predictor.tile=128",
    "train.val_every=1", "train.tune_postprocess=false", "selftrain.unlabeled_batch=2",
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("semi")
    for part, count, seed in (("labeled", 4, 1), ("unlabeled", 3, 20), ("val", 2, 40)):
        write_synthetic_folder(root / part, count=count, seed=seed)
    for label in (root / "unlabeled" / "labels").iterdir():  # unlabelled means no labels
        label.unlink()
    return root


def _args(folders: Path, out: Path, method: str, *extra: str) -> list[str]:
    args = ["-q", "selftrain", "--recipe", "re-unet", "--method", method, "--rounds", "1", "--labeled", str(folders / "labeled"),
            "--unlabeled", str(folders / "unlabeled"), "--val", str(folders / "val"), "--out", str(out), "--steps", "3", "--device", "cpu"]
    for item in TINY:
        args += ["--set", item]
    return args + list(extra)


def test_pseudo_label_round(folders, tmp_path, monkeypatch):
    monkeypatch.setenv("CELLNEST_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "pl"
    starts, build = {}, cellnest.selftrain.build_trainer

    def recording(recipe, samples, val, run, *args, init_weights=None, **kwargs):
        trainer, finish = build(recipe, samples, val, run, *args, init_weights=init_weights, **kwargs)
        starts[run.path.name] = {k: v.clone() for k, v in trainer.model.state_dict().items()}  # before any step
        return trainer, finish

    monkeypatch.setattr(cellnest.selftrain, "build_trainer", recording)
    assert main(_args(folders, out, "pseudo_label", "--set", "selftrain.confidence=0.5", "--overlays", "2")) == 0
    # the student's first weights are the teacher's best model, not a fresh initialisation
    teacher = ModelFile.load(out / "round0" / "model.pt").state_dict
    assert set(starts) == {"round0", "round1"} and teacher.keys() == starts["round1"].keys()
    assert all(torch.equal(starts["round1"][k], v.float() if v.is_floating_point() else v) for k, v in teacher.items())
    assert not all(torch.equal(starts["round0"][k], v) for k, v in teacher.items())
    pseudo = sorted((out / "round1" / "pseudo").glob("*_label.tiff"))
    images = sorted((folders / "unlabeled" / "images").iterdir())
    assert len(pseudo) == 3 and len(list((out / "round1" / "pseudo").glob("*_overlay.png"))) == 2
    for path in pseudo:
        labels = read_labels(path)
        assert labels.ndim == 2 and labels.shape == (320, 320)
    for r in (0, 1):
        assert (out / f"round{r}" / "model.pt").is_file() and (out / f"round{r}" / "metrics.csv").is_file()
    rows = list(csv.DictReader(open(out / "selftrain.csv")))
    assert [int(r["round"]) for r in rows] == [0, 1] and "f1_all" in rows[0]
    assert "| round |" in (out / "selftrain.md").read_text()
    # the student started from the teacher's weights at the fine-tuning learning rate
    assert "lr: 0.003" in (out / "round1" / "recipe.yaml").read_text()
    assert len(images) == 3


def test_control_arm_and_resume_reuses_finished_rounds(folders, tmp_path, monkeypatch):
    monkeypatch.setenv("CELLNEST_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "ctl"
    assert main(_args(folders, out, "pseudo_label", "--control")) == 0
    rows = list(csv.DictReader(open(out / "selftrain.csv")))
    assert [(r["round"], r["arm"]) for r in rows] == [("0", "teacher"), ("1", "student"), ("1", "supervised only")]
    # the twin starts from the teacher with the student's recipe, on the labelled images only
    assert "lr: 0.003" in (out / "control1" / "recipe.yaml").read_text()
    assert torch.load(out / "control1" / "checkpoint.pt", weights_only=True)["state"]["step"] == 3
    assert "supervised only" in (out / "selftrain.md").read_text()

    def no_pseudo_labels(*args, **kwargs):
        raise AssertionError("a finished round predicted its pseudo-labels again")

    original = cellnest.selftrain.pseudo_label
    monkeypatch.setattr(cellnest.selftrain, "pseudo_label", no_pseudo_labels)
    assert main(_args(folders, out, "pseudo_label", "--control", "--resume")) == 0
    assert list(csv.DictReader(open(out / "selftrain.csv"))) == rows
    # a larger budget continues the round on pseudo-labels again (args: --steps 3 then --steps 5)
    calls = []
    monkeypatch.setattr(cellnest.selftrain, "pseudo_label", lambda *a, **k: calls.append(1) or original(*a, **k))
    assert main(_args(folders, out, "pseudo_label", "--control", "--resume", "--steps", "5")) == 0
    assert calls == [1]
    for arm in ("round1", "control1"):
        assert torch.load(out / arm / "checkpoint.pt", weights_only=True)["state"]["step"] == 5


def test_consistency_round_with_mean_teacher(folders, tmp_path, monkeypatch):
    monkeypatch.setenv("CELLNEST_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "cons"
    assert main(_args(folders, out, "consistency", "--set", "selftrain.ema=0.9")) == 0
    checkpoint = torch.load(out / "round1" / "checkpoint.pt", weights_only=True)
    assert checkpoint["state"]["step"] == 3 and "teacher" in checkpoint["extra"]  # EMA teacher is checkpointed
    assert ModelFile.load(out / "round1" / "model.pt").meta["recipe"] == "re-unet"
    rows = list(csv.DictReader(open(out / "selftrain.csv")))
    assert len(rows) == 2


def test_turn_is_inverted_by_negative_turns():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    turned = _turn(x, [1, 3], [False, False])
    assert torch.equal(_turn(turned, [-1, -3], [False, False]), x)
    assert not torch.equal(turned, x)
    np.testing.assert_array_equal(_turn(x, [0, 0], [True, True]).numpy(), x.flip(3).numpy())
