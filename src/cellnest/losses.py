"""Segmentation losses of both systems, chosen by name from a recipe.

Shapes: logits (B, C, H, W) float; targets (B, H, W) int64 class maps (0 background,
1 interior, 2 boundary for the three-class targets); weight maps (B, H, W) float32
(Ronneberger maps from :func:`cellnest.targets.weight_map`). Every loss is called as
``loss(logits, target, weight=None)`` and returns a scalar tensor.

* ``dice_focal`` (Attention U-Net++): ``lambda_focal * focal + lambda_dice * Dice`` with
  a *softmax* focal term. MONAI's ``DiceFocalLoss`` applies a sigmoid focal term even
  with ``softmax=True``, so MONAI's ``DiceLoss(softmax=True)`` and
  ``FocalLoss(use_softmax=True)`` are composed here. The focal term is summed over
  classes (only the true class is non-zero) and averaged over pixels, so with
  ``gamma=0`` and no ``alpha`` it equals cross-entropy; MONAI's own ``"mean"`` would also
  divide by C.
* ``dice_ce`` / ``weighted_dice_ce`` (Re-Unet): ``lambda_dice * Dice + lambda_ce * CE``.
  The weighted form multiplies the per-pixel CE (``reduction='none'``, then the mean
  over pixels) and the soft Dice TP, FP and FN sums by the weight map; with all weights
  1 it equals the unweighted loss. ``weighted_dice_ce`` requires a weight map; the
  unweighted losses ignore one (``loss.uses_weight_map`` tells a trainer whether to
  compute it).
* :class:`DeepSupervisionLoss` takes one logits tensor or the list of heads from
  ``model.forward_heads``; :func:`build_loss` always returns one, so callers need not
  know whether the model has deep supervision.

Soft Dice per image and class (``batch=True`` pools the batch):
``1 - (2 TP + smooth_nr) / (2 TP + FP + FN + smooth_dr)``, averaged over classes and
images; ``include_background=False`` drops class 0.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.losses import DiceLoss, FocalLoss


def _check_inputs(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None) -> None:
    if logits.ndim != 4:
        raise ValueError(f"logits must be (B, C, H, W), got shape {tuple(logits.shape)}")
    if target.shape != logits.shape[:1] + logits.shape[2:]:
        raise ValueError(f"target shape {tuple(target.shape)} does not match logits {tuple(logits.shape)}: "
                         f"expected (B, H, W)")
    if target.dtype.is_floating_point or target.dtype == torch.bool:
        raise ValueError(f"target must be an integer class map, got dtype {target.dtype}")
    if weight is not None and weight.shape != target.shape:
        raise ValueError(f"weight shape {tuple(weight.shape)} does not match target {tuple(target.shape)}")


class DiceFocalLoss(nn.Module):
    """``lambda_focal * softmax focal + lambda_dice * soft Dice`` (see the module docstring).

    Parameters
    ----------
    lambda_focal, lambda_dice : term weights (0.5 and 0.5).
    gamma : focal exponent.
    alpha : focal class balance: a float gives background ``1 - alpha`` and every other
        class ``alpha`` (MONAI's convention), a list gives one factor per class.
    class_weights : optional per-class factors of the focal term.
    include_background : keep class 0 in both terms.
    smooth_nr, smooth_dr : Dice smoothing of numerator and denominator.
    batch : pool the Dice sums over the batch.
    """

    uses_weight_map = False

    def __init__(self, lambda_focal: float = 0.5, lambda_dice: float = 0.5, gamma: float = 2.0,
                 alpha: float | Sequence[float] | None = None, class_weights: Sequence[float] | None = None,
                 include_background: bool = True, smooth_nr: float = 1e-5, smooth_dr: float = 1e-5,
                 batch: bool = False):
        super().__init__()
        if lambda_focal < 0 or lambda_dice < 0:
            raise ValueError(f"lambda_focal and lambda_dice must be >= 0, got {lambda_focal}, {lambda_dice}")
        self.lambda_focal = float(lambda_focal)
        self.lambda_dice = float(lambda_dice)
        self.focal = FocalLoss(include_background=include_background, to_onehot_y=True, gamma=gamma,
                               alpha=alpha, weight=class_weights, reduction="none", use_softmax=True)
        self.dice = DiceLoss(include_background=include_background, to_onehot_y=True, softmax=True,
                             smooth_nr=smooth_nr, smooth_dr=smooth_dr, batch=batch)

    def forward(self, logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None
                ) -> torch.Tensor:
        """Scalar loss; ``weight`` is ignored."""
        _check_inputs(logits, target, weight)
        target = target.long()[:, None]
        focal = self.focal(logits, target).sum(dim=1).mean()
        return self.lambda_focal * focal + self.lambda_dice * self.dice(logits, target)


class DiceCELoss(nn.Module):
    """``lambda_dice * soft Dice + lambda_ce * cross-entropy``, optionally weighted per pixel.

    Parameters
    ----------
    weighted : require a (B, H, W) weight map and weight both terms by it.
    lambda_dice, lambda_ce : term weights (1 and 1, as nnU-Net).
    include_background : keep class 0 in the Dice term (CE always uses every class).
    smooth_nr, smooth_dr : Dice smoothing; batch : pool the Dice sums over the batch.
    """

    def __init__(self, weighted: bool = False, lambda_dice: float = 1.0, lambda_ce: float = 1.0,
                 include_background: bool = True, smooth_nr: float = 1e-5, smooth_dr: float = 1e-5,
                 batch: bool = False):
        super().__init__()
        if lambda_dice < 0 or lambda_ce < 0:
            raise ValueError(f"lambda_dice and lambda_ce must be >= 0, got {lambda_dice}, {lambda_ce}")
        self.uses_weight_map = bool(weighted)
        self.lambda_dice = float(lambda_dice)
        self.lambda_ce = float(lambda_ce)
        self.include_background = include_background
        self.smooth_nr = float(smooth_nr)
        self.smooth_dr = float(smooth_dr)
        self.batch = batch

    def forward(self, logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None
                ) -> torch.Tensor:
        """Scalar loss; ``weight`` (B, H, W) is required if weighted, ignored otherwise."""
        _check_inputs(logits, target, weight)
        target = target.long()
        if not self.uses_weight_map:
            weight = None
        elif weight is None:
            raise ValueError("weighted_dice_ce needs a (B, H, W) weight map, got None")
        ce = F.cross_entropy(logits.float(), target, reduction="none")
        if weight is not None:
            ce = ce * weight
        dice = weighted_dice(logits, target, weight, self.include_background, self.smooth_nr,
                             self.smooth_dr, self.batch)
        return self.lambda_ce * ce.mean() + self.lambda_dice * dice


def weighted_dice(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None,
                  include_background: bool = True, smooth_nr: float = 1e-5, smooth_dr: float = 1e-5,
                  batch: bool = False) -> torch.Tensor:
    """Soft Dice loss of softmax(logits) with TP, FP, FN weighted per pixel.

    logits (B, C, H, W), target (B, H, W) int64, weight (B, H, W) or None (all 1).
    Returns the scalar mean over classes and images of
    ``1 - (2 TP + smooth_nr) / (2 TP + FP + FN + smooth_dr)``.
    """
    probs = torch.softmax(logits.float(), dim=1)
    onehot = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2).to(probs.dtype)
    if not include_background:
        probs, onehot = probs[:, 1:], onehot[:, 1:]
    w = torch.ones_like(probs[:, :1]) if weight is None else weight[:, None].to(probs.dtype)
    dims = (0, 2, 3) if batch else (2, 3)
    tp = (w * probs * onehot).sum(dims)
    fp = (w * probs * (1 - onehot)).sum(dims)
    fn = (w * (1 - probs) * onehot).sum(dims)
    return (1 - (2 * tp + smooth_nr) / (2 * tp + fp + fn + smooth_dr)).mean()


def deep_supervision_weights(n_heads: int) -> list[float]:
    """nnU-Net's rule: weight ``2**-k`` for head k (main head k = 0), normalised to sum 1."""
    if n_heads < 1:
        raise ValueError(f"n_heads must be >= 1, got {n_heads}")
    raw = [0.5**k for k in range(n_heads)]
    return [r / sum(raw) for r in raw]


def _stride(full: tuple[int, int], head: tuple[int, int]) -> tuple[int, int]:
    """Per-axis stride s with ``ceil(full / s) == head``; a power of two where several fit."""
    if len(full) != 2 or len(head) != 2:
        raise ValueError(f"expected (H, W) sizes, got target {full} and head {head}")
    strides = []
    for f, h in zip(full, head):
        lo, hi = -(-f // max(h, 1)), ((f - 1) // (h - 1) if h > 1 else f)
        fits = [s for s in range(lo, hi + 1) if -(-f // s) == h]
        if not fits:
            raise ValueError(f"head size {head} is not the target size {full} divided by an integer stride")
        powers = [s for s in fits if s & (s - 1) == 0]
        strides.append((powers or fits)[0])
    return strides[0], strides[1]


def downsample_target(target: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, H, W) class map -> (B, h, w) by a strided pick ``target[:, ::s, ::s]``.

    ``h = ceil(H / s)``; the picked pixels are those a stride-s head (cropped by
    :class:`~cellnest.nets.wrapper.PadCrop`) sits on, and no class is averaged away.
    The stride is inferred from the sizes; where several fit (tiny maps) the power of two
    is taken, as the networks downsample by 2 per level.
    """
    sy, sx = _stride(tuple(target.shape[-2:]), tuple(size))
    return target[:, ::sy, ::sx]


def downsample_weight(weight: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, H, W) weight map -> (B, h, w) by area averaging over s x s blocks.

    Edge blocks cut by the border (``H`` not a multiple of ``s``) average their pixels.
    """
    sy, sx = _stride(tuple(weight.shape[-2:]), tuple(size))
    if (sy, sx) == (1, 1):
        return weight
    return F.avg_pool2d(weight[:, None], (sy, sx), stride=(sy, sx), ceil_mode=True)[:, 0]


class DeepSupervisionLoss(nn.Module):
    """Weighted sum of ``loss`` over deep-supervision heads.

    Parameters
    ----------
    loss : a loss called as ``loss(logits, target, weight)``.
    weights : one weight per head; default :func:`deep_supervision_weights` (halving
        per head, normalised to sum 1). Explicit weights are normalised too.

    Heads are (B, C, h_k, w_k) with ``h_k = ceil(H / s_k)``; targets are downsampled by
    :func:`downsample_target`, weight maps by :func:`downsample_weight`.
    """

    def __init__(self, loss: nn.Module, weights: Sequence[float] | None = None):
        super().__init__()
        if weights is not None and (len(weights) == 0 or min(weights) < 0 or sum(weights) <= 0):
            raise ValueError(f"weights must be non-negative with a positive sum, got {weights!r}")
        self.loss = loss
        self.weights = None if weights is None else [w / sum(weights) for w in weights]

    @property
    def uses_weight_map(self) -> bool:
        return bool(getattr(self.loss, "uses_weight_map", False))

    def forward(self, outputs: torch.Tensor | Sequence[torch.Tensor], target: torch.Tensor,
                weight: torch.Tensor | None = None) -> torch.Tensor:
        """Scalar loss for one logits tensor or a list of heads (main head first)."""
        heads = [outputs] if isinstance(outputs, torch.Tensor) else list(outputs)
        if not heads:
            raise ValueError("outputs is an empty list of heads")
        _check_inputs(heads[0], target, weight)
        weights = deep_supervision_weights(len(heads)) if self.weights is None else self.weights
        if len(weights) != len(heads):
            raise ValueError(f"{len(heads)} heads but {len(weights)} deep-supervision weights")
        total = heads[0].new_zeros(())
        for head, level_weight in zip(heads, weights):
            if level_weight == 0:
                continue
            size = tuple(head.shape[-2:])
            t = downsample_target(target, size)
            w = None if weight is None else downsample_weight(weight, size)
            total = total + level_weight * self.loss(head, t, w)
        return total


_LOSSES: dict[str, tuple[type[nn.Module], dict]] = {
    "dice_focal": (DiceFocalLoss, {}),
    "dice_ce": (DiceCELoss, {"weighted": False}),
    "weighted_dice_ce": (DiceCELoss, {"weighted": True}),
}
LOSS_NAMES: tuple[str, ...] = tuple(_LOSSES)


def build_loss(name: str, ds_weights: Sequence[float] | None = None, **cfg) -> DeepSupervisionLoss:
    """Build loss ``name`` (``LOSS_NAMES``) from plain recipe values.

    Returns a :class:`DeepSupervisionLoss` around it, called as
    ``loss(outputs, target, weight=None)`` with ``outputs`` one (B, C, H, W) logits
    tensor or the list from ``model.forward_heads``; ``ds_weights`` overrides the
    halving head weights.

    Raises ValueError for an unknown name or cfg key.
    """
    if name not in _LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of: {', '.join(LOSS_NAMES)}")
    cls, fixed = _LOSSES[name]
    valid = [p for p in inspect.signature(cls).parameters if p not in fixed]
    for key in cfg:
        if key not in valid:
            raise ValueError(f"loss {name!r}: unknown cfg key {key!r}; valid keys: {', '.join(valid + ['ds_weights'])}")
    return DeepSupervisionLoss(cls(**fixed, **cfg), ds_weights)
