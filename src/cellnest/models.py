"""Segmentation models: by name or by file, classical or network, single or ensemble.

A *segmenter* maps a raw ``(H, W, C)`` image of any real dtype to an ``(H, W)`` int32
instance map. Every segmenter normalises with the whole image's percentiles and, above
``max_whole_pixels``, works block by block (:mod:`cellnest.blocks`) so memory stays bounded.

A *model file* (``.pt``) is one ``torch.save`` dict, loadable with
``torch.load(weights_only=True)``::

    {"format": "cellnest-model", "version": 1,
     "network": {"name": "attn_unetpp", "cfg": {...}, "in_channels": 3, "out_channels": 3},
     "targets": {...}, "predictor": {...}, "postprocess": {...}, "meta": {...},
     "state_dict": {...}}

so the network, its normalisation, tile size, post-processing and tuned thresholds travel
together. ``--model`` accepts a registered name (``classical``, or a model shipped in
``cellnest/weights/``), a path to a ``.pt`` file, or a run folder holding ``model.pt``.
Several models form an ensemble whose softmax outputs are averaged.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn

from cellnest.blocks import segment_in_blocks
from cellnest.catalog import DEFAULT_MODEL, model_path, shipped_models
from cellnest.classical import ClassicalConfig, segment_normalized_classical
from cellnest.diameter import TOLERANCE, interior_median_diameter, rescale_image, resize_labels, scale_for, search_diameter
from cellnest.io import atomic_write, first_line
from cellnest.normalize import apply_image_percentiles, image_percentiles
from cellnest.postprocess import PostprocessConfig, probabilities_to_instances
from cellnest.predict import Predictor, PredictorConfig, resolve_device
from cellnest.runtime import on_backend
from cellnest.sizemodel import SizeModel, estimate_diameter
from cellnest.timing import stage

log = logging.getLogger(__name__)

MODEL_FORMAT = "cellnest-model"
MODEL_VERSION = 1
ESTIMATORS = ("size_model", "search", "combined")


class ModelFileError(ValueError):
    """A model file that cannot be used; ``str(err)`` is ``"<path>: <problem>"``."""

    def __init__(self, path: str | os.PathLike, problem: str):
        super().__init__(f"{path}: {problem}")
        self.problem = problem


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
    lower_percentile: float = 1.0
    upper_percentile: float = 99.0
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
        with stage("network"):
            return self.predictor(np.moveaxis(image, -1, 0), tile)

    def segment_normalized(self, image: np.ndarray, tile: int | None = None) -> np.ndarray:
        probabilities = self.probabilities(image, tile)
        with stage("postprocess"):
            return probabilities_to_instances(probabilities, self.postprocess)


def _plain(values: dict) -> dict:
    """Only the plain types ``torch.load(weights_only=True)`` accepts (e.g. no TorchVersion)."""
    return json.loads(json.dumps(values, default=str))


def save_model(
    path: str | os.PathLike,
    model: nn.Module,
    network: dict,
    targets: dict,
    predictor: PredictorConfig,
    postprocess: PostprocessConfig,
    meta: dict | None = None,
    half: bool = False,
) -> Path:
    """Write a model file atomically (see the module docstring for its layout).

    ``half=True`` stores floating-point weights as float16 (half the size); they are
    cast back to float32 on load.
    """
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    state = half_state(state) if half else state
    bundle = {
        "format": MODEL_FORMAT,
        "version": MODEL_VERSION,
        "network": _plain(network),
        "targets": _plain(targets),
        "predictor": _plain(predictor.to_dict()),
        "postprocess": _plain(postprocess.to_dict()),
        "meta": _plain(meta or {}),
        "state_dict": state,
    }
    return write_model_file(path, bundle)


def half_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict with its floating-point tensors cast to float16 (integer buffers kept)."""
    return {k: v.half() if v.is_floating_point() else v for k, v in state.items()}


def write_model_file(path: str | os.PathLike, bundle: dict) -> Path:
    """Write a model-file dict atomically (temporary file, then rename)."""
    return atomic_write(path, lambda tmp: torch.save(bundle, tmp))


