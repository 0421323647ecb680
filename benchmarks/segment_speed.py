"""End-to-end segmentation speed on this CPU: a 1000x1000 image from file to label file.

    python benchmarks/segment_speed.py [--networks unet unetpp ...] [--threads 2]

For each network (default widths, random weights: speed does not depend on the values)
the pipeline runs read -> normalise -> sliding-window network (tile 256, overlap 0.25,
Gaussian blending) -> post-processing -> write, and the table reports seconds per
megapixel, the network's share, and the network's achieved GFLOP/s (FLOPs counted per
window by torch's FlopCounterMode, times the windows actually run) against two peaks:
the measured float32 matmul rate of torch on the same threads (a practical ceiling) and
the theoretical AVX2 rate (threads x clock x 32 FLOP/cycle: two 8-wide FMA units).

Post-processing is timed on a realistic probability map (a synthetic image's 3-class
target, blurred), because a random network's output is not one. A second table times
each post-processing method on that map.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cellnest.io import read_image, write_labels
from cellnest.models import NetworkSegmenter
from cellnest.nets import MODEL_NAMES, build_model, count_flops
from cellnest.normalize import normalize_image
from cellnest.postprocess import PostprocessConfig, probabilities_from_instances, probabilities_to_instances
from cellnest.predict import Predictor, PredictorConfig
from cellnest.synthetic import SyntheticSpec, synthetic_cells, to_uint

SIDE = 1000
TILE = 256


def cpu_clock_ghz() -> float | None:
    """Maximum clock from sysfs, else the current one from /proc/cpuinfo."""
    try:
        return int(Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq").read_text()) / 1e6
    except OSError:
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                return float(line.split(":")[1]) / 1000
    except OSError:
        pass
    return None


def matmul_gflops(repeats: int = 5) -> float:
    """Best float32 GEMM rate of torch on the current threads (2048^3, 2 FLOP per FMA)."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * 2048**3 / best / 1e9


def network_cfg(name: str) -> dict:
    return {"img_size": TILE} if name == "unetr" else {}


def time_network(name: str, image_path: Path, probs_for_post: np.ndarray, repeats: int) -> dict:
    torch.manual_seed(0)
    model = build_model(name, **network_cfg(name))
    flops_per_window = count_flops(model, (3, TILE, TILE))
    windows = 0

    def count(_module, inputs, _output):
        nonlocal windows
        windows += inputs[0].shape[0]

    predictor = Predictor(model, PredictorConfig(tile=TILE, overlap=0.25, batch_size=4), device="cpu")
    hook = model.register_forward_hook(count)
    segmenter = NetworkSegmenter(name=name, predictor=predictor, postprocess=PostprocessConfig())
    runs = []
    with tempfile.TemporaryDirectory() as out:
        for attempt in range(repeats + 1):  # the first run warms up and is discarded
            windows = 0
            t0 = time.perf_counter()
            image = read_image(image_path, dtype=None)
            t1 = time.perf_counter()
            normalised = normalize_image(image)
            t2 = time.perf_counter()
            segmenter.probabilities(normalised)
            t3 = time.perf_counter()
            labels = probabilities_to_instances(probs_for_post, segmenter.postprocess)
            t4 = time.perf_counter()
            write_labels(Path(out) / "x_label.tiff", labels)
            t5 = time.perf_counter()
            if attempt > 0:
                runs.append({"read": t1 - t0, "normalise": t2 - t1, "network": t3 - t2, "post": t4 - t3, "write": t5 - t4, "windows": windows})
    hook.remove()
    best = min(runs, key=lambda r: r["network"])
    best["total"] = sum(best[k] for k in ("read", "normalise", "network", "post", "write"))
    best["gflops"] = flops_per_window * best["windows"] / best["network"] / 1e9
    best["flops_per_window"] = flops_per_window
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--networks", nargs="+", default=list(MODEL_NAMES), choices=MODEL_NAMES)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per network (after one warm-up)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    grey, truth = synthetic_cells(SyntheticSpec(shape=(SIDE, SIDE), n_cells=900, radius=(6, 14), min_gap=0.5), seed=7)
    probs = probabilities_from_instances(truth, blur=1.0, noise=0.05, seed=0)
    peak_measured = matmul_gflops()
    clock = cpu_clock_ghz()
    peak_theory = args.threads * clock * 32 if clock else float("nan")
    print(f"torch {torch.__version__}, {args.threads} threads; fp32 matmul peak {peak_measured:.0f} GFLOP/s measured, "
          f"{peak_theory:.0f} GFLOP/s theoretical ({clock} GHz x 32 FLOP/cycle x {args.threads})")
    print(f"image {SIDE}x{SIDE} grey uint8 TIFF, {int(truth.max())} cells; tile {TILE}, overlap 0.25, watershed post-processing\n")

    with tempfile.TemporaryDirectory() as tmp:
        import tifffile

        path = Path(tmp) / "image.tif"
        tifffile.imwrite(path, to_uint(grey))
        print("| network | s/MP end to end | network s | post s | network share | windows | GFLOP/window | GFLOP/s | % of matmul peak |")
        print("|---|---|---|---|---|---|---|---|---|")
        for name in args.networks:
            r = time_network(name, path, probs, args.repeats)
            mp = SIDE * SIDE / 1e6
            print(f"| {name} | {r['total'] / mp:.2f} | {r['network']:.2f} | {r['post']:.3f} | {r['network'] / r['total']:.0%} | "
                  f"{r['windows']} | {r['flops_per_window'] / 1e9:.1f} | {r['gflops']:.0f} | {r['gflops'] / peak_measured:.0%} |", flush=True)

    print("\n| post-processing | seconds per 1000x1000 | cells |")
    print("|---|---|---|")
    for method in ("components", "closing", "watershed"):
        config = PostprocessConfig(method=method)
        probabilities_to_instances(probs, config)
        start = time.perf_counter()
        labels = probabilities_to_instances(probs, config)
        print(f"| {method} | {time.perf_counter() - start:.3f} | {int(labels.max())} |")


if __name__ == "__main__":
    main()
