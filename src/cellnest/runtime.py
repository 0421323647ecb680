"""Run a network's forward pass on an optimised CPU runtime: ONNX Runtime or OpenVINO.

The network proper (``model.net`` inside :class:`cellnest.nets.PadCrop`) is exported
once to ONNX with a dynamic batch, height and width, and cached under
``<cache>/runtime/<key>.onnx``, where the key hashes the network's structure and
weights: retraining or fine-tuning gives a new file, never a stale one. Padding to the
network's multiple and cropping stay in PyTorch (:class:`PadCrop`), so the exported
graph only ever sees the shapes it was traced for (multiples of 16 or 32), and every
caller (sliding windows, blocks, TTA, ensembles) works unchanged.

The graph has a second output: the spatial means of the convolutions at the network's
coarsest resolutions, the features :mod:`cellnest.sizemodel` estimates cell size from,
so ``--diameter auto`` runs on the same runtime (:attr:`RuntimeNet.last_features`).

Backends
--------
``"torch"`` eager PyTorch (any device). ``"onnx"`` ONNX Runtime, CPU execution provider.
``"openvino"`` OpenVINO on the CPU in float32 (its CPU default on bf16-capable
processors is bfloat16, which moved logits by up to 0.56 here). ``"auto"``: the fastest
installed runtime on CPU (:data:`AUTO_ORDER`, measured in docs/speed.md), PyTorch on
CUDA. A runtime that is missing, or a network that does not export, falls back to
PyTorch with a one-line note.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from cellnest.io import atomic_write

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "onnx", "openvino")
AUTO_ORDER = ("openvino", "onnx")  # tried in this order by "auto" on CPU: fastest first (docs/speed.md)
EXPORT_VERSION = 1  # part of the cache key: bump when the exported graph changes
FEATURE_LEVELS = 2  # coarsest resolutions whose conv outputs are pooled (cellnest.sizemodel)
_MODULES = {"onnx": "onnxruntime", "openvino": "openvino"}


def available_backends() -> list[str]:
    """Backends usable here: ``torch`` plus each runtime whose package is installed."""
    return ["torch", *(b for b, module in _MODULES.items() if importlib.util.find_spec(module) is not None)]


def coarsest_positions(sizes: list[int]) -> list[int]:
    """Positions, among conv outputs of spatial ``sizes`` (in the order they ran), of those
    at the ``FEATURE_LEVELS`` coarsest resolutions: the size model's features (one rule for
    the PyTorch hooks and the exported graph)."""
    coarsest = sorted(set(sizes))[:FEATURE_LEVELS]
    return [i for i, size in enumerate(sizes) if size in coarsest]


class FeatureTap(nn.Module):
    """The network proper with a second output for the size model.

    ``forward(x)`` returns ``(logits, features)``: (B, K, H, W) and (F,), the means over
    batch and space of the outputs of every ``Conv2d`` at the ``FEATURE_LEVELS`` coarsest
    resolutions, in the order they run (as :func:`cellnest.sizemodel.pooled_features`
    collects them with hooks). Which convolutions those are is found once, on a probe.
    """

    def __init__(self, net: nn.Module, probe: int = 256):
        super().__init__()
        self.net = net
        self.convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
        with torch.no_grad():
            outputs = self._run(torch.zeros(1, net_in_channels(net), probe, probe))[1]
        self.keep = coarsest_positions([o.shape[-2] * o.shape[-1] for o in outputs])

    def _run(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        outputs: list[torch.Tensor] = []
        hooks = [conv.register_forward_hook(lambda _m, _i, out: outputs.append(out)) for conv in self.convs]
        try:
            logits = self.net(x)
        finally:
            for hook in hooks:
                hook.remove()
        return logits, outputs

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, outputs = self._run(x)
        return logits, torch.cat([outputs[i].mean(dim=(0, 2, 3)) for i in self.keep])


def net_in_channels(net: nn.Module) -> int:
    """Input channels of a network: those of its first convolution."""
    first = next((m for m in net.modules() if isinstance(m, nn.Conv2d)), None)
    if first is None:
        raise ValueError("network has no Conv2d layer")
    return first.in_channels


def network_key(net: nn.Module) -> str:
    """Hash of a network's structure and weights (the exported file's cache key)."""
    digest = hashlib.sha256(f"v{EXPORT_VERSION}\n{net!r}".encode())
    for name, tensor in sorted(net.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:32]


def export_onnx(net: nn.Module, path: str | os.PathLike, probe: int = 256) -> Path:
    """Export the network proper (inputs padded to its multiple) to ONNX, atomically.

    Inputs ``image`` (B, C, H, W) float32; outputs ``logits`` (B, K, H, W) and
    ``features`` (F,) (see :class:`FeatureTap`); B, H and W are dynamic.
    """
    tap = FeatureTap(net, probe).eval()
    example = torch.zeros(1, net_in_channels(net), probe, probe)

    def write(tmp: Path) -> None:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer notes on shape-dependent Python branches
            torch.onnx.export(tap, (example,), str(tmp), dynamo=False, opset_version=17,
                              input_names=["image"], output_names=["logits", "features"],
                              dynamic_axes={"image": {0: "batch", 2: "height", 3: "width"},
                                            "logits": {0: "batch", 2: "height", 3: "width"}})

    return atomic_write(path, write)


def cached_onnx(net: nn.Module, cache: str | os.PathLike | None = None) -> Path:
    """The network's ONNX file, exported on first use into ``<cache>/runtime/``."""
    from cellnest.data import default_cache_dir

    path = Path(cache or default_cache_dir()) / "runtime" / f"{network_key(net)}.onnx"
    if not path.is_file():
        log.info("exporting the network to %s (once per set of weights)", path)
        export_onnx(net, path)
    return path


