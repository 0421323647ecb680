"""Segmentation models: by name or by file, classical or network, single or ensemble.

A *segmenter* maps a raw ``(H, W, C)`` image of any real dtype to an ``(H, W)`` int32
instance map. Every segmenter normalises with the whole image's percentiles and, above
``max_whole_pixels``, works block by block (:mod:`cellnest.blocks`) so memory stays bounded.

A model file (:mod:`cellnest.modelfile`) carries a network with its normalisation,
window size and post-processing. ``--model`` accepts a registered name (``classical``,
or a model shipped in ``cellnest/weights/``), a path to a ``.pt`` file, or a run folder
holding ``model.pt``.
Several models form an ensemble whose softmax outputs are averaged.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from cellnest.blocks import segment_in_blocks
from cellnest.catalog import DEFAULT_MODEL, model_path, shipped_models
from cellnest.classical import ClassicalConfig, segment_normalized_classical
from cellnest.diameter import TOLERANCE, interior_median_diameter, rescale_image, resize_labels, scale_for, search_diameter
from cellnest.modelfile import IN_CHANNELS, ModelFile
from cellnest.normalize import (LOWER_PERCENTILE, UPPER_PERCENTILE, apply_image_percentiles, channels_first,
                                image_percentiles)
from cellnest.postprocess import PostprocessConfig, probabilities_to_instances
from cellnest.predict import Predictor, PredictorConfig, resolve_device
from cellnest.runtime import on_backend
from cellnest.sizemodel import SizeModel, estimate_diameter
from cellnest.timing import stage

log = logging.getLogger(__name__)

ESTIMATORS = ("size_model", "search", "combined")


@dataclass(frozen=True)
class SizeInfo:
    """How an image was sized: the cell diameter used (image pixels; None = native scale)
    and the factor the image was resized by before the network (1 = none)."""

    diameter: float | None = None
    scale: float = 1.0


@dataclass
class Segmenter:
    """Base: cell-size rescaling, normalisation with whole-image percentiles, and the
    large-image block path.

    Subclasses implement :meth:`segment_normalized` on a normalised (h, w, C) float32
    image in [0, 1].

    cell_diameter : the model's training cell diameter (pixels), or None.
    diameter : None (segment at the image's own scale), the cells' typical diameter in the
        user's images (pixels), or "auto" (estimated per image). The image is resized by
        ``cell_diameter / diameter`` (clipped to [1/4, 4]) and the labels come back at its
        own size (:mod:`cellnest.diameter`).
    estimator : how "auto" estimates: ``"size_model"`` (the network's features, if the
        model file has a size model; :mod:`cellnest.sizemodel`) or ``"search"`` (the model on
        a pyramid of one window; :func:`cellnest.diameter.search_diameter`). Either way
        the estimate is then checked on the cells found at that scale, and the image is
        segmented once more if they are off by more than ``tolerance``.

    Images whose native or rescaled size exceeds ``max_whole_pixels`` go block by block: blocks of
    ``block`` pixels at the model's scale (``block / scale`` image pixels when enlarging)
    with a margin of ``margin`` image pixels or four model cell diameters, whichever is
    larger; each block is resized on its own, so memory stays bounded. Inside a block a
    network runs windows of at most ``block_tile`` pixels: a 1024-px window of the default
    model needs about 1.2 GB, a 512-px one 0.35 GB, for some 10 % more time
    (docs/reliability.md), and a huge image is where memory runs short.
    """

    name: str = "segmenter"
    lower_percentile: float = LOWER_PERCENTILE
    upper_percentile: float = UPPER_PERCENTILE
    max_whole_pixels: int = 4096 * 4096
    block: int = 2048
    block_tile: int = 512
    margin: int = 128
    cell_diameter: float | None = None
    diameter: float | str | None = None
    estimator: str = "search"
    tolerance: float = TOLERANCE

    def __post_init__(self) -> None:
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {self.estimator!r}")
        if self.diameter is None:
            return
        if self.cell_diameter is None:
            raise ValueError(f"model {self.name} does not record its training cell diameter, so --diameter cannot rescale for it")
        if self.diameter != "auto" and not (isinstance(self.diameter, (int, float)) and self.diameter > 0):
            raise ValueError(f"diameter must be 'auto' or a number of pixels > 0, got {self.diameter!r}")

    def segment_normalized(self, image: np.ndarray, tile: int | None = None) -> np.ndarray:
        """Normalised (h, w, C) float32 -> (h, w) instance map; ``tile`` caps a network's
        window side (None: its own)."""
        raise NotImplementedError

    def __call__(self, image: np.ndarray, progress: bool = False) -> np.ndarray:
        """(H, W, C) raw image -> (H, W) int32 instance map."""
        return self.run(image, progress)[0]

    def run(self, image: np.ndarray, progress: bool = False) -> tuple[np.ndarray, SizeInfo]:
        """(H, W, C) raw image -> (H, W) int32 instance map and how it was sized."""
        if image.ndim != 3:
            raise ValueError(f"expected an (H, W, C) image, got shape {image.shape}")
        with stage("normalise"):
            bounds = image_percentiles(image, self.lower_percentile, self.upper_percentile)
        if all(b is None or not b[1] > b[0] for b in bounds):  # blank or constant: nothing to segment
            log.warning("image %s has no contrast (blank or constant): no cells", "x".join(map(str, image.shape)))
            return np.zeros(image.shape[:2], np.int32), SizeInfo()
        if self.diameter is None:
            return self.segment_at(image, bounds, 1.0, progress), SizeInfo()
        if self.diameter != "auto":
            scale = scale_for(self.cell_diameter, float(self.diameter))
            return self.segment_at(image, bounds, scale, progress), SizeInfo(float(self.diameter), scale)
        with stage("size"):
            estimate = self.estimate_diameter(image, bounds)
        if estimate is None:  # nothing found at any scale: segment as is
            return self.segment_at(image, bounds, 1.0, progress), SizeInfo()
        scale = scale_for(self.cell_diameter, estimate)
        labels = self.segment_at(image, bounds, scale, progress)
        found = interior_median_diameter(labels)
        if found is None or abs(math.log2(found / estimate)) <= math.log2(self.tolerance):
            return labels, SizeInfo(estimate, scale)
        rescale = scale_for(self.cell_diameter, found)  # the cells found disagree: trust them, once
        if rescale == scale:  # both clipped to the same limit
            return labels, SizeInfo(found, scale)
        del labels  # a huge image's first label map (4 bytes a pixel) is not kept during the second pass
        return self.segment_at(image, bounds, rescale, progress), SizeInfo(found, rescale)

    def estimate_diameter(self, image: np.ndarray, bounds) -> float | None:
        """Median cell diameter of a raw image in its own pixels (the ``search`` estimator)."""
        return search_diameter(lambda crop, scale: self.segment_window(crop, bounds, scale), image, self.cell_diameter)

    def segment_window(self, crop: np.ndarray, bounds, scale: float) -> np.ndarray:
        """A raw (h, w, C) crop, normalised with the whole image's ``bounds`` and resized by
        ``scale`` -> instance map at the resized size."""
        with stage("normalise"):
            normalised = apply_image_percentiles(crop, bounds)
        if scale != 1.0:
            with stage("resample"):
                normalised = rescale_image(normalised, scale)
        return np.asarray(self.segment_normalized(normalised))

    def segment_at(self, image: np.ndarray, bounds, scale: float, progress: bool = False) -> np.ndarray:
        """Segment a raw (H, W, C) image resized by ``scale``; labels at (H, W), int32."""
        height, width = image.shape[:2]
        whole = height * width * max(scale, 1.0) ** 2 <= self.max_whole_pixels  # the native copy counts too
        tile = None if whole else self.block_tile

        def segment_block(normalised: np.ndarray) -> np.ndarray:
            if scale == 1.0:
                return np.asarray(self.segment_normalized(normalised, tile))
            with stage("resample"):
                resized = rescale_image(normalised, scale)
            labels = np.asarray(self.segment_normalized(resized, tile))
            with stage("resample"):
                return resize_labels(labels, normalised.shape[:2])

        if whole:
            with stage("normalise"):
                normalised = apply_image_percentiles(image, bounds)
            return np.asarray(segment_block(normalised), np.int32)
        block = max(int(self.block / max(scale, 1.0)), 64)
        margin = max(self.margin, int(math.ceil(4 * self.cell_diameter / scale))) if self.cell_diameter else self.margin
        return segment_in_blocks(image, bounds, segment_block, block, margin, progress)


@dataclass
class ClassicalSegmenter(Segmenter):
    """The classical baseline (:mod:`cellnest.classical`)."""

    name: str = "classical"
    config: ClassicalConfig = field(default_factory=ClassicalConfig)

    def segment_normalized(self, image: np.ndarray, tile: int | None = None) -> np.ndarray:
        return segment_normalized_classical(image, self.config)


@dataclass
class NetworkSegmenter(Segmenter):
    """Network(s) -> sliding-window probabilities -> post-processing -> instances."""

    name: str = "network"
    predictor: Predictor | None = None
    postprocess: PostprocessConfig = field(default_factory=PostprocessConfig)
    size_model: SizeModel | None = None

    def estimate_diameter(self, image: np.ndarray, bounds) -> float | None:
        """The size model's estimate, the search's, or ("combined") their geometric mean:
        the two fail differently (the size model drifts on images unlike its training
        data, the search can lock onto fragments or merged cells), so the mean halves
        either's error in octaves before the check."""
        if self.estimator == "search" or self.size_model is None:
            return super().estimate_diameter(image, bounds)
        by_features = estimate_diameter(self.predictor.models[0], self.size_model, image, bounds, device=self.predictor.device)
        if self.estimator == "size_model":
            return by_features
        by_search = super().estimate_diameter(image, bounds)
        return by_features if by_search is None else math.sqrt(by_features * by_search)

    def probabilities(self, image: np.ndarray, tile: int | None = None) -> np.ndarray:
        """Normalised (h, w, C) float32 -> (K, h, w) float32 class probabilities."""
        if image.shape[-1] != IN_CHANNELS:  # a runtime would abort the process, not raise
            raise ValueError(f"the network takes {IN_CHANNELS}-channel images, got {image.shape[-1]} "
                             "(cellnest.io.three_channels makes them)")
        with stage("network"):
            return self.predictor(channels_first(image), tile)

    def segment_normalized(self, image: np.ndarray, tile: int | None = None) -> np.ndarray:
        probabilities = self.probabilities(image, tile)
        with stage("postprocess"):
            return probabilities_to_instances(probabilities, self.postprocess)


def load_segmenter(
    models: str | Sequence[str] = DEFAULT_MODEL,
    device: str = "auto",
    predictor: dict | None = None,
    diameter: float | str | None = None,
    estimator: str | None = None,
    backend: str = "auto",
) -> Segmenter:
    """Build a segmenter from model names or files.

    Parameters
    ----------
    models : one name/path, or several model files to ensemble (their softmax outputs
        are averaged; normalisation, predictor and post-processing come from the first).
    device : "auto", "cpu", "cuda", ...
    predictor : overrides of the stored :class:`PredictorConfig` (e.g. ``{"tta": True}``).
    diameter : the cells' diameter in pixels, "auto" (estimated per image) or "native"
        (no rescaling); None = the model's default: "auto" for a model trained at one cell
        size (``meta.size_normalised``), else "native". See :class:`Segmenter`.
    estimator : "size_model" or "search" for "auto"; None = the size model where the model
        file has one, else the search.
    backend : what runs the networks: "torch", "onnx", "openvino" or "auto" (the fastest
        installed runtime on CPU, PyTorch on CUDA); see :mod:`cellnest.runtime`.

    Raises
    ------
    ValueError : unknown name, unreadable or mismatched model file (one line).
    """
    specs = [models] if isinstance(models, str) else list(models)
    paths = [model_path(s) for s in specs]
    if any(p is None for p in paths):
        if len(paths) > 1:
            raise ValueError("the classical baseline cannot be part of an ensemble")
        return ClassicalSegmenter(diameter=None if diameter in (None, "native") else diameter)
    files = [ModelFile.load(p) for p in paths]
    networks = [f.build_network() for f in files]
    first = files[0]
    for what, values in (("the number of classes", {f.network.out_channels for f in files}),
                         ("normalisation percentiles", {(f.targets.lower_percentile, f.targets.upper_percentile) for f in files}),
                         ("training cell size", {(f.meta.get("cell_diameter"), bool(f.meta.get("size_normalised"))) for f in files})):
        if len(values) > 1:  # one input image must suit every member
            raise ValueError(f"ensemble members disagree on {what} ({sorted(values, key=str)}); they cannot share one input")
    predictor_config = PredictorConfig.from_dict({**first.predictor.to_dict(), **(predictor or {})})
    device = resolve_device(device)
    networks = [on_backend(n, backend, device) for n in networks]
    name = "+".join(Path(s).stem if s not in shipped_models() else s for s in specs)
    if diameter is None:
        diameter = "auto" if first.meta.get("size_normalised") else "native"
    size_model = SizeModel.from_dict(first.size_model) if first.size_model else None
    if estimator == "size_model" and size_model is None:
        raise ValueError(f"{paths[0]}: has no size model (fitted after training at one cell size); use --estimator search")
    return NetworkSegmenter(
        name=name,
        lower_percentile=first.targets.lower_percentile,
        upper_percentile=first.targets.upper_percentile,
        predictor=Predictor(networks, predictor_config, device),
        postprocess=first.postprocess,
        cell_diameter=first.meta.get("cell_diameter"),
        diameter=None if diameter == "native" else diameter,
        estimator=estimator or ("size_model" if size_model is not None else "search"),
        size_model=size_model,
    )
