"""Score segmentation models on a labelled folder with the challenge metric, per modality.

    python benchmarks/accuracy.py --data ../shared/data/mmcells/tuning --model re-unet --model classical

``--model`` takes a shipped name, the classical baseline, a model file or a run folder.
Prints one markdown table per model (n, mean/median F1, precision, recall per modality),
then one summary table (mean F1 per modality, overall mean and median F1, seconds per image of reading
and segmentation, scoring excluded), all measured here.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from cellnest.cli import parse_diameter
from cellnest.data import load_folder
from cellnest.evaluate import score_segmenter
from cellnest.metrics import format_table, modality_mean, summarize
from cellnest.models import load_segmenter
from cellnest.hardware import cpu_name


def summary_table(results: dict[str, tuple[dict, float]]) -> str:
    """Markdown: one row per model, mean F1 per modality, overall mean/median, s/image."""
    groups = sorted({g for summary, _ in results.values() for g in summary if g != "all"})
    lines = ["| model | " + " | ".join(groups) + " | mean F1 | mean of modality means | median F1 | s/image |",
             "|---" * (len(groups) + 5) + "|"]
    for name, (summary, seconds) in results.items():
        cells = [f"{summary[g]['mean_f1']:.4f}" if g in summary else "" for g in groups]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {summary['all']['mean_f1']:.4f} | {modality_mean(summary):.4f} | {summary['all']['median_f1']:.4f} | {seconds:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_data = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mmcells" / "tuning"
    parser.add_argument("--data", type=Path, default=default_data, help="labelled folder (challenge layout)")
    parser.add_argument("--model", action="append", help="model name, file or run folder (repeatable; default: classical)")
    parser.add_argument("--limit", type=int, default=None, help="score only the first N images")
    parser.add_argument("--tile", type=int, help="override the models' sliding-window tile (pixels)")
    parser.add_argument("--overlap", type=float, help="override the models' window overlap (0-1)")
    parser.add_argument("--diameter", type=parse_diameter, help="'auto', 'native' or pixels (default: each model's own)")
    parser.add_argument("--backend", action="append", choices=("auto", "torch", "onnx", "openvino"),
                        help="what runs the networks (repeatable: each model is scored on each; default: auto)")
    args = parser.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    items = load_folder(args.data, require_labels=True)[: args.limit]
    if not items:
        parser.error(f"{args.data}: no labelled images to score")
    print(f"data: {args.data} ({len(items)} images); cpu: {cpu_name()}, torch threads {torch.get_num_threads()}")
    overrides = {k: v for k, v in (("tile", args.tile), ("overlap", args.overlap)) if v is not None}
    results = {}
    backends = args.backend or ["auto"]
    for model in args.model or ["classical"]:
        for backend in backends:
            name = model if len(backends) == 1 else f"{model} ({backend})"
            segmenter = load_segmenter(model, predictor=overrides, diameter=args.diameter, backend=backend)
            scores, seconds = score_segmenter(segmenter, items)
            results[name] = (summarize(scores), seconds)
            print(f"\n## {name}: {seconds:.3f} s/image\n")
            print(format_table(results[name][0]))
    print("\n## Summary (mean F1)\n")
    print(summary_table(results))


if __name__ == "__main__":
    main()
