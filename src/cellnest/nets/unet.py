"""The NeurIPS 2022 Cell Segmentation Challenge baseline: MONAI ``UNet``.

Channels (16, 32, 64, 128, 256), stride-2 strided-conv downsampling, two residual units
per level, instance norm and PReLU (MONAI's defaults), as in the challenge's official
baseline. Inputs are padded to a multiple of the product of the strides.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch.nn as nn
from monai.networks.nets import UNet

from cellnest.nets.registry import layer_spec, register
from cellnest.nets.wrapper import PadCrop


@register("unet")
def build_unet(in_channels: int = 3, out_channels: int = 3,
               channels: Sequence[int] = (16, 32, 64, 128, 256), strides: Sequence[int] = (2, 2, 2, 2),
               num_res_units: int = 2, norm="instance", act="prelu", dropout: float = 0.0,
               pad_mode: str = "reflect") -> nn.Module:
    """MONAI ``UNet`` (2-D) wrapped in :class:`PadCrop`; ``len(strides) == len(channels) - 1``."""
    if len(strides) != len(channels) - 1:
        raise ValueError(f"model 'unet': need len(strides) == len(channels) - 1, got {len(strides)} "
                         f"strides for {len(channels)} channels")
    net = UNet(spatial_dims=2, in_channels=in_channels, out_channels=out_channels,
               channels=tuple(channels), strides=tuple(strides), num_res_units=num_res_units,
               norm=layer_spec(norm), act=layer_spec(act), dropout=dropout)
    return PadCrop(net, math.prod(strides), pad_mode)
