"""Which models ``--model`` accepts by name: the classical baseline and the model files
shipped in ``cellnest/weights/``.

Kept free of torch so ``cellnest models`` answers at once.
"""

from __future__ import annotations

import os
from pathlib import Path

WEIGHTS_DIR = Path(__file__).with_name("weights")
DEFAULT_MODEL = "attn-unetpp"  # the shipped model with the better tuning F1 (docs/models.md)


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
