"""Segment many image files with one segmenter and write what other tools open.

For every input ``<name>.<ext>`` the output folder receives ``<name>_label.tiff`` (the
challenge naming; uint16/uint32, opens in napari and Fiji) and, on request,
``<name>_overlay.png`` (cell outlines over the image), ``<name>_cells.csv`` (per-cell
measurements) and ``<name>_cells.geojson`` (polygons QuPath imports). ``summary.csv``
lists cells and seconds per image and the error of any file that failed. A bad file is reported by name
and skipped; the others go on.
"""

from __future__ import annotations

import csv
import glob
import io
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from skimage.segmentation import find_boundaries
from tqdm import tqdm

from cellnest.export import measure_cells, write_geojson, write_measurements
from cellnest.io import IMAGE_SUFFIXES, ImageReadError, atomic_write, list_images, read_image, write_labels, write_png
from cellnest.models import Segmenter
from cellnest.normalize import normalize_image

log = logging.getLogger(__name__)


@dataclass
class ImageResult:
    """Outcome of one input file."""

    input: str
    name: str
    cells: int = 0
    seconds: float = 0.0
    diameter: str = ""  # cell diameter used (image pixels): given, or estimated with --diameter auto
    scale: str = ""  # factor the image was resized by for the model
    output: str = ""
    error: str = ""


def expand_inputs(inputs: Sequence[str | os.PathLike]) -> tuple[list[Path], list[ImageResult]]:
    """Resolve files, folders (their images, or ``images/`` inside) and glob patterns.

    Returns
    -------
    paths : unique image files, in the order given (folders and globs sorted).
    missing : a failed :class:`ImageResult` for every input that matched nothing.
    """
    paths: list[Path] = []
    missing: list[ImageResult] = []
    for spec in inputs:
        spec = str(spec)
        path = Path(spec)
        if path.is_dir():
            folder = path / "images" if (path / "images").is_dir() else path
            found = list_images(folder)
        elif path.exists():
            found = [path]
        else:
            found = sorted(Path(p) for p in glob.glob(spec) if Path(p).suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            missing.append(ImageResult(spec, Path(spec).stem, error=f"{spec}: no such file, folder or matching image"))
        paths.extend(found)
    unique, seen = [], set()
    for p in paths:
        if p.resolve() not in seen:
            seen.add(p.resolve())
            unique.append(p)
    return unique, missing


def overlay_outlines(image: np.ndarray, labels: np.ndarray, color: tuple[int, int, int] = (255, 255, 0)) -> np.ndarray:
    """Cell outlines drawn over the normalised image.

    Parameters
    ----------
    image : (H, W, 3) raw intensities. labels : (H, W) instance map.

    Returns
    -------
    (H, W, 3) uint8 picture.
    """
    picture = (normalize_image(image) * 255).astype(np.uint8)
    picture[find_boundaries(labels, mode="inner")] = color
    return picture


@dataclass(frozen=True)
class Outputs:
    """Which files besides ``<name>_label.tiff`` to write for each image."""

    overlay: bool = False  # <name>_overlay.png: outlines over the image
    measure: bool = False  # <name>_cells.csv: per-cell regionprops
    geojson: bool = False  # <name>_cells.geojson: polygons for QuPath


def segment_files(
    inputs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    segmenter: Segmenter,
    outputs: Outputs = Outputs(),
    progress: bool = True,
) -> list[ImageResult]:
    """Segment every image of ``inputs`` into ``out_dir``.

    Returns
    -------
    One :class:`ImageResult` per input file (``error`` set on failure), in input order.
    Inputs are never overwritten: an output that would land on an input, or on an
    existing file in an input folder (e.g. ground truth ``<name>_label.tiff``), is refused.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths, results = expand_inputs(inputs)
    for spec in results:
        log.error(spec.error)
    protected = {p.resolve() for p in paths}
    input_folders = {p.resolve().parent for p in paths}
    writes_beside_inputs = out_dir.resolve() in input_folders
    claimed: dict[str, Path] = {}
    bar = tqdm(paths, desc=f"segment ({segmenter.name})", unit="img", disable=not progress)
    try:
        for path in bar:
            results.append(_segment_one(path, out_dir, segmenter, outputs, protected, writes_beside_inputs, claimed, progress))
            if results[-1].error:
                tqdm.write(f"error: {results[-1].error}")
            else:
                bar.set_postfix(cells=results[-1].cells, s=f"{results[-1].seconds:.2f}")
    finally:  # even an interrupted batch leaves its summary
        write_summary(out_dir / "summary.csv", results)
    return results


def _segment_one(
    path: Path,
    out_dir: Path,
    segmenter: Segmenter,
    outputs: Outputs,
    protected: set[Path],
    writes_beside_inputs: bool,
    claimed: dict[str, Path],
    progress: bool,
) -> ImageResult:
    """Segment one file; any failure is recorded in the result, never raised."""
    result = ImageResult(str(path), path.stem)
    target = out_dir / f"{path.stem}_label.tiff"
    extras = [out_dir / f"{path.stem}{suffix}" for suffix in ("_overlay.png", "_cells.csv", "_cells.geojson")]
    try:
        if path.stem in claimed:
            raise ImageReadError(path, f"output name collides with {claimed[path.stem]} (same file stem)")
        clash = next((t for t in [target, *extras] if t.resolve() in protected), None)
        if clash is not None:
            raise ImageReadError(path, f"refusing to overwrite input file {clash}")
        # Beside the inputs, an existing <name>_label.tiff is likely ground truth: keep it.
        existing = next((t for t in [target, *extras] if writes_beside_inputs and t.exists()), None)
        if existing is not None:
            raise ImageReadError(path, f"refusing to overwrite existing {existing} beside the inputs; choose another --out")
        claimed[path.stem] = path
        start = time.perf_counter()
        image = read_image(path, dtype=None)  # native dtype: a large uint8 image stays small
        labels, size = segmenter.run(image, progress=progress)
        result.diameter = f"{size.diameter:.1f}" if size.diameter is not None else ""
        result.scale = f"{size.scale:.3f}"
        write_labels(target, labels)
        if outputs.overlay:
            write_png(extras[0], overlay_outlines(image, labels))
        if outputs.measure:
            write_measurements(extras[1], measure_cells(labels, image))
        if outputs.geojson:
            write_geojson(extras[2], labels, name=path.stem)
        result.seconds = time.perf_counter() - start
        result.cells = int(np.count_nonzero(np.bincount(labels.ravel())[1:]))
        result.output = str(target)
    except ImageReadError as err:
        result.error = str(err)
    except (ValueError, OSError, RuntimeError, MemoryError) as err:  # e.g. out of (GPU) memory on one image
        result.error = f"{path}: {type(err).__name__}: {' '.join(str(err).split())[:300]}"
    return result


def write_summary(path: Path, results: Sequence[ImageResult]) -> Path:
    """CSV of per-image results (input, name, cells, seconds, output, error), atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(asdict(ImageResult("", "")).keys()))
    writer.writeheader()
    for r in results:
        row = asdict(r)
        row["seconds"] = f"{r.seconds:.3f}"
        writer.writerow(row)
    return atomic_write(path, lambda tmp: tmp.write_text(buffer.getvalue()))
