"""Networks: registry, any-size forward/backward, channels_last, heads, gates, profile."""

import itertools

import pytest
import torch
import torch.nn as nn

from cellnest.nets import MODEL_NAMES, AttentionGate, PadCrop, build_model, count_flops, count_parameters
from cellnest.nets.unetpp import NODE_NAMES, NODES, PAPER_GATES, UNetPlusPlus, parse_gates
from cellnest.nets.wrapper import pad_to

# Slim widths: the same code paths as the defaults at a fraction of the cost.
SLIM = {
    "unet": {"channels": [4, 8, 8, 16, 16]},
    "unetpp": {"features": [4, 4, 8, 8, 16, 4], "deep_supervision": True},
    "attn_unetpp": {"features": [4, 4, 8, 8, 16, 4], "gates": ["2,1", "0,3"], "deep_supervision": True},
    "unetr": {"img_size": 64, "feature_size": 4, "hidden_size": 16, "mlp_dim": 32, "num_heads": 2},
    "swin_unetr": {"feature_size": 12, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 1, 1]},
    "generic_unet": {"strides": [1, 2, 2, 2, 2], "base_filters": 4, "max_filters": 16},
}
# (model, number of heads, stride of each head)
HEADS = [
    ("unet", [1]),
    ("unetpp", [1, 1, 1, 1]),
    ("attn_unetpp", [1, 1, 1, 1]),
    ("unetr", [1]),
    ("swin_unetr", [1]),
    ("generic_unet", [1, 2, 4, 8]),
]


def slim(name, **extra):
    torch.manual_seed(0)
    return build_model(name, **{**SLIM[name], **extra})


def test_registry_lists_the_six_networks():
    assert MODEL_NAMES == ("unet", "unetpp", "attn_unetpp", "unetr", "swin_unetr", "generic_unet")
    assert set(SLIM) == set(MODEL_NAMES)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_forward_backward_on_odd_size(name):
    model = slim(name).train()
    x = torch.randn(1, 3, 250, 313, requires_grad=True)
    y = model(x)
    assert isinstance(y, torch.Tensor) and y.shape == (1, 3, 250, 313)
    sum(head.square().mean() for head in model.forward_heads(x)).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert x.grad is not None and x.grad.shape == x.shape


