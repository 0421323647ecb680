"""`cellnest plan`: a fingerprint of a labelled folder and the plan its rules make."""

from __future__ import annotations

import pytest
import yaml

from cellnest.cli import main
from cellnest.plan import fingerprint, make_plan, plan_overrides, read_plan, receptive_field
from cellnest.recipe import load_recipe


def _print(diameters: list[float]) -> dict:
    images = [{"name": str(i), "modality": "m", "height": 100, "width": 100, "channels": 3, "diameter": d, "cells": 5,
               "p1": 0.0, "p99": 1.0} for i, d in enumerate(diameters)]
    return {"folder": "x", "images": images, "modalities": {"m": {"n": len(images), "diameter_median": 1, "diameter_p5": 1,
                                                                 "diameter_p95": 1, "height_median": 100, "width_median": 100}}}


def test_rules_on_known_fingerprints():
    plan = make_plan(_print([15.0, 20.0, 110.0] * 10))  # like mmcells: nuclei to DIC
    assert plan["data"] == {"diameter": 30.0, "patch_size": 192, "batch_size": 4}
    assert plan["network"]["stages"] == 5 and receptive_field(5) >= 90 > receptive_field(4)
    small = make_plan(_print([4.0] * 20), device="cuda")  # bacteria: 4x upscaling at most
    assert small["data"]["diameter"] == 16.0 and small["data"]["patch_size"] == 96
    assert small["data"]["batch_size"] == round(8 * 256 * 256 / 96**2)
    with pytest.raises(ValueError, match="no labelled cells"):
        make_plan(_print([None]))


def test_plan_command_writes_a_plan_that_train_applies(synthetic_folder, tmp_path, capsys):
    out = tmp_path / "plan.yaml"
    assert main(["-q", "plan", str(synthetic_folder), "--out", str(out)]) == 0
    plan = read_plan(out)
    measured = fingerprint(synthetic_folder, progress=False)
    assert len(measured["images"]) == 8 and all(i["diameter"] > 0 for i in measured["images"])
    assert plan["fingerprint"]["images"] == 8 and "diameter" in capsys.readouterr().out
    recipe = load_recipe("attn-unetpp", plan_overrides(plan) + ["data.batch_size=2"])  # --set still wins
    assert recipe.data.diameter == plan["data"]["diameter"] and recipe.data.patch_size == plan["data"]["patch_size"]
    assert recipe.data.batch_size == 2
    assert main(["-q", "plan", str(synthetic_folder), "--out", str(out)]) == 2  # never overwritten silently
    out.write_text(yaml.safe_dump({"data": {"colour": 1}}))
    with pytest.raises(ValueError, match="not a cellnest plan"):
        read_plan(out)
