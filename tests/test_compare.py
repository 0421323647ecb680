"""A two-variant, one-seed, few-step comparison on synthetic images: table and plot."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from cellnest.cli import main
from cellnest.compare import _slug, load_comparison, comparison_names, summarise
from cellnest.recipe import load_recipe
from cellnest.synthetic import write_synthetic_folder

TINY = ["model.name=unet", "model.cfg={channels: [8, 16, 32], strides: [2, 2], num_res_units: 1}",
        "data.patch_size=64", "data.batch_size=2", "data.patches_per_epoch=4", "predictor.tile=128",
        "train.val_every=1000", "train.tune_postprocess=false"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cmp")
    write_synthetic_folder(root / "train", count=4, seed=3)
    write_synthetic_folder(root / "val", count=3, seed=30)
    return root


def test_train_comparison_writes_table_and_plot(data, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CELLNEST_CACHE", str(tmp_path / "cache"))
    config = tmp_path / "two.yaml"
    config.write_text(
        "name: two\nkind: train\nbudget: {steps: 2}\nseeds: [0]\nval_images: 2\n"
        f"set: {TINY!r}\n"
        "variants:\n  - {name: slow lr, recipe: unet, set: ['optimizer.lr=1e-5']}\n  - {name: fast lr, recipe: unet}\n"
    )
    out = tmp_path / "out"
    argv = ["-q", "compare", str(config), "--data", str(data / "train"), "--val", str(data / "val"), "--out", str(out), "--device", "cpu"]
    assert main(argv) == 0
    rows = list(csv.DictReader(open(out / "table.csv")))
    assert {r["variant"] for r in rows} == {"slow lr", "fast lr"}
    overall = [r for r in rows if r["modality"] == "all"]
    assert all(float(r["ci_low"]) <= float(r["mean_f1"]) <= float(r["ci_high"]) and r["n_images"] == "2" for r in overall)
    assert "| slow lr | all | 2 |" in (out / "table.md").read_text() and "subset of 2 validation images" in (out / "table.md").read_text()
    assert (out / "bars.png").stat().st_size > 1000
    scored = [r["name"] for r in csv.DictReader(open(out / "slow_lr" / "seed0" / "scores.csv"))]
    assert scored == [r["name"] for r in csv.DictReader(open(out / "fast_lr" / "seed0" / "scores.csv"))] and len(scored) == 2
    assert not (out / "slow_lr" / "seed0" / "val_scores.csv").exists()  # trained without validation: the end-of-budget model
    stamp = (out / "fast_lr" / "seed0" / "model.pt").stat().st_mtime
    assert main(argv) == 0  # rerun: finished runs are reused, not retrained
    assert (out / "fast_lr" / "seed0" / "model.pt").stat().st_mtime == stamp
    # a run stopped before its first checkpoint starts over, and its old scores are not reused
    (out / "slow_lr" / "seed0" / "checkpoint.pt").unlink()
    (out / "slow_lr" / "seed0" / "scores.csv").write_text("name,modality,f1\nstale,x,1.0\n")
    assert main(argv) == 0
    assert torch.load(out / "slow_lr" / "seed0" / "checkpoint.pt", weights_only=True)["state"]["step"] == 2
    assert [r["name"] for r in csv.DictReader(open(out / "slow_lr" / "seed0" / "scores.csv"))] == scored


def test_selftrain_comparison_has_teacher_student_and_control_rows(data, tmp_path, monkeypatch):
    monkeypatch.setenv("CELLNEST_CACHE", str(tmp_path / "cache"))
    unlabeled = tmp_path / "unlabeled"
    write_synthetic_folder(unlabeled, count=2, seed=50)
    config = tmp_path / "st.yaml"
    config.write_text("name: st\nkind: selftrain\nbudget: {steps: 2}\nseeds: [0]\n"
                      f"set: {[*TINY, 'selftrain.overlays=0']!r}\nvariants:\n  - {{name: r, recipe: re-unet, set: ['selftrain.rounds=1']}}\n")
    out = tmp_path / "st"
    assert main(["-q", "compare", str(config), "--data", str(data / "train"), "--unlabeled", str(unlabeled),
                 "--val", str(data / "val"), "--out", str(out), "--device", "cpu"]) == 0
    variants = [r["variant"] for r in csv.DictReader(open(out / "table.csv")) if r["modality"] == "all"]
    assert variants == ["teacher", "1 round", "1 round, supervised only"]
    references = {r["variant"]: r["reference"] for r in csv.DictReader(open(out / "table.csv"))}
    assert references == {"teacher": "teacher", "1 round": "teacher", "1 round, supervised only": "1 round"}
    for arm in ("round0", "round1", "control1"):  # every row was scored per image on the 3 validation images
        assert len(list(csv.DictReader(open(out / "seed0" / arm / "scores.csv")))) == 3


def test_postprocess_comparison_on_one_model(data, tmp_path, monkeypatch):
    from cellnest.data import TargetConfig
    from cellnest.modelfile import ModelFile, NetworkSpec
    from cellnest.postprocess import PostprocessConfig
    from cellnest.predict import PredictorConfig

    monkeypatch.setenv("CELLNEST_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    spec = NetworkSpec("unet", {"channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1})
    ModelFile.of(spec.build(), spec, TargetConfig(), PredictorConfig(tile=128), PostprocessConfig()).save(tmp_path / "m.pt")
    out = tmp_path / "pp"
    assert main(["-q", "compare", "postprocess", "--val", str(data / "val"), "--out", str(out), "--model", str(tmp_path / "m.pt"), "--device", "cpu"]) == 0
    variants = {r["variant"] for r in csv.DictReader(open(out / "table.csv"))}
    assert variants == {"none", "closing", "opening", "both", "components", "watershed"}


def test_shipped_comparisons_load_and_bootstrap_brackets_the_mean():
    assert set(comparison_names()) == {"table3", "table4", "postprocess", "selftrain", "selftrain-consistency"}
    assert [v.name for v in load_comparison("table3").variants] == ["U-Net", "UNETR", "Swin-UNETR", "U-Net++", "Attention U-Net++"]
    assert len(load_comparison("table4").variants) == 7
    assert load_comparison("table3").variants[-1].vs == "U-Net++"  # what the gates add
    for name in comparison_names():  # every shipped variant resolves to a valid recipe
        comparison = load_comparison(name)
        for variant in comparison.variants:
            if variant.recipe:
                load_recipe(variant.recipe, [*comparison.set, *variant.set])
    runs = [[("a", "x", 0.5), ("b", "x", 0.7), ("c", "y", 0.9)], [("a", "x", 0.6), ("b", "x", 0.8), ("c", "y", 1.0)]]
    rows = {(r["variant"], r["modality"]): r for r in summarise({"v": runs})}
    assert rows[("v", "all")]["mean_f1"] == pytest.approx(0.75) and rows[("v", "all")]["sd"] == pytest.approx(np.std([0.7, 0.8], ddof=1))
    assert rows[("v", "x")]["n_images"] == 2 and rows[("v", "y")]["mean_f1"] == pytest.approx(0.95)
    assert rows[("v", "all")]["ci_low"] <= 0.75 <= rows[("v", "all")]["ci_high"]
    # a variant better by 0.1 on every image: the paired interval is exactly +0.1, unlike the per-variant ones
    better = [[(n, m, f + 0.1) for n, m, f in run] for run in runs]
    rows = {(r["variant"], r["modality"]): r for r in summarise({"ref": runs, "better": better})}
    assert rows[("ref", "all")]["delta"] == 0.0
    assert rows[("better", "all")]["delta_low"] == pytest.approx(0.1) and rows[("better", "all")]["delta_high"] == pytest.approx(0.1)
    assert rows[("better", "all")]["seeds_above"] == 2 and rows[("ref", "all")]["seeds_above"] == 0
    assert rows[("better", "all")]["ci_high"] - rows[("better", "all")]["ci_low"] > 0.1
    rows = {(r["variant"], r["modality"]): r for r in summarise({"ref": runs, "better": better}, references={"ref": "better"})}
    assert rows[("ref", "all")]["reference"] == "better" and rows[("ref", "all")]["delta"] == pytest.approx(-0.1)
    with pytest.raises(ValueError, match="same images"):
        summarise({"ref": runs, "other": [[("z", "x", 0.5), ("b", "x", 0.7), ("c", "y", 0.9)]]})
    with pytest.raises(ValueError, match="number of seeds"):
        summarise({"ref": runs, "one seed": runs[:1]})


def test_bootstrap_holds_the_spread_between_seeds():
    """Two seeds of one variant 0.3 above and 0.3 below the reference on every image: an
    image-only bootstrap would call the difference exactly 0; resampling seeds does not."""
    ref = [[(f"i{k}", "x", 0.5) for k in range(20)]] * 2
    noisy = [[(n, m, f + 0.3) for n, m, f in ref[0]], [(n, m, f - 0.3) for n, m, f in ref[0]]]
    row = {r["variant"]: r for r in summarise({"ref": ref, "noisy": noisy}) if r["modality"] == "all"}["noisy"]
    assert row["delta"] == pytest.approx(0.0) and row["seeds_above"] == 1
    assert row["delta_low"] == pytest.approx(-0.3) and row["delta_high"] == pytest.approx(0.3)
    assert row["ci_low"] == pytest.approx(0.2) and row["ci_high"] == pytest.approx(0.8)


def test_variant_folders_are_distinct():
    assert _slug("U-Net++") == "U-Netpp" and _slug("U-Net") == "U-Net" and _slug("G12+G21") == "G12_and_G21"
    assert len({_slug(v.name) for v in load_comparison("table3").variants}) == 5


@pytest.mark.parametrize("text, message", [
    ("kind: train\nvariants: [{name: a, recipe: unet}]", "needs an equal budget"),
    ("kind: train\nbudget: {steps: 1}\nval_images: 0\nvariants: [{name: a, recipe: unet}]", "val_images must be a positive integer"),
    ("kind: train\nbudget: {steps: 1}\nvariants: [{name: 'a b', recipe: unet}, {name: 'a_b', recipe: unet}]", "would share a run folder"),
    ("kind: train\nbudget: {steps: 1}\nvariants: [{name: a, recipe: unet}, {name: b, recipe: unet, vs: c}]",
     "vs must name another variant, got 'c'"),
    ("kind: selftrain\nbudget: {steps: 1}\nvariants: [{name: a, recipe: unet}, {name: b, recipe: unet, vs: a}]",
     "selftrain comparisons take no vs"),
])
def test_bad_comparison_files(tmp_path, text, message):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text + "\n")
    with pytest.raises(ValueError, match=message):
        load_comparison(bad)


def test_unknown_comparison_name():
    with pytest.raises(ValueError, match="unknown comparison 'nope'"):
        load_comparison("nope")
