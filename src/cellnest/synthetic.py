"""Microscopy-like synthetic images with known instance labels, deterministic by seed.

Demo images and unit-test fixtures come from here, so the project ships no third-party
pixels. An image holds round and elongated cells, some touching or partly overlapping
(the later cell occludes the earlier one), on a background with uneven illumination and
noise; cells are bright on dark (fluorescence-like), dark on bright (brightfield-like),
or stained colour on a light background (RGB).
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from scipy import ndimage as ndi
from skimage.draw import ellipse
from skimage.segmentation import relabel_sequential

from cellnest.targets import N_CLASSES, instances_to_classes

Style = Literal["bright", "dark", "rgb"]


@dataclass(frozen=True)
class SyntheticSpec:
    """Settings of one synthetic image; every field has a sensible default."""

    shape: tuple[int, int] = (256, 256)
    n_cells: int = 30
    radius: tuple[float, float] = (6.0, 14.0)  # semi-minor axis range, pixels
    elongation: tuple[float, float] = (1.0, 2.2)  # semi-major / semi-minor
    min_gap: float = 0.6  # centres closer than min_gap * (major1 + major2) are rejected; < 1 lets cells touch
    style: Style = "bright"
    noise: float = 0.04  # Gaussian noise sd, in units of the cell-background contrast
    illumination: float = 0.3  # amplitude of the smooth background gradient
    blur: float = 1.0  # optical blur sigma, pixels


def synthetic_cells(spec: SyntheticSpec = SyntheticSpec(), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Draw one synthetic image and its instance labels.

    Returns
    -------
    image : (H, W) float32 in [0, 1] for "bright"/"dark"; (H, W, 3) float32 for "rgb".
    labels : (H, W) uint16, 0 = background, cells 1..N sequential.
    """
    rng = np.random.default_rng(seed)
    height, width = spec.shape
    labels = np.zeros(spec.shape, np.int32)
    placed: list[tuple[float, float, float]] = []
    for _ in range(spec.n_cells * 20):  # rejection sampling, bounded
        if len(placed) == spec.n_cells:
            break
        minor = rng.uniform(*spec.radius)
        major = minor * rng.uniform(*spec.elongation)
        r, c = rng.uniform(0, height), rng.uniform(0, width)
        if any(np.hypot(r - pr, c - pc) < spec.min_gap * (major + pm) for pr, pc, pm in placed):
            continue
        rr, cc = ellipse(r, c, minor, major, shape=spec.shape, rotation=rng.uniform(0, np.pi))
        if rr.size < 12:
            continue
        labels[rr, cc] = len(placed) + 1
        placed.append((r, c, major))
    labels = _drop_fragments(labels)

    cells = labels > 0
    # Per-cell brightness and a little internal texture.
    brightness = rng.uniform(0.55, 1.0, size=labels.max() + 1)
    texture = ndi.gaussian_filter(rng.normal(0, 1, spec.shape), 2.0)
    signal = np.where(cells, brightness[labels] * (1 + 0.15 * texture), 0.0)
    signal = ndi.gaussian_filter(signal, spec.blur)
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    angle = rng.uniform(0, 2 * np.pi)
    gradient = spec.illumination * (np.cos(angle) * yy + np.sin(angle) * xx)
    noise = rng.normal(0, spec.noise, spec.shape)

    if spec.style == "bright":
        image = 0.05 + gradient * 0.3 + 0.8 * signal + noise
    elif spec.style == "dark":
        image = 0.85 - gradient * 0.5 - 0.55 * signal + noise
    elif spec.style == "rgb":
        stain = np.array([0.45, 0.25, 0.6])  # purple-ish nuclei on a pink background
        base = np.array([0.95, 0.85, 0.9])
        image = base - gradient[..., None] * 0.3 - signal[..., None] * (base - stain) + noise[..., None]
    else:
        raise ValueError(f"style must be 'bright', 'dark' or 'rgb', got {spec.style!r}")
    return np.clip(image, 0, 1).astype(np.float32), labels.astype(np.uint16)


def _drop_fragments(labels: np.ndarray, min_size: int = 12) -> np.ndarray:
    """Keep each cell's largest connected piece (occlusion can split one) and renumber."""
    out = np.zeros_like(labels)
    for label, box in enumerate(ndi.find_objects(labels), start=1):
        if box is None:
            continue
        pieces, n = ndi.label(labels[box] == label)
        if n == 0:
            continue
        sizes = np.bincount(pieces.ravel())[1:]
        if sizes.max() < min_size:
            continue
        keep = pieces == (np.argmax(sizes) + 1)
        out[box][keep] = label
    return relabel_sequential(out)[0]


