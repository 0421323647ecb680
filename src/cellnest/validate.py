"""Validation by what users care about: full images through the real predictor and
post-processing, scored with the challenge F1 per modality.

Also chooses post-processing thresholds on validation probabilities (the thresholds are
then stored in the model file, as StarDist stores its tuned thresholds).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch.nn as nn

from cellnest.data import Sample
from cellnest.metrics import ImageScore, score_image, summarize
from cellnest.postprocess import PostprocessConfig, probabilities_to_instances, tune_postprocess
from cellnest.predict import Predictor, PredictorConfig

# Thresholds tried per post-processing method by :func:`tune_thresholds`.
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
        return self.summary["all"]["mean_f1"] if self.summary else 0.0


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


def tune_thresholds(
    probabilities: Sequence[np.ndarray], samples: Sequence[Sample], base: PostprocessConfig
) -> tuple[PostprocessConfig, float]:
    """Best thresholds of ``base.method`` on validation probabilities (grid: TUNE_GRIDS)."""
    truths = [np.asarray(s.labels) for s in samples]
    return tune_postprocess(probabilities, truths, base, TUNE_GRIDS.get(base.method, {}))


def summary_line(summary: dict[str, dict[str, float]]) -> str:
    """``0.712 (DIC 0.100, fluorescence 0.800, ...)`` for logs."""
    if not summary:
        return "n/a"
    parts = [f"{m} {s['mean_f1']:.3f}" for m, s in summary.items() if m != "all"]
    return f"{summary['all']['mean_f1']:.3f} ({', '.join(parts)})"
