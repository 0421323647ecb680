"""Validation by what users care about: full images through the real predictor and
post-processing, scored with the challenge F1 per modality.

Also chooses the post-processing method and its thresholds on validation probabilities
(stored in the model file, as StarDist stores its tuned thresholds).
"""

from __future__ import annotations

import itertools
import logging
import os
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch.nn as nn
from tqdm import tqdm

from cellnest.data import Sample
from cellnest.metrics import ImageScore, modality_mean, score_image, summarize
from cellnest.postprocess import PostprocessConfig, check_probabilities, decode_checked, probabilities_to_instances
from cellnest.predict import Predictor, PredictorConfig

log = logging.getLogger(__name__)

# The post-processing methods tuning tries (in this order: ties keep the first), and the
# thresholds tried per method by :func:`tune_thresholds`.
TUNE_METHODS = ("components", "closing", "watershed")
TUNE_GRIDS: dict[str, dict[str, list]] = {
    "watershed": {"seed_threshold": [0.5, 0.6, 0.7, 0.8], "foreground_threshold": [0.3, 0.4, 0.5, 0.6]},
    "closing": {"interior_threshold": [0.3, 0.4, 0.5, 0.6, 0.7]},
    "components": {"min_size_fraction": [0.0, 0.1, 0.2, 0.3]},
}


@dataclass
class Validation:
    """Per-image scores, per-modality summary, and the probability maps they came from."""

    scores: list[ImageScore]
    summary: dict[str, dict[str, float]]
    probabilities: list[np.ndarray]

    @property
    def mean_f1(self) -> float:
        """Mean F1 over images (the challenge's figure)."""
        return self.summary["all"]["mean_f1"] if self.summary else 0.0

    @property
    def modality_mean_f1(self) -> float:
        """Mean over modalities of their mean F1 (every modality counts once)."""
        return modality_mean(self.summary)

    def score(self, select_by: str) -> float:
        """The selection score: ``"modality_mean"`` or ``"image_mean"``."""
        return self.modality_mean_f1 if select_by == "modality_mean" else self.mean_f1


def validate(
    model: nn.Module,
    samples: Sequence[Sample],
    predictor: PredictorConfig,
    postprocess: PostprocessConfig,
    device: str = "cpu",
    keep_probabilities: bool = False,
) -> Validation:
    """Predict every (labelled, normalised) sample whole and score it.

    The model is used in eval mode and put back in its previous mode afterwards.
    """
    was_training = model.training
    run = Predictor(model, predictor, device)
    scores, kept = [], []
    try:
        for sample in samples:
            probs = run(np.asarray(sample.image))
            labels = probabilities_to_instances(probs, postprocess)
            scores.append(score_image(np.asarray(sample.labels), labels, sample.name, sample.modality))
            if keep_probabilities:
                kept.append(probs)
    finally:
        model.train(was_training)
    return Validation(scores, summarize(scores), kept)


def tune_postprocess(
    prob_maps: Sequence[np.ndarray],
    truths: Sequence[np.ndarray],
    base: PostprocessConfig = PostprocessConfig(),
    grid: Mapping[str, Sequence] | None = None,
    groups: Sequence[str] | None = None,
) -> tuple[PostprocessConfig, float]:
    """Grid search of post-processing settings for the best mean challenge F1.

    Every combination of ``grid`` values (itertools.product, in the grid's key and value
    order) replaces those fields of ``base``; each is scored by the mean over images of
    :func:`cellnest.metrics.score_image` F1 (IoU 0.5, border cells removed). Ties keep the
    first combination, so the result is deterministic.

    Parameters
    ----------
    prob_maps : (3, H, W) softmax maps, e.g. of validation images.
    truths : (H, W) integer instance maps, same order and shapes.
    base : the settings not in ``grid``.
    grid : ``{field: candidate values}``, e.g. ``{"seed_threshold": [0.4, 0.5, 0.6]}``;
        empty or None scores ``base`` alone.
    groups : one group (modality) per image: the score is then the mean over groups of
        each group's mean F1, so every modality counts once.

    Returns
    -------
    (best config, its mean F1).
    """
    if len(prob_maps) != len(truths):
        raise ValueError(f"got {len(prob_maps)} probability maps but {len(truths)} ground truths")
    if not prob_maps:
        raise ValueError("tune_postprocess needs at least one image")
    grid = dict(grid or {})
    known = {f.name for f in fields(PostprocessConfig)}
    unknown = sorted(set(grid) - known)
    if unknown:
        raise ValueError(f"unknown post-processing key(s) in grid {unknown}; valid keys: {sorted(known)}")
    empty = [k for k, v in grid.items() if len(v) == 0]
    if empty:
        raise ValueError(f"grid has no values for {empty}")
    checked = [check_probabilities(p) for p in prob_maps]
    truths = [np.asarray(t) for t in truths]
    for i, (p, t) in enumerate(zip(checked, truths)):
        if p.shape[1:] != t.shape:
            raise ValueError(f"image {i}: probs shape {p.shape} does not match ground truth shape {t.shape}")

    keys_of = np.asarray(groups if groups is not None else [""] * len(truths), dtype=str)
    if keys_of.shape != (len(truths),):
        raise ValueError(f"got {len(truths)} images but {keys_of.size} groups")
    best: tuple[PostprocessConfig, float] | None = None
    keys = list(grid)
    for values in itertools.product(*(grid[k] for k in keys)):
        config = replace(base, **dict(zip(keys, values)))
        f1s = np.array([score_image(t, decode_checked(p, config)).f1 for p, t in zip(checked, truths)])  # checked once above
        f1 = float(np.mean([f1s[keys_of == g].mean() for g in np.unique(keys_of)]))
        log.debug("tune_postprocess %s -> mean F1 %.4f", dict(zip(keys, values)), f1)
        if best is None or f1 > best[1]:
            best = (config, f1)
    return best


