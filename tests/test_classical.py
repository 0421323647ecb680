from __future__ import annotations

import numpy as np

from cellnest.classical import segment_classical
from cellnest.metrics import score_image
from cellnest.synthetic import DEMO_SET, synthetic_cells


def test_classical_segments_every_synthetic_look():
    for i, (name, spec, _, _) in enumerate(DEMO_SET):
        image, labels = synthetic_cells(spec, seed=100 + i)
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, -1)
        score = score_image(labels, segment_classical(image * 255))
        assert score.f1 > 0.75, f"{name}: F1 {score.f1:.3f}"


def test_blank_image_gives_no_cells():
    assert segment_classical(np.zeros((32, 32, 3), np.float32)).max() == 0
    assert segment_classical(np.full((32, 32, 3), 9, np.float32)).max() == 0
