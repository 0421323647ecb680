"""Size and speed of every registered network (default widths), on the CPU or a GPU.

Prints a Markdown table: parameters, forward GFLOPs per 1x3x256x256 tile
(``torch.utils.flop_counter``), CPU seconds for forward + backward of a batch of
8x3x256x256 (train mode, all deep-supervision heads, as a training step) and forward
seconds per 1x3x256x256 tile (eval mode, no grad), each in the default (NCHW) and the
``channels_last`` memory format. Each timing: one warm-up run, then the median of
``--repeats`` runs (on CUDA, synchronised before the clock is read; ``--amp`` times
float16 autocast, as training and inference use on CUDA).

    python benchmarks/networks.py                 # full table (about 10 min on 2 cores)
    python benchmarks/networks.py --quick         # smoke run: batch 2, one repeat
    python benchmarks/networks.py --models unet generic_unet --repeats 5
    python benchmarks/networks.py --device cuda --amp --repeats 10
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import torch

from cellnest.hardware import cpu_name
from cellnest.nets import MODEL_NAMES, build_model, profile_model

TILE = (3, 256, 256)


def median_seconds(fn, repeats: int, device: torch.device) -> float:
    def timed() -> float:
        start = time.perf_counter()
        fn()
        if device.type == "cuda":  # kernels run asynchronously: wait for them
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    timed()  # warm-up (cuDNN picks its algorithms here)
    return statistics.median(timed() for _ in range(repeats))


def time_model(name: str, batch: int, repeats: int, channels_last: bool, device: torch.device, amp: bool) -> tuple[float, float]:
    """(forward+backward seconds per batch, forward seconds per tile)."""
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = build_model(name).to(device, memory_format=fmt)
    x_batch = torch.randn(batch, *TILE, device=device).contiguous(memory_format=fmt)
    x_tile = torch.randn(1, *TILE, device=device).contiguous(memory_format=fmt)
    autocast = functools.partial(torch.autocast, device.type, dtype=torch.float16, enabled=amp)

    def train_step():
        model.zero_grad(set_to_none=True)
        with autocast():
            loss = sum(head.float().mean() for head in model.forward_heads(x_batch))
        loss.backward()

    def infer():
        with torch.no_grad(), autocast():
            model(x_tile)

    model.train()
    train = median_seconds(train_step, repeats, device)
    model.eval()
    forward = median_seconds(infer, repeats, device)
    return train, forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODEL_NAMES), choices=MODEL_NAMES)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="batch 2, one repeat")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--amp", action="store_true", help="float16 autocast (CUDA only; bf16/fp16 are slow on this CPU)")
    args = parser.parse_args()
    if args.quick:
        args.batch, args.repeats = 2, 1
    device = torch.device(args.device)
    if args.amp and device.type != "cuda":
        parser.error("--amp needs a CUDA device")
    torch.set_num_threads(args.threads)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{args.threads} threads, {cpu_name()}"
    print(f"torch {torch.__version__}, {where}, {'float16 autocast' if args.amp else 'float32'}, "
          f"batch {args.batch}, median of {args.repeats} after 1 warm-up")
    print()
    print(f"| model | params (M) | GFLOPs / 256² tile | fwd+bwd s / batch {args.batch} | "
          f"fwd+bwd s, channels_last | fwd s / tile | fwd s / tile, channels_last |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in args.models:
        prof = profile_model(build_model(name), TILE)
        train, fwd = time_model(name, args.batch, args.repeats, False, device, args.amp)
        train_cl, fwd_cl = time_model(name, args.batch, args.repeats, True, device, args.amp)
        print(f"| {name} | {prof.params / 1e6:.2f} | {prof.gflops:.1f} | {train:.4f} | {train_cl:.4f} "
              f"| {fwd:.4f} | {fwd_cl:.4f} |", flush=True)


if __name__ == "__main__":
    main()
