"""Cell size: measure typical cell diameters, and segment at the scale a model was trained on.

A network sees cells at the sizes of its training images (plus its scale augmentation).
As Cellpose does, cellnest can rescale an image so that its cells have the model's
typical training diameter, segment, and map the labels back to the original pixels:

* the model file records ``cell_diameter``: the median over training images of each
  image's median equivalent cell diameter (``2 * sqrt(area / pi)``, pixels), written by
  ``cellnest ship --train-data``;
* ``diameter=PIXELS`` (the user's typical cell diameter) rescales by
  ``cell_diameter / PIXELS``;
* ``diameter="auto"`` segments once, measures the median diameter of the cells found,
  and segments again at the corrected scale when it is off by more than ``tolerance``
  (default 1.25x, so images already at the model's scale cost one pass).

The scale factor is clipped to [1/4, 4], and a rescaled image may not exceed
``MAX_RESCALED_PIXELS`` (the rescaled copy is held whole; the block path then bounds the
network's memory). Images are resized with linear interpolation
(anti-aliased when shrinking, via scikit-image); labels are mapped back by nearest
neighbour, so every cell keeps one id.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
from skimage.transform import resize

from cellnest.io import read_labels

MIN_SCALE, MAX_SCALE = 0.25, 4.0
TOLERANCE = 1.25
MAX_RESCALED_PIXELS = 2**28  # 268 MP: the rescaled float32 RGB copy stays under ~3.2 GB


def cell_diameters(labels: np.ndarray) -> np.ndarray:
    """Equivalent diameters ``2 * sqrt(area / pi)`` (float64, pixels) of the cells of an (H, W) instance map."""
    areas = np.bincount(np.asarray(labels).ravel().astype(np.int64, copy=False))[1:]
    areas = areas[areas > 0]
    return 2.0 * np.sqrt(areas / math.pi)


def median_diameter(labels: np.ndarray) -> float | None:
    """Median equivalent cell diameter of an instance map; None without cells."""
    diameters = cell_diameters(labels)
    return float(np.median(diameters)) if diameters.size else None


def training_diameter(label_paths: Sequence) -> float | None:
    """Median over label files of each file's median cell diameter; None without cells."""
    medians = [d for d in (median_diameter(read_labels(p)) for p in label_paths) if d is not None]
    return float(np.median(medians)) if medians else None


def rescale_image(image: np.ndarray, factor: float) -> np.ndarray:
    """Resize an (H, W, C) image by ``factor`` -> float32 (linear; anti-aliased when shrinking)."""
    height, width = image.shape[:2]
    shape = (max(int(round(height * factor)), 1), max(int(round(width * factor)), 1), image.shape[2])
    return resize(image.astype(np.float32, copy=False), shape, order=1, preserve_range=True,
                  anti_aliasing=factor < 1).astype(np.float32, copy=False)


def resize_labels(labels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of an instance map to ``shape`` (ids unchanged; a cell may vanish when shrinking)."""
    return resize(labels, shape, order=0, preserve_range=True, anti_aliasing=False).astype(labels.dtype, copy=False)


def scale_for(model_diameter: float, diameter: float) -> float:
    """The factor that brings cells of ``diameter`` pixels to ``model_diameter``, clipped to [1/4, 4]."""
    if not (diameter > 0 and model_diameter > 0):
        raise ValueError(f"cell diameters must be > 0, got {diameter} (image) and {model_diameter} (model)")
    return float(min(max(model_diameter / diameter, MIN_SCALE), MAX_SCALE))


def segment_at_diameter(
    segment: Callable[[np.ndarray], np.ndarray],
    image: np.ndarray,
    model_diameter: float,
    diameter: float | str,
    tolerance: float = TOLERANCE,
) -> tuple[np.ndarray, float]:
    """Segment ``image`` (H, W, C) with its cells brought to ``model_diameter``.

    Parameters
    ----------
    segment : (h, w, C) image -> (h, w) int instance map.
    diameter : the cells' typical diameter in ``image`` (pixels), or "auto" to measure
        it from a first pass at scale 1.

    Returns
    -------
    (H, W) instance map of ``segment``'s dtype, and the scale factor used (1.0 = none).
    """
    if diameter == "auto":
        first = segment(image)
        found = median_diameter(first)
        if found is None:
            return first, 1.0  # no cells found: nothing to measure the scale on
        scale = scale_for(model_diameter, found)
        if 1 / tolerance <= scale <= tolerance:
            return first, 1.0
    else:
        scale = scale_for(model_diameter, float(diameter))
    if image.shape[0] * image.shape[1] * scale**2 > MAX_RESCALED_PIXELS:
        raise ValueError(
            f"rescaling this {image.shape[1]}x{image.shape[0]} image by {scale:.2f} for the cell diameter would exceed "
            f"{MAX_RESCALED_PIXELS // 10**6} MP; segment it without --diameter or in crops"
        )
    labels = segment(rescale_image(image, scale))
    return resize_labels(labels, image.shape[:2]), scale
