"""INT8 post-training quantisation of the default model (OpenVINO NNCF): tuning F1 and speed against float32.

    pip install -c constraints.txt nncf
    python benchmarks/int8.py [--data ../shared/data/mmcells] [--per-modality 10]

Calibration uses the windows the network really receives (cell-size rescaling
included) while segmenting ``--per-modality`` training images of each modality; the
quantised graph is then scored on ``tuning/`` with the same pipeline and timed on one
1024 x 1024 window (best of 3), beside the float32 OpenVINO graph. Nothing is written to
the package: INT8 is measured here, not shipped (docs/speed.md).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from cellnest import runtime
from cellnest.catalog import DEFAULT_MODEL
from cellnest.data import load_folder
from cellnest.evaluate import score_segmenter
from cellnest.io import read_image
from cellnest.metrics import modality_mean, summarize
from cellnest.models import load_segmenter


def calibration_windows(data: Path, per_modality: int, seed: int = 0) -> list[np.ndarray]:
    """(1, 3, h, w) float32 inputs of the network while segmenting training images."""
    segmenter = load_segmenter(DEFAULT_MODEL, device="cpu", backend="openvino")
    net = segmenter.predictor.models[0].net
    windows: list[np.ndarray] = []
    run = net.run
    net.run = lambda x: (windows.append(x.copy()), run(x))[1]
    rng = np.random.default_rng(seed)
    by_modality: dict[str, list] = {}
    for item in load_folder(data / "train", require_labels=True):
        by_modality.setdefault(item.modality, []).append(item)
    for items in by_modality.values():
        for i in rng.permutation(len(items))[:per_modality]:
            segmenter.run(read_image(items[i].image))
    return windows


def int8_runner(path: str):
    """A runtime runner for a saved OpenVINO IR (float32 hint: INT8 where quantised)."""
    import openvino as ov

    def make(_onnx_path, threads: int):
        compiled = ov.Core().compile_model(path, "CPU", {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads,
                                                         "PERFORMANCE_HINT": "LATENCY"})
        request = compiled.create_infer_request()
        logits, features = compiled.outputs

        def run(x: np.ndarray):
            result = request.infer({0: x})
            return result[logits], result[features]

        return run

    return make


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mmcells")
    parser.add_argument("--per-modality", type=int, default=10, help="training images per modality for calibration")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(2)
    import nncf
    import openvino as ov

    windows = calibration_windows(args.data, args.per_modality)
    onnx_path = runtime.cached_onnx(load_segmenter(DEFAULT_MODEL, device="cpu", backend="torch").predictor.models[0].net.eval())
    start = time.perf_counter()
    quantised = nncf.quantize(ov.Core().read_model(str(onnx_path)), nncf.Dataset(windows), subset_size=len(windows),
                              preset=nncf.QuantizationPreset.MIXED)
    print(f"calibrated on {len(windows)} windows; quantised in {time.perf_counter() - start:.0f} s")
    items = load_folder(args.data / "tuning", require_labels=True)
    with tempfile.TemporaryDirectory() as tmp:
        ir = str(Path(tmp) / "int8.xml")
        ov.save_model(quantised, ir)
        print("| graph | s per 1024x1024 window | s/image (tuning) | DIC | fluorescence | phase-contrast | image mean | mean of modality means |")
        print("|---|---|---|---|---|---|---|---|")
        for name in ("float32", "int8"):
            if name == "int8":
                runtime.RUNNERS["openvino"] = int8_runner(ir)
            segmenter = load_segmenter(DEFAULT_MODEL, device="cpu", backend="openvino")
            model, x = segmenter.predictor.models[0], torch.rand(1, 3, 1024, 1024)
            with torch.inference_mode():
                model(x)
                best = min(_seconds(lambda: model(x)) for _ in range(3))
            scores, seconds = score_segmenter(segmenter, items, False)
            summary = summarize(scores)
            f1 = [f"{summary[m]['mean_f1']:.4f}" if m in summary else "" for m in ("DIC", "fluorescence", "phase-contrast", "all")]
            print(f"| {name} | {best:.3f} | {seconds:.3f} | " + " | ".join(f1) + f" | {modality_mean(summary):.4f} |", flush=True)


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
