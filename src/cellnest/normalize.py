"""Per-channel percentile normalisation, the one rule used at training and inference,
and the one change of image layout.

Layout: images are channel-last ``(H, W, C)`` from the file to the normalised image (io,
normalize, segment, blocks, diameter, export: the layout of image files, scikit-image and
napari), and channel-first ``(C, H, W)`` from where they meet a network on (data samples,
the predictor, the size model: the layout of torch). :func:`channels_first` is the one
crossing and :func:`channels_last` the way back (overlays of training samples).

The official challenge baseline normalised differently at training and inference time;
cellnest calls :func:`normalize_image` in both places (the dataset cache and the
predictor). Large images use the same rule in two steps, :func:`channel_percentiles` on
the whole image, then :func:`apply_percentiles` block by block.
"""

from __future__ import annotations

import numpy as np

# Integer images with at most this many distinct values get exact percentiles from a
# histogram (no float copy of the image): uint8 and uint16.
_HISTOGRAM_MAX_VALUE = 65535
# The percentiles of the non-zero pixels mapped to 0 and 1, unless a recipe says otherwise.
LOWER_PERCENTILE, UPPER_PERCENTILE = 1.0, 99.0
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_FLOAT32_TINY = float(np.finfo(np.float32).tiny)


def _check(lower: float, upper: float) -> None:
    if not 0 <= lower < upper <= 100:
        raise ValueError(f"need 0 <= lower < upper <= 100, got lower={lower}, upper={upper}")


def _histogram_percentiles(counts: np.ndarray, qs: tuple[float, ...]) -> list[float]:
    """numpy's default ('linear') percentiles of the values 1..len(counts)-1 with ``counts``.

    Why by hand: ``np.percentile`` copies and sorts the pixels; from a histogram the same
    numbers cost one pass of ``bincount`` and no memory, which matters for 10k x 10k images.
    """
    counts = counts.copy()
    counts[0] = 0  # percentiles of the non-zero pixels
    cumulative = np.cumsum(counts)
    n = int(cumulative[-1])
    out = []
    for q in qs:
        position = q / 100 * (n - 1)
        below = int(np.floor(position))
        value_low = int(np.searchsorted(cumulative, below, side="right"))
        value_high = int(np.searchsorted(cumulative, min(below + 1, n - 1), side="right"))
        out.append(value_low + (position - below) * (value_high - value_low))
    return out


