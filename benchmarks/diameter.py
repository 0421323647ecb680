"""Cell-size estimation and what it buys: error of each estimator, and F1 and speed per sizing mode.

    python benchmarks/diameter.py --model attn-unetpp [--data ../shared/data/mmcells/tuning]

For every labelled image, the true diameter is the median equivalent diameter of its
labelled cells not cut by the image edge (the measure training sizes images by). Printed, per modality:

1. the median ``|log2(estimate / true)|`` of each estimator: the size model and the
   multi-scale search, each raw (before segmenting) and refined (``--diameter auto``'s
   check on the cells found at the estimated scale, i.e. the diameter it finally used);
2. challenge F1 (IoU 0.5) and seconds per megapixel (read excluded; sizing, network and
   post-processing included) for each mode: ``native`` (no rescaling), ``true`` (the true
   per-image diameter: the ceiling of any estimator), ``auto:size_model``, ``auto:search``.
   ``all`` is the image mean; ``modalities`` the mean of per-modality means.
"""

from __future__ import annotations

import argparse
import os
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from cellnest.data import load_folder
from cellnest.diameter import interior_median_diameter, log2_error
from cellnest.hardware import cpu_name
from cellnest.io import read_image, read_labels
from cellnest.metrics import modality_mean, score_image, summarize
from cellnest.models import load_segmenter
from cellnest.normalize import image_percentiles

MODES = ("native", "true", "auto:size_model", "auto:search", "auto:combined")


def table(rows: dict[str, dict[str, float]], groups: list[str], fmt: str = "{:.3f}") -> str:
    lines = ["| | " + " | ".join(groups) + " |", "|---" * (len(groups) + 1) + "|"]
    for name, values in rows.items():
        lines.append(f"| {name} | " + " | ".join(fmt.format(values[g]) if g in values else "" for g in groups) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_data = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mmcells" / "tuning"
    parser.add_argument("--data", type=Path, default=default_data, help="labelled folder (challenge layout)")
    parser.add_argument("--model", default="attn-unetpp", help="model trained at one cell size (name, file or run folder)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}")
    parser.add_argument("--limit", type=int, help="only the first N images")
    args = parser.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    items = load_folder(args.data, require_labels=True)[: args.limit]
    modes = [m for m in args.modes.split(",") if m]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        parser.error(f"unknown mode(s) {unknown}; choose from {', '.join(MODES)}")
    print(f"data: {args.data} ({len(items)} images); model: {args.model}; cpu: {cpu_name()}, torch threads {torch.get_num_threads()}")

    segmenters = {}
    for mode in modes:
        diameter = {"native": "native", "true": 1.0}.get(mode, "auto")
        estimator = mode.split(":")[1] if mode.startswith("auto:") else None
        segmenters[mode] = load_segmenter(args.model, device="cpu", diameter=diameter, estimator=estimator)
    if "auto:size_model" in modes and segmenters["auto:size_model"].size_model is None:
        parser.error(f"{args.model} has no size model (train at one cell size, or ship with --train-data)")

    errors: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    scores = defaultdict(list)
    seconds: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    megapixels: dict[str, float] = defaultdict(float)
    for n, item in enumerate(items, 1):
        image, truth = read_image(item.image), read_labels(item.label)
        true = interior_median_diameter(truth)
        if true is None:
            continue
        megapixels[item.modality] += image.shape[0] * image.shape[1] / 1e6
        first = next(iter(segmenters.values()))
        bounds = image_percentiles(image, first.lower_percentile, first.upper_percentile)
        for mode, segmenter in segmenters.items():
            if mode == "true":
                segmenter.diameter = true
            start = time.perf_counter()
            labels, size = segmenter.run(image)
            seconds[mode][item.modality] += time.perf_counter() - start
            scores[mode].append(score_image(truth, labels, item.name, item.modality))
            if mode.startswith("auto:"):
                raw = segmenter.estimate_diameter(image, bounds)
                errors[f"{mode[5:]} (raw)"][item.modality].append(log2_error(raw, true))
                errors[f"{mode[5:]} (refined)"][item.modality].append(log2_error(size.diameter, true))
        print(f"{n}/{len(items)} {item.name} ({item.modality}, true {true:.1f} px)", flush=True)

    groups = sorted(megapixels)
    if errors:
        rows = {}
        for name, per in errors.items():
            rows[name] = {g: float(np.median(v)) for g, v in per.items()}
            rows[name]["all"] = float(np.median([e for v in per.values() for e in v]))
        print("\n## Estimator error: median |log2(estimate / true diameter)|\n")
        print(table(rows, groups + ["all"]))
    f1_rows, speed_rows = {}, {}
    for mode in modes:
        summary = summarize(scores[mode])
        f1_rows[mode] = {g: s["mean_f1"] for g, s in summary.items()}
        f1_rows[mode]["modalities"] = modality_mean(summary)
        speed_rows[mode] = {g: seconds[mode][g] / megapixels[g] for g in groups}
        speed_rows[mode]["all"] = sum(seconds[mode].values()) / sum(megapixels.values())
    print("\n## Challenge F1 by sizing mode (all = image mean; modalities = mean of per-modality means)\n")
    print(table(f1_rows, groups + ["all", "modalities"], "{:.4f}"))
    print("\n## Seconds per megapixel by sizing mode (sizing, network, post-processing)\n")
    print(table(speed_rows, groups + ["all"], "{:.2f}"))


if __name__ == "__main__":
    main()
