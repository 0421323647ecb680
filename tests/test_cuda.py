"""The CUDA paths: AMP training and resume, GPU inference against the CPU, the shipped
models on a GPU, consistency self-training under autocast, and DDP over NCCL.

Every test here skips without CUDA (CI and the 2-core development machine have none);
they run on a lent GPU machine with ``pytest tests/test_cuda.py``.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cellnest.cli import main
from cellnest.models import load_segmenter
from cellnest.nets import build_model
from cellnest.predict import Predictor, PredictorConfig, resolve_device
from cellnest.synthetic import write_synthetic_folder

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

SMALL = [
    "model.cfg.features=[16, 16, 32, 64, 128, 16]", "data.patch_size=128", "data.batch_size=4",
    "data.patches_per_epoch=16", "predictor.tile=256", "train.val_every=2", "train.checkpoint_minutes=100",
]


@pytest.fixture(scope="module")
def split(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cuda")
    for part, count, seed in (("train", 6, 10), ("val", 2, 50), ("unlabeled", 3, 20)):
        write_synthetic_folder(root / part, count=count, seed=seed)
    for label in (root / "unlabeled" / "labels").iterdir():
        label.unlink()
    return root


def _train(split: Path, out: Path, *extra: str) -> int:
    args = ["-q", "train", "--recipe", "attn-unetpp", "--data", str(split / "train"), "--val", str(split / "val"),
            "--out", str(out), "--device", "cuda"]
    for item in SMALL:
        args += ["--set", item]
    return main(args + list(extra))


def test_cuda_devices_get_an_index():
    assert resolve_device("cuda").index == torch.cuda.current_device()
    assert resolve_device("auto").type == "cuda" and resolve_device("auto").index is not None
    with pytest.raises(ValueError, match="CUDA device"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")


def test_amp_training_resumes_and_segments_on_the_cpu(split, tmp_path, monkeypatch):
    monkeypatch.setenv("CELLNEST_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    assert _train(split, out, "--epochs", "4", "--set", "train.tune_postprocess=false") == 0
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["scaler"]["scale"] > 0 and ckpt["rng_cuda"], "AMP scaler and CUDA RNG are checkpointed"
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [2, 4] and all(np.isfinite(float(r["train_loss"])) for r in rows)
    # a larger budget continues from the CUDA checkpoint (scaler, CUDA RNG)
    assert _train(split, out, "--epochs", "6", "--set", "train.tune_postprocess=false", "--resume") == 0
    assert torch.load(out / "checkpoint.pt", weights_only=True)["state"]["epoch"] == 6
    segmenter = load_segmenter(str(out / "model.pt"), device="cpu")  # trained on the GPU, used on a CPU
    labels = segmenter(np.random.default_rng(0).random((200, 240, 3), dtype=np.float32))
    assert labels.shape == (200, 240)


# float32 convolutions on CUDA use TF32 (10-bit mantissa) by default, hence 5e-3
@pytest.mark.parametrize("amp, atol", [(False, 5e-3), (True, 2e-2)])
def test_gpu_probabilities_match_the_cpu(amp, atol):
    torch.manual_seed(0)
    model = build_model("attn_unetpp", features=[16, 16, 32, 64, 128, 16])
    image = np.random.default_rng(1).random((3, 300, 410), dtype=np.float32)
    config = PredictorConfig(tile=256, overlap=0.25, amp=amp)
    cpu = Predictor(model, config, device="cpu")(image)
    gpu = Predictor(model, config, device="cuda")(image)  # channels_last and, if amp, float16 on CUDA
    assert gpu.dtype == np.float32 and gpu.shape == cpu.shape
    np.testing.assert_allclose(gpu, cpu, atol=atol)


@pytest.mark.parametrize("name", ["attn-unetpp", "re-unet"])
def test_shipped_models_score_alike_on_gpu_and_cpu(name, tmp_path, capsys):
    folder = tmp_path / "data"
    write_synthetic_folder(folder, count=4, seed=7)
    scores = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / device
        assert main(["-q", "segment", str(folder), "--out", str(out), "--model", name, "--device", device]) == 0
        assert main(["-q", "evaluate", "--pred", str(out), "--gt", str(folder)]) == 0
        scores[device] = json.loads((out / "evaluation.json").read_text())["summary"]["all"]["mean_f1"]
    assert scores["cuda"] == pytest.approx(scores["cpu"], abs=0.02), scores


def test_consistency_self_training_under_autocast(split, tmp_path, monkeypatch):
    monkeypatch.setenv("CELLNEST_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "semi"
    args = ["-q", "selftrain", "--recipe", "attn-unetpp", "--method", "consistency", "--rounds", "1",
            "--labeled", str(split / "train"), "--unlabeled", str(split / "unlabeled"), "--val", str(split / "val"),
            "--out", str(out), "--steps", "4", "--device", "cuda", "--set", "train.tune_postprocess=false",
            "--set", "selftrain.unlabeled_batch=2"]
    for item in SMALL:
        args += ["--set", item]
    assert main(args) == 0
    rows = list(csv.DictReader(open(out / "selftrain.csv")))
    assert [int(r["round"]) for r in rows] == [0, 1] and all(np.isfinite(float(r["f1_all"])) for r in rows)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL DDP needs two GPUs")
def test_ddp_two_gpus_over_nccl(split, tmp_path):
    env = {**os.environ, "CELLNEST_CACHE": str(tmp_path / "cache")}
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29519",
               "-m", "cellnest", "-q", "train", "--recipe", "attn-unetpp", "--data", str(split / "train"),
               "--val", str(split / "val"), "--out", str(out), "--steps", "4", "--set", "train.tune_postprocess=false"]
    for item in SMALL:
        command += ["--set", item]
    subprocess.run(command, check=True, env=env, timeout=600)
    state = torch.load(out / "checkpoint.pt", weights_only=True)["state"]
    assert state["step"] == 4 and state["finished"]