def to_uint(image: np.ndarray, dtype: type = np.uint8) -> np.ndarray:
    """Scale a [0, 1] float image to the full range of an unsigned integer dtype."""
    top = np.iinfo(dtype).max
    return np.round(np.clip(image, 0, 1) * top).astype(dtype)


# The demo set: one of each look, deterministic. (name, spec, file suffix, dtype)
DEMO_SET: tuple[tuple[str, SyntheticSpec, str, type], ...] = (
    ("fluo_nuclei", SyntheticSpec(shape=(320, 320), n_cells=45, radius=(6, 11), style="bright"), ".png", np.uint8),
    ("bright_field", SyntheticSpec(shape=(320, 320), n_cells=35, radius=(7, 13), style="dark"), ".tif", np.uint16),
    ("stained_rgb", SyntheticSpec(shape=(320, 320), n_cells=40, radius=(6, 12), style="rgb"), ".png", np.uint8),
    ("elongated", SyntheticSpec(shape=(320, 320), n_cells=30, radius=(5, 8), elongation=(2.0, 3.5), style="bright", noise=0.08), ".tif", np.uint8),
)


def write_synthetic_folder(root: str | os.PathLike, count: int | None = None, seed: int = 0) -> list[Path]:
    """Write synthetic images in the challenge layout: images/, labels/, manifest.csv.

    Parameters
    ----------
    root : destination folder (created).
    count : number of images; cycles through :data:`DEMO_SET` (default: its size).
    seed : base seed; image ``i`` uses ``seed + i``.

    Returns
    -------
    The written image paths.
    """
    import tifffile

    from cellnest.io import atomic_write, write_labels

    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    count = len(DEMO_SET) if count is None else count
    rows, paths = [], []
    for i in range(count):
        stem, spec, suffix, dtype = DEMO_SET[i % len(DEMO_SET)]
        name = stem if count <= len(DEMO_SET) else f"{stem}_{i:03d}"
        image, labels = synthetic_cells(spec, seed=seed + i)
        pixels = to_uint(image, dtype)
        path = root / "images" / f"{name}{suffix}"
        if suffix == ".tif":
            atomic_write(path, lambda tmp, px=pixels: tifffile.imwrite(tmp, px, compression="zlib"))
        else:
            import imageio.v3 as iio

            atomic_write(path, lambda tmp, px=pixels: iio.imwrite(tmp, px, extension=".png"))
        write_labels(root / "labels" / f"{name}_label.tiff", labels)
        modality = "brightfield" if spec.style in ("dark", "rgb") else "fluorescence"
        rows.append({"name": name, "modality": modality, "n_cells": int(labels.max()), "source": "synthetic"})
        paths.append(path)
    with open(root / "manifest.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return paths


def probabilities_from_instances(
    labels: np.ndarray, boundary_width: int = 1, blur: float = 0.0, noise: float = 0.0, seed: int = 0
) -> np.ndarray:
    """Synthetic softmax map of an instance map, for encode -> decode tests and tuning experiments.

    The one-hot encoding of :func:`cellnest.targets.instances_to_classes`, optionally
    Gaussian-blurred (``blur`` sigma, pixels; a linear filter keeps the per-pixel sum at 1)
    and perturbed by independent Gaussian noise of sd ``noise`` per channel, clipped at 0
    and renormalised to sum 1.

    Parameters
    ----------
    labels : (H, W) integer instance map, 0 = background.
    boundary_width, blur, noise : as above; ``seed`` makes the noise reproducible.

    Returns
    -------
    (3, H, W) float32, non-negative, summing to 1 per pixel.
    """
    classes = instances_to_classes(labels, boundary_width)
    probs = np.stack([classes == c for c in range(N_CLASSES)]).astype(np.float32)
    if blur > 0:
        probs = np.stack([ndi.gaussian_filter(p, blur, mode="nearest") for p in probs])
    if noise > 0:
        rng = np.random.default_rng(seed)
        probs = np.clip(probs + rng.normal(0.0, noise, probs.shape).astype(np.float32), 1e-6, None)
        probs /= probs.sum(axis=0, keepdims=True)
    return probs.astype(np.float32, copy=False)