def read_model_file(path: str | os.PathLike) -> dict:
    """Load and check a model file's dict (weights only; no code is unpickled)."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.pt"
    if not path.is_file():
        raise ModelFileError(path, "model file not found")
    try:
        bundle = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a corrupt or foreign file
        raise ModelFileError(path, f"not a readable model file ({type(err).__name__}: {first_line(err)})") from None
    if not isinstance(bundle, dict) or bundle.get("format") != MODEL_FORMAT:
        raise ModelFileError(path, f"not a cellnest model file (no format '{MODEL_FORMAT}')")
    if bundle.get("version") != MODEL_VERSION:
        raise ModelFileError(path, f"model file version {bundle.get('version')} is not supported (expected {MODEL_VERSION})")
    missing = [k for k in ("network", "predictor", "postprocess", "state_dict") if k not in bundle]
    if missing:
        raise ModelFileError(path, f"model file lacks {', '.join(missing)}")
    return bundle


def build_network(bundle: dict, path: str | os.PathLike = "<model>") -> nn.Module:
    """Rebuild the network of a model file and load its weights (float32)."""
    from cellnest.nets import build_model
    from cellnest.nets.registry import declared_shapes

    spec = bundle["network"]

    args = (spec.get("name"), spec.get("in_channels", 3), spec.get("out_channels", 3))
    try:  # only a network whose shapes match the file's own weights is built
        declared = declared_shapes(*args, **spec.get("cfg", {}))
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise ModelFileError(path, f"cannot build its network ({first_line(err)})") from None
    weights = bundle["state_dict"]
    stored = {k: tuple(v.shape) for k, v in weights.items() if isinstance(v, torch.Tensor)}
    if declared != stored:
        wrong = sorted(set(declared) ^ set(stored)) or [k for k in declared if declared[k] != stored[k]]
        size = sum(math.prod(shape) for shape in declared.values())
        raise ModelFileError(path, f"its weights do not fit the network it declares ({size:,} values; first mismatch: "
                                   f"{wrong[0]})")
    model = build_model(*args, **spec.get("cfg", {}))
    try:
        model.load_state_dict({k: (v.float() if v.is_floating_point() else v) for k, v in weights.items()})
    except (RuntimeError, AttributeError) as err:
        raise ModelFileError(path, f"weights do not fit the network ({first_line(err)})") from None
    return model


def sized_at(bundle: dict) -> float | None:
    """The cell diameter a model file was trained at (``data.diameter``), or None for a
    model trained at native scale: its samples must be prepared at that size."""
    meta = bundle.get("meta", {})
    return meta.get("cell_diameter") if meta.get("size_normalised") else None


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
    bundles = [read_model_file(p) for p in paths]
    networks = [build_network(b, p) for b, p in zip(bundles, paths)]
    first = bundles[0]
    classes = {b["network"].get("out_channels", 3) for b in bundles}
    if len(classes) > 1:
        raise ValueError(f"ensemble members disagree on the number of classes: {sorted(classes)}")
    percentiles = {(b.get("targets", {}).get("lower_percentile"), b.get("targets", {}).get("upper_percentile")) for b in bundles}
    if len(percentiles) > 1:
        raise ValueError(f"ensemble members normalise differently (percentiles {sorted(percentiles, key=str)}); they cannot share one input")
    sizes = {(b.get("meta", {}).get("cell_diameter"), bool(b.get("meta", {}).get("size_normalised"))) for b in bundles}
    if len(sizes) > 1:
        raise ValueError(f"ensemble members were trained at different cell sizes ({sorted(sizes, key=str)}); they cannot share one input")
    predictor_config = PredictorConfig.from_dict({**first["predictor"], **(predictor or {})})
    device = resolve_device(device)
    networks = [on_backend(n, backend, device) for n in networks]
    targets = first.get("targets", {})
    meta = first.get("meta", {})
    name = "+".join(Path(s).stem if s not in shipped_models() else s for s in specs)
    if diameter is None:
        diameter = "auto" if meta.get("size_normalised") else "native"
    size_model = SizeModel.from_dict(first["size_model"]) if first.get("size_model") else None
    if estimator == "size_model" and size_model is None:
        raise ValueError(f"{paths[0]}: has no size model (fitted after training at one cell size); use --estimator search")
    return NetworkSegmenter(
        name=name,
        lower_percentile=targets.get("lower_percentile", 1.0),
        upper_percentile=targets.get("upper_percentile", 99.0),
        predictor=Predictor(networks, predictor_config, device),
        postprocess=PostprocessConfig.from_dict(first["postprocess"]),
        cell_diameter=meta.get("cell_diameter"),
        diameter=None if diameter == "native" else diameter,
        estimator=estimator or ("size_model" if size_model is not None else "search"),
        size_model=size_model,
    )