@pytest.mark.parametrize(("name", "strides"), HEADS)
def test_forward_heads_shapes_and_main_head(name, strides):
    model = slim(name).eval()
    x = torch.randn(2, 3, 37, 45)
    with torch.no_grad():
        heads = model.forward_heads(x)
        main = model(x)
    assert model.num_heads == len(heads) == len(strides)
    for head, s in zip(heads, strides):
        assert head.shape == (2, 3, -(-37 // s), -(-45 // s))
    torch.testing.assert_close(heads[0], main)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_channels_last(name):
    model = slim(name).to(memory_format=torch.channels_last).eval()
    x = torch.randn(2, 3, 40, 33).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        y = model(x)
        reference = model(x.contiguous())
    assert y.shape == (2, 3, 40, 33)
    torch.testing.assert_close(y, reference, rtol=1e-4, atol=1e-4)


def test_in_and_out_channels():
    model = build_model("unetpp", in_channels=1, out_channels=2, features=[4, 4, 4, 4, 4, 4])
    assert model(torch.zeros(1, 1, 20, 20)).shape == (1, 2, 20, 20)


def test_deep_supervision_flag_keeps_the_return_type():
    for flag in (False, True):
        model = build_model("unetpp", features=[4, 4, 4, 4, 4, 4], deep_supervision=flag).train()
        assert isinstance(model(torch.zeros(1, 3, 32, 32)), torch.Tensor)


@pytest.mark.parametrize(
    ("name", "cfg", "message"),
    [
        ("resnet", {}, "unknown model 'resnet'"),
        ("unet", {"features": [1]}, "model 'unet': unknown cfg key 'features'"),
        ("unetpp", {"gates": ["0,1"]}, "model 'unetpp': unknown cfg key 'gates'"),
        ("attn_unetpp", {"gates": ["4,1"]}, "gate '4,1' is not a nested node"),
        ("attn_unetpp", {"gates": ["0,0"]}, "gate '0,0' is not a nested node"),
        ("attn_unetpp", {"gates": ["1,1", "1, 1"]}, "listed twice"),
        ("attn_unetpp", {"gate_inputs": "middle"}, "gate_inputs must be one of"),
        ("unetr", {"img_size": 100}, "img_size must be a multiple of 16"),
        ("swin_unetr", {"feature_size": 16}, "feature_size must be a multiple of 12"),
        ("unet", {"pad_mode": "wrap"}, "pad_mode must be one of"),
    ],
)
def test_bad_names_and_keys_raise(name, cfg, message):
    with pytest.raises(ValueError, match=message):
        build_model(name, **cfg)


# (gates, gate_inputs, expected AttentionGate module paths inside model.net)
GATE_CASES = [
    ([], "last", []),
    (["2,1", "0,3"], "last", ["nodes.0_3.gates.0", "nodes.2_1.gates.0"]),
    (list(PAPER_GATES), "last", ["nodes.0_3.gates.0", "nodes.1_2.gates.0", "nodes.2_1.gates.0"]),
    (["0,4"], "first", ["nodes.0_4.gates.0"]),
    (["1,3", "3,1"], "all", ["nodes.1_3.gates.0", "nodes.1_3.gates.1", "nodes.1_3.gates.2",
                             "nodes.3_1.gates.0"]),
    ("all", "last", [f"nodes.{i}_{j}.gates.0" for i, j in NODES]),
]


@pytest.mark.parametrize(("gates", "gate_inputs", "expected"), GATE_CASES)
def test_attention_modules_sit_at_the_named_nodes(gates, gate_inputs, expected):
    model = build_model("attn_unetpp", features=[4, 4, 4, 4, 4, 4], gates=gates, gate_inputs=gate_inputs)
    found = [name for name, m in model.net.named_modules() if isinstance(m, AttentionGate)]
    assert sorted(found) == sorted(expected)
    gated_nodes = {path.split(".")[1].replace("_", ",") for path in expected}
    assert set(model.net.gate_names) == gated_nodes


def test_gate_inputs_pick_the_skips():
    model = build_model("attn_unetpp", features=[4] * 6, gates=["0,3"], gate_inputs="first").net
    assert model.nodes["0_3"].gated == (0,)
    model = build_model("attn_unetpp", features=[4] * 6, gates=["0,3"], gate_inputs="last").net
    assert model.nodes["0_3"].gated == (2,)


def test_every_gate_placement_is_expressible():
    subsets = [list(c) for r in range(len(NODE_NAMES) + 1) for c in itertools.combinations(NODE_NAMES, r)]
    assert len(subsets) == 2**10
    assert len({parse_gates(s) for s in subsets}) == 2**10


def test_gate_widths_scale_to_the_paper_triplets():
    # The paper's (F_int, F_g, F_l) triplets for a 64-base network.
    with torch.device("meta"):
        net = UNetPlusPlus(features=(64, 128, 256, 512, 1024, 64), gates=list(PAPER_GATES))
    triplets = {name: net.nodes[name.replace(",", "_")].gates[0].channels for name in PAPER_GATES}
    assert {k: (f_int, f_g, f_l) for k, (f_l, f_g, f_int) in triplets.items()} == {
        "2,1": (128, 256, 256), "1,2": (64, 128, 128), "0,3": (32, 64, 64)}


def test_attention_gate_map_and_identity_init():
    x, g = torch.randn(2, 5, 6, 7), torch.randn(2, 3, 6, 7)
    gate = AttentionGate(5, 3, 2)
    alpha = gate.attention_map(x, g)
    assert alpha.shape == (2, 1, 6, 7) and bool(((alpha > 0) & (alpha < 1)).all())
    torch.testing.assert_close(gate(x, g), x * alpha)
    open_gate = AttentionGate(5, 3, 2, psi_bias=30.0)
    nn.init.zeros_(open_gate.psi.weight)
    torch.testing.assert_close(open_gate(x, g), x)


def test_unwrapped_network_rejects_bad_sizes():
    with pytest.raises(ValueError, match="multiples of 16"):
        UNetPlusPlus(features=[4] * 6)(torch.zeros(1, 3, 20, 16))


@pytest.mark.parametrize(("mode", "expected_last_row"), [
    ("reflect", [3.0, 4.0, 5.0, 4.0]),     # row 1 mirrored, col 1 mirrored
    ("replicate", [6.0, 7.0, 8.0, 8.0]),
    ("constant", [0.0, 0.0, 0.0, 0.0]),
])
def test_pad_to_modes(mode, expected_last_row):
    x = torch.arange(9.0).reshape(1, 1, 3, 3)
    y = pad_to(x, (4, 4), mode)
    assert y.shape == (1, 1, 4, 4)
    assert y[0, 0, -1].tolist() == expected_last_row
    torch.testing.assert_close(y[..., :3, :3], x)


def test_reflect_falls_back_to_replicate_for_large_pads():
    y = pad_to(torch.ones(1, 1, 2, 2), (16, 16), "reflect")
    assert y.shape == (1, 1, 16, 16) and bool((y == 1).all())


def test_padcrop_is_exact_for_pointwise_nets_and_tiles():
    conv = nn.Conv2d(3, 2, kernel_size=1)
    x = torch.randn(2, 3, 23, 41)
    torch.testing.assert_close(PadCrop(conv, 16)(x), conv(x))
    torch.testing.assert_close(PadCrop(conv, 8, tile=16)(x), conv(x))


@pytest.mark.parametrize(("module", "tile", "params", "flops"), [
    # 3x3 conv 3->4: 3*4*9 weights + 4 biases; 2 * 3*9 MACs per output, 4 * 8 * 8 outputs.
    (nn.Conv2d(3, 4, kernel_size=3, padding=1), (3, 8, 8), 112, 2 * 27 * 4 * 64),
    # 1x1 conv 3->2 without bias on 16x16.
    (nn.Conv2d(3, 2, kernel_size=1, bias=False), (3, 16, 16), 6, 2 * 3 * 2 * 256),
])
def test_profile_counts(module, tile, params, flops):
    assert count_parameters(module) == params
    assert count_flops(module, tile) == flops
