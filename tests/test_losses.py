"""Losses: hand-computed values, perfect predictions, weighting, deep supervision."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss as MonaiDiceCE

from cellnest.losses import (
    LOSS_NAMES,
    DeepSupervisionLoss,
    build_loss,
    deep_supervision_weights,
    downsample_target,
    downsample_weight,
    weighted_dice,
)
from cellnest.nets import build_model

LN3 = math.log(3.0)
S = 1e-5  # default Dice smoothing

# Two pixels (classes 0 and 1), three classes, all logits 0: every probability is 1/3.
ZERO_LOGITS = torch.zeros(1, 3, 1, 2)
TARGET = torch.tensor([[[0, 1]]])
W21 = torch.tensor([[[2.0, 1.0]]])


def dice(tp, fp, fn):
    return 1 - (2 * tp + S) / (2 * tp + fp + fn + S)


# Soft Dice by hand: classes 0 and 1 have TP 1/3, FP 1/3, FN 2/3; class 2 has FP 2/3.
DICE_UNIFORM = (dice(1 / 3, 1 / 3, 2 / 3) * 2 + dice(0, 2 / 3, 0)) / 3
# Weights (2, 1): class 0 TP 2/3, FP 1/3, FN 4/3; class 1 TP 1/3, FP 2/3, FN 2/3; class 2 FP 1.
DICE_W21 = (dice(2 / 3, 1 / 3, 4 / 3) + dice(1 / 3, 2 / 3, 2 / 3) + dice(0, 1, 0)) / 3
FOCAL_UNIFORM = (2 / 3) ** 2 * LN3  # -(1 - p_t)^gamma log p_t with p_t = 1/3

CASES = [
    # (loss name, cfg, weight map, expected value)
    ("dice_ce", {}, None, LN3 + DICE_UNIFORM),
    ("dice_ce", {}, W21, LN3 + DICE_UNIFORM),  # unweighted loss ignores the map
    ("dice_ce", {"lambda_dice": 0.0}, None, LN3),
    ("dice_ce", {"include_background": False}, None, (dice(1 / 3, 1 / 3, 2 / 3) + dice(0, 2 / 3, 0)) / 2 + LN3),
    ("weighted_dice_ce", {}, W21, 1.5 * LN3 + DICE_W21),
    ("weighted_dice_ce", {"lambda_ce": 2.0, "lambda_dice": 0.5}, W21, 3.0 * LN3 + 0.5 * DICE_W21),
    ("dice_focal", {}, None, 0.5 * FOCAL_UNIFORM + 0.5 * DICE_UNIFORM),
    ("dice_focal", {"gamma": 0.0}, None, 0.5 * LN3 + 0.5 * DICE_UNIFORM),
    # alpha 0.25: background pixels x 0.75, foreground pixels x 0.25.
    ("dice_focal", {"alpha": 0.25}, None, 0.5 * FOCAL_UNIFORM * (0.75 + 0.25) / 2 + 0.5 * DICE_UNIFORM),
    ("dice_focal", {"alpha": [0.2, 0.6, 0.2]}, None, 0.5 * FOCAL_UNIFORM * (0.2 + 0.6) / 2 + 0.5 * DICE_UNIFORM),
    ("dice_focal", {"lambda_focal": 1.0, "lambda_dice": 0.0, "gamma": 1.0}, None, (2 / 3) * LN3),
]


@pytest.mark.parametrize(("name", "cfg", "weight", "expected"), CASES)
def test_hand_computed_values(name, cfg, weight, expected):
    value = build_loss(name, **cfg)(ZERO_LOGITS, TARGET, weight)
    assert value.ndim == 0
    assert value.item() == pytest.approx(expected, abs=1e-5)


def perfect_logits(target, n_classes=3, scale=100.0):
    return scale * F.one_hot(target, n_classes).permute(0, 3, 1, 2).float()


@pytest.mark.parametrize("name", LOSS_NAMES)
@pytest.mark.parametrize("labels", [[[0, 1, 2], [2, 1, 0]], [[0, 1, 1], [1, 0, 0]]])  # second: class 2 absent
def test_perfect_prediction_gives_zero(name, labels):
    target = torch.tensor([labels])
    weight = torch.rand(1, 2, 3) + 0.5
    assert build_loss(name)(perfect_logits(target), target, weight).item() == pytest.approx(0.0, abs=1e-5)


def test_weights_of_one_equal_the_unweighted_loss():
    torch.manual_seed(0)
    logits, target = torch.randn(2, 3, 9, 11), torch.randint(0, 3, (2, 9, 11))
    ones = torch.ones(2, 9, 11)
    for cfg in ({}, {"batch": True}, {"include_background": False}):
        weighted = build_loss("weighted_dice_ce", **cfg)(logits, target, ones)
        torch.testing.assert_close(weighted, build_loss("dice_ce", **cfg)(logits, target))
    torch.testing.assert_close(weighted_dice(logits, target, ones), weighted_dice(logits, target))


def test_weighted_loss_depends_on_the_weights():
    torch.manual_seed(0)
    logits, target = torch.randn(1, 3, 5, 5), torch.randint(0, 3, (1, 5, 5))
    loss = build_loss("weighted_dice_ce")
    assert loss(logits, target, torch.ones(1, 5, 5)) != loss(logits, target, torch.rand(1, 5, 5))


def test_dice_ce_matches_monai_and_focal_gamma0_is_ce():
    torch.manual_seed(0)
    logits, target = torch.randn(2, 3, 8, 9), torch.randint(0, 3, (2, 8, 9))
    expected = MonaiDiceCE(softmax=True, to_onehot_y=True)(logits, target[:, None])
    torch.testing.assert_close(build_loss("dice_ce")(logits, target), expected)
    focal = build_loss("dice_focal", gamma=0.0, lambda_focal=1.0, lambda_dice=0.0)(logits, target)
    torch.testing.assert_close(focal, F.cross_entropy(logits, target))


def test_gradients_flow():
    logits = torch.randn(2, 3, 6, 7, requires_grad=True)
    target, weight = torch.randint(0, 3, (2, 6, 7)), torch.rand(2, 6, 7)
    for name in LOSS_NAMES:
        logits.grad = None
        build_loss(name)(logits, target, weight).backward()
        assert logits.grad is not None and torch.isfinite(logits.grad).all()


@pytest.mark.parametrize(("call", "message"), [
    (lambda: build_loss("dice")(ZERO_LOGITS, TARGET), "unknown loss 'dice'"),
    (lambda: build_loss("dice_ce", gamma=2), "loss 'dice_ce': unknown cfg key 'gamma'"),
    (lambda: build_loss("dice_ce", weighted=True), "unknown cfg key 'weighted'"),
    (lambda: build_loss("weighted_dice_ce")(ZERO_LOGITS, TARGET), "needs a \\(B, H, W\\) weight map"),
    (lambda: build_loss("dice_ce")(ZERO_LOGITS, TARGET[0]), "target shape"),
    (lambda: build_loss("dice_ce")(ZERO_LOGITS, TARGET.float()), "integer class map"),
    (lambda: build_loss("weighted_dice_ce")(ZERO_LOGITS, TARGET, W21[..., :1]), "weight shape"),
    (lambda: build_loss("dice_ce")([ZERO_LOGITS, torch.zeros(1, 3, 1, 3)], TARGET), "integer stride"),
    (lambda: build_loss("dice_ce", ds_weights=[1, 1])(ZERO_LOGITS, TARGET), "1 heads but 2"),
])
def test_bad_inputs_raise(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize(("n", "expected"), [
    (1, [1.0]),
    (2, [2 / 3, 1 / 3]),
    (3, [4 / 7, 2 / 7, 1 / 7]),
    (5, [16 / 31, 8 / 31, 4 / 31, 2 / 31, 1 / 31]),
])
def test_deep_supervision_weights(n, expected):
    assert deep_supervision_weights(n) == pytest.approx(expected)


def test_downsample_target_is_a_strided_pick():
    target = torch.arange(25).reshape(1, 5, 5)
    assert downsample_target(target, (3, 3)).tolist() == [[[0, 2, 4], [10, 12, 14], [20, 22, 24]]]
    assert downsample_target(target, (2, 2)).tolist() == [[[0, 4], [20, 24]]]  # stride 4 (a power of two) also gives 2
    assert downsample_target(target, (5, 5)).equal(target)


def test_downsample_weight_is_an_area_average():
    weight = torch.arange(25.0).reshape(1, 5, 5)
    # 2x2 blocks; the last row and column blocks are cut by the border.
    expected = [[[3.0, 5.0, 6.5], [13.0, 15.0, 16.5], [20.5, 22.5, 24.0]]]
    assert downsample_weight(weight, (3, 3)).tolist() == expected


class MeanLoss(torch.nn.Module):
    """Records what each head gets; returns the head's mean."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, logits, target, weight=None):
        self.seen.append((tuple(logits.shape[-2:]), tuple(target.shape), None if weight is None else weight.sum()))
        return logits.mean()


