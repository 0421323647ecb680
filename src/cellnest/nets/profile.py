"""Parameter count and FLOPs of a network per tile.

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` on one forward pass in
eval mode without gradients: matrix multiplications, convolutions (transposed included)
and attention, each multiply-add counted as two FLOPs. Normalisation, activations,
padding and elementwise ops are not counted (a few percent for these networks).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode


@dataclass(frozen=True)
class ModelProfile:
    """Size of a network: trainable parameters and forward FLOPs for one tile."""

    params: int
    flops: int
    tile: tuple[int, int, int]

    @property
    def gflops(self) -> float:
        return self.flops / 1e9


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def count_flops(model: nn.Module, tile: tuple[int, int, int] = (3, 256, 256)) -> int:
    """Forward FLOPs for one (C, H, W) tile, batch 1, counted in eval mode.

    The model's train/eval mode is restored afterwards.
    """
    was_training = model.training
    device = next(model.parameters()).device
    x = torch.zeros((1, *tile), device=device)
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


def profile_model(model: nn.Module, tile: tuple[int, int, int] = (3, 256, 256)) -> ModelProfile:
    """Parameters and forward FLOPs of ``model`` for a (C, H, W) tile."""
    return ModelProfile(params=count_parameters(model), flops=count_flops(model, tile), tile=tuple(tile))
