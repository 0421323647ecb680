"""A dataset's fingerprint and the training plan made from it, as nnU-Net plans from its
fingerprint (the Re-Unet paper builds on that self-configuration).

``cellnest plan DATA --out plan.yaml`` measures a labelled folder and writes a short,
human-readable plan; ``cellnest train --plan plan.yaml`` takes the size-dependent values
from it (explicit ``--set`` values still win) and keeps it in the run folder and model file.

* :func:`fingerprint`: per image its modality, size, channels, median cell diameter (from
  the labels) and 1st/99th intensity percentiles; per modality their summaries.
* :func:`make_plan`: the rules, each a documented choice:

  - ``diameter`` (nnU-Net's target spacing): Cellpose's 30 px, lowered when the smallest
    typical cells (the 5th percentile of per-image diameters) would need more than the
    4x upscaling inference allows;
  - ``patch_size``: six target diameters across (several whole cells and their
    surroundings in every patch), rounded up to a multiple of 32;
  - ``stages``: the fewest U-Net stages (>= 4) whose receptive field spans three target
    diameters, while the bottleneck keeps at least 8 px of the patch;
  - ``batch_size``: the pixels per step a device affords (measured here: 4 x 192 px
    patches take about 1 s per attn-unetpp-cpu step on 2 CPU cores; 8 x 256 px patches
    on a GPU, the papers' batch) divided by the patch area.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import yaml
from tqdm import tqdm

from cellnest.data import load_folder
from cellnest.diameter import MAX_SCALE, median_diameter
from cellnest.io import atomic_write, read_image, read_labels
from cellnest.recipe import read_yaml

CELLPOSE_DIAMETER = 30.0
PIXELS_PER_STEP = {"cpu": 4 * 192 * 192, "cuda": 8 * 256 * 256}
PLAN_KEYS = ("diameter", "patch_size", "batch_size")  # what a plan sets in a recipe's data section


def fingerprint(folder: str | os.PathLike, progress: bool = True) -> dict:
    """Measure a labelled folder (challenge layout).

    Returns
    -------
    ``{"folder", "images": [{name, modality, height, width, channels, diameter, cells,
    p1, p99}], "modalities": {modality: {n, diameter_median, diameter_p5, diameter_p95,
    height_median, width_median}}}``; diameters in pixels (None for an image without cells).
    """
    items = load_folder(folder, require_labels=True)
    images = []
    for item in tqdm(items, desc="fingerprint", unit="img", disable=not progress):
        image = read_image(item.image, dtype=None)
        labels = read_labels(item.label)
        diameter = median_diameter(labels)
        low, high = np.percentile(image, [1, 99])
        images.append({
            "name": item.name, "modality": item.modality, "height": int(image.shape[0]), "width": int(image.shape[1]),
            "channels": int(image.shape[2]), "diameter": None if diameter is None else round(diameter, 2),
            "cells": int(np.count_nonzero(np.bincount(labels.ravel().astype(np.int64))[1:])),
            "p1": float(low), "p99": float(high),
        })
    modalities = {}
    for modality in sorted({i["modality"] for i in images}):
        members = [i for i in images if i["modality"] == modality]
        diameters = [i["diameter"] for i in members if i["diameter"] is not None]
        modalities[modality] = {
            "n": len(members),
            **_spread("diameter", diameters),
            "height_median": float(np.median([i["height"] for i in members])),
            "width_median": float(np.median([i["width"] for i in members])),
        }
    return {"folder": str(folder), "images": images, "modalities": modalities}


def _spread(name: str, values: Sequence[float]) -> dict:
    if not values:
        return {f"{name}_median": None, f"{name}_p5": None, f"{name}_p95": None}
    p5, median, p95 = np.percentile(values, [5, 50, 95])
    return {f"{name}_median": round(float(median), 2), f"{name}_p5": round(float(p5), 2), f"{name}_p95": round(float(p95), 2)}


def receptive_field(stages: int) -> int:
    """Receptive field (pixels) of a U-Net of ``stages`` resolutions with two 3x3 convs per
    stage on both paths: each conv at stride ``2**k`` widens it by ``2 * 2**k``."""
    encoder = sum(4 * 2**k for k in range(stages))
    decoder = sum(4 * 2**k for k in range(stages - 1))
    return 1 + encoder + decoder


def make_plan(print_: dict, device: str = "cpu") -> dict:
    """The plan for a fingerprint (see the module docstring for each rule)."""
    if device not in PIXELS_PER_STEP:
        raise ValueError(f"plan device must be one of {sorted(PIXELS_PER_STEP)}, got {device!r}")
    diameters = [i["diameter"] for i in print_["images"] if i["diameter"] is not None]
    if not diameters:
        raise ValueError(f"{print_['folder']}: no labelled cells to plan from")
    smallest = float(np.percentile(diameters, 5))
    diameter = float(min(CELLPOSE_DIAMETER, max(round(MAX_SCALE * smallest), 8)))
    patch = int(32 * math.ceil(6 * diameter / 32))
    stages = 4
    while receptive_field(stages) < 3 * diameter and patch / 2 ** stages >= 8:
        stages += 1
    batch = max(1, int(round(PIXELS_PER_STEP[device] / patch**2)))
    return {
        "data": {"diameter": diameter, "patch_size": patch, "batch_size": batch},
        "network": {"stages": stages, "receptive_field": receptive_field(stages)},
        "device": device,
        "why": {
            "diameter": f"Cellpose's {CELLPOSE_DIAMETER:g} px, at most {MAX_SCALE:g}x the 5th percentile of per-image "
                        f"median diameters ({smallest:.1f} px)",
            "patch_size": "six target diameters, rounded up to a multiple of 32",
            "stages": "fewest U-Net stages (>= 4) whose receptive field spans three target diameters",
            "batch_size": f"{PIXELS_PER_STEP[device]} pixels per step on {device} divided by the patch area",
        },
        "fingerprint": {"folder": print_["folder"], "images": len(print_["images"]),
                        "diameter_p5": round(smallest, 2), "diameter_median": round(float(np.median(diameters)), 2),
                        "modalities": print_["modalities"]},
    }


def write_plan(plan: dict, path: str | os.PathLike) -> Path:
    """Write a plan as YAML, atomically."""
    text = yaml.safe_dump(plan, sort_keys=False)
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def read_plan(path: str | os.PathLike) -> dict:
    """Read a plan written by :func:`write_plan`; ValueError (one line, naming the file) if it is not one."""
    plan = read_yaml(path)  # RecipeError (a ValueError) naming the file
    if not isinstance(plan, dict) or not isinstance(plan.get("data"), dict) or set(plan["data"]) - set(PLAN_KEYS):
        raise ValueError(f"{path}: not a cellnest plan (expected a 'data' section with {', '.join(PLAN_KEYS)})")
    return plan


def plan_overrides(plan: dict) -> list[str]:
    """The plan's values as recipe ``--set`` assignments (applied before the user's own)."""
    return [f"data.{key}={plan['data'][key]}" for key in PLAN_KEYS if key in plan["data"]]


def format_plan(plan: dict) -> str:
    """A short human-readable summary (markdown table of modalities, then the plan)."""
    lines = ["| modality | images | median diameter (px) | 5-95 % | median size |", "|---|---|---|---|---|"]
    for modality, m in plan["fingerprint"]["modalities"].items():
        lines.append(f"| {modality} | {m['n']} | {m['diameter_median']} | {m['diameter_p5']}-{m['diameter_p95']} | "
                     f"{m['height_median']:.0f} x {m['width_median']:.0f} |")
    d = plan["data"]
    lines += ["", f"plan ({plan['device']}): diameter {d['diameter']:g} px, patch {d['patch_size']} px, batch {d['batch_size']}, "
              f"at least {plan['network']['stages']} U-Net stages (receptive field {plan['network']['receptive_field']} px)"]
    return "\n".join(lines)
