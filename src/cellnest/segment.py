"""Segment many image files with one segmenter and write what other tools open.

For every input ``<name>.<ext>`` the output folder receives ``<name>_label.tiff`` (the
challenge naming; uint16/uint32, opens in napari and Fiji) and, on request,
``<name>_overlay.png`` (cell outlines over the image), ``<name>_cells.csv`` (per-cell
measurements), ``<name>_cells.geojson`` (polygons QuPath imports) and ``<name>_rois.zip``
(Fiji's ROI Manager). ``summary.csv``
lists cells and seconds per image and the error of any file that failed. A bad file is reported by name
and skipped; the others go on.
"""

from __future__ import annotations

import glob
import logging
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm

from cellnest.export import measure_cells, overlay_outlines, write_geojson, write_imagej_rois, write_measurements
from cellnest.io import (IMAGE_SUFFIXES, MAX_PIXELS, ImageReadError, OutputExistsError, folder_lock,
                         list_images, read_image, refuse_existing, write_csv, write_labels, write_png)
from cellnest.models import Segmenter
from cellnest.timing import stage

log = logging.getLogger(__name__)


@dataclass
class ImageResult:
    """Outcome of one input file."""

    input: str
    name: str
    model: str = ""  # the segmenter that wrote this image's outputs
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
    missing : a failed :class:`ImageResult` for every input that matched nothing or whose
        path cannot be resolved (a symlink loop, a dangling link).
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
            problem = (f"folder holds no image files ({', '.join(IMAGE_SUFFIXES)})" if path.is_dir()
                       else "no such file, folder or matching image")
            missing.append(ImageResult(spec, Path(spec).stem, error=f"{spec}: {problem}"))
        paths.extend(found)
    unique, seen = [], set()
    for p in paths:
        try:
            real = p.resolve(strict=True)
        except (OSError, RuntimeError) as err:  # a symlink loop or a dangling link: that input fails, not the batch
            reason = "symlink loop" if "loop" in str(err).lower() or getattr(err, "errno", None) == 40 else "cannot resolve the path"
            missing.append(ImageResult(str(p), p.stem, error=f"{p}: {reason}"))
            continue
        if real not in seen:
            seen.add(real)
            unique.append(p)
    return unique, missing


@dataclass(frozen=True)
class Outputs:
    """Which files besides ``<name>_label.tiff`` to write for each image."""

    overlay: bool = False  # <name>_overlay.png: outlines over the image
    measure: bool = False  # <name>_cells.csv: per-cell regionprops
    geojson: bool = False  # <name>_cells.geojson: polygons for QuPath
    rois: bool = False  # <name>_rois.zip: an ImageJ ROI set for Fiji's ROI Manager


def _suffixes(outputs: "Outputs") -> list[str]:
    """File-name endings one image writes with these ``outputs``."""
    chosen = [(True, "_label.tiff"), (outputs.overlay, "_overlay.png"), (outputs.measure, "_cells.csv"),
              (outputs.geojson, "_cells.geojson"), (outputs.rois, "_rois.zip")]
    return [suffix for wanted, suffix in chosen if wanted]


PREFETCH_MAX_BYTES = 256 * 2**20  # files larger than this are read when their turn comes, not ahead


def segment_files(
    inputs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    segmenter: Segmenter,
    outputs: Outputs = Outputs(),
    progress: bool = True,
    overwrite: bool = False,
    max_pixels: int = MAX_PIXELS,
) -> list[ImageResult]:
    """Segment every image of ``inputs`` into ``out_dir``.

    Existing files are never replaced unless ``overwrite``: if any output of this run
    (``summary.csv`` or an image's files) already exists, nothing is done and
    :class:`OutputExistsError` names it. A folder that holds ground truth (``labels/``
    beside ``images/``, or one with a ``manifest.csv``) is refused even with ``overwrite``.
    An image above ``max_pixels`` (height x width, read from its header) fails before it is
    decoded.

    Reading and writing overlap with segmentation: the next file is read by one thread
    while the current image is segmented (files up to ``PREFETCH_MAX_BYTES``, so at most
    one extra image is held), and outputs are written by another while the next image is
    segmented. Decoding and compression release the GIL, so a folder of small images runs
    near the network's own rate.

    Returns
    -------
    One :class:`ImageResult` per input file (``error`` set on failure), in input order.
    Inputs are never overwritten: an output that would land on an input, or on an
    existing file in an input folder (e.g. ground truth ``<name>_label.tiff``), is refused.
    """
    out_dir = Path(out_dir)
    if (out_dir / "manifest.csv").exists() or (out_dir.name == "labels" and (out_dir.parent / "images").is_dir()):
        raise OutputExistsError(f"{out_dir}: holds ground truth (a dataset's labels or manifest); choose another --out")
    paths, results = expand_inputs(inputs)
    planned = [out_dir / "summary.csv"] + [out_dir / f"{p.stem}{suffix}" for p in paths for suffix in _suffixes(outputs)]
    if not overwrite:
        refuse_existing(planned)  # before the folder is made: a refused run leaves nothing behind
    with folder_lock(out_dir):
        if not overwrite:
            refuse_existing(planned)  # again under the lock: a run that just ended may have written them
        return _segment_locked(paths, results, out_dir, segmenter, outputs, progress, max_pixels)