def test_deep_supervision_combines_heads():
    heads = [torch.full((1, 3, 9, 9), 1.0), torch.full((1, 3, 5, 5), 2.0), torch.full((1, 3, 3, 3), 3.0)]
    recorder = MeanLoss()
    total = DeepSupervisionLoss(recorder)(heads, torch.zeros(1, 9, 9, dtype=torch.long), torch.ones(1, 9, 9))
    assert total.item() == pytest.approx((4 * 1 + 2 * 2 + 1 * 3) / 7)
    assert [s[:2] for s in recorder.seen] == [((9, 9), (1, 9, 9)), ((5, 5), (1, 5, 5)), ((3, 3), (1, 3, 3))]
    assert [s[2].item() for s in recorder.seen] == [81, 25, 9]  # averaged weights stay 1
    explicit = DeepSupervisionLoss(MeanLoss(), weights=[1, 0, 1])(heads, torch.zeros(1, 9, 9, dtype=torch.long))
    assert explicit.item() == pytest.approx(2.0)


def test_single_tensor_equals_the_base_loss():
    torch.manual_seed(0)
    logits, target = torch.randn(1, 3, 6, 6), torch.randint(0, 3, (1, 6, 6))
    loss = build_loss("dice_focal")
    torch.testing.assert_close(loss(logits, target), loss.loss(logits, target))
    torch.testing.assert_close(loss([logits], target), loss.loss(logits, target))


