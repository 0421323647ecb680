"""Score segmentation models on a labelled folder with the challenge metric, per modality.

    python benchmarks/accuracy.py --data ../shared/data/mmcells/tuning --model classical

Prints one markdown table per model (n, mean/median F1, precision, recall per modality)
and the mean seconds per image (reading, segmentation; scoring excluded), measured here.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch

from cellnest.data import load_folder
from cellnest.io import read_image, read_labels
from cellnest.metrics import format_table, score_image, summarize
from cellnest.models import load_segmenter


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what platform reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_data = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mmcells" / "tuning"
    parser.add_argument("--data", type=Path, default=default_data, help="labelled folder (challenge layout)")
    parser.add_argument("--model", action="append", help="model name (repeatable; default: classical)")
    parser.add_argument("--limit", type=int, default=None, help="score only the first N images")
    args = parser.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    items = load_folder(args.data, require_labels=True)[: args.limit]
    print(f"data: {args.data} ({len(items)} images); cpu: {cpu_name()}, torch threads {torch.get_num_threads()}")
    for name in args.model or ["classical"]:
        segmenter = load_segmenter(name)
        scores, seconds = [], 0.0
        for item in items:
            start = time.perf_counter()
            prediction = segmenter(read_image(item.image))
            seconds += time.perf_counter() - start
            scores.append(score_image(read_labels(item.label), prediction, item.name, item.modality))
        print(f"\n## {name}: {seconds / len(items):.3f} s/image\n")
        print(format_table(summarize(scores)))


if __name__ == "__main__":
    main()
