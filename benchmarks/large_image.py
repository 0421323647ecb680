"""Segment a 10,000 x 10,000 synthetic image and report time and peak memory.

    python benchmarks/large_image.py [--side 10000] [--model classical] [--workdir DIR]

The image (grey uint8, ~1 cell per 2,500 px^2, written as a TIFF with its true labels)
is made by tiling 2000x2000 synthetic images. ``cellnest segment`` then runs in a child
process, exactly as a user would call it, and the child's peak resident memory
(``ru_maxrss``) is printed next to the sizes of the image and of its label map. The
result is scored against the true labels with the challenge metric (images >= 25 MP are
scored in 2000x2000 tiles), which shows that block stitching keeps cells whole.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile

from cellnest.io import read_labels, write_labels
from cellnest.metrics import match_counts
from cellnest.synthetic import SyntheticSpec, synthetic_cells, to_uint

PIECE = 2000


def make_large_image(side: int, folder: Path) -> tuple[Path, Path]:
    """Write ``side x side`` grey image and labels built from 2000x2000 synthetic pieces."""
    image = np.zeros((side, side), np.uint8)
    labels = np.zeros((side, side), np.uint32)
    offset = 0
    for i, r in enumerate(range(0, side, PIECE)):
        for j, c in enumerate(range(0, side, PIECE)):
            h, w = min(PIECE, side - r), min(PIECE, side - c)
            grey, truth = synthetic_cells(SyntheticSpec(shape=(h, w), n_cells=h * w // 2500, radius=(6, 14), min_gap=0.5), seed=1000 + 31 * i + j)
            image[r : r + h, c : c + w] = to_uint(grey)
            truth = truth.astype(np.uint32)
            labels[r : r + h, c : c + w] = np.where(truth > 0, truth + offset, 0)
            offset += int(truth.max())
    image_path = folder / "large.tif"
    tifffile.imwrite(image_path, image, compression="zlib")
    return image_path, write_labels(folder / "large_truth_label.tiff", labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", type=int, default=10_000)
    parser.add_argument("--model", default="classical", help="model name or .pt file")
    parser.add_argument("--workdir", type=Path, default=None, help="where the image and outputs go (default: a temp dir)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.workdir or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        image_path, truth_path = folder / "large.tif", folder / "large_truth_label.tiff"
        if not (image_path.is_file() and truth_path.is_file() and tifffile.TiffFile(image_path).pages[0].shape == (args.side,) * 2):
            image_path, truth_path = make_large_image(args.side, folder)
            print(f"made {args.side}x{args.side} image in {time.perf_counter() - start:.0f} s")
        out = folder / "out"
        command = [sys.executable, "-m", "cellnest", "-q", "segment", str(image_path), "--out", str(out), "--model", args.model,
                   "--overwrite", "--max-pixels", str(max(args.side**2, 1))]
        start = time.perf_counter()
        subprocess.run(command, check=True)
        seconds = time.perf_counter() - start
        peak_gib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # KiB on Linux
        megapixels = args.side**2 / 1e6
        print(f"segment ({args.model}): {seconds:.0f} s, {seconds / megapixels:.2f} s/MP; peak RSS of the segment process {peak_gib:.2f} GiB")
        print(f"for scale: image as uint8 RGB {3 * args.side**2 / 2**30:.2f} GiB, as float32 RGB {12 * args.side**2 / 2**30:.2f} GiB; "
              f"label map int32 {4 * args.side**2 / 2**30:.2f} GiB")
        (counts,) = match_counts(read_labels(truth_path), read_labels(out / "large_label.tiff"))
        print(f"challenge F1 against the true labels: {counts.f1:.4f} (TP {counts.tp}, FP {counts.fp}, FN {counts.fn})")


if __name__ == "__main__":
    main()
