"""Cell size from a network's deepest features: a Cellpose-style size model.

A network trained at one cell size still *sees* the size of the cells it is shown: the
global average of its deepest feature maps (Cellpose's "style" vector) changes with it.
A ridge regression from that vector to ``log2`` of the median cell diameter, fitted on
labelled images shown at many sizes, estimates the diameter of a new image from one
forward pass at its native scale, before any segmentation:

* :func:`pooled_features`: (F,) vector of one normalised image: the spatial means of the
  outputs of every ``Conv2d`` at the network's two coarsest resolutions (found with
  forward hooks, so any registered architecture works).
* :func:`fit_size_model`: windows of labelled images at random scales ``2 ** U(-r, r)``
  (``r = scale_range``, octaves) around their native size; the target is each window's
  median diameter times its scale. Ridge on standardised features, fitted in closed form
  with numpy (a few hundred rows: no solver library needed), its penalty chosen on
  held-out images.
* :class:`SizeModel`: the fitted numbers, stored as plain lists under ``"size_model"``
  in the model file (``torch.load(weights_only=True)`` reads them).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, replace
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from cellnest.data import Item
from cellnest.diameter import interior_median_diameter, rescale_image, resize_labels, window_slices
from cellnest.io import read_image, read_labels
from cellnest.modelfile import ModelFile
from cellnest.normalize import LOWER_PERCENTILE, UPPER_PERCENTILE, apply_image_percentiles, channels_first, image_percentiles
from cellnest.runtime import RuntimeNet, coarsest_positions

log = logging.getLogger(__name__)



@torch.inference_mode()
def pooled_features(model: nn.Module, image: np.ndarray, device: torch.device | str = "cpu") -> np.ndarray:
    """Spatial means of the outputs of every ``Conv2d`` at the network's ``cellnest.runtime.FEATURE_LEVELS`` coarsest
    resolutions, for one normalised (C, H, W) float32 image -> (F,) float64.

    F depends only on the network, not on the image size (spatial means). A network run
    by ONNX Runtime or OpenVINO (:class:`cellnest.runtime.RuntimeNet`) computes the same
    means inside its exported graph."""
    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None].to(device)
    inner = getattr(model, "net", None)
    if isinstance(inner, RuntimeNet):
        model(x)
        return np.asarray(inner.last_features, np.float64)
    outputs: list[tuple[int, torch.Tensor]] = []

    def keep(_module, _inputs, output):
        # over the batch too: a fixed-tile network (UNETR) folds its tiles into the batch
        outputs.append((output.shape[-2] * output.shape[-1], output.mean(dim=(0, -2, -1)).float()))

    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    hooks = [m.register_forward_hook(keep) for m in convs]
    was_training = model.training
    model.eval()
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    keep = coarsest_positions([size for size, _ in outputs])
    return torch.cat([outputs[i][1] for i in keep]).cpu().numpy().astype(np.float64)


@dataclass(frozen=True)
class SizeModel:
    """Ridge regression from pooled features to log2 median cell diameter.

    mean, scale : (F,) standardisation of the features; coef : (F,); intercept : float.
    window : side (pixels) of the native-scale windows features are taken from.
    """

    mean: list[float]
    scale: list[float]
    coef: list[float]
    intercept: float
    window: int = 384

    def predict(self, features: np.ndarray) -> float:
        """Median cell diameter (pixels) for one (F,) feature vector, within [1, 4096]."""
        z = (np.asarray(features, np.float64) - np.asarray(self.mean)) / np.asarray(self.scale)
        log2_diameter = float(z @ np.asarray(self.coef) + self.intercept)
        return float(2.0 ** np.clip(np.nan_to_num(log2_diameter, nan=5.0), 0.0, 12.0))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "SizeModel":
        return cls(**values)


def estimate_diameter(model: nn.Module, size_model: SizeModel, image: np.ndarray, bounds, windows: int = 4,
                      device: torch.device | str = "cpu") -> float:
    """Median cell diameter of a raw (H, W, C) image, in its own pixels: the median of the
    size model's predictions on up to ``windows`` native-scale windows (normalised with the
    whole image's percentile ``bounds``), no more windows than fit in the image's area, so
    sizing never reads more pixels than the image has (four overlapping 384-px windows of
    a 512-px image would read 2.25x the image)."""
    height, width = image.shape[:2]
    area_windows = (height * width) // (min(size_model.window, height) * min(size_model.window, width))
    estimates = []
    for rows, cols in window_slices((height, width), size_model.window, max(1, min(windows, area_windows))):
        crop = channels_first(apply_image_percentiles(image[rows, cols], bounds))
        estimates.append(size_model.predict(pooled_features(model, crop, device)))
    return float(np.median(estimates))


def ridge(features: np.ndarray, targets: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Closed-form ridge on standardised (N, F) features -> (mean, scale, coef, intercept)."""
    mean = features.mean(axis=0)
    scale = features.std(axis=0)
    scale[scale < 1e-8] = 1.0
    z = (features - mean) / scale
    intercept = float(targets.mean())
    gram = z.T @ z + alpha * len(z) * np.eye(z.shape[1])
    coef = np.linalg.solve(gram, z.T @ (targets - intercept))
    return mean, scale, coef, intercept


