"""Training: the loss falls, a SIGKILLed run resumes to the identical model, and DDP runs."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cellnest.cli import main
from cellnest.models import load_segmenter
from cellnest.synthetic import write_synthetic_folder
from cellnest.run import parse_duration

TINY = [
    "model.name=unet", "model.cfg={channels: [8, 16, 32], strides: [2, 2], num_res_units: 1}",
    "data.patch_size=64", "data.batch_size=4", "data.patches_per_epoch=16",
    "optimizer.lr=3e-3", "predictor.tile=128", "train.val_every=2", "train.checkpoint_minutes=100",
]


def _train_args(data: Path, out: Path, *extra: str) -> list[str]:
    args = ["-q", "train", "--recipe", "unet", "--data", str(data / "train"), "--out", str(out), "--device", "cpu"]
    for item in TINY:
        args += ["--set", item]
    return args + list(extra)


@pytest.fixture(scope="module")
def split(tmp_path_factory) -> Path:
    """train/ (6 synthetic images) and val/ (2) in the challenge layout."""
    root = tmp_path_factory.mktemp("split")
    for part, count, seed in (("train", 6, 10), ("val", 2, 50)):
        write_synthetic_folder(root / part, count=count, seed=seed)
    return root


def test_training_reduces_loss_and_writes_the_run(split, tmp_path, monkeypatch):
    monkeypatch.setenv("CELLNEST_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    assert main(_train_args(split, out, "--val", str(split / "val"), "--epochs", "8")) == 0
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [2, 4, 6, 8]
    losses = [float(r["train_loss"]) for r in rows]
    assert losses[-1] < 0.8 * losses[0], losses
    assert {"f1_all", "f1_fluorescence", "f1_brightfield"} <= set(rows[0])
    for name in ("model.pt", "checkpoint.pt", "recipe.yaml", "curves.png", "report.md"):
        assert (out / name).is_file(), name
    assert "Training report: unet" in (out / "report.md").read_text()
    segmenter = load_segmenter(str(out / "model.pt"), device="cpu")  # the run's model segments
    assert segmenter.predictor.config.tile == 128



def test_run_folder_is_never_silently_overwritten(split, tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "model.pt").write_bytes(b"an earlier run")
    assert main(_train_args(split, tmp_path / "run", "--epochs", "1")) == 2
    assert "already holds a run (model.pt); use --resume" in capsys.readouterr().err
    assert (tmp_path / "run" / "model.pt").read_bytes() == b"an earlier run"
    assert main(_train_args(split, tmp_path / "fresh", "--epochs", "1", "--resume")) == 2
    assert "nothing to resume" in capsys.readouterr().err


def test_resume_refuses_a_changed_recipe(split, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CELLNEST_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    assert main(_train_args(split, out, "--steps", "2")) == 0
    assert main(_train_args(split, out, "--steps", "4", "--resume", "--set", "optimizer.lr=1e-2")) == 2
    assert "differs from the run's recipe.yaml in ['optimizer']" in capsys.readouterr().err
    assert main(_train_args(split, out, "--steps", "4", "--resume")) == 0  # same recipe, bigger budget: continues
    assert torch.load(out / "checkpoint.pt", weights_only=True)["state"]["step"] == 4


def test_parse_duration():
    assert parse_duration("90s") == 90 and parse_duration("30m") == 1800 and parse_duration("1h30m") == 5400
    with pytest.raises(ValueError, match="cannot read duration"):
        parse_duration("soon")


def _final_weights(out: Path) -> dict:
    return torch.load(out / "checkpoint.pt", weights_only=True)["model"]


def test_sigkill_then_resume_equals_uninterrupted(split, tmp_path):
    env = {**os.environ, "CELLNEST_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    # Dropout on, so the torch RNG state matters; checkpoint every 3 steps; 20 steps in all.
    extra = ["--steps", "20", "--set", "train.checkpoint_steps=3", "--set", "model.cfg.dropout=0.2",
             "--set", "train.val_every=2", "--val", str(split / "val")]
    reference = tmp_path / "reference"
    subprocess.run([sys.executable, "-m", "cellnest", *_train_args(split, reference, *extra)], check=True, env=env)

    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "cellnest", *_train_args(split, killed, *extra)], env=env)
    deadline = time.monotonic() + 120
    while not (killed / "checkpoint.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    step_at_kill = torch.load(killed / "checkpoint.pt", weights_only=True)["state"]["step"]
    assert step_at_kill < 20
    subprocess.run([sys.executable, "-m", "cellnest", *_train_args(split, killed, *extra), "--resume"], check=True, env=env)

    final = torch.load(killed / "checkpoint.pt", weights_only=True)
    assert final["state"]["step"] == 20
    expected = _final_weights(reference)
    for key, value in _final_weights(killed).items():
        assert torch.equal(value, expected[key]), key
    reference_ckpt = torch.load(reference / "checkpoint.pt", weights_only=True)
    for a, b in zip(final["optimizer"]["state"].values(), reference_ckpt["optimizer"]["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert final["state"]["best_f1"] == reference_ckpt["state"]["best_f1"]
    best_killed = torch.load(killed / "model.pt", weights_only=True)
    best_reference = torch.load(reference / "model.pt", weights_only=True)
    assert best_killed["postprocess"] == best_reference["postprocess"]
    assert all(torch.equal(v, best_reference["state_dict"][k]) for k, v in best_killed["state_dict"].items())
    assert _f1_rows(killed) == _f1_rows(reference)


def test_loader_workers_never_change_the_run(split, tmp_path, monkeypatch):
    """Patches are a pure function of their index: two persistent workers, stopped in the
    middle of an epoch and resumed, train the very weights the main process does alone."""
    monkeypatch.setenv("CELLNEST_CACHE", str(tmp_path / "cache"))
    alone, workers = tmp_path / "alone", tmp_path / "workers"
    assert main(_train_args(split, alone, "--steps", "10", "--set", "data.num_workers=0")) == 0
    assert main(_train_args(split, workers, "--steps", "6", "--set", "data.num_workers=2")) == 0  # 4 steps an epoch
    assert main(_train_args(split, workers, "--steps", "10", "--set", "data.num_workers=2", "--resume")) == 0
    expected, got = (torch.load(run / "checkpoint.pt", weights_only=True) for run in (alone, workers))
    assert got["state"]["step"] == expected["state"]["step"] == 10
    assert expected["model"].keys() == got["model"].keys()
    assert all(torch.equal(expected["model"][k], got["model"][k]) for k in expected["model"])


def _f1_rows(run: Path) -> list[dict]:
    """metrics.csv without its wall-clock and loss-average columns."""
    return [{k: v for k, v in r.items() if k.startswith("f1_") or k in ("epoch", "step")} for r in csv.DictReader(open(run / "metrics.csv"))]


def test_ddp_two_processes_on_cpu(split, tmp_path):
    env = {**os.environ, "CELLNEST_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29517",
               "-m", "cellnest", *_train_args(split, out, "--steps", "4", "--set", "train.tune_postprocess=false",
                                               "--val", str(split / "val"))]
    subprocess.run(command, check=True, env=env, timeout=300)
    state = torch.load(out / "checkpoint.pt", weights_only=True)["state"]
    assert state["step"] == 4 and state["finished"]
    assert (out / "model.pt").is_file() and (out / "metrics.csv").is_file()


def test_cross_validation_folds(split, tmp_path, monkeypatch):
    monkeypatch.setenv("CELLNEST_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "cv"
    assert main(_train_args(split, out, "--folds", "all", "--steps", "1", "--set", "cv.folds=2", "--set", "train.tune_postprocess=false")) == 0
    for k in (0, 1):
        assert (out / f"fold{k}" / "model.pt").is_file() and (out / f"fold{k}" / "metrics.csv").is_file()
    table = (out / "folds.md").read_text()
    assert "| fold0 |" in table and "| fold1 |" in table and "mean +/- sd" in table
    from cellnest.models import load_segmenter

    ensemble = load_segmenter([str(out / "fold0"), str(out / "fold1")], device="cpu")  # folds ensemble
    assert len(ensemble.predictor.models) == 2


def test_fine_tuning_starts_from_the_given_model(split, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CELLNEST_CACHE", str(tmp_path / "cache"))
    first, tuned = tmp_path / "first", tmp_path / "tuned"
    assert main(_train_args(split, first, "--steps", "2")) == 0
    # lr 1e-12: after one step the fine-tuned model still holds the starting weights
    assert main(_train_args(split, tuned, "--steps", "1", "--init", str(first / "model.pt"), "--set", "optimizer.lr=1e-12")) == 0
    start = torch.load(first / "model.pt", weights_only=True)["state_dict"]
    after = torch.load(tuned / "model.pt", weights_only=True)["state_dict"]
    assert start.keys() == after.keys() and all(torch.allclose(start[k].float(), after[k].float(), atol=1e-8) for k in start)
    fresh = tmp_path / "fresh"  # the same run without --init ends elsewhere: the weights did come from --init
    assert main(_train_args(split, fresh, "--steps", "1", "--set", "optimizer.lr=1e-12")) == 0
    other_start = torch.load(fresh / "model.pt", weights_only=True)["state_dict"]
    assert not all(torch.allclose(start[k].float(), other_start[k].float(), atol=1e-8) for k in start)
    assert torch.load(tuned / "model.pt", weights_only=True)["meta"]["init"] == str(first / "model.pt")
    other = ["--set", "model.cfg={channels: [8, 16], strides: [2], num_res_units: 1}"]
    assert main(_train_args(split, tmp_path / "bad", "--steps", "1", "--init", str(first / "model.pt"), *other)) == 2
    assert "not the network of recipe unet" in capsys.readouterr().err


def test_training_at_one_cell_size_ships_its_size_and_size_model(split, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CELLNEST_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "sized"
    sized = ["--set", "data.diameter=24", "--set", "data.scale_jitter=0.5"]
    assert main(_train_args(split, out, "--val", str(split / "val"), "--epochs", "2", *sized)) == 0
    bundle = torch.load(out / "model.pt", weights_only=True)
    assert bundle["meta"]["cell_diameter"] == 24.0 and bundle["meta"]["size_normalised"] is True
    assert bundle["size_model"]["coef"] and bundle["meta"]["size_model_fit"]["windows"] >= 10
    segmenter = load_segmenter(str(out / "model.pt"), device="cpu")
    assert segmenter.diameter == "auto" and segmenter.estimator == "size_model"
    # leave-one-source-out: a source the data does not have is a one-line error
    assert main(_train_args(split, tmp_path / "loso", "--steps", "1", "--set", "data.exclude_sources=[nowhere]")) == 2
    assert "no images of source(s) ['nowhere']" in capsys.readouterr().err


def test_the_loop_alone_trains_a_1x1_convolution_from_a_list(tmp_path):
    """The trainer needs no recipe, network registry or data set: a 1x1 convolution, a
    list of batches and a cross-entropy train, stop on the budget and resume exactly."""
    import torch.nn.functional as F

    from cellnest.run import Budget, RunFolder
    from cellnest.train import Trainer

    rng = torch.Generator().manual_seed(0)
    images = [torch.randn(2, 3, 8, 8, generator=rng) for _ in range(4)]
    batches = [{"image": x, "classes": x.argmax(1)} for x in images]  # learnable by a 1x1 convolution

    def cross_entropy(outputs, classes, weights):
        return F.cross_entropy(outputs[0], classes)

    def trainer(run: Path, budget: Budget) -> Trainer:
        torch.manual_seed(0)
        model = torch.nn.Conv2d(3, 3, 1)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 0.9**epoch)
        return Trainer(model, cross_entropy, optimizer, scheduler, batches, None, RunFolder(run), budget=budget, progress=False)

    def mean_loss(model) -> float:
        with torch.no_grad():
            return float(np.mean([cross_entropy([model(b["image"])], b["classes"], None) for b in batches]))

    whole = trainer(tmp_path / "whole", Budget(epochs=5))
    before = mean_loss(whole.model)
    state = whole.fit()
    assert (state.epoch, state.step, state.finished) == (5, 20, True)
    assert mean_loss(whole.model) < 0.5 * before
    assert len(list(csv.DictReader(open(tmp_path / "whole" / "metrics.csv")))) == 5

    cut = trainer(tmp_path / "cut", Budget(epochs=5, steps=7))  # stops inside the second epoch
    assert cut.fit().step == 7
    resumed = trainer(tmp_path / "cut", Budget(epochs=5))
    resumed.resume()
    assert (resumed.state.epoch, resumed.state.batch_in_epoch) == (1, 3)
    resumed.fit()
    assert all(torch.equal(a, b) for a, b in zip(whole.model.state_dict().values(), resumed.model.state_dict().values()))
