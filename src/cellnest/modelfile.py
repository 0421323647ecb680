"""The model file (``model.pt``): one typed record of a trained network, and the only code
that reads or writes one.

On disk it is one ``torch.save`` dict, loadable with ``torch.load(weights_only=True)``::

    {"format": "cellnest-model", "version": 1,
     "network": {"name": "attn_unetpp", "cfg": {...}, "in_channels": 3, "out_channels": 3},
     "targets": {...}, "predictor": {...}, "postprocess": {...}, "meta": {...},
     "state_dict": {...}, "size_model": {...}}

so the network, its normalisation (``targets``' percentiles, the rule the training data
was prepared with), window size, post-processing and tuned thresholds travel together.
``size_model`` is present once a model trained at one cell size has its size estimator
(:mod:`cellnest.sizemodel`). :class:`ModelFile` is that dict with types; change one with
:func:`dataclasses.replace` and :meth:`ModelFile.save`.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn as nn

from cellnest.data import TargetConfig
from cellnest.io import atomic_write, first_line
from cellnest.postprocess import PostprocessConfig
from cellnest.predict import PredictorConfig
from cellnest.targets import N_CLASSES

MODEL_FORMAT = "cellnest-model"
MODEL_VERSION = 1
IN_CHANNELS = 3  # every image is read as three channels (cellnest.io)


class ModelFileError(ValueError):
    """A model file that cannot be used; ``str(err)`` is ``"<path>: <problem>"``."""

    def __init__(self, path: str | os.PathLike, problem: str):
        super().__init__(f"{path}: {problem}")
        self.problem = problem


@dataclass(frozen=True)
class NetworkSpec:
    """A registered network and its recipe keys (:func:`cellnest.nets.build_model`)."""

    name: str
    cfg: dict = field(default_factory=dict)
    in_channels: int = IN_CHANNELS
    out_channels: int = N_CLASSES

    def build(self) -> nn.Module:
        """The network with fresh weights."""
        from cellnest.nets import build_model

        return build_model(self.name, self.in_channels, self.out_channels, **self.cfg)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Its state-dict shapes, without allocating them."""
        from cellnest.nets.registry import declared_shapes

        return declared_shapes(self.name, self.in_channels, self.out_channels, **self.cfg)


def _plain(values: dict) -> dict:
    """Only the plain types ``torch.load(weights_only=True)`` accepts (e.g. no TorchVersion)."""
    return json.loads(json.dumps(values, default=str))


@dataclass(frozen=True)
class ModelFile:
    """A trained network with everything needed to segment with it."""

    network: NetworkSpec
    state_dict: dict[str, torch.Tensor]
    targets: TargetConfig = TargetConfig()
    predictor: PredictorConfig = PredictorConfig()
    postprocess: PostprocessConfig = PostprocessConfig()
    meta: dict = field(default_factory=dict)
    size_model: dict | None = None
    source: str = "<model>"  # where it was read from, for messages

    @classmethod
    def of(cls, model: nn.Module, network: NetworkSpec, targets: TargetConfig, predictor: PredictorConfig,
           postprocess: PostprocessConfig, meta: dict | None = None) -> "ModelFile":
        """A model file of ``model``'s current weights (copied to the CPU)."""
        state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        return cls(network, state, targets, predictor, postprocess, dict(meta or {}))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ModelFile":
        """Read and check a model file, or a run folder's ``model.pt`` (weights only: no code
        is unpickled). Raises :class:`ModelFileError` naming the file."""
        path = Path(path)
        if path.is_dir():
            path = path / "model.pt"
        if not path.is_file():
            raise ModelFileError(path, "model file not found")
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises many types for a corrupt or foreign file
            raise ModelFileError(path, f"not a readable model file ({type(err).__name__}: {first_line(err)})") from None
        if not isinstance(raw, dict) or raw.get("format") != MODEL_FORMAT:
            raise ModelFileError(path, f"not a cellnest model file (no format '{MODEL_FORMAT}')")
        if raw.get("version") != MODEL_VERSION:
            raise ModelFileError(path, f"model file version {raw.get('version')} is not supported (expected {MODEL_VERSION})")
        missing = [k for k in ("network", "predictor", "postprocess", "state_dict") if k not in raw]
        if missing:
            raise ModelFileError(path, f"model file lacks {', '.join(missing)}")
        try:
            return cls(
                network=NetworkSpec(**raw["network"]),
                state_dict=dict(raw["state_dict"]),
                targets=TargetConfig(**raw.get("targets", {})),
                predictor=PredictorConfig.from_dict(raw["predictor"]),
                postprocess=PostprocessConfig.from_dict(raw["postprocess"]),
                meta=dict(raw.get("meta", {})),
                size_model=raw.get("size_model"),
                source=str(path),
            )
        except (TypeError, ValueError) as err:
            raise ModelFileError(path, f"invalid model file ({first_line(err)})") from None

    def to_dict(self) -> dict:
        """The on-disk dict (see the module docstring)."""
        raw = {
            "format": MODEL_FORMAT,
            "version": MODEL_VERSION,
            "network": _plain(asdict(self.network)),
            "targets": _plain(asdict(self.targets)),
            "predictor": _plain(self.predictor.to_dict()),
            "postprocess": _plain(self.postprocess.to_dict()),
            "meta": _plain(self.meta),
            "state_dict": self.state_dict,
        }
        if self.size_model is not None:
            raw["size_model"] = self.size_model
        return raw

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically (temporary file, then rename)."""
        raw = self.to_dict()
        return atomic_write(path, lambda tmp: torch.save(raw, tmp))

    def half(self) -> "ModelFile":
        """Floating-point weights as float16 (half the size; cast back to float32 on load)."""
        return replace(self, state_dict={k: v.half() if v.is_floating_point() else v for k, v in self.state_dict.items()})

    def with_meta(self, **entries) -> "ModelFile":
        return replace(self, meta={**self.meta, **entries})

    def build_network(self) -> nn.Module:
        """The network with this file's weights (float32). Its shapes are checked against
        the stored weights first, without memory: a file may declare any size
        (``base_filters: 4096`` asks for over 100 GB), and only a network that fits is built."""
        try:
            declared = self.network.shapes()
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            raise ModelFileError(self.source, f"cannot build its network ({first_line(err)})") from None
        stored = {k: tuple(v.shape) for k, v in self.state_dict.items() if isinstance(v, torch.Tensor)}
        if declared != stored:
            wrong = sorted(set(declared) ^ set(stored)) or [k for k in declared if declared[k] != stored[k]]
            size = sum(math.prod(shape) for shape in declared.values())
            raise ModelFileError(self.source, f"its weights do not fit the network it declares ({size:,} values; first "
                                              f"mismatch: {wrong[0]})")
        model = self.network.build()
        try:
            model.load_state_dict({k: (v.float() if v.is_floating_point() else v) for k, v in self.state_dict.items()})
        except (RuntimeError, AttributeError) as err:
            raise ModelFileError(self.source, f"weights do not fit the network ({first_line(err)})") from None
        return model

    @property
    def cell_diameter(self) -> float | None:
        """The cell diameter the model was trained at (``data.diameter``), or None for a
        model trained at native scale: its samples must be prepared at that size."""
        return self.meta.get("cell_diameter") if self.meta.get("size_normalised") else None

    @property
    def inference_targets(self) -> TargetConfig:
        """How to prepare labelled images to score this model on: its normalisation, no
        weight maps (they only weight the training loss)."""
        return replace(self.targets, weight_maps=False)
