"""Checks on the real labelled data beside the project (skipped when it is absent)."""

from __future__ import annotations

import numpy as np

from cellnest.data import load_folder, load_sample, TargetConfig
from cellnest.evaluate import evaluate_folders


def test_labels_against_themselves_score_one(mmcells):
    evaluation = evaluate_folders(mmcells / "tuning" / "labels", mmcells / "tuning", progress=False)
    assert len(evaluation.scores) == 110 and not evaluation.missing
    assert all(s.f1 == 1.0 for s in evaluation.scores), [s.name for s in evaluation.scores if s.f1 != 1.0]
    assert set(evaluation.summary) == {"DIC", "fluorescence", "phase-contrast", "all"}


def test_every_modality_loads_and_prepares(mmcells):
    items = load_folder(mmcells / "train", require_labels=True)
    assert len(items) == 688
    by_modality = {}
    for item in items:
        by_modality.setdefault(item.modality, item)
    assert set(by_modality) == {"brightfield", "fluorescence", "phase-contrast", "DIC"}
    for item in by_modality.values():
        sample = load_sample(item, TargetConfig())
        assert sample.image.shape[0] == 3 and np.isfinite(sample.image).all()
        assert sample.classes.max() == 2 and sample.labels.max() > 0
    assert len({i.group for i in items}) < len(items)  # groups come from split_decisions.csv
