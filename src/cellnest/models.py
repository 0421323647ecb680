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
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn

from cellnest.blocks import segment_in_blocks
from cellnest.classical import ClassicalConfig, segment_normalized_classical
from cellnest.diameter import segment_at_diameter
from cellnest.io import atomic_write
from cellnest.normalize import apply_image_percentiles, image_percentiles
from cellnest.postprocess import PostprocessConfig, probabilities_to_instances
from cellnest.predict import Predictor, PredictorConfig

log = logging.getLogger(__name__)

MODEL_FORMAT = "cellnest-model"
MODEL_VERSION = 1
WEIGHTS_DIR = Path(__file__).with_name("weights")
DEFAULT_MODEL = "attn-unetpp"  # the shipped model with the better tuning F1 (docs/models.md)


class ModelFileError(ValueError):
    """A model file that cannot be used; ``str(err)`` is ``"<path>: <problem>"``."""

    def __init__(self, path: str | os.PathLike, problem: str):
        super().__init__(f"{path}: {problem}")
        self.problem = problem


@dataclass
class Segmenter:
    """Base: normalisation with whole-image percentiles, and the large-image block path.

    Subclasses implement :meth:`segment_normalized` on a normalised (h, w, C) float32
    image in [0, 1].

    cell_diameter : the model's typical training cell diameter (pixels), or None.
    diameter : None (segment as is), the cells' typical diameter in the user's images
        (pixels), or "auto"; the image is rescaled to ``cell_diameter`` first
        (:mod:`cellnest.diameter`).
    """

    name: str = "segmenter"
    lower_percentile: float = 1.0
    upper_percentile: float = 99.0
    max_whole_pixels: int = 4096 * 4096
    block: int = 2048
    margin: int = 128
    cell_diameter: float | None = None
    diameter: float | str | None = None

    def __post_init__(self) -> None:
        if self.diameter is None:
            return
        if self.cell_diameter is None:
            raise ValueError(f"model {self.name} does not record its training cell diameter, so --diameter cannot rescale for it")
        if self.diameter != "auto" and not (isinstance(self.diameter, (int, float)) and self.diameter > 0):
            raise ValueError(f"diameter must be 'auto' or a number of pixels > 0, got {self.diameter!r}")

    def segment_normalized(self, image: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def __call__(self, image: np.ndarray, progress: bool = False) -> np.ndarray:
        """(H, W, C) raw image -> (H, W) int32 instance map."""
        if image.ndim != 3:
            raise ValueError(f"expected an (H, W, C) image, got shape {image.shape}")
        if self.diameter is None:
            return self._segment(image, progress)
        labels, _ = segment_at_diameter(lambda im: self._segment(im, progress), image, self.cell_diameter, self.diameter)
        return labels

    def _segment(self, image: np.ndarray, progress: bool) -> np.ndarray:
        bounds = image_percentiles(image, self.lower_percentile, self.upper_percentile)
        if image.shape[0] * image.shape[1] <= self.max_whole_pixels:
            return np.asarray(self.segment_normalized(apply_image_percentiles(image, bounds)), np.int32)
        return segment_in_blocks(image, bounds, self.segment_normalized, self.block, self.margin, progress)


@dataclass
class ClassicalSegmenter(Segmenter):
    """The classical baseline (:mod:`cellnest.classical`)."""

    name: str = "classical"
    config: ClassicalConfig = field(default_factory=ClassicalConfig)

    def segment_normalized(self, image: np.ndarray) -> np.ndarray:
        return segment_normalized_classical(image, self.config)


@dataclass
class NetworkSegmenter(Segmenter):
    """Network(s) -> sliding-window probabilities -> post-processing -> instances."""

    name: str = "network"
    predictor: Predictor | None = None
    postprocess: PostprocessConfig = field(default_factory=PostprocessConfig)

    def probabilities(self, image: np.ndarray) -> np.ndarray:
        """Normalised (h, w, C) float32 -> (K, h, w) float32 class probabilities."""
        return self.predictor(np.moveaxis(image, -1, 0))

    def segment_normalized(self, image: np.ndarray) -> np.ndarray:
        return probabilities_to_instances(self.probabilities(image), self.postprocess)


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
        raise ModelFileError(path, f"not a readable model file ({type(err).__name__}: {str(err).splitlines()[0]})") from None
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

    spec = bundle["network"]
    try:
        model = build_model(spec["name"], spec.get("in_channels", 3), spec.get("out_channels", 3), **spec.get("cfg", {}))
    except (KeyError, TypeError, ValueError) as err:
        raise ModelFileError(path, f"cannot build its network ({str(err).splitlines()[0]})") from None
    try:
        model.load_state_dict({k: (v.float() if v.is_floating_point() else v) for k, v in bundle["state_dict"].items()})
    except (RuntimeError, AttributeError) as err:
        raise ModelFileError(path, f"weights do not fit the network ({str(err).splitlines()[0]})") from None
    return model


def shipped_models() -> dict[str, Path]:
    """Model files shipped in the package: ``name -> path``."""
    return {p.stem: p for p in sorted(WEIGHTS_DIR.glob("*.pt"))} if WEIGHTS_DIR.is_dir() else {}


def available_models() -> list[str]:
    """Names accepted by ``--model`` besides file paths."""
    return ["classical", *shipped_models()]


def model_path(spec: str) -> Path | None:
    """A model name or path -> a model file path (None for the classical baseline)."""
    if spec == "classical":
        return None
    shipped = shipped_models()
    if spec in shipped:
        return shipped[spec]
    path = Path(spec)
    if path.exists() or path.suffix == ".pt" or os.sep in spec:
        return path
    raise ValueError(f"unknown model '{spec}' (available: {', '.join(available_models())}, or a .pt file)")


def load_segmenter(
    models: str | Sequence[str] = DEFAULT_MODEL,
    device: str = "auto",
    predictor: dict | None = None,
    diameter: float | str | None = None,
) -> Segmenter:
    """Build a segmenter from model names or files.

    Parameters
    ----------
    models : one name/path, or several model files to ensemble (their softmax outputs
        are averaged; normalisation, predictor and post-processing come from the first).
    device : "auto", "cpu", "cuda", ...
    predictor : overrides of the stored :class:`PredictorConfig` (e.g. ``{"tta": True}``).
    diameter : rescale images to the model's training cell size: the cells' diameter in
        pixels, or "auto" (see :mod:`cellnest.diameter`); None keeps the image as is.

    Raises
    ------
    ValueError : unknown name, unreadable or mismatched model file (one line).
    """
    specs = [models] if isinstance(models, str) else list(models)
    paths = [model_path(s) for s in specs]
    if any(p is None for p in paths):
        if len(paths) > 1:
            raise ValueError("the classical baseline cannot be part of an ensemble")
        return ClassicalSegmenter(diameter=diameter)
    bundles = [read_model_file(p) for p in paths]
    networks = [build_network(b, p) for b, p in zip(bundles, paths)]
    first = bundles[0]
    classes = {b["network"].get("out_channels", 3) for b in bundles}
    if len(classes) > 1:
        raise ValueError(f"ensemble members disagree on the number of classes: {sorted(classes)}")
    percentiles = {(b.get("targets", {}).get("lower_percentile"), b.get("targets", {}).get("upper_percentile")) for b in bundles}
    if len(percentiles) > 1:
        raise ValueError(f"ensemble members normalise differently (percentiles {sorted(percentiles, key=str)}); they cannot share one input")
    predictor_config = PredictorConfig.from_dict({**first["predictor"], **(predictor or {})})
    targets = first.get("targets", {})
    name = "+".join(Path(s).stem if s not in shipped_models() else s for s in specs)
    return NetworkSegmenter(
        name=name,
        lower_percentile=targets.get("lower_percentile", 1.0),
        upper_percentile=targets.get("upper_percentile", 99.0),
        predictor=Predictor(networks, predictor_config, device),
        postprocess=PostprocessConfig.from_dict(first["postprocess"]),
        cell_diameter=first.get("meta", {}).get("cell_diameter"),
        diameter=diameter,
    )
