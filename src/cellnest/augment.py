"""Training augmentation of patches, built from MONAI dictionary transforms.

One :class:`AugmentConfig` (plain numbers, from a recipe) describes every transform with
its own probability (0 leaves the transform out) and range; :func:`build_augmentation`
turns it into an :class:`Augmentation` called as ``aug(item, seed)``.

Order: spatial transforms move ``image``, ``classes`` and ``weights`` together (flips,
90-degree rotations, free rotation, isotropic scaling), then intensity transforms touch
only ``image`` (histogram shift, gamma, brightness, blur, noise), then the image is
clipped to ``clip_range``.

* Interpolation: bilinear for image and weights, nearest for classes, so classes stay in
  {0, 1, 2}. Padding after rotation or zoom-out is by reflection for every key, so no
  black corners appear and the reflected classes match the reflected image.
* Determinism: the output is a pure function of ``(item, seed)``, bit for bit on one
  machine, whatever the call order, process or torch thread count. Each call reseeds the
  MONAI ``Compose`` objects (``set_random_state``), which derive one seed per transform;
  no global RNG is read. Exact training resume relies on this. An ``Augmentation`` is not
  thread-safe (one per DataLoader worker process, which is what ``DataLoader`` gives).

The two seed systems' recipes choose from these: Attention U-Net++ (random crop, done by
:mod:`cellnest.patches`; random rotation; intensity histogram shift) and Re-Unet
(mirroring, gamma, rotation, scaling, Gaussian noise).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

import numpy as np
import torch
from monai.transforms import (
    Compose,
    RandAdjustContrastd,
    RandFlipd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandHistogramShiftd,
    RandRotate90d,
    RandRotated,
    RandScaleIntensityd,
    RandZoomd,
)

CHANNEL_KEY = "image_{}"  # spatial transforms see the image one channel per key (see Augmentation)


@dataclass(frozen=True)
class AugmentConfig:
    """Probabilities and ranges of the training augmentation (part of every recipe).

    Defaults follow nnU-Net's 2-D recipe and the challenge baseline where they agree with
    microscopy: cells have no preferred orientation (flips and 90-degree turns at 0.5,
    free rotation over the full circle), sizes vary (scale 0.7-1.4), and modalities differ
    in contrast (gamma, histogram shift, brightness, blur, noise).

    flip_prob : per axis (vertical and horizontal independently).
    rot90_prob : rotate by 90, 180 or 270 degrees (lossless).
    rotate_prob, rotate_degrees : free rotation by an angle uniform in +-rotate_degrees.
    scale_prob, scale_range : isotropic zoom factor (> 1 enlarges cells); the patch keeps
        its size (centre crop, or reflection padding when shrinking).
    histogram_prob, histogram_points : MONAI's non-linear intensity-histogram shift with
        this many control points (>= 3; the challenge baseline used 3).
    gamma_prob, gamma_range : ``x -> x ** gamma`` on the image's own min-max range.
    brightness_prob, brightness_range : multiply the image by a factor from this range.
    blur_prob, blur_sigma : Gaussian blur, sigma per axis uniform in this range (pixels).
    noise_prob, noise_std : additive Gaussian noise, sd uniform in [0, noise_std].
    colour_prob, colour_range : multiply each channel by its own factor from this range
        (colour jitter: stains and cameras differ).
    grey_prob : replace every channel by the channels' mean (colour to grey).
    invert_prob : ``x -> 1 - x`` (polarity: dark cells on bright ground and the reverse,
        as brightfield and fluorescence differ).
    clip_range : the image is clipped to this range at the end. Normalised images lie in
        [0, 1] at inference, so by default training images do too (noise and brightness
        can leave it; histogram shift and gamma cannot).
    """

    flip_prob: float = 0.5
    rot90_prob: float = 0.5
    rotate_prob: float = 0.2
    rotate_degrees: float = 180.0
    scale_prob: float = 0.2
    scale_range: tuple[float, float] = (0.7, 1.4)
    histogram_prob: float = 0.25
    histogram_points: int = 3
    gamma_prob: float = 0.3
    gamma_range: tuple[float, float] = (0.7, 1.5)
    brightness_prob: float = 0.15
    brightness_range: tuple[float, float] = (0.75, 1.25)
    blur_prob: float = 0.1
    blur_sigma: tuple[float, float] = (0.5, 1.0)
    noise_prob: float = 0.15
    noise_std: float = 0.1
    colour_prob: float = 0.0
    colour_range: tuple[float, float] = (0.7, 1.3)
    grey_prob: float = 0.0
    invert_prob: float = 0.0
    clip_range: tuple[float, float] = (0.0, 1.0)

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name.endswith("_prob") and not 0.0 <= value <= 1.0:
                raise ValueError(f"augment {f.name} must be in [0, 1], got {value}")
            if f.name in ("scale_range", "gamma_range", "brightness_range", "blur_sigma", "clip_range", "colour_range"):
                if len(value) != 2 or not value[0] <= value[1]:
                    raise ValueError(f"augment {f.name} must be [low, high] with low <= high, got {value}")
        if not 0.0 <= self.rotate_degrees <= 180.0:
            raise ValueError(f"augment rotate_degrees must be in [0, 180], got {self.rotate_degrees}")
        for name in ("scale_range", "gamma_range", "brightness_range", "colour_range"):
            if getattr(self, name)[0] <= 0:
                raise ValueError(f"augment {name} must be positive, got {getattr(self, name)}")
        if self.blur_sigma[0] < 0 or self.noise_std < 0:
            raise ValueError(f"augment blur_sigma and noise_std must be >= 0, got {self.blur_sigma}, {self.noise_std}")
        if int(self.histogram_points) != self.histogram_points or self.histogram_points < 3:
            raise ValueError(f"augment histogram_points must be an integer >= 3, got {self.histogram_points}")
        if not self.clip_range[0] < self.clip_range[1]:
            raise ValueError(f"augment clip_range must have low < high, got {self.clip_range}")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> AugmentConfig:
        """Build from a recipe mapping; lists become tuples; an unknown key is a ValueError."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown augment setting(s) {unknown}; known: {sorted(known)}")
        return cls(**{k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in values.items()})

    def to_dict(self) -> dict[str, Any]:
        """Plain values for YAML/JSON (ranges as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


class Augmentation:
    """Random augmentation of one training patch; deterministic by seed.

    Call as ``aug(item, seed)`` with ``item`` = {"image": (C, H, W) float32, "classes":
    (H, W) integer, optional "weights": (H, W) float32}. Returns a new dict with the same
    keys and shapes: image float32 (clipped to ``config.clip_range``), classes int64,
    weights float32. Inputs are never modified (read-only arrays are fine).
    """

    def __init__(self, config: AugmentConfig):
        self.config = config
        self.intensity = Compose(_intensity_transforms(config))
        self._spatial: dict[int, Compose] = {}  # by number of image channels

    def spatial(self, channels: int) -> Compose:
        """The spatial transforms for an image of ``channels`` channels (built once)."""
        if channels not in self._spatial:
            keys = tuple(CHANNEL_KEY.format(i) for i in range(channels)) + ("classes", "weights")
            self._spatial[channels] = Compose(_spatial_transforms(self.config, keys))
        return self._spatial[channels]

    def __call__(self, item: Mapping[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
        image = np.asarray(item["image"])
        classes = np.asarray(item["classes"])
        if image.ndim != 3 or classes.shape != image.shape[1:]:
            raise ValueError(f"augment needs image (C, H, W) and classes (H, W), got {image.shape} and {classes.shape}")
        # One key per image channel: torch's CPU bilinear resize of a multi-channel tensor
        # rounds differently with 1 and with several threads (DataLoader workers run with
        # 1), single-channel resizes do not. The random draws are per call, not per key.
        data = {CHANNEL_KEY.format(i): torch.tensor(image[i : i + 1], dtype=torch.float32) for i in range(len(image))}
        data["classes"] = torch.tensor(classes[None], dtype=torch.float32)
        weights = item.get("weights")
        if weights is not None:
            weights = np.asarray(weights)
            if weights.shape != classes.shape:
                raise ValueError(f"augment weights shape {weights.shape} differs from classes shape {classes.shape}")
            data["weights"] = torch.tensor(weights[None], dtype=torch.float32)

        # Both parts reseeded from the one seed on every call: a pure function of it.
        seeds = np.random.RandomState(int(seed) % 2**32).randint(2**32, size=2, dtype=np.uint32)
        spatial = self.spatial(len(image))
        spatial.set_random_state(seed=int(seeds[0]))
        data = spatial(data)
        image_out = torch.cat([_as_tensor(data[CHANNEL_KEY.format(i)]) for i in range(len(image))])
        self.intensity.set_random_state(seed=int(seeds[1]))
        image_out = self.intensity({"image": image_out})["image"]
        image_np = _colour_and_polarity(_to_numpy(image_out).astype(np.float32), self.config, int(seed))

        low, high = self.config.clip_range
        out = {
            "image": np.clip(image_np, low, high).astype(np.float32, copy=False),
            "classes": np.rint(_to_numpy(data["classes"])[0]).astype(np.int64),
        }
        if weights is not None:
            out["weights"] = _to_numpy(data["weights"])[0].astype(np.float32, copy=False)
        return out


def _colour_and_polarity(image: np.ndarray, c: AugmentConfig, seed: int) -> np.ndarray:
    """Per-channel gain, grey conversion and inversion of a (C, H, W) image in [0, 1].

    Plain numpy (MONAI has no polarity or grey transform); its own generator from
    ``seed`` keeps the MONAI streams unchanged when these are off.
    """
    if c.colour_prob == 0 and c.grey_prob == 0 and c.invert_prob == 0:
        return image
    rng = np.random.default_rng([seed, 1])
    draws = rng.random(3)
    gains = rng.uniform(c.colour_range[0], c.colour_range[1], size=(len(image), 1, 1)).astype(np.float32)
    if draws[0] < c.colour_prob:
        image = image * gains
    if draws[1] < c.grey_prob:
        image = np.broadcast_to(image.mean(axis=0, keepdims=True), image.shape).copy()
    if draws[2] < c.invert_prob:
        image = 1.0 - np.clip(image, 0.0, 1.0)
    return image


def _as_tensor(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    """A plain tensor from a MONAI MetaTensor, tensor or array."""
    if isinstance(x, torch.Tensor):
        return x.as_tensor() if hasattr(x, "as_tensor") else x
    return torch.as_tensor(x)


def _to_numpy(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """A numpy array from a MONAI MetaTensor, tensor or array."""
    return _as_tensor(x).numpy()


def build_augmentation(config: AugmentConfig = AugmentConfig()) -> Augmentation:
    """The MONAI pipeline for ``config``; transforms with probability 0 are left out."""
    return Augmentation(config)


def _spatial_transforms(c: AugmentConfig, keys: tuple[str, ...]) -> list:
    """Flips, rot90, rotation, zoom on ``keys`` ("classes" nearest, the rest bilinear)."""
    modes = tuple("nearest" if key == "classes" else "bilinear" for key in keys)
    transforms: list = []
    if c.flip_prob > 0:
        transforms.append(RandFlipd(keys, prob=c.flip_prob, spatial_axis=0, allow_missing_keys=True))
        transforms.append(RandFlipd(keys, prob=c.flip_prob, spatial_axis=1, allow_missing_keys=True))
    if c.rot90_prob > 0:
        transforms.append(RandRotate90d(keys, prob=c.rot90_prob, max_k=3, spatial_axes=(0, 1), allow_missing_keys=True))
    if c.rotate_prob > 0 and c.rotate_degrees > 0:
        angle = math.radians(c.rotate_degrees)
        transforms.append(
            RandRotated(
                keys,
                range_x=(-angle, angle),
                prob=c.rotate_prob,
                keep_size=True,
                mode=modes,
                padding_mode="reflection",
                allow_missing_keys=True,
            )
        )
    if c.scale_prob > 0:
        transforms.append(
            RandZoomd(
                keys,
                prob=c.scale_prob,
                min_zoom=c.scale_range[0],
                max_zoom=c.scale_range[1],
                mode=modes,
                padding_mode="reflect",
                keep_size=True,
                allow_missing_keys=True,
            )
        )
    return transforms


def _intensity_transforms(c: AugmentConfig) -> list:
    """Histogram shift, gamma, brightness, blur, noise on the (C, H, W) "image"."""
    transforms: list = []
    if c.histogram_prob > 0:
        transforms.append(RandHistogramShiftd("image", num_control_points=int(c.histogram_points), prob=c.histogram_prob))
    if c.gamma_prob > 0:
        transforms.append(RandAdjustContrastd("image", prob=c.gamma_prob, gamma=tuple(c.gamma_range)))
    if c.brightness_prob > 0:
        factors = (c.brightness_range[0] - 1.0, c.brightness_range[1] - 1.0)  # MONAI scales by 1 + factor
        transforms.append(RandScaleIntensityd("image", factors=factors, prob=c.brightness_prob))
    if c.blur_prob > 0:
        sigma = tuple(c.blur_sigma)
        transforms.append(RandGaussianSmoothd("image", sigma_x=sigma, sigma_y=sigma, prob=c.blur_prob))
    if c.noise_prob > 0 and c.noise_std > 0:
        transforms.append(RandGaussianNoised("image", prob=c.noise_prob, mean=0.0, std=c.noise_std))
    return transforms