Runner = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def onnxruntime_runner(path: str | os.PathLike, threads: int) -> Runner:
    """ONNX Runtime session on the CPU: (B, C, H, W) float32 -> (logits, features)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: no notes on unused initialisers
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda x: tuple(session.run(None, {"image": x}))


def openvino_runner(path: str | os.PathLike, threads: int) -> Runner:
    """OpenVINO compiled model on the CPU in float32: (B, C, H, W) -> (logits, features)."""
    import openvino as ov

    compiled = ov.Core().compile_model(str(path), "CPU", {
        "INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"})
    request = compiled.create_infer_request()
    logits, features = compiled.outputs

    def run(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        result = request.infer({0: x})
        return result[logits], result[features]

    return run


RUNNERS: dict[str, Callable[[str | os.PathLike, int], Runner]] = {"onnx": onnxruntime_runner, "openvino": openvino_runner}


class RuntimeNet(nn.Module):
    """Stands in for the network proper inside :class:`PadCrop`; runs it on a runtime.

    ``forward(x)`` maps (B, C, H, W) float32 on the CPU to logits (B, K, H, W) and keeps
    the size-model features of that call in :attr:`last_features` ((F,) float32).
    Inference only: no gradients flow through it.
    """

    def __init__(self, run: Runner, backend: str):
        super().__init__()
        self.run = run
        self.backend = backend
        self.last_features: np.ndarray | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits, self.last_features = self.run(np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32))
        return torch.from_numpy(logits)

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend to use: ``auto`` -> the first installed of :data:`AUTO_ORDER` on CPU,
    ``torch`` on other devices; a requested runtime that is missing or off-CPU -> ``torch``
    with a one-line note."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    installed = available_backends()
    if backend == "auto":
        return next((b for b in AUTO_ORDER if b in installed), "torch") if device.type == "cpu" else "torch"
    if backend != "torch" and device.type != "cpu":
        log.warning("note: backend %s runs on the CPU only; using PyTorch on %s", backend, device)
        return "torch"
    if backend not in installed:
        log.warning("note: %s is not installed (pip install %s); using PyTorch", _MODULES[backend], _MODULES[backend])
        return "torch"
    return backend


def on_backend(model: nn.Module, backend: str, device: torch.device, cache: str | os.PathLike | None = None) -> nn.Module:
    """``model`` (a :class:`PadCrop`) with its network proper run by ``backend``.

    Returns ``model`` itself for PyTorch, else a new :class:`PadCrop` around a
    :class:`RuntimeNet` (the original is not changed). A network that cannot be exported
    stays on PyTorch, with a one-line note.
    """
    from cellnest.nets import PadCrop

    chosen = resolve_backend(backend, device)
    if chosen == "torch" or not isinstance(model, PadCrop):
        return model
    try:
        path = cached_onnx(model.net.eval(), cache)
        run = RUNNERS[chosen](path, torch.get_num_threads())
    except Exception as err:  # exporters and runtimes raise many types for unsupported operators
        log.warning("note: %s cannot run this network (%s: %s); using PyTorch", chosen, type(err).__name__,
                    " ".join(str(err).split())[:200])
        return model
    return PadCrop(RuntimeNet(run, chosen), model.multiple, model.pad_mode, model.tile)
