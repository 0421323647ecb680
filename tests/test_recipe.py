from __future__ import annotations

import pytest
import torch

from cellnest.nets import build_model
from cellnest.losses import build_loss
from cellnest.recipe import RecipeError, load_recipe, recipe_names
from cellnest.assemble import loader_workers


def test_shipped_recipes_load_and_build():
    assert {"attn-unetpp", "re-unet", "unet", "unetpp", "unetr", "swin-unetr"} <= set(recipe_names())
    for name in recipe_names():
        recipe = load_recipe(name)
        assert recipe.name == name and recipe.source
        build_loss(recipe.loss.name, **recipe.loss.cfg)
        if name in ("attn-unetpp", "re-unet", "unet"):  # the cheap ones; all are built in test_nets
            build_model(recipe.model.name, **recipe.model.cfg)


def test_paper_settings_are_the_recipes_defaults():
    attn = load_recipe("attn-unetpp")
    assert attn.model.cfg["gates"] == ["1,2", "2,1", "0,3"]
    assert (attn.optimizer.name, attn.optimizer.lr, attn.data.batch_size, attn.data.patch_size) == ("adamw", 1e-4, 8, 256)
    assert attn.loss.cfg == {"lambda_focal": 0.5, "lambda_dice": 0.5} and attn.postprocess.morphology == "closing"
    re_unet = load_recipe("re-unet")
    assert (re_unet.optimizer.name, re_unet.optimizer.momentum, re_unet.optimizer.nesterov, re_unet.optimizer.lr) == ("sgd", 0.99, True, 1e-2)
    assert (re_unet.scheduler.name, re_unet.scheduler.step_epochs, re_unet.scheduler.gamma, re_unet.train.epochs) == ("step", 250, 0.5, 500)
    assert re_unet.targets.weight_maps and (re_unet.targets.w0, re_unet.targets.sigma) == (10.0, 5.0)
    assert re_unet.cv.folds == 5 and re_unet.postprocess.method == "components"


def test_overrides_parse_yaml_values():
    recipe = load_recipe("attn-unetpp", ["optimizer.lr=3e-4", "model.cfg.gates=['2,1', '0,3']", "data.patch_size=128"])
    assert recipe.optimizer.lr == 3e-4 and recipe.model.cfg["gates"] == ["2,1", "0,3"] and recipe.data.patch_size == 128
    assert "lr: 0.0003" in recipe.to_yaml()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["optimizer.lrr=1"], r"optimizer: unknown key\(s\) \['lrr'\]"),
        (["optimizer.name=adam"], "optimizer name must be"),
        (["oops"], "expected section.key=value"),
        (["colour.x=1"], r"unknown section\(s\) \['colour'\]"),
        (["postprocess.method=magic"], "method must be one of"),
        (["data.modality_balance=2"], r"modality_balance must be in \[0, 1\]"),
    ],
)
def test_bad_overrides_name_the_key(overrides, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe("unet", overrides)


def test_unknown_recipe_and_bad_yaml(tmp_path):
    with pytest.raises(RecipeError, match="unknown recipe 'nope'"):
        load_recipe("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(RecipeError, match="invalid YAML"):
        load_recipe(bad)


def test_differences_compare_resolved_values():
    plain = load_recipe("unet")
    assert plain.differences(load_recipe("unet", ["train.seed=0"])) == []  # the default written out
    assert plain.differences(load_recipe("unet", ["train.seed=1", "optimizer.lr=1e-3"])) == ["optimizer", "train"]
    assert plain.differences(load_recipe("unet", ["selftrain.rounds=5"])) == []  # more rounds: the same rounds
    assert plain.differences(load_recipe("unet", ["selftrain.gamma_range=[0.7, 1.5]"])) == []  # a default as a list
    assert plain.differences(load_recipe("unet", ["selftrain.confidence=0.5"])) == ["selftrain"]
    assert plain.differences(load_recipe("unet", ["data.num_workers=4"])) == []  # workers never change a patch
    assert plain.differences(load_recipe("unet", ["data.batch_size=2"])) == ["data"]


def test_auto_loader_workers(monkeypatch):
    assert load_recipe("unet").data.num_workers == "auto"
    assert loader_workers("auto", torch.device("cpu")) == 0  # workers would take the network's cores
    assert loader_workers(3, torch.device("cpu")) == 3
    cuda = torch.device("cuda", 0)
    for cores, processes, expected in ((16, 1, 8), (4, 1, 3), (1, 1, 0), (16, 2, 7), (16, 8, 1)):
        monkeypatch.setattr("os.sched_getaffinity", lambda pid, n=cores: set(range(n)), raising=False)
        assert loader_workers("auto", cuda, processes) == expected, (cores, processes)
    with pytest.raises(RecipeError, match="num_workers must be 'auto'"):
        load_recipe("unet", ["data.num_workers=many"])
