"""Score a folder of predicted label maps against ground truth with the challenge metric.

Files are matched by the challenge naming: ground truth ``<name>_label.tiff`` (in
``GT/labels/`` or ``GT/``) against prediction ``PRED/<name>_label.tiff`` (or ``.tif``).
A missing prediction scores F1 = 0 and is reported by name. Modalities come from a
``manifest.csv`` (``name,modality``), by default the one beside the ground truth.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from tqdm import tqdm

from cellnest.data import Item, label_path_for, read_csv_column
from cellnest.io import MAX_PIXELS, ImageReadError, atomic_write, read_image, read_labels, refuse_existing, write_csv
from cellnest.metrics import THRESHOLDS, ImageScore, score_image, summarize

log = logging.getLogger(__name__)


@dataclass
class Evaluation:
    """Per-image scores, the names with no prediction, and per-modality statistics."""

    scores: list[ImageScore]
    missing: list[str]
    summary: dict[str, dict[str, float]]


def ground_truth_files(gt: str | os.PathLike) -> dict[str, Path]:
    """``name -> label file`` for ``<name>_label.tif(f)`` in ``gt/labels`` or ``gt``."""
    gt = Path(gt)
    folder = gt / "labels" if (gt / "labels").is_dir() else gt
    if not folder.is_dir():
        raise FileNotFoundError(f"{gt}: ground-truth folder not found")
    files = {}
    for path in sorted(folder.iterdir()):
        for suffix in ("_label.tiff", "_label.tif"):
            if path.name.endswith(suffix):
                files[path.name[: -len(suffix)]] = path
    if not files:
        raise FileNotFoundError(f"{folder}: no <name>_label.tiff ground-truth files")
    return files


def _default_manifest(gt: Path) -> Path | None:
    for candidate in (gt / "manifest.csv", gt.parent / "manifest.csv"):
        if candidate.is_file():
            return candidate
    return None


def evaluate_folders(
    pred: str | os.PathLike,
    gt: str | os.PathLike,
    manifest: str | os.PathLike | None = None,
    keep_border_cells: bool = False,
    progress: bool = True,
    max_pixels: int = MAX_PIXELS,
) -> Evaluation:
    """Score every ground-truth image against its prediction.

    Raises
    ------
    FileNotFoundError : a folder is missing or holds no label files.
    ImageReadError : a label file is unreadable, or shapes differ (names the files).
    """
    pred, gt = Path(pred), Path(gt)
    if not pred.is_dir():
        raise FileNotFoundError(f"{pred}: prediction folder not found")
    truth = ground_truth_files(gt)
    manifest_path = Path(manifest) if manifest is not None else _default_manifest(gt)
    if manifest_path is not None and not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path}: manifest not found")
    modality = read_csv_column(manifest_path, "modality", required=True) if manifest_path else {}
    scores, missing = [], []
    for name, gt_path in tqdm(truth.items(), desc="evaluate", unit="img", disable=not progress):
        true = read_labels(gt_path, max_pixels)
        pred_path = label_path_for(pred, name)
        if pred_path is None:
            missing.append(name)
            predicted = np.zeros_like(true)
        else:
            predicted = read_labels(pred_path, max_pixels)
            if predicted.shape != true.shape:
                raise ImageReadError(pred_path, f"shape {predicted.shape} differs from ground truth {gt_path} {true.shape}")
        scores.append(score_image(true, predicted, name, modality.get(name, "unknown"), THRESHOLDS, keep_border_cells))
    for name in missing:
        log.warning("missing prediction for %s (scored F1 = 0)", name)
    return Evaluation(scores, missing, summarize(scores))


EVALUATION_FILES = ("evaluation.csv", "evaluation.json")


def write_evaluation(evaluation: Evaluation, out_dir: str | os.PathLike, overwrite: bool = False) -> tuple[Path, Path]:
    """Write ``evaluation.csv`` (one row per image) and ``evaluation.json`` (summary).

    Existing files are replaced only with ``overwrite`` (:class:`cellnest.io.OutputExistsError`).
    """
    out_dir = Path(out_dir)
    if not overwrite:
        refuse_existing([out_dir / name for name in EVALUATION_FILES])
    per_image = write_scores_csv(out_dir / "evaluation.csv", evaluation.scores)
    summary = {"summary": evaluation.summary, "missing_predictions": evaluation.missing}
    summary_path = atomic_write(out_dir / "evaluation.json", lambda tmp: tmp.write_text(json.dumps(summary, indent=2)))
    return per_image, summary_path


def write_scores_csv(path: str | os.PathLike, scores: Sequence[ImageScore]) -> Path:
    """One row per image (:meth:`ImageScore.row` columns), written atomically."""
    rows = [s.row() for s in scores]
    return write_csv(path, rows, None if rows else ["name"])


def read_scores_csv(path: str | os.PathLike) -> list[tuple[str, str, float]]:
    """(name, modality, F1) per image from a :func:`write_scores_csv` file."""
    with open(path, newline="") as fh:
        return [(r["name"], r["modality"], float(r["f1"])) for r in csv.DictReader(fh)]


def score_segmenter(segmenter: Callable[[np.ndarray], np.ndarray], items: Sequence[Item], progress: bool = False) -> tuple[list[ImageScore], float]:
    """Segment labelled ``items`` (:class:`cellnest.data.Item`) and score each one.

    Returns the per-image scores and the mean seconds per image of reading and
    segmenting (scoring excluded), timed with ``time.perf_counter``.
    """
    scores, seconds = [], 0.0
    for item in tqdm(items, desc=f"scoring {getattr(segmenter, 'name', 'model')}", unit="image", disable=not progress):
        start = time.perf_counter()
        prediction = segmenter(read_image(item.image))
        seconds += time.perf_counter() - start
        scores.append(score_image(read_labels(item.label), prediction, item.name, item.modality))
    return scores, seconds / max(len(items), 1)