def fit_size_model(
    model: nn.Module,
    items: Sequence[Item],
    lower_percentile: float = LOWER_PERCENTILE,
    upper_percentile: float = UPPER_PERCENTILE,
    max_images: int = 300,
    draws: int = 2,
    scale_range: float = 1.25,
    window: int = 384,
    alphas: Sequence[float] = (0.01, 0.1, 1.0, 10.0),
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> tuple[SizeModel, dict]:
    """Fit a :class:`SizeModel` on labelled items (native images).

    Up to ``max_images`` items (an even share per modality, at random), ``draws`` windows
    each: a window of ``window / f`` native pixels is resized by ``f = 2 ** U(-scale_range,
    scale_range)`` (so it is about ``window`` pixels across) and its target is its median
    cell diameter. The ridge penalty is chosen from ``alphas`` on a held-out fifth of the
    images (by median ``|log2(estimate / truth)|``), then the model is refitted on all.
    Returns the model and fit statistics: window count, chosen alpha, held-out error.
    """
    rng = np.random.default_rng(seed)
    chosen = _balanced(items, max_images, rng)
    features, targets, groups = [], [], []
    for index, item in enumerate(tqdm(chosen, desc="size model", unit="img", disable=not progress)):
        image = read_image(item.image)
        labels = read_labels(item.label)
        bounds = image_percentiles(image, lower_percentile, upper_percentile)
        for _ in range(draws):
            factor = 2.0 ** rng.uniform(-scale_range, scale_range)
            height, width = labels.shape
            h, w = min(max(int(round(window / factor)), 16), height), min(max(int(round(window / factor)), 16), width)
            top, left = int(rng.integers(height - h + 1)), int(rng.integers(width - w + 1))
            rows, cols = slice(top, top + h), slice(left, left + w)
            crop_labels = labels[rows, cols]
            shape = (max(int(round(crop_labels.shape[0] * factor)), 1), max(int(round(crop_labels.shape[1] * factor)), 1))
            diameter = interior_median_diameter(resize_labels(crop_labels, shape))
            if diameter is None:
                continue
            crop = rescale_image(apply_image_percentiles(image[rows, cols], bounds), factor)
            features.append(pooled_features(model, channels_first(crop), device))
            targets.append(math.log2(diameter))
            groups.append(index)
    if len(features) < 10:
        raise ValueError(f"only {len(features)} labelled windows with cells: too few to fit a size model")
    x, y = np.stack(features), np.asarray(targets)
    held_out = np.asarray(groups) % 5 == 0  # whole images, so windows of one image never sit on both sides
    errors = {}
    for alpha in alphas:
        mean, scale, coef, intercept = ridge(x[~held_out], y[~held_out], alpha)
        errors[alpha] = float(np.median(np.abs(((x[held_out] - mean) / scale) @ coef + intercept - y[held_out])))
    alpha = min(errors, key=errors.get)
    mean, scale, coef, intercept = ridge(x, y, alpha)
    fitted = SizeModel(mean.tolist(), scale.tolist(), coef.tolist(), intercept, window=window)
    stats = {"windows": len(y), "alpha": alpha, "held_out_median_abs_log2_error": round(errors[alpha], 4)}
    log.info("size model: %d windows, alpha %g, held-out median |log2 error| %.3f", len(y), alpha, errors[alpha])
    return fitted, stats


def _balanced(items: Sequence[Item], limit: int, rng: np.random.Generator) -> list[Item]:
    """Up to ``limit`` labelled items taken in turn from each modality (shuffled within it),
    so rare modalities are all used before common ones fill the rest."""
    pools: dict[str, list[Item]] = {}
    for item in items:
        if item.label is not None:
            pools.setdefault(item.modality, []).append(item)
    shuffled = {m: [members[i] for i in rng.permutation(len(members))] for m, members in sorted(pools.items())}
    chosen: list[Item] = []
    for i in range(max((len(v) for v in shuffled.values()), default=0)):
        for members in shuffled.values():
            if i < len(members) and len(chosen) < limit:
                chosen.append(members[i])
    return chosen


def with_size_model(model: ModelFile, items: Sequence[Item], device: torch.device | str = "cpu",
                    progress: bool = True) -> ModelFile:
    """A copy of a model file with a size model fitted on labelled ``items`` (and its fit
    statistics in ``meta["size_model_fit"]``)."""
    fitted, stats = fit_size_model(model.build_network().to(device), items, model.targets.lower_percentile,
                                   model.targets.upper_percentile, device=device, progress=progress)
    return replace(model.with_meta(size_model_fit=stats), size_model=fitted.to_dict())
