"""The NeurIPS 2022 Cell Segmentation Challenge metric: per-image F1 at IoU >= 0.5.

Rules, as in the challenge's ``compute_metric.py``:

1. Cells touching a 2-pixel frame around the image are removed from ground truth and
   prediction (``keep_border_cells=True`` turns this off); both are relabelled.
2. IoU between every ground-truth and predicted cell; one-to-one matching. The official
   script runs the Hungarian algorithm on ``-(iou >= t) - iou / (2 n)``, whose optimum is
   the largest set of one-to-one pairs with IoU >= t. We compute that number directly as
   a maximum bipartite matching over the sparse graph of such pairs (identical count,
   and fast with thousands of cells; the IoU itself comes from sparse overlap counts).
3. TP = matched pairs, FP = predicted - TP, FN = true - TP; F1 = 0 when TP = 0 (so an
   image with no cells on either side scores 0, as in the challenge).
4. Images of >= 25 megapixels are padded to multiples of 2000 and scored in 2000x2000
   tiles (border rule applied per tile), with TP/FP/FN summed.

One documented difference: when a (tile of an) image has no predicted cell, the official
script counts FN = 0; we count every true cell as missed. Per-image F1 is the same (0);
precision/recall and tiled >= 25 MP images are reported correctly here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterable, Sequence

import numpy as np
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import maximum_bipartite_matching

BORDER = 2
TILE = 2000
TILED_PIXELS = 25_000_000
THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)


def remove_border_cells(labels: np.ndarray, width: int = BORDER) -> np.ndarray:
    """Drop cells with any pixel in a ``width``-pixel frame and relabel 1..N.

    Parameters
    ----------
    labels : (H, W) non-negative integer instance map.

    Returns
    -------
    (H, W) int32 instance map with sequential ids.
    """
    labels = np.asarray(labels)
    frame = np.ones(labels.shape, bool)
    frame[width:-width or None, width:-width or None] = False
    return relabel(labels, drop=np.unique(labels[frame]))


def relabel(labels: np.ndarray, drop: Iterable[int] = ()) -> np.ndarray:
    """Renumber an instance map to 1..N in order of id, removing the ids in ``drop``.

    Returns an (H, W) int32 array. A lookup table does it in one pass (no per-cell loop).
    """
    labels = np.asarray(labels)
    if labels.size == 0 or labels.max() == 0:
        return np.zeros(labels.shape, np.int32)
    ids = np.unique(labels)
    keep = np.setdiff1d(ids, np.asarray(list(drop), dtype=ids.dtype))
    keep = keep[keep != 0]
    if ids[-1] <= 4 * labels.size:  # dense ids: a lookup table indexed by id
        table = np.zeros(int(ids[-1]) + 1, np.int32)
        table[keep] = np.arange(1, keep.size + 1, dtype=np.int32)
        return table[labels]
    table = np.zeros(ids.size, np.int32)  # sparse huge ids: index by rank instead
    table[np.searchsorted(ids, keep)] = np.arange(1, keep.size + 1, dtype=np.int32)
    return table[np.searchsorted(ids, labels)]


def iou_pairs(true: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """IoU of every overlapping (true, predicted) cell pair, from sparse overlap counts.

    Parameters
    ----------
    true, pred : (H, W) instance maps with sequential ids 1..N (e.g. from :func:`relabel`).

    Returns
    -------
    rows, cols : int arrays of 0-based true / predicted cell indices of overlapping pairs.
    iou : float64 array of their IoU. Pairs that do not overlap (IoU 0) are not listed.
    """
    n_true, n_pred = int(true.max()), int(pred.max())
    both = (true > 0) & (pred > 0)
    keys = true[both].astype(np.int64) * (n_pred + 1) + pred[both]
    pair_keys, intersection = np.unique(keys, return_counts=True)
    rows, cols = pair_keys // (n_pred + 1), pair_keys % (n_pred + 1)
    area_true = np.bincount(true.ravel(), minlength=n_true + 1)
    area_pred = np.bincount(pred.ravel(), minlength=n_pred + 1)
    union = area_true[rows] + area_pred[cols] - intersection
    return rows - 1, cols - 1, intersection / union


def count_matches(rows: np.ndarray, cols: np.ndarray, iou: np.ndarray, n_true: int, n_pred: int, threshold: float) -> int:
    """Largest number of one-to-one (true, predicted) pairs with IoU >= ``threshold``."""
    ok = iou >= threshold
    if not ok.any():
        return 0
    graph = csr_matrix((np.ones(ok.sum()), (rows[ok], cols[ok])), shape=(n_true, n_pred))
    return int((maximum_bipartite_matching(graph, perm_type="column") >= 0).sum())


@dataclass(frozen=True)
class Counts:
    """TP/FP/FN of one image at one IoU threshold, with the scores derived from them."""

    tp: int
    fp: int
    fn: int

    def __add__(self, other: "Counts") -> "Counts":
        return Counts(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn)

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp else 0.0

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp else 0.0

    @property
    def f1(self) -> float:
        return 2 * self.tp / (2 * self.tp + self.fp + self.fn) if self.tp else 0.0


def _counts_one(true: np.ndarray, pred: np.ndarray, thresholds: Sequence[float], keep_border_cells: bool) -> list[Counts]:
    if not keep_border_cells:
        true, pred = remove_border_cells(true), remove_border_cells(pred)
    else:
        true, pred = relabel(true), relabel(pred)
    n_true, n_pred = int(true.max()), int(pred.max())
    rows, cols, iou = iou_pairs(true, pred)
    out = []
    for t in thresholds:
        tp = count_matches(rows, cols, iou, n_true, n_pred, t)
        out.append(Counts(tp, n_pred - tp, n_true - tp))
    return out


def match_counts(
    true: np.ndarray, pred: np.ndarray, thresholds: Sequence[float] = (0.5,), keep_border_cells: bool = False
) -> list[Counts]:
    """TP/FP/FN of one image at each IoU threshold, with the challenge's rules.

    Parameters
    ----------
    true, pred : (H, W) non-negative integer instance maps of the same shape.
    thresholds : IoU thresholds in (0, 1].
    keep_border_cells : keep cells touching the 2-pixel frame (the challenge drops them).

    Returns
    -------
    One :class:`Counts` per threshold.
    """
    true, pred = np.asarray(true), np.asarray(pred)
    for name, labels in (("ground truth", true), ("prediction", pred)):
        if labels.dtype.kind not in "iub" or (labels.size and labels.min() < 0):
            raise ValueError(f"{name} must be a non-negative integer instance map, got dtype {labels.dtype}")
    if true.shape != pred.shape:
        raise ValueError(f"shape mismatch: ground truth {true.shape} vs prediction {pred.shape}")
    if true.ndim != 2:
        raise ValueError(f"instance maps must be 2-D, got shape {true.shape}")
    if true.size < TILED_PIXELS:
        return _counts_one(true, pred, thresholds, keep_border_cells)
    height, width = true.shape
    padded = (-(-height // TILE) * TILE, -(-width // TILE) * TILE)
    totals = [Counts(0, 0, 0)] * len(thresholds)
    for r in range(0, padded[0], TILE):
        for c in range(0, padded[1], TILE):
            tile_true = np.zeros((TILE, TILE), true.dtype)
            tile_pred = np.zeros((TILE, TILE), pred.dtype)
            part_true, part_pred = true[r : r + TILE, c : c + TILE], pred[r : r + TILE, c : c + TILE]
            tile_true[: part_true.shape[0], : part_true.shape[1]] = part_true
            tile_pred[: part_pred.shape[0], : part_pred.shape[1]] = part_pred
            counts = _counts_one(tile_true, tile_pred, thresholds, keep_border_cells)
            totals = [a + b for a, b in zip(totals, counts)]
    return totals


@dataclass(frozen=True)
class ImageScore:
    """Challenge scores of one image (F1/precision/recall at IoU 0.5, F1 at 0.5..0.9)."""

    name: str
    modality: str
    n_true: int
    n_pred: int
    tp: int
    fp: int
    fn: int
    precision: float
    recall: float
    f1: float
    f1_at: dict[float, float]

    def row(self) -> dict:
        """Flat dict for CSV writing (``f1@0.5`` ... ``f1@0.9`` columns)."""
        flat = {k: v for k, v in asdict(self).items() if k != "f1_at"}
        flat.update({f"f1@{t:g}": v for t, v in self.f1_at.items()})
        return flat


def score_image(
    true: np.ndarray,
    pred: np.ndarray,
    name: str = "",
    modality: str = "unknown",
    thresholds: Sequence[float] = THRESHOLDS,
    keep_border_cells: bool = False,
) -> ImageScore:
    """Score one predicted instance map against its ground truth (see module docstring)."""
    thresholds = tuple(thresholds)
    if 0.5 not in thresholds:
        thresholds = (0.5,) + thresholds
    counts = match_counts(true, pred, thresholds, keep_border_cells)
    at = dict(zip(thresholds, counts))
    main = at[0.5]
    return ImageScore(
        name=name,
        modality=modality,
        n_true=main.tp + main.fn,
        n_pred=main.tp + main.fp,
        tp=main.tp,
        fp=main.fp,
        fn=main.fn,
        precision=main.precision,
        recall=main.recall,
        f1=main.f1,
        f1_at={t: c.f1 for t, c in at.items()},
    )


def summarize(scores: Sequence[ImageScore]) -> dict[str, dict[str, float]]:
    """Per-modality and overall statistics of per-image scores.

    Returns
    -------
    ``{group: {"n", "mean_f1", "median_f1", "precision", "recall"}}`` where group is each
    modality (sorted) and ``"all"``; precision and recall are means over images.
    """
    groups: dict[str, list[ImageScore]] = {}
    for s in scores:
        groups.setdefault(s.modality, []).append(s)
    out = {}
    for group, members in sorted(groups.items()) + [("all", list(scores))]:
        if not members:
            continue
        f1 = np.array([m.f1 for m in members])
        out[group] = {
            "n": len(members),
            "mean_f1": float(f1.mean()),
            "median_f1": float(np.median(f1)),
            "precision": float(np.mean([m.precision for m in members])),
            "recall": float(np.mean([m.recall for m in members])),
        }
    return out


def modality_mean(summary: dict[str, dict[str, float]]) -> float:
    """Mean over modalities of their mean F1 (:func:`summarize` output; 0 if empty).

    Every modality counts once, however many images it has: the selection score for a
    generalist when the validation set is mostly one modality (tuning/: 95 of 110 images
    fluorescence)."""
    means = [s["mean_f1"] for group, s in summary.items() if group != "all"]
    return float(np.mean(means)) if means else 0.0


def format_table(summary: dict[str, dict[str, float]]) -> str:
    """Markdown table of :func:`summarize` output."""
    lines = ["| modality | n | mean F1 | median F1 | precision | recall |", "|---|---|---|---|---|---|"]
    for group, s in summary.items():
        lines.append(
            f"| {group} | {s['n']} | {s['mean_f1']:.4f} | {s['median_f1']:.4f} | {s['precision']:.4f} | {s['recall']:.4f} |"
        )
    return "\n".join(lines)
