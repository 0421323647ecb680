"""Shared fixtures: synthetic data made by cellnest itself, and the real data set if present."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

from cellnest.synthetic import write_synthetic_folder

MMCELLS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mmcells"

# Without a display, Qt's default platform aborts the whole process when napari's test
# fixtures start; offscreen lets the napari tests skip instead (test_napari.py).
if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")


@pytest.fixture(scope="session")
def synthetic_folder(tmp_path_factory) -> Path:
    """Eight synthetic images in the challenge layout (images/, labels/, manifest.csv)."""
    root = tmp_path_factory.mktemp("synthetic")
    write_synthetic_folder(root, count=8, seed=0)
    return root


@pytest.fixture(scope="session")
def mmcells() -> Path:
    """The real labelled data beside the project; tests using it skip when it is absent."""
    if not (MMCELLS / "tuning" / "labels").is_dir():
        pytest.skip(f"real data not found at {MMCELLS}")
    return MMCELLS


def disk(shape: tuple[int, int], centre: tuple[float, float], radius: float) -> np.ndarray:
    """Boolean disk, for hand-made label maps."""
    yy, xx = np.ogrid[: shape[0], : shape[1]]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2
