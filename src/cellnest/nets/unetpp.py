"""U-Net++ (Zhou et al., DLMIA 2018) with optional attention gates at any nested node.

Nodes are named X^{i,j}: depth ``i`` (0 = full resolution, 4 = bottleneck), position
``j`` (0 = encoder). A decoder node X^{i,j} (j >= 1, i + j <= 4; ten of them) receives
the ``j`` skip inputs X^{i,0..j-1} and the transposed-conv upsampling of X^{i+1,j-1},
concatenates them and applies two 3x3 conv + norm + activation blocks (MONAI's
``TwoConv``). Widths follow MONAI's ``BasicUNetPlusPlus``: ``features`` = five encoder
widths plus the width of the last node X^{0,4}.

Attention gates (Attention U-Net++)
-----------------------------------
A gate G^{i,j} at node X^{i,j} takes skip features and the upsampled X^{i+1,j-1}
(the gating signal) and multiplies the skip features by an additive attention map
(:class:`~cellnest.nets.attention.AttentionGate`) before the concatenation. Gates are
named ``"i,j"`` as in the paper; any subset of the ten nodes is allowed (``"all"`` for
every node). Which of the ``j`` skip inputs a gate acts on is ``gate_inputs``:

* ``"last"`` (default): only X^{i,j-1}, the most refined skip and the one spatially
  aligned with the sub-network that produced the gating signal; the paper's
  single-input gate triplets fit it and nodes with j = 1 are unaffected by the choice.
* ``"first"``: only the encoder feature X^{i,0}, as Attention U-Net gates its skips.
* ``"all"``: each skip input gets its own gate (j gates at node X^{i,j}).

Gate widths scale with the network: F_l = F_g = ``features[i]`` (the upsampling
projects X^{i+1,j-1} to the skip width) and F_int = ``features[i] // gate_reduction``.
With ``features=(64, 128, 256, 512, 1024, 64)`` and ``gate_reduction=2`` this gives the
paper's triplets G^{2,1} (128, 256, 256), G^{1,2} (64, 128, 128) and G^{0,3}
(32, 64, 64) as (F_int, F_g, F_l).

Deep supervision heads are 1x1 convolutions on X^{0,1..4}, all at full resolution;
:meth:`UNetPlusPlus.forward_heads` returns them as [X^{0,4}, X^{0,3}, X^{0,2}, X^{0,1}],
deepest sub-network first, so the halving weights of the deep-supervision loss favour the
fuller sub-networks.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
import torch.nn as nn
from monai.networks.blocks import UpSample
from monai.networks.nets.basic_unet import Down, TwoConv

from cellnest.nets.attention import AttentionGate
from cellnest.nets.registry import layer_spec, register
from cellnest.nets.wrapper import PadCrop

DEPTH = 4
MULTIPLE = 2**DEPTH
NODES: tuple[tuple[int, int], ...] = tuple((i, j) for j in range(1, DEPTH + 1) for i in range(DEPTH + 1 - j))
NODE_NAMES: tuple[str, ...] = tuple(f"{i},{j}" for i, j in NODES)
PAPER_GATES = ("1,2", "2,1", "0,3")
GATE_INPUTS = ("last", "first", "all")
DEFAULT_FEATURES = (32, 32, 64, 128, 256, 32)
DEFAULT_ACT = ("leakyrelu", {"negative_slope": 0.1, "inplace": True})
DEFAULT_NORM = ("instance", {"affine": True})


def parse_gates(gates: str | Sequence[str]) -> tuple[tuple[int, int], ...]:
    """Gate names ``"i,j"`` (or ``"all"``) -> sorted unique (i, j) nodes."""
    if isinstance(gates, str):
        if gates == "all":
            return NODES
        raise ValueError(f"gates must be a list of 'i,j' names or 'all', got {gates!r}")
    nodes = []
    for name in gates:
        match = re.fullmatch(r"\s*(\d+)\s*,\s*(\d+)\s*", str(name))
        node = (int(match[1]), int(match[2])) if match else None
        if node not in NODES:
            raise ValueError(f"gate {name!r} is not a nested node; valid: {', '.join(NODE_NAMES)}")
        if node in nodes:
            raise ValueError(f"gate {name!r} is listed twice")
        nodes.append(node)
    return tuple(sorted(nodes, key=NODES.index))


class NestedNode(nn.Module):
    """Decoder node X^{i,j}: upsample the node below, gate skips, concatenate, two convs.

    Parameters
    ----------
    below_channels : channels of X^{i+1,j-1}.
    width : channels of each skip input X^{i,k}; the upsampling projects to it too.
    n_skips : j, the number of skip inputs.
    out_channels : channels of X^{i,j}.
    gated : indices of the skip inputs that get an :class:`AttentionGate` (may be empty).
    """

    def __init__(self, below_channels: int, width: int, n_skips: int, out_channels: int,
                 gated: Sequence[int], gate_reduction: int, psi_bias: float,
                 act, norm, dropout: float, upsample: str):
        super().__init__()
        self.up = UpSample(2, below_channels, width, scale_factor=2, mode=upsample)
        inter = max(1, width // gate_reduction)
        self.gated = tuple(gated)
        self.gates = nn.ModuleList(AttentionGate(width, width, inter, psi_bias) for _ in self.gated)
        self.convs = TwoConv(2, (n_skips + 1) * width, out_channels, act, norm, True, dropout)

    def forward(self, skips: list[torch.Tensor], below: torch.Tensor) -> torch.Tensor:
        g = self.up(below)
        skips = list(skips)
        for k, gate in zip(self.gated, self.gates):
            skips[k] = gate(skips[k], g)
        return self.convs(torch.cat([*skips, g], dim=1))


class UNetPlusPlus(nn.Module):
    """Nested U-Net (U-Net++) with optional attention gates; see the module docstring.

    Parameters
    ----------
    in_channels, out_channels : C of the (B, C, H, W) input, K of the logits.
    features : six widths (five encoder depths, then node X^{0,4}).
    gates : gate names ``"i,j"`` or ``"all"``; empty for the plain U-Net++.
    gate_inputs : which skip inputs of a gated node are gated (``GATE_INPUTS``).
    gate_reduction : F_int = features[i] // gate_reduction.
    psi_bias : initial bias of each gate's map logit.
    deep_supervision : add heads on X^{0,1..3} for :meth:`forward_heads`.
    act, norm : MONAI layer specs; dropout : rate in every conv block.
    upsample : MONAI ``UpSample`` mode (``"deconv"``, ``"nontrainable"``, ``"pixelshuffle"``).

    H and W must be multiples of 16 (use :class:`~cellnest.nets.wrapper.PadCrop`).
    """

    def __init__(self, in_channels: int = 3, out_channels: int = 3,
                 features: Sequence[int] = DEFAULT_FEATURES, gates: str | Sequence[str] = (),
                 gate_inputs: str = "last", gate_reduction: int = 2, psi_bias: float = 0.0,
                 deep_supervision: bool = False, act=DEFAULT_ACT, norm=DEFAULT_NORM,
                 dropout: float = 0.0, upsample: str = "deconv"):
        super().__init__()
        fea = tuple(int(f) for f in features)
        if len(fea) != 6 or min(fea) < 1:
            raise ValueError(f"features must be six positive widths, got {features!r}")
        if gate_inputs not in GATE_INPUTS:
            raise ValueError(f"gate_inputs must be one of {GATE_INPUTS}, got {gate_inputs!r}")
        if gate_reduction < 1:
            raise ValueError(f"gate_reduction must be >= 1, got {gate_reduction}")
        self.gate_nodes = parse_gates(gates)
        self.gate_inputs = gate_inputs
        self.deep_supervision = bool(deep_supervision)
        self.num_heads = DEPTH if self.deep_supervision else 1
        act, norm = layer_spec(act), layer_spec(norm)

        self.encoder = nn.ModuleList([TwoConv(2, in_channels, fea[0], act, norm, True, dropout)])
        for i in range(1, DEPTH + 1):
            self.encoder.append(Down(2, fea[i - 1], fea[i], act, norm, True, dropout))
        self.nodes = nn.ModuleDict()
        for i, j in NODES:
            gated = _gated_inputs(j, gate_inputs) if (i, j) in self.gate_nodes else ()
            out = fea[5] if (i, j) == (0, DEPTH) else fea[i]
            self.nodes[f"{i}_{j}"] = NestedNode(fea[i + 1], fea[i], j, out, gated, gate_reduction,
                                                psi_bias, act, norm, dropout, upsample)
        self.head = nn.Conv2d(fea[5], out_channels, kernel_size=1)
        self.aux_heads = nn.ModuleDict()
        if self.deep_supervision:
            for j in range(DEPTH - 1, 0, -1):
                self.aux_heads[f"0_{j}"] = nn.Conv2d(fea[0], out_channels, kernel_size=1)

    @property
    def gate_names(self) -> tuple[str, ...]:
        """Names ``"i,j"`` of the gated nodes."""
        return tuple(f"{i},{j}" for i, j in self.gate_nodes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W), H and W multiples of 16 -> logits (B, K, H, W) from X^{0,4}."""
        return self.head(self._features(x)[(0, DEPTH)])

    def forward_heads(self, x: torch.Tensor) -> list[torch.Tensor]:
        """[X^{0,4}, X^{0,3}, X^{0,2}, X^{0,1}] heads (only X^{0,4} without deep supervision)."""
        feats = self._features(x)
        heads = [self.head(feats[(0, DEPTH)])]
        for name, conv in self.aux_heads.items():
            heads.append(conv(feats[(0, int(name.split("_")[1]))]))
        return heads

    def _features(self, x: torch.Tensor) -> dict[tuple[int, int], torch.Tensor]:
        if x.shape[-2] % MULTIPLE or x.shape[-1] % MULTIPLE:
            raise ValueError(f"H and W must be multiples of {MULTIPLE}, got {tuple(x.shape[-2:])}")
        feats: dict[tuple[int, int], torch.Tensor] = {}
        for i, block in enumerate(self.encoder):
            x = block(x)
            feats[(i, 0)] = x
        for i, j in NODES:
            skips = [feats[(i, k)] for k in range(j)]
            feats[(i, j)] = self.nodes[f"{i}_{j}"](skips, feats[(i + 1, j - 1)])
        return feats


