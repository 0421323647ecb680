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
from skimage.segmentation import clear_border
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


def interior_median_diameter(labels: np.ndarray) -> float | None:
    """Median diameter of the cells not touching the image edge (cut cells read small);
    of all cells when every cell touches it; None without cells."""
    labels = np.asarray(labels)
    areas = np.bincount(labels.ravel().astype(np.int64, copy=False))
    edge = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]).astype(np.int64))
    inner = areas.copy()
    inner[edge] = 0
    inner[0] = 0
    chosen = inner[inner > 0] if np.any(inner > 0) else areas[1:][areas[1:] > 0]
    return float(np.median(2.0 * np.sqrt(chosen / math.pi))) if chosen.size else None


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


def rescale_labels(labels: np.ndarray, factor: float, min_pixels: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Resize an (H, W) instance map by ``factor`` for training at another cell size.

    Nearest-neighbour sampling copies ids, so no two cells merge and no id is invented;
    a cell left with fewer than ``min_pixels`` pixels (shrinking) is removed, since a
    network cannot be asked to find it.

    Returns
    -------
    labels : (h, w) map of the input dtype (surviving cells keep their ids).
    dropped : (h, w) bool, the pixels of removed cells (for the loss to ignore).
    """
    height, width = labels.shape
    shape = (max(int(round(height * factor)), 1), max(int(round(width * factor)), 1))
    resized = resize_labels(labels, shape) if shape != labels.shape else np.array(labels, copy=True)
    areas = np.bincount(resized.ravel().astype(np.int64, copy=False))
    small = np.flatnonzero((areas > 0) & (areas < min_pixels))
    small = small[small > 0]
    dropped = np.isin(resized, small) if small.size else np.zeros(shape, bool)
    resized[dropped] = 0
    return resized, dropped


def training_scale(label_diameter: float | None, target_diameter: float | None) -> float:
    """Factor that brings an image's median cell diameter to ``target_diameter``: 1 without a
    target (native scale) or without cells, else clipped to [1/4, 4] like inference."""
    if target_diameter is None or label_diameter is None:
        return 1.0
    return scale_for(target_diameter, label_diameter)


def scale_for(model_diameter: float, diameter: float) -> float:
    """The factor that brings cells of ``diameter`` pixels to ``model_diameter``, clipped to [1/4, 4]."""
    if not (diameter > 0 and model_diameter > 0):
        raise ValueError(f"cell diameters must be > 0, got {diameter} (image) and {model_diameter} (model)")
    return float(min(max(model_diameter / diameter, MIN_SCALE), MAX_SCALE))


def window_slices(shape: tuple[int, int], side: int, count: int = 1) -> list[tuple[slice, slice]]:
    """Up to ``count`` square windows of ``side`` pixels (clipped to the image), spread
    over an image of ``shape``: the centre first, then the centres of the quadrants."""
    height, width = shape
    h, w = min(side, height), min(side, width)
    centres = [(0.5, 0.5), (0.25, 0.25), (0.25, 0.75), (0.75, 0.25), (0.75, 0.75)][:max(count, 1)]
    out, seen = [], set()
    for fy, fx in centres:
        top = int(min(max(round(fy * height - h / 2), 0), height - h))
        left = int(min(max(round(fx * width - w / 2), 0), width - w))
        if (top, left) not in seen:
            seen.add((top, left))
            out.append((slice(top, top + h), slice(left, left + w)))
    return out


def search_diameter(
    segment_window: Callable[[np.ndarray, float], np.ndarray],
    image: np.ndarray,
    model_diameter: float,
    candidates: Sequence[float] | None = None,
    window: int = 256,
    min_cells: int = 3,
) -> float | None:
    """Multi-scale search: the cell diameter at which the model finds cells of its training size.

    For each candidate diameter ``c`` (default: octaves from ``model_diameter / 4`` to
    ``model_diameter * 4``), a window of the image is rescaled by ``s = model_diameter / c``
    so that it is ``window`` pixels across at the model's scale, and segmented. The
    candidate whose found cells' median diameter (model pixels) lies closest to
    ``model_diameter`` in log scale wins (ties: more cells), among those with at least
    ``min_cells`` cells not touching the window's edge; the estimate is that median
    divided by ``s``.

    Parameters
    ----------
    segment_window : (h, w, C) raw crop and a scale factor -> instance map of the crop
        rescaled by that factor.
    image : (H, W, C) raw image.

    Returns
    -------
    The estimated median cell diameter in ``image`` pixels, or None if no scale finds cells.
    """
    if candidates is None:
        candidates = [model_diameter * 2.0**k for k in (-2, -1, 0, 1, 2)]
    best: tuple[float, int, float] | None = None  # (log distance, -cells, estimate)
    for candidate in candidates:
        scale = scale_for(model_diameter, candidate)
        rows, cols = window_slices(image.shape[:2], max(int(round(window / scale)), 8))[0]
        labels = np.asarray(segment_window(image[rows, cols], scale))
        diameters = cell_diameters(clear_border(labels))  # cells cut by the window would read small
        if diameters.size < min_cells:
            continue
        found = float(np.median(diameters))
        key = (abs(math.log2(found / model_diameter)), -int(diameters.size), found / scale)
        if best is None or key[:2] < best[:2]:
            best = key
    return None if best is None else best[2]


def log2_error(estimate: float | None, truth: float) -> float:
    """``|log2(estimate / truth)|``; a missing estimate counts as off by the full 4x clip (2 octaves)."""
    if estimate is None or not estimate > 0:
        return 2.0
    return abs(math.log2(estimate / truth))
