"""Class probabilities of a normalised image: overlapping windows, Gaussian blending,
flip test-time augmentation, and ensembles of several networks.

Windows run on the model's device; the blended map is stitched on the CPU (MONAI
``sliding_window_inference`` with ``sw_device``/``device``), so GPU memory holds only a
batch of windows. Probabilities, not logits, are blended and averaged: softmax outputs of
different models and flips are on one scale, logits are not.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
from monai.inferers import sliding_window_inference

BLEND_MODES = ("gaussian", "constant")


# Largest window side: the command line's --tile bound, and a cap on what a model file may
# declare (one 8192-px window of a U-Net++ already needs tens of GB).
MAX_TILE = 8192


@dataclass(frozen=True)
class PredictorConfig:
    """How windows are cut, batched, augmented and blended (stored in model files).

    tile : window side in pixels; images smaller than a tile run as one window.
    overlap : fraction of a window shared with its neighbour (0 <= overlap < 1).
    batch_size : windows per forward pass on a GPU.
    cpu_batch_size : windows per forward pass on the CPU. One at a time is faster there and
        bounds memory: a 1.4-MP image in four windows ran 2.23 s and peaked at 1.26 GB
        with 1, 3.59 s and 3.29 GB with 4 (OpenVINO, 2 threads; docs/speed.md).
    tta : also predict the horizontal, vertical and both flips and average (4x the cost).
    blend : "gaussian" weights window centres over edges (MONAI, sigma = tile / 8);
        "constant" averages uniformly.
    channels_last : NHWC memory format; measured ~1.25x slower on AVX2 CPUs for these
        instance-norm networks, so off by default and on for CUDA.
    amp : float16 autocast on CUDA (ignored on CPU, where bf16 is ~20x slower here).
    """

    tile: int = 256
    overlap: float = 0.25
    batch_size: int = 4
    cpu_batch_size: int = 1
    tta: bool = False
    blend: str = "gaussian"
    channels_last: bool | None = None
    amp: bool = True

    def __post_init__(self) -> None:
        if not 16 <= self.tile <= MAX_TILE:
            raise ValueError(f"predictor tile must be 16..{MAX_TILE} pixels, got {self.tile}")
        if not 0 <= self.overlap < 1:
            raise ValueError(f"predictor overlap must be in [0, 1), got {self.overlap}")
        if self.batch_size < 1 or self.cpu_batch_size < 1:
            raise ValueError(f"predictor batch sizes must be >= 1, got {self.batch_size} and {self.cpu_batch_size}")
        if self.blend not in BLEND_MODES:
            raise ValueError(f"predictor blend must be one of {BLEND_MODES}, got {self.blend!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "PredictorConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown predictor setting(s) {unknown}; valid: {sorted(known)}")
        return cls(**values)


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``"auto"``/None -> CUDA if available, else CPU; otherwise the named device.

    A CUDA device always gets its index (``cuda`` -> ``cuda:0``, the current device):
    ``torch.cuda.set_device`` and DDP's ``device_ids`` refuse an index-less one.
    """
    if device is None or str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {str(device)!r} (use auto, cpu, cuda, cuda:1, ...)") from None
    if device.type not in ("cpu", "cuda"):  # mps, xpu, ...: cellnest is tested on these two only
        raise ValueError(f"device {str(device)!r} is not supported (use auto, cpu, cuda, cuda:1, ...)")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r} requested but CUDA is not available")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        elif device.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(device)!r} requested but only {torch.cuda.device_count()} CUDA device(s) found")
    return device


SINGLE_WINDOW_SLACK = 1.125  # a side up to this many tiles runs as one window (4 % more pixels than the tile, not 4x)


def window_size(side: int, tile: int, overlap: float) -> int:
    """Window side for an image side: the fewest windows of at most ``tile`` that cover it
    with the given overlap, each as small as that count allows.

    MONAI slides full tiles, so a side just above the tile costs two full windows (a
    1045-px side with 1024-px tiles: 2048 pixels of network per row, and 4x the work in
    2-D). Here that side runs as one window (up to ``SINGLE_WINDOW_SLACK`` tiles), and
    otherwise the windows shrink evenly: 1500 px with 1024-px tiles and overlap 0.25 is
    two windows of 858 px.
    """
    if side <= tile * SINGLE_WINDOW_SLACK:
        return side
    count = math.ceil((side - tile * overlap) / (tile * (1 - overlap)))
    return min(tile, math.ceil(side / (count - (count - 1) * overlap)))


# Flip TTA: each entry is the spatial dims flipped (its own inverse).
_FLIPS: tuple[tuple[int, ...], ...] = ((), (3,), (2,), (2, 3))


class Predictor:
    """Sliding-window class probabilities of one network or an ensemble.

    Parameters
    ----------
    models : one network or several (e.g. cross-validation folds) mapping
        (B, 3, h, w) float32 to (B, K, h, w) logits; they are put in eval mode on ``device``.
    config : :class:`PredictorConfig`.
    device : "cpu", "cuda", "cuda:1", or "auto".
    """

    def __init__(self, models: nn.Module | Sequence[nn.Module], config: PredictorConfig = PredictorConfig(), device: str | torch.device | None = "auto"):
        self.models = [models] if isinstance(models, nn.Module) else list(models)
        if not self.models:
            raise ValueError("Predictor needs at least one model")
        self.config = config
        self.device = resolve_device(device)
        channels_last = config.channels_last if config.channels_last is not None else self.device.type == "cuda"
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        for model in self.models:
            model.to(self.device, memory_format=self.memory_format).eval()

    def _autocast(self):
        if self.config.amp and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.float16)
        return nullcontext()

    def _window_probabilities(self, windows: torch.Tensor) -> torch.Tensor:
        """Mean softmax over models and flips of a batch of windows (B, C, h, w)."""
        windows = windows.contiguous(memory_format=self.memory_format)
        flips = _FLIPS if self.config.tta else _FLIPS[:1]
        total = None
        with self._autocast():
            for model in self.models:
                for dims in flips:
                    view = torch.flip(windows, dims) if dims else windows
                    probs = torch.softmax(model(view).float(), dim=1)
                    probs = torch.flip(probs, dims) if dims else probs
                    total = probs if total is None else total + probs
        return total / (len(self.models) * len(flips))

    @torch.inference_mode()
    def __call__(self, image: np.ndarray, tile: int | None = None) -> np.ndarray:
        """Probabilities of a normalised image.

        Parameters
        ----------
        image : (C, H, W) float32, normalised (see :mod:`cellnest.normalize`).
        tile : largest window side for this call (the smaller of it and the config's tile).

        Returns
        -------
        (K, H, W) float32 probabilities summing to 1 over K.
        """
        if image.ndim != 3:
            raise ValueError(f"expected a (C, H, W) image, got shape {image.shape}")
        x = torch.from_numpy(np.array(image, dtype=np.float32))[None]  # a copy: cached arrays are read-only maps
        tile = min(tile or self.config.tile, self.config.tile)
        roi = tuple(window_size(side, tile, self.config.overlap) for side in image.shape[1:])
        probs = sliding_window_inference(
            x,
            roi_size=roi,
            sw_batch_size=self.config.batch_size if self.device.type != "cpu" else self.config.cpu_batch_size,
            predictor=self._window_probabilities,
            overlap=self.config.overlap,
            mode=self.config.blend,
            sw_device=self.device,
            device=torch.device("cpu"),
            progress=False,
        )
        return probs[0].numpy()
