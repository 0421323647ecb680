"""Segmentation models by name: anything that maps an image to an instance map.

A *segmenter* is a callable ``(H, W, 3) float32 raw image -> (H, W) int32 labels`` with a
``name``. :func:`load_segmenter` resolves ``--model``: a registered name (the classical
baseline now; shipped networks register here as they arrive) or, later, a model file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np

from cellnest.classical import ClassicalConfig, segment_classical


class Segmenter(Protocol):
    name: str

    def __call__(self, image: np.ndarray) -> np.ndarray: ...


@dataclass
class ClassicalSegmenter:
    """The classical baseline as a segmenter (see :mod:`cellnest.classical`)."""

    config: ClassicalConfig = field(default_factory=ClassicalConfig)
    name: str = "classical"

    def __call__(self, image: np.ndarray) -> np.ndarray:
        return segment_classical(image, self.config)


_REGISTRY: dict[str, Callable[..., Segmenter]] = {"classical": ClassicalSegmenter}
DEFAULT_MODEL = "classical"


def available_models() -> list[str]:
    """Registered model names."""
    return sorted(_REGISTRY)


def load_segmenter(model: str = DEFAULT_MODEL) -> Segmenter:
    """Build the segmenter named ``model``.

    Raises
    ------
    ValueError : unknown model name (the message lists the known ones).
    """
    factory = _REGISTRY.get(model)
    if factory is None:
        raise ValueError(f"unknown model '{model}' (available: {', '.join(available_models())})")
    return factory()
