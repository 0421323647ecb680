"""Per-channel percentile normalisation, the one function used at training and inference.

The official challenge baseline normalised differently at training and inference time;
cellnest calls :func:`normalize_image` in both places (the dataset cache and the predictor).
"""

from __future__ import annotations

import numpy as np


def normalize_channel(channel: np.ndarray, lower: float = 1.0, upper: float = 99.0) -> np.ndarray:
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
    if not 0 <= lower < upper <= 100:
        raise ValueError(f"need 0 <= lower < upper <= 100, got lower={lower}, upper={upper}")
    channel = np.asarray(channel, dtype=np.float32)
    nonzero = channel[channel != 0]
    if nonzero.size == 0:
        return np.zeros(channel.shape, np.float32)
    lo, hi = np.percentile(nonzero, [lower, upper])
    if not hi > lo:
        return np.zeros(channel.shape, np.float32)
    out = (channel - np.float32(lo)) / np.float32(hi - lo)
    return np.clip(out, 0.0, 1.0, out=out)


def normalize_image(image: np.ndarray, lower: float = 1.0, upper: float = 99.0) -> np.ndarray:
    """Normalise every channel of a channel-last image with :func:`normalize_channel`.

    Parameters
    ----------
    image : (H, W, C) array, as returned by :func:`cellnest.io.read_image`.

    Returns
    -------
    (H, W, C) float32 in [0, 1].
    """
    image = np.asarray(image)
    if image.ndim != 3:
        raise ValueError(f"expected an (H, W, C) image, got shape {image.shape}")
    out = np.empty(image.shape, np.float32)
    for c in range(image.shape[-1]):
        # Grey images arrive as three identical channels: normalise once, copy the rest.
        same = next((p for p in range(c) if np.array_equal(image[..., p], image[..., c])), None)
        out[..., c] = out[..., same] if same is not None else normalize_channel(image[..., c], lower, upper)
    return out