def channel_percentiles(channel: np.ndarray, lower: float = LOWER_PERCENTILE, upper: float = UPPER_PERCENTILE) -> tuple[float, float] | None:
    """The ``lower`` and ``upper`` percentiles of a channel's non-zero pixels.

    Returns None for an all-zero channel. Flat non-zero percentiles in a channel that also
    has zeros (a two-level image) are widened to include 0 (:func:`_two_level`). uint8/uint16 (and small non-negative ints) are
    counted exactly by histogram; other dtypes use ``np.percentile``.
    """
    _check(lower, upper)
    channel = np.asarray(channel)
    if channel.dtype.kind in "ub" or (channel.dtype.kind == "i" and channel.size and channel.min() >= 0):
        top = int(channel.max()) if channel.size else 0
        if top <= _HISTOGRAM_MAX_VALUE:
            if top == 0:
                return None
            counts = np.bincount(channel.ravel(), minlength=top + 1)
            lo, hi = _histogram_percentiles(counts, (lower, upper))
            return _two_level(float(lo), float(hi), bool(counts[0]))
    nonzero = channel[channel != 0]
    if nonzero.size == 0:
        return None
    values = nonzero.astype(np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        lo, hi = np.percentile(values, [lower, upper])
    if not (np.isfinite(lo) and np.isfinite(hi)):  # interpolating across ~1e308 overflows; take pixel values
        lo, hi = np.percentile(values, [lower, upper], method="nearest")
    return _two_level(float(lo), float(hi), nonzero.size < channel.size)


def _two_level(lo: float, hi: float, has_zeros: bool) -> tuple[float, float]:
    """Percentiles of the non-zero pixels, widened to include 0 when they are flat but the
    channel also has zeros: a binary 0/255 (or mask-like) image then maps to 0 and 1
    instead of all zeros, which lost its cells and left the network to invent some."""
    if hi <= lo and has_zeros:
        return min(0.0, lo), max(0.0, hi)
    return lo, hi


def apply_percentiles(channel: np.ndarray, bounds: tuple[float, float] | None) -> np.ndarray:
    """Map ``bounds`` to [0, 1] and clip; a flat or empty channel (``hi <= lo``) gives zeros.

    Returns (H, W) float32.
    """
    if bounds is None or not bounds[1] > bounds[0]:
        return np.zeros(np.shape(channel), np.float32)
    lo, hi = bounds
    if _FLOAT32_TINY <= hi - lo and max(abs(lo), abs(hi), hi - lo) < _FLOAT32_MAX:  # the usual case, in float32
        with np.errstate(over="ignore"):  # a pixel far outside the bounds may overflow; it is clipped below
            out = (np.asarray(channel, dtype=np.float32) - np.float32(lo)) / np.float32(hi - lo)
    else:  # bounds float32 cannot hold (pixels near +-3e38 or 1e-300): in float64, scaled first
        with np.errstate(over="ignore"):
            out = (np.asarray(channel, dtype=np.float64) / (hi - lo) - lo / (hi - lo)).astype(np.float32)
    return np.clip(out, 0.0, 1.0, out=out)


def normalize_channel(channel: np.ndarray, lower: float = LOWER_PERCENTILE, upper: float = UPPER_PERCENTILE) -> np.ndarray:
    """Rescale one channel between percentiles of its non-zero pixels, clipped to [0, 1].

    Parameters
    ----------
    channel : (H, W) array of any real dtype.
    lower, upper : percentiles (0..100) of the non-zero pixels mapped to 0 and 1.

    Returns
    -------
    (H, W) float32 in [0, 1]. An all-zero or flat channel (upper percentile equal to the
    lower one) returns all zeros: there is no contrast to rescale.
    """
    return apply_percentiles(channel, channel_percentiles(channel, lower, upper))


def image_percentiles(image: np.ndarray, lower: float = LOWER_PERCENTILE, upper: float = UPPER_PERCENTILE) -> list[tuple[float, float] | None]:
    """:func:`channel_percentiles` of each channel of an (H, W, C) image."""
    image = np.asarray(image)
    if image.ndim != 3:
        raise ValueError(f"expected an (H, W, C) image, got shape {image.shape}")
    bounds: list[tuple[float, float] | None] = []
    for c in range(image.shape[-1]):
        # Grey images arrive as three identical channels: count once.
        same = 0 if c and image.strides[-1] == 0 else None  # a grey image's broadcast view
        if same is None:
            same = next((p for p in range(c) if np.array_equal(image[..., p], image[..., c])), None)
        bounds.append(bounds[same] if same is not None else channel_percentiles(image[..., c], lower, upper))
    return bounds


def apply_image_percentiles(image: np.ndarray, bounds: list[tuple[float, float] | None]) -> np.ndarray:
    """Apply per-channel ``bounds`` to an (H, W, C) image (or block) -> (H, W, C) float32."""
    out = np.empty(np.shape(image), np.float32)
    for c, b in enumerate(bounds):
        out[..., c] = apply_percentiles(image[..., c], b)
    return out


def normalize_image(image: np.ndarray, lower: float = LOWER_PERCENTILE, upper: float = UPPER_PERCENTILE) -> np.ndarray:
    """Normalise every channel of a channel-last image with :func:`normalize_channel`.

    Parameters
    ----------
    image : (H, W, C) array, as returned by :func:`cellnest.io.read_image`.

    Returns
    -------
    (H, W, C) float32 in [0, 1].
    """
    return apply_image_percentiles(image, image_percentiles(image, lower, upper))


def channels_first(image: np.ndarray) -> np.ndarray:
    """(H, W, C) -> contiguous (C, H, W): an image meeting a network (see the module docstring)."""
    return np.ascontiguousarray(np.moveaxis(image, -1, 0))


def channels_last(image: np.ndarray) -> np.ndarray:
    """(C, H, W) -> (H, W, C) view: a network-side image back in file layout."""
    return np.moveaxis(np.asarray(image), 0, -1)