def _segment_locked(paths: list[Path], results: list[ImageResult], out_dir: Path, segmenter: Segmenter, outputs: Outputs,
                    progress: bool, max_pixels: int) -> list[ImageResult]:
    """:func:`segment_files` once the folder is locked and checked."""
    for spec in results:
        log.error(spec.error)
    guard = _OutputGuard({p.resolve() for p in paths}, out_dir.resolve() in {p.resolve().parent for p in paths})
    bar = tqdm(paths, desc=f"segment ({segmenter.name})", unit="img", disable=not progress)
    writing: tuple[ImageResult, Future] | None = None

    def finish(pending: tuple[ImageResult, Future] | None) -> None:
        if pending is None:
            return
        result, future = pending
        error = future.exception()
        if error is not None:
            result.error, result.output = _error_line(Path(result.input), error), ""
            tqdm.write(f"error: {result.error}")
        results.append(result)

    with ThreadPoolExecutor(1, thread_name_prefix="cellnest-read") as reader, \
            ThreadPoolExecutor(1, thread_name_prefix="cellnest-write") as writer:
        ahead = {0: _read_ahead(reader, paths[0], max_pixels)} if paths else {}
        try:
            for index, path in enumerate(bar):
                if index + 1 < len(paths):
                    ahead[index + 1] = _read_ahead(reader, paths[index + 1], max_pixels)
                result, write = _segment_one(path, ahead.pop(index), out_dir, segmenter, outputs, guard, writer, progress, max_pixels)
                finish(writing)
                writing = (result, write) if write is not None else None
                if write is None:
                    results.append(result)
                if result.error:
                    tqdm.write(f"error: {result.error}")
                else:
                    bar.set_postfix(cells=result.cells, s=f"{result.seconds:.2f}")
            finish(writing)
            writing = None
        finally:  # even an interrupted batch leaves its summary
            for future in ahead.values():
                future.cancel()
            if writing is not None:
                finish(writing)
            write_summary(out_dir / "summary.csv", results)
    return results


@dataclass
class _OutputGuard:
    """Refuses outputs that would overwrite an input, ground truth, or each other."""

    protected: set[Path]
    writes_beside_inputs: bool
    claimed: dict[str, Path] = field(default_factory=dict)

    def check(self, path: Path, targets: Sequence[Path]) -> None:
        if path.stem in self.claimed:
            raise ImageReadError(path, f"output name collides with {self.claimed[path.stem]} (same file stem)")
        clash = next((t for t in targets if t.resolve() in self.protected), None)
        if clash is not None:
            raise ImageReadError(path, f"refusing to overwrite input file {clash}")
        # Beside the inputs, an existing <name>_label.tiff is likely ground truth: keep it.
        existing = next((t for t in targets if self.writes_beside_inputs and t.exists()), None)
        if existing is not None:
            raise ImageReadError(path, f"refusing to overwrite existing {existing} beside the inputs; choose another --out")
        self.claimed[path.stem] = path


def _read_ahead(reader: ThreadPoolExecutor, path: Path, max_pixels: int) -> Future:
    """Start reading ``path`` in the reader thread, or defer a large file to its turn."""
    try:
        small = path.stat().st_size <= PREFETCH_MAX_BYTES
    except OSError:
        small = True  # let the read report the problem
    if small:
        return reader.submit(read_image, path, dtype=None, max_pixels=max_pixels)  # native dtype: a large uint8 image stays small
    deferred: Future = Future()
    deferred.set_result(None)
    return deferred


def _error_line(path: Path, err: BaseException) -> str:
    if isinstance(err, ImageReadError):
        return str(err)
    return f"{path}: {type(err).__name__}: {' '.join(str(err).split())[:300]}"


def _segment_one(
    path: Path,
    read: Future,
    out_dir: Path,
    segmenter: Segmenter,
    outputs: Outputs,
    guard: _OutputGuard,
    writer: ThreadPoolExecutor,
    progress: bool,
    max_pixels: int,
) -> tuple[ImageResult, Future | None]:
    """Segment one file and hand its outputs to the writer; a failure is recorded in the
    result, never raised. Returns the result and the pending write (None on failure)."""
    result = ImageResult(str(path), path.stem, model=segmenter.name)
    target = out_dir / f"{path.stem}_label.tiff"
    extras = [out_dir / f"{path.stem}{suffix}" for suffix in ("_overlay.png", "_cells.csv", "_cells.geojson", "_rois.zip")]
    try:
        guard.check(path, [target, *extras])
        start = time.perf_counter()
        with stage("read"):
            image = read.result()
            if image is None:  # deferred: too large to read ahead
                image = read_image(path, dtype=None, max_pixels=max_pixels)
        labels, size = segmenter.run(image, progress=progress)
        result.diameter = f"{size.diameter:.1f}" if size.diameter is not None else ""
        result.scale = f"{size.scale:.3f}"
        result.cells = int(np.count_nonzero(np.bincount(labels.ravel())[1:]))
        result.output = str(target)
        write = writer.submit(_write_outputs, target, extras, image, labels, outputs, path.stem)
        result.seconds = time.perf_counter() - start
        return result, write
    except (ImageReadError, ValueError, OSError, RuntimeError, MemoryError) as err:  # e.g. out of (GPU) memory on one image
        result.error = _error_line(path, err)
        return result, None


def _write_outputs(target: Path, extras: list[Path], image: np.ndarray, labels: np.ndarray, outputs: Outputs, name: str) -> None:
    """Write the label file and the requested extras (runs in the writer thread)."""
    write_labels(target, labels)
    if outputs.overlay:
        write_png(extras[0], overlay_outlines(image, labels))
    if outputs.measure:
        write_measurements(extras[1], measure_cells(labels, image))
    if outputs.geojson:
        write_geojson(extras[2], labels, name=name)
    if outputs.rois:
        write_imagej_rois(extras[3], labels)


def write_summary(path: Path, results: Sequence[ImageResult]) -> Path:
    """CSV of per-image results (input, name, model, cells, seconds, output, error), atomically."""
    rows = [{**asdict(r), "seconds": f"{r.seconds:.3f}"} for r in results]
    return write_csv(path, rows, list(asdict(ImageResult("", ""))))