def _gated_inputs(j: int, gate_inputs: str) -> tuple[int, ...]:
    if gate_inputs == "all":
        return tuple(range(j))
    return (0,) if gate_inputs == "first" else (j - 1,)


@register("unetpp")
def build_unetpp(in_channels: int = 3, out_channels: int = 3, features: Sequence[int] = DEFAULT_FEATURES,
                 deep_supervision: bool = False, act=DEFAULT_ACT, norm=DEFAULT_NORM,
                 dropout: float = 0.0, upsample: str = "deconv", pad_mode: str = "reflect") -> nn.Module:
    """Plain U-Net++ (no gates), MONAI ``BasicUNetPlusPlus`` widths by default."""
    net = UNetPlusPlus(in_channels, out_channels, features, (), "last", 2, 0.0, deep_supervision,
                       act, norm, dropout, upsample)
    return PadCrop(net, MULTIPLE, pad_mode)


@register("attn_unetpp")
def build_attn_unetpp(in_channels: int = 3, out_channels: int = 3,
                      features: Sequence[int] = DEFAULT_FEATURES, gates: str | Sequence[str] = PAPER_GATES,
                      gate_inputs: str = "last", gate_reduction: int = 2, psi_bias: float = 0.0,
                      deep_supervision: bool = False, act=DEFAULT_ACT, norm=DEFAULT_NORM,
                      dropout: float = 0.0, upsample: str = "deconv", pad_mode: str = "reflect") -> nn.Module:
    """Attention U-Net++; default gates are the paper's G^{1,2} + G^{2,1} + G^{0,3}."""
    net = UNetPlusPlus(in_channels, out_channels, features, gates, gate_inputs, gate_reduction, psi_bias,
                       deep_supervision, act, norm, dropout, upsample)
    return PadCrop(net, MULTIPLE, pad_mode)