def tune_thresholds(
    probabilities: Sequence[np.ndarray],
    samples: Sequence[Sample],
    base: PostprocessConfig,
    methods: Sequence[str] = TUNE_METHODS,
    select_by: str = "modality_mean",
) -> tuple[PostprocessConfig, float, dict[str, float]]:
    """Best post-processing method and thresholds on validation probabilities.

    Each method in ``methods`` starts from ``base`` (its other fields kept) and tries its
    grid in :data:`TUNE_GRIDS`, scored by ``select_by`` (``"modality_mean"``: the mean of
    per-modality mean F1s; ``"image_mean"``). Returns the best config, its score, and the
    best score of every method (for the report).
    """
    truths = [np.asarray(s.labels) for s in samples]
    groups = [s.modality for s in samples] if select_by == "modality_mean" else None
    best, best_f1, per_method = base, -1.0, {}
    for method in methods:
        config, f1 = tune_postprocess(probabilities, truths, replace(base, method=method), TUNE_GRIDS.get(method, {}), groups)
        per_method[method] = f1
        if f1 > best_f1:
            best, best_f1 = config, f1
    return best, best_f1, per_method


def tune_kept_model(path: Path, samples: Sequence[Sample], predictor: PredictorConfig, base: PostprocessConfig,
                    device, methods: Sequence[str] = TUNE_METHODS, select_by: str = "modality_mean") -> str:
    """Choose the post-processing of the model file at ``path`` on validation ``samples``
    and rewrite the file if it beats ``base``; returns a sentence for the run's report."""
    from cellnest.modelfile import ModelFile

    kept = ModelFile.load(path)
    result = validate(kept.build_network(), samples, predictor, base, device, keep_probabilities=True)
    untuned = result.score(select_by)
    tuned, tuned_f1, per_method = tune_thresholds(result.probabilities, samples, base, methods, select_by)
    methods_f1 = ", ".join(f"{m} {f:.4f}" for m, f in per_method.items())
    if tuned_f1 <= untuned:
        return f"Tuning found nothing better than the recipe's post-processing ({select_by} F1 {untuned:.4f}; per method: {methods_f1})."
    replace(kept, postprocess=tuned).with_meta(
        postprocess_tuned_f1=round(tuned_f1, 5), postprocess_untuned_f1=round(untuned, 5),
        postprocess_methods_f1=per_method, postprocess_select_by=select_by).save(path)
    return (f"Post-processing tuned on the validation images ({select_by} F1): {untuned:.4f} with the recipe's "
            f"{base.method} -> {tuned_f1:.4f} with {tuned.method} ({tuned.to_dict()}). Best mean F1 per method: {methods_f1}.")


def summary_line(summary: dict[str, dict[str, float]]) -> str:
    """``0.712 (DIC 0.100, fluorescence 0.800, ...)`` for logs."""
    if not summary:
        return "n/a"
    parts = [f"{m} {s['mean_f1']:.3f}" for m, s in summary.items() if m != "all"]
    return f"{summary['all']['mean_f1']:.3f} ({', '.join(parts)})"


def retune_model_file(
    model: str | os.PathLike,
    data: str | os.PathLike,
    out: str | os.PathLike,
    methods: Sequence[str] = TUNE_METHODS,
    device: str = "auto",
    limit: int | None = None,
    progress: bool = True,
) -> tuple[PostprocessConfig, float, dict[str, float]]:
    """Choose a model file's post-processing on a labelled folder; write the result to ``out``.

    The network runs once per image; every method and threshold is then tried on the kept
    probabilities. ``out`` gets the same weights with the chosen post-processing and the
    per-method scores in its ``meta`` (``out`` may not be ``model`` itself: inputs are
    never overwritten).
    """
    from cellnest.data import SampleCache, load_folder
    from cellnest.modelfile import ModelFile

    if Path(out).resolve() == Path(model).resolve() or (Path(model).is_dir() and Path(out).resolve() == (Path(model) / "model.pt").resolve()):
        raise ValueError(f"{out}: refusing to overwrite the input model; choose another --out")
    found = ModelFile.load(model)
    items = load_folder(data, require_labels=True)[:limit]
    cache = SampleCache()
    samples = [cache.load(item, found.inference_targets, found.cell_diameter)
               for item in tqdm(items, desc="prepare", unit="img", disable=not progress)]
    result = validate(found.build_network(), samples, found.predictor, found.postprocess, device, True)
    config, f1, per_method = tune_thresholds(result.probabilities, samples, found.postprocess, methods)
    replace(found, postprocess=config).with_meta(
        postprocess_tuned_on=str(data), postprocess_untuned_f1=result.modality_mean_f1, postprocess_tuned_f1=f1,
        postprocess_methods_f1=per_method).save(out)
    return config, f1, per_method
