"""Size and CPU speed of every registered network (default widths).

Prints a Markdown table: parameters, forward GFLOPs per 1x3x256x256 tile
(``torch.utils.flop_counter``), CPU seconds for forward + backward of a batch of
8x3x256x256 (train mode, all deep-supervision heads, as a training step) and forward
seconds per 1x3x256x256 tile (eval mode, no grad), each in the default (NCHW) and the
``channels_last`` memory format. Each timing: one warm-up run, then the median of
``--repeats`` runs.

    python benchmarks/networks.py                 # full table (about 10 min on 2 cores)
    python benchmarks/networks.py --quick         # smoke run: batch 2, one repeat
    python benchmarks/networks.py --models unet generic_unet --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from cellnest.hardware import cpu_name
from cellnest.nets import MODEL_NAMES, build_model, profile_model

TILE = (3, 256, 256)


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_model(name: str, batch: int, repeats: int, channels_last: bool) -> tuple[float, float]:
    """(forward+backward seconds per batch, forward seconds per tile)."""
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = build_model(name).to(memory_format=fmt)
    x_batch = torch.randn(batch, *TILE).contiguous(memory_format=fmt)
    x_tile = torch.randn(1, *TILE).contiguous(memory_format=fmt)

    def train_step():
        model.zero_grad(set_to_none=True)
        sum(head.float().mean() for head in model.forward_heads(x_batch)).backward()

    def infer():
        with torch.no_grad():
            model(x_tile)

    model.train()
    train = median_seconds(train_step, repeats)
    model.eval()
    forward = median_seconds(infer, repeats)
    return train, forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODEL_NAMES), choices=MODEL_NAMES)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="batch 2, one repeat")
    args = parser.parse_args()
    if args.quick:
        args.batch, args.repeats = 2, 1
    torch.set_num_threads(args.threads)

    print(f"torch {torch.__version__}, {args.threads} threads, {cpu_name()}, "
          f"batch {args.batch}, median of {args.repeats} after 1 warm-up")
    print()
    print(f"| model | params (M) | GFLOPs / 256² tile | fwd+bwd s / batch {args.batch} | "
          f"fwd+bwd s, channels_last | fwd s / tile | fwd s / tile, channels_last |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in args.models:
        prof = profile_model(build_model(name), TILE)
        train, fwd = time_model(name, args.batch, args.repeats, channels_last=False)
        train_cl, fwd_cl = time_model(name, args.batch, args.repeats, channels_last=True)
        print(f"| {name} | {prof.params / 1e6:.2f} | {prof.gflops:.1f} | {train:.2f} | {train_cl:.2f} "
              f"| {fwd:.3f} | {fwd_cl:.3f} |", flush=True)


if __name__ == "__main__":
    main()
