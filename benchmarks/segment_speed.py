"""Segmentation speed on this CPU, side by side: the default model on each backend and Cellpose 3.

    python benchmarks/segment_speed.py [--threads 2] [--folder ../shared/data/mmcells/tuning]

Needs ``pip install -c constraints.txt cellpose==3.1.1.2`` for the Cellpose rows (its
CPnet with random weights: the network's speed does not depend on the values, so nothing
is downloaded); without it those rows are skipped. One process, one run, so every row
meets the same machine state.

Inputs: synthetic 1000 x 1000 grey and RGB images and a 2000 x 2000 grey one (the
project's generator, cells about 30 px across, so no tool resizes them), and up to 50
mixed ``tuning/`` images (every non-fluorescence image, then fluorescence ones).

Rows: cellnest's default model with the cell diameter given (30 px, or each tuning
image's true diameter) on each backend, and with ``--diameter auto`` (the default: size
model, then a check) on the default backend; Cellpose 3 (``CellposeModel``, cyto3
architecture) given the same diameter: network only (``compute_masks=False``), the basis
of the ratios, because with random weights its flow dynamics cost whatever the random
flows make them cost (measured 2.9 to 10.4 s/MP on the same folder with two draws); end
to end (network, dynamics, masks) on the 1000 x 1000 grey image only, for reference. Read and write are outside every timing.

Printed: seconds per megapixel, ratio to eager PyTorch and to Cellpose's network,
the stage table of the default backend (:mod:`cellnest.timing`),
and the network alone (one forward pass of a 1024 x 1024 window, the shipped tile):
seconds, achieved GFLOP/s (FLOPs counted by torch's FlopCounterMode) and its share of
the machine's float32 matrix-multiply peak (torch GEMM 2048^3 on the same threads).
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import logging
import time
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from cellnest.catalog import DEFAULT_MODEL
from cellnest.diameter import interior_median_diameter
from cellnest.hardware import cpu_name
from cellnest.io import list_images, read_image, read_labels
from cellnest.models import load_segmenter
from cellnest.nets import count_flops
from cellnest.runtime import available_backends, resolve_backend
from cellnest.synthetic import SyntheticSpec, synthetic_cells, to_uint
from cellnest.timing import recording

DIAMETER = 30.0
STAGES = ("normalise", "size", "resample", "network", "postprocess")


def matmul_gflops(repeats: int = 5) -> float:
    """Best float32 GEMM rate of torch on the current threads (2048^3, 2 FLOP per multiply-add)."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    torch.mm(a, b)
    best = min(_timed(lambda: torch.mm(a, b))[1] for _ in range(repeats))
    return 2 * 2048**3 / best / 1e9


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def synthetic(side: int, rgb: bool, seed: int) -> np.ndarray:
    """(side, side, 3) uint8 image with cells ~30 px across (radius 12-18 px semi-minor)."""
    n_cells = int(side * side / 1600)
    grey, _ = synthetic_cells(SyntheticSpec(shape=(side, side), n_cells=n_cells, radius=(12, 18), min_gap=0.6), seed=seed)
    image = to_uint(grey)
    if rgb:  # a tinted stain: the three channels differ
        return np.stack([image, (image * 0.7).astype(np.uint8), (255 - image // 2).astype(np.uint8)], axis=-1)
    return np.repeat(image[..., None], 3, axis=-1)  # grey as read_image gives it


def tuning_images(folder: Path, limit: int) -> list[tuple[str, np.ndarray, float | None]]:
    """Up to ``limit`` labelled images: every non-fluorescence one first, then fluorescence."""
    modality = {row["name"]: row["modality"] for row in csv.DictReader((folder / "manifest.csv").open())}
    paths = sorted(list_images(folder / "images"), key=lambda p: (modality.get(p.stem) == "fluorescence", p.name))[:limit]
    out = []
    for path in paths:
        labels = read_labels(folder / "labels" / f"{path.stem}_label.tiff")
        out.append((path.stem, read_image(path, dtype=None), interior_median_diameter(labels)))
    return out


def cellnest_row(backend: str, diameter, images) -> dict:
    segmenter = load_segmenter(DEFAULT_MODEL, device="cpu", backend=backend, diameter="auto" if diameter == "auto" else DIAMETER)
    segmenter.run(images[0][1][:256, :256])  # warm-up: export/compile, first-call allocations
    seconds, stages = 0.0, defaultdict(float)
    for _name, image, true_diameter in images:
        if diameter != "auto":
            segmenter.diameter = true_diameter or DIAMETER
        with recording() as spent:
            _, elapsed = _timed(lambda: segmenter.run(image))
        seconds += elapsed
        for k, v in spent.items():
            stages[k] += v
    return {"seconds": seconds, "stages": dict(stages)}


def cellpose_row(images, network_only: bool) -> dict:
    from cellpose import models

    torch.manual_seed(0)  # its mask dynamics depend on the (random) flows: one draw for every set
    model = models.CellposeModel(gpu=False, pretrained_model=False)  # cyto3 architecture, random weights
    model.eval(images[0][1][:256, :256], channels=[0, 0], diameter=DIAMETER)  # warm-up
    seconds = 0.0
    for _name, image, true_diameter in images:
        grey = image.mean(axis=-1) if image.shape[-1] > 1 else image[..., 0]
        _, elapsed = _timed(lambda: model.eval(grey, channels=[0, 0], diameter=true_diameter or DIAMETER,
                                               compute_masks=not network_only))
        seconds += elapsed
    return {"seconds": seconds}


def network_alone(backends: list[str], peak: float, side: int = 1024) -> list[str]:
    """One forward pass of a side x side window per backend: seconds, GFLOP/s, share of peak."""
    flops = None
    lines = ["| backend | s per 1024x1024 window | GFLOP/s | % of matmul peak |", "|---|---|---|---|"]
    x = torch.rand(1, 3, side, side)
    for backend in backends:
        model = load_segmenter(DEFAULT_MODEL, device="cpu", backend=backend).predictor.models[0]
        if flops is None:
            flops = count_flops(load_segmenter(DEFAULT_MODEL, device="cpu", backend="torch").predictor.models[0], (3, side, side))
        with torch.inference_mode():
            model(x)
            best = min(_timed(lambda: model(x))[1] for _ in range(3))
        lines.append(f"| {backend} | {best:.3f} | {flops / best / 1e9:.0f} | {flops / best / 1e9 / peak:.0%} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_folder = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mmcells" / "tuning"
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--folder", type=Path, default=default_folder, help="labelled folder for the mixed-folder row")
    parser.add_argument("--limit", type=int, default=50, help="images taken from --folder")
    parser.add_argument("--backends", nargs="+", default=available_backends(), help="cellnest backends to time")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("cellpose").setLevel(logging.ERROR)  # random weights find no cells: its warnings are expected
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    has_cellpose = importlib.util.find_spec("cellpose") is not None
    default_backend = resolve_backend("auto", torch.device("cpu"))
    peak = matmul_gflops()
    print(f"cpu: {cpu_name()}, {args.threads} threads, torch {torch.__version__}; float32 matmul peak {peak:.0f} GFLOP/s; "
          f"backends {', '.join(args.backends)} (default {default_backend}); cellpose {'3' if has_cellpose else 'not installed'}\n")

    sets = {
        "1000x1000 grey": [("grey", synthetic(1000, False, 1), DIAMETER)],
        "1000x1000 RGB": [("rgb", synthetic(1000, True, 2), DIAMETER)],
        "2000x2000 grey": [("4mp", synthetic(2000, False, 3), DIAMETER)],
    }
    if (args.folder / "manifest.csv").is_file():
        images = tuning_images(args.folder, args.limit)
        sets[f"{len(images)} tuning images"] = images

    stage_rows = {}
    for set_name, images in sets.items():
        megapixels = sum(im.shape[0] * im.shape[1] for _, im, _ in images) / 1e6
        rows = {}
        for backend in args.backends:
            rows[f"cellnest {backend}"] = cellnest_row(backend, "given", images)
        rows[f"cellnest {default_backend}, --diameter auto"] = cellnest_row(default_backend, "auto", images)
        stage_rows[set_name] = rows[f"cellnest {default_backend}"]["stages"]
        if has_cellpose:
            rows["cellpose 3, network only"] = cellpose_row(images, network_only=True)
            if set_name == "1000x1000 grey":
                rows["cellpose 3, end to end"] = cellpose_row(images, network_only=False)
        eager = rows["cellnest torch"]["seconds"] if "cellnest torch" in rows else None
        cellpose = rows.get("cellpose 3, network only", {}).get("seconds")
        print(f"## {set_name} ({megapixels:.2f} MP)\n")
        print("| method | s/MP | x faster than eager torch | x faster than Cellpose's network |")
        print("|---|---|---|---|")
        for name, r in rows.items():
            s = r["seconds"]
            print(f"| {name} | {s / megapixels:.2f} | {eager / s if eager else float('nan'):.2f} | "
                  f"{cellpose / s if cellpose else float('nan'):.1f} |")
        print(flush=True)

    print(f"## Stage seconds per megapixel, cellnest {default_backend}, diameter given\n")
    print("| input | " + " | ".join(STAGES) + " |")
    print("|---" * (len(STAGES) + 1) + "|")
    for set_name, stages in stage_rows.items():
        megapixels = sum(im.shape[0] * im.shape[1] for _, im, _ in sets[set_name]) / 1e6
        print(f"| {set_name} | " + " | ".join(f"{stages.get(k, 0.0) / megapixels:.3f}" for k in STAGES) + " |")
    print("\n## The network alone\n")
    print("\n".join(network_alone(args.backends, peak)))


if __name__ == "__main__":
    main()
