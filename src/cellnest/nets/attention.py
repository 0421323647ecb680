"""Additive attention gate (Oktay et al., "Attention U-Net", MIDL 2018).

Design choices (documented in docs/networks.md):

* The gating signal ``g`` arrives already upsampled to the skip's resolution (in U-Net++
  it is the transposed-conv output of node X^{i+1,j-1}), so unlike Oktay's original the
  gate needs no strided ``theta`` or resampling of the map; this is the common
  Attention U-Net implementation.
* ``theta`` (skip) and ``phi`` (gate) are 1x1 convolutions to ``inter_channels``; their
  sum goes through ReLU, ``psi`` (1x1 conv to one channel) and a sigmoid. No
  normalisation inside the gate: instance norm over a single-channel map would force
  its mean to 0.5 whatever the image, and batch norm would tie it to the batch size.
* ``psi``'s bias starts at ``psi_bias`` (default 0, so a fresh gate outputs about 0.5,
  as in the reference implementation). A positive value such as 3 (sigmoid 0.95) makes
  an untrained gate pass the skip almost unchanged, i.e. starts from the plain U-Net++,
  at the price of smaller early gradients through the sigmoid.
"""

from __future__ import annotations

import torch
import torch.nn as nn

class AttentionGate(nn.Module):
    """Multiply skip features by an additive attention map computed from a gating signal.

    Parameters
    ----------
    skip_channels : F_l, channels of the gated skip features ``x``.
    gate_channels : F_g, channels of the gating signal ``g``.
    inter_channels : F_int, channels of the joint projection.
    psi_bias : initial bias of the map's logit (see the module docstring).
    """

    def __init__(self, skip_channels: int, gate_channels: int, inter_channels: int, psi_bias: float = 0.0):
        super().__init__()
        for name, value in (("skip_channels", skip_channels), ("gate_channels", gate_channels),
                            ("inter_channels", inter_channels)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.theta = nn.Conv2d(skip_channels, inter_channels, kernel_size=1, bias=False)
        self.phi = nn.Conv2d(gate_channels, inter_channels, kernel_size=1, bias=True)
        self.psi = nn.Conv2d(inter_channels, 1, kernel_size=1, bias=True)
        nn.init.constant_(self.psi.bias, float(psi_bias))
        self.channels = (skip_channels, gate_channels, inter_channels)

    def attention_map(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """(B, F_l, H, W) skip and (B, F_g, H, W) gate -> (B, 1, H, W) map in (0, 1)."""
        if x.shape[-2:] != g.shape[-2:]:
            raise ValueError(f"skip {tuple(x.shape)} and gate {tuple(g.shape)} differ in H, W")
        return torch.sigmoid(self.psi(torch.relu(self.theta(x) + self.phi(g))))

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """Gated skip features, (B, F_l, H, W)."""
        return x * self.attention_map(x, g)

    def extra_repr(self) -> str:
        f_l, f_g, f_int = self.channels
        return f"F_l={f_l}, F_g={f_g}, F_int={f_int}"
