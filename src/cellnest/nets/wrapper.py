"""Pad any (H, W) up to what a network needs, run it, crop the logits back.

Every model returned by :func:`cellnest.nets.build_model` is a :class:`PadCrop` around
the network proper (``model.net``). Padding is added at the bottom and right only, so
cropping is ``[..., :H, :W]`` and a head at stride ``s`` keeps its first
``ceil(H / s)`` rows, the same pixels a strided pick ``target[:, ::s, ::s]`` selects
(see :class:`cellnest.losses.DeepSupervisionLoss`).

Pad modes
---------
``"reflect"`` (default) mirrors the image without repeating the edge pixel, so a cell
cut by the border continues plausibly and the network sees no artificial edge; where
the pad is at least as large as the image side (tiny inputs, or UNETR's fixed tile)
reflection is undefined and ``"replicate"`` is used for that call instead.
``"replicate"`` repeats the edge pixel. ``"constant"`` pads with 0, which after the
pipeline's percentile normalisation is dark background.

Fixed-size networks
-------------------
With ``tile`` set (UNETR, whose position embedding is tied to its ``img_size``), the
input is padded up to a multiple of ``tile`` and cut into non-overlapping
``tile x tile`` windows that are folded into the batch dimension; the outputs are
folded back. This is exact for inputs of exactly ``tile`` (training patches and the
predictor's sliding windows) and differentiable for any size; for whole large images
use a sliding-window predictor with ``roi = tile`` so windows overlap and blend.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

PAD_MODES = ("reflect", "replicate", "constant")


class PadCrop(nn.Module):
    """Wrap ``net`` so that it accepts any H, W.

    Parameters
    ----------
    net : module mapping (B, C, H', W') float32 to (B, K, H', W') for H', W' multiples
        of ``multiple``; may define ``forward_heads(x) -> list[Tensor]``.
    multiple : H and W are padded up to a multiple of this (e.g. 16 for four 2x poolings).
    pad_mode : one of ``PAD_MODES`` (see the module docstring).
    tile : optional fixed input size (a multiple of ``multiple``); see the module
        docstring.
    """

    def __init__(self, net: nn.Module, multiple: int, pad_mode: str = "reflect", tile: int | None = None):
        super().__init__()
        if pad_mode not in PAD_MODES:
            raise ValueError(f"pad_mode must be one of {PAD_MODES}, got {pad_mode!r}")
        if multiple < 1:
            raise ValueError(f"multiple must be >= 1, got {multiple}")
        if tile is not None and (tile < multiple or tile % multiple):
            raise ValueError(f"tile {tile} must be a positive multiple of {multiple}")
        self.net = net
        self.multiple = int(multiple)
        self.pad_mode = pad_mode
        self.tile = tile

    @property
    def num_heads(self) -> int:
        """Number of tensors :meth:`forward_heads` returns (1 without deep supervision)."""
        return int(getattr(self.net, "num_heads", 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) float32 -> logits (B, K, H, W), for any H, W."""
        return self._run(x, heads=False)[0]

    def forward_heads(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Deep-supervision heads: main (B, K, H, W) first, then the auxiliary heads.

        A head at stride ``s`` has shape (B, K, ceil(H / s), ceil(W / s)). Without deep
        supervision this is ``[forward(x)]``.
        """
        return self._run(x, heads=hasattr(self.net, "forward_heads"))

    def _run(self, x: torch.Tensor, heads: bool) -> list[torch.Tensor]:
        if x.ndim != 4:
            raise ValueError(f"x must be (B, C, H, W), got shape {tuple(x.shape)}")
        h, w = x.shape[-2:]
        step = self.tile or self.multiple
        # At least two steps a side: a side of one step leaves the deepest level 1 x 1,
        # where instance normalisation is undefined (a 2 x 2 image failed inside torch).
        least = step if self.tile else 2 * step
        size = (max(math.ceil(h / step) * step, least), max(math.ceil(w / step) * step, least))
        xp = pad_to(x, size, self.pad_mode)
        if self.tile is not None:
            ny, nx = size[0] // self.tile, size[1] // self.tile
            xp = rearrange(xp, "b c (ny h) (nx w) -> (b ny nx) c h w", ny=ny, nx=nx)
        outs = self.net.forward_heads(xp) if heads else [self.net(xp)]
        if self.tile is not None:
            outs = [rearrange(o, "(b ny nx) c h w -> b c (ny h) (nx w)", ny=ny, nx=nx) for o in outs]
        cropped = []
        for out in outs:
            sy, sx = size[0] // out.shape[-2], size[1] // out.shape[-1]
            cropped.append(out[..., : math.ceil(h / sy), : math.ceil(w / sx)])
        return cropped


def pad_to(x: torch.Tensor, size: tuple[int, int], mode: str = "reflect") -> torch.Tensor:
    """Pad (B, C, H, W) at the bottom and right up to ``size`` = (H', W') >= (H, W).

    ``"reflect"`` falls back to ``"replicate"`` when a pad is not smaller than the side
    it mirrors.
    """
    h, w = x.shape[-2:]
    dy, dx = size[0] - h, size[1] - w
    if dy < 0 or dx < 0:
        raise ValueError(f"cannot pad {(h, w)} to the smaller size {tuple(size)}")
    if dy == 0 and dx == 0:
        return x
    if mode == "reflect" and (dy >= h or dx >= w):
        mode = "replicate"
    if mode == "constant":
        return F.pad(x, (0, dx, 0, dy), mode="constant", value=0.0)
    return F.pad(x, (0, dx, 0, dy), mode=mode)
