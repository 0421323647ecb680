"""Transformer-encoder baselines: MONAI ``UNETR`` and ``SwinUNETR`` in 2-D.

* ``unetr``: a ViT encoder on 16x16 patches. Its learned position embedding is tied to
  ``img_size``, so the network always runs on ``img_size x img_size`` tiles: smaller
  inputs are padded up, larger ones are padded to a multiple of ``img_size`` and cut
  into non-overlapping tiles folded into the batch (see
  :mod:`cellnest.nets.wrapper`). Predict large images with a sliding window of
  ``roi = img_size`` so tiles overlap.
* ``swin_unetr``: shifted-window attention, no position embedding tied to the size; any
  H, W divisible by 32 (padded to that). ``feature_size`` must be a multiple of 12.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn as nn
from monai.networks.nets import SwinUNETR, UNETR

from cellnest.nets.registry import layer_spec, register
from cellnest.nets.wrapper import PadCrop

UNETR_PATCH = 16
SWIN_MULTIPLE = 32


@register("unetr")
def build_unetr(in_channels: int = 3, out_channels: int = 3, img_size: int = 256, feature_size: int = 16,
                hidden_size: int = 768, mlp_dim: int = 3072, num_heads: int = 12, dropout: float = 0.0,
                norm="instance", pad_mode: str = "reflect") -> nn.Module:
    """MONAI ``UNETR`` (2-D, conv patch embedding) run on ``img_size`` tiles."""
    if img_size < UNETR_PATCH or img_size % UNETR_PATCH:
        raise ValueError(f"model 'unetr': img_size must be a multiple of {UNETR_PATCH}, got {img_size}")
    if hidden_size % num_heads:
        raise ValueError(f"model 'unetr': hidden_size {hidden_size} not divisible by num_heads {num_heads}")
    net = UNETR(in_channels=in_channels, out_channels=out_channels, img_size=(img_size, img_size),
                feature_size=feature_size, hidden_size=hidden_size, mlp_dim=mlp_dim, num_heads=num_heads,
                proj_type="conv", norm_name=layer_spec(norm), dropout_rate=dropout, spatial_dims=2)
    # MONAI's transformer blocks register a cross-attention norm that UNETR never uses;
    # frozen, it neither counts as trainable nor trips DDP's unused-parameter check.
    for block in net.vit.blocks:
        if hasattr(block, "norm_cross_attn") and not getattr(block, "with_cross_attention", False):
            block.norm_cross_attn.requires_grad_(False)
    return PadCrop(net, UNETR_PATCH, pad_mode, tile=img_size)


@register("swin_unetr")
def build_swin_unetr(in_channels: int = 3, out_channels: int = 3, feature_size: int = 24,
                     depths: Sequence[int] = (2, 2, 2, 2), num_heads: Sequence[int] = (3, 6, 12, 24),
                     window_size: int = 7, dropout: float = 0.0, attn_dropout: float = 0.0,
                     dropout_path: float = 0.0, norm="instance", use_v2: bool = False,
                     pad_mode: str = "reflect") -> nn.Module:
    """MONAI ``SwinUNETR`` (2-D), inputs padded to a multiple of 32."""
    if feature_size < 12 or feature_size % 12:
        raise ValueError(f"model 'swin_unetr': feature_size must be a multiple of 12, got {feature_size}")
    net = SwinUNETR(in_channels=in_channels, out_channels=out_channels, feature_size=feature_size,
                    depths=tuple(depths), num_heads=tuple(num_heads), window_size=window_size,
                    norm_name=layer_spec(norm), drop_rate=dropout, attn_drop_rate=attn_dropout,
                    dropout_path_rate=dropout_path, spatial_dims=2, use_v2=use_v2)
    return PadCrop(net, SWIN_MULTIPLE, pad_mode)
