"""Distributed segmentation: wall time, peak memory per worker and cells per second on 1
and 2 local workers, for a huge synthetic image and for a folder of small images, and a
paper estimate for a 100k x 100k slide from the measured per-block cost.

    python benchmarks/distributed.py [--side 20000] [--folder 200] [--model classical] [--workers 1 2]

The image (grey uint8, tiled TIFF, about one cell per 2,500 px^2) is built from 2000 x 2000
synthetic pieces; the folder holds 512 x 512 synthetic images. Each run starts a fresh
``LocalCluster`` of single-threaded worker processes, as ``--cluster local:N`` does.
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

# This file's name is the package dask imports as `distributed`: keep its folder off the path.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np
import tifffile

from cellnest.distributed import SegmenterSpec, segment_distributed, segment_inputs
from cellnest.synthetic import SyntheticSpec, synthetic_cells, to_uint, write_synthetic_folder

PIECE = 2000
CORES = len(os.sched_getaffinity(0))  # as cellnest's --cluster local:N: each worker's network gets cores / N threads


def make_image(side: int, path: Path) -> Path:
    image = np.zeros((side, side), np.uint8)
    for i, r in enumerate(range(0, side, PIECE)):
        for j, c in enumerate(range(0, side, PIECE)):
            h, w = min(PIECE, side - r), min(PIECE, side - c)
            grey, _ = synthetic_cells(SyntheticSpec(shape=(h, w), n_cells=h * w // 2500, radius=(6, 14), min_gap=0.5),
                                      seed=1000 + 31 * i + j)
            image[r: r + h, c: c + w] = to_uint(grey)
    tifffile.imwrite(path, image, tile=(1024, 1024), compression="zlib", bigtiff=True)
    return path


def worker_peaks(client) -> list[float]:
    """Peak resident memory of each worker process (GiB)."""
    return sorted(v / 2**20 for v in client.run(lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss).values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", type=int, default=20_000)
    parser.add_argument("--folder", type=int, default=200, help="images in the folder run (0: none)")
    parser.add_argument("--model", default="classical")
    parser.add_argument("--block", type=int, default=2048)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    from dask.distributed import Client, LocalCluster

    spec = SegmenterSpec((args.model,))
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        image = work / f"big{args.side}.tif"
        if not image.is_file():
            start = time.perf_counter()
            make_image(args.side, image)
            print(f"made a {args.side} x {args.side} image in {time.perf_counter() - start:.0f} s")
        folder = work / f"folder{args.folder}"
        if args.folder and not folder.is_dir():
            write_synthetic_folder(folder, count=args.folder, seed=0)
        megapixels = args.side**2 / 1e6
        print("| run | workers | wall s | s/MP | cells | cells/s | peak GiB per worker |\n|---|---|---|---|---|---|---|")
        per_block = {}
        for n in args.workers:
            with Client(LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None, silence_logs=logging.CRITICAL,
                                       env={"CELLNEST_THREADS": str(max(1, CORES // n))})) as client:
                client.run(lambda: __import__("cellnest.distributed"))  # imports are start-up, not work
                start = time.perf_counter()
                result = segment_distributed(image, work / f"out{n}", spec, client, block=args.block, diameter="auto",
                                             overwrite=True)
                wall = time.perf_counter() - start
                per_block[n] = wall * n / result.blocks
                print(f"| {args.side}^2 image, {result.blocks} blocks | {n} | {wall:.0f} | {wall / megapixels:.2f} | "
                      f"{result.cells} | {result.cells / wall:.0f} | {', '.join(f'{p:.2f}' for p in worker_peaks(client))} |",
                      flush=True)
            if args.folder:
                with Client(LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None, silence_logs=logging.CRITICAL,
                                       env={"CELLNEST_THREADS": str(max(1, CORES // n))})) as client:
                    client.run(lambda: __import__("cellnest.distributed"))
                    start = time.perf_counter()
                    rows = segment_inputs([folder], work / f"folder-out{n}", spec, client, block=args.block, overwrite=True,
                                          progress=False)
                    wall = time.perf_counter() - start
                    cells = sum(r.cells for r in rows)
                    print(f"| folder of {len(rows)} images | {n} | {wall:.0f} | - | {cells} | {cells / wall:.0f} | "
                          f"{', '.join(f'{p:.2f}' for p in worker_peaks(client))} |", flush=True)
        blocks_100k = (-(-100_000 // args.block)) ** 2
        cost = min(per_block.values())
        print(f"\nmeasured cost per {args.block}-px block and worker: {cost:.2f} s; a 100k x 100k slide has {blocks_100k} "
              f"blocks: about {blocks_100k * cost / 3600:.1f} worker-hours, {blocks_100k * cost / 3600 / 16:.2f} h on 16 "
              f"workers, {blocks_100k * cost / 3600 / 64:.2f} h on 64 (blocks are independent; the join is seconds)")


if __name__ == "__main__":
    main()
