"""nnU-Net's generic U-Net (the Re-Unet backbone), built on MONAI ``DynUNet``.

Each stage is two 3x3 conv + instance norm + leaky ReLU (slope 0.01) blocks, the first
one strided for downsampling (no pooling); the decoder upsamples with transposed
convolutions, concatenates the skip and applies two conv blocks; 1x1 heads on every
decoder stage but the lowest give deep supervision. Depth and widths come from a plan:

* ``strides``: one entry per stage, the first 1 (input block); the default
  ``(1, 2, 2, 2, 2, 2)`` is the six-stage plan nnU-Net makes for 256 px 2-D patches
  (pooling until the bottleneck map is 8 x 8).
* ``filters``: per-stage widths; if omitted ``base_filters * 2**stage`` capped at
  ``max_filters``. The default cap 320 gives (32, 64, 128, 256, 320, 320); nnU-Net caps
  2-D networks at 480 (v1) or 512 (v2), which recipes can set.
* ``deep_supr_num``: auxiliary heads, default ``len(strides) - 2`` (every decoder stage
  except the one right above the bottleneck), as nnU-Net.

:meth:`GenericUNet.forward_heads` returns the main head at full resolution, then the
auxiliary heads at their native resolutions (strides 2, 4, ...), highest first. MONAI's
own ``DynUNet.forward`` stacks interpolated heads in training mode; it is bypassed so
that ``forward`` always returns the main logits.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
from monai.networks.nets import DynUNet

from cellnest.nets.registry import register
from cellnest.nets.wrapper import PadCrop

DEFAULT_STRIDES = (1, 2, 2, 2, 2, 2)


def plan_filters(n_stages: int, base_filters: int = 32, max_filters: int = 320) -> list[int]:
    """nnU-Net's widths: ``base_filters`` doubling per stage, capped at ``max_filters``."""
    return [min(base_filters * 2**stage, max_filters) for stage in range(n_stages)]


class GenericUNet(nn.Module):
    """DynUNet with a fixed return type; H and W must be multiples of ``prod(strides)``.

    Parameters
    ----------
    in_channels, out_channels : C of the (B, C, H, W) input, K of the logits.
    strides, filters : the plan (see the module docstring); equal lengths >= 3.
    kernel_size : conv kernel of every stage.
    dropout : dropout rate after each conv (0 disables).
    negative_slope : leaky ReLU slope.
    deep_supervision, deep_supr_num : auxiliary heads (1 <= deep_supr_num <= stages - 2).
    res_block : residual conv blocks instead of plain pairs.
    """

    def __init__(self, in_channels: int, out_channels: int, strides: Sequence[int], filters: Sequence[int],
                 kernel_size: int = 3, dropout: float = 0.0, negative_slope: float = 0.01,
                 deep_supervision: bool = True, deep_supr_num: int | None = None, res_block: bool = False):
        super().__init__()
        strides = [int(s) for s in strides]
        if len(strides) < 3 or min(strides) < 1 or strides[0] != 1:
            raise ValueError(f"strides must have >= 3 entries >= 1 and start with 1, got {strides}")
        if len(filters) != len(strides):
            raise ValueError(f"filters ({len(filters)}) and strides ({len(strides)}) differ in length")
        if deep_supr_num is None:
            deep_supr_num = len(strides) - 2
        if deep_supervision and not 1 <= deep_supr_num <= len(strides) - 2:
            raise ValueError(f"deep_supr_num must be in 1..{len(strides) - 2}, got {deep_supr_num}")
        self.multiple = math.prod(strides)
        self.deep_supervision = bool(deep_supervision)
        self.num_heads = 1 + deep_supr_num if self.deep_supervision else 1
        self.net = DynUNet(
            spatial_dims=2, in_channels=in_channels, out_channels=out_channels,
            kernel_size=[kernel_size] * len(strides), strides=strides, upsample_kernel_size=strides[1:],
            filters=[int(f) for f in filters], dropout=dropout or None, norm_name=("instance", {"affine": True}),
            act_name=("leakyrelu", {"inplace": True, "negative_slope": negative_slope}),
            deep_supervision=self.deep_supervision, deep_supr_num=deep_supr_num if self.deep_supervision else 1,
            res_block=res_block,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> main logits (B, K, H, W)."""
        self._check(x)
        return self.net.output_block(self.net.skip_layers(x))

    def forward_heads(self, x: torch.Tensor) -> list[torch.Tensor]:
        """[main (B, K, H, W), aux at stride 2 (B, K, H/2, W/2), stride 4, ...]."""
        main = self.forward(x)
        # DynUNet's skip layers write the auxiliary outputs into this shared list.
        return [main, *self.net.heads[: self.num_heads - 1]]

    def _check(self, x: torch.Tensor) -> None:
        if x.shape[-2] % self.multiple or x.shape[-1] % self.multiple:
            raise ValueError(f"H and W must be multiples of {self.multiple}, got {tuple(x.shape[-2:])}")


@register("generic_unet")
def build_generic_unet(in_channels: int = 3, out_channels: int = 3, strides: Sequence[int] = DEFAULT_STRIDES,
                       filters: Sequence[int] | None = None, base_filters: int = 32, max_filters: int = 320,
                       kernel_size: int = 3, dropout: float = 0.0, negative_slope: float = 0.01,
                       deep_supervision: bool = True, deep_supr_num: int | None = None,
                       res_block: bool = False, pad_mode: str = "reflect") -> nn.Module:
    """nnU-Net generic U-Net from a plan; deep supervision on by default."""
    if filters is None:
        filters = plan_filters(len(strides), base_filters, max_filters)
    net = GenericUNet(in_channels, out_channels, strides, filters, kernel_size, dropout, negative_slope,
                      deep_supervision, deep_supr_num, res_block)
    return PadCrop(net, net.multiple, pad_mode)