@pytest.mark.parametrize("name", ["generic_unet", "attn_unetpp"])
def test_deep_supervision_on_real_heads(name):
    cfg = {"strides": [1, 2, 2, 2], "base_filters": 4} if name == "generic_unet" else \
        {"features": [4] * 6, "deep_supervision": True}
    model = build_model(name, **cfg)
    x, target, weight = torch.randn(1, 3, 29, 35), torch.randint(0, 3, (1, 29, 35)), torch.rand(1, 29, 35) + 1
    heads = model.forward_heads(x)
    assert len(heads) == model.num_heads > 1
    loss = build_loss("weighted_dice_ce")
    value = loss(heads, target, weight)
    # The documented sum: head k weighs 2**-k (normalised) and, at its stride s (a power of
    # two; 1 for U-Net++'s full-size heads), sees the target picked at its pixels and the
    # weight map averaged over s x s blocks.
    raw = [0.5**k for k in range(len(heads))]
    expected = 0
    for k, head in enumerate(heads):
        s = 2 ** round(np.log2(29 / head.shape[-2]))
        assert head.shape[-2:] == (-(-29 // s), -(-35 // s))
        w = torch.nn.functional.avg_pool2d(weight[:, None], s, s, ceil_mode=True)[:, 0] if s > 1 else weight
        expected = expected + raw[k] / sum(raw) * loss.loss(head, target[:, ::s, ::s], w)
    torch.testing.assert_close(value, expected)
    value.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
