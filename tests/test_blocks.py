from __future__ import annotations

import numpy as np

from conftest import disk
from cellnest.blocks import block_grid, segment_in_blocks
from cellnest.classical import segment_normalized_classical
from cellnest.metrics import score_image
from cellnest.normalize import image_percentiles


def _threshold_segmenter(block: np.ndarray) -> np.ndarray:
    from scipy import ndimage as ndi

    return ndi.label(block[..., 0] > 0.5)[0]


def test_grid_cores_tile_the_image_exactly():
    cover = np.zeros((70, 45), int)
    for core_r, core_c, outer_r, outer_c in block_grid((70, 45), block=20, margin=6):
        cover[core_r, core_c] += 1
        assert outer_r.start <= core_r.start and outer_r.stop >= core_r.stop
    assert (cover == 1).all()


def test_cell_crossing_block_edges_gets_one_id():
    image = np.zeros((100, 100, 3), np.uint8)
    truth = np.zeros((100, 100), np.int32)
    for i, (centre, radius) in enumerate([((50, 50), 9), ((20, 70), 6), ((75, 22), 7)], start=1):
        truth[disk((100, 100), centre, radius)] = i
    image[truth > 0] = 200
    image[..., :] += 10  # non-zero background, so percentiles are well defined
    labels = segment_in_blocks(image, image_percentiles(image), _threshold_segmenter, block=32, margin=16)
    # The centre cell spans four blocks (edges at 32 and 64) and still has a single id.
    assert len(np.unique(labels[truth == 1])) == 1 and labels[50, 50] > 0
    assert score_image(truth, labels, keep_border_cells=True).f1 == 1.0


def test_blocks_match_whole_image_on_synthetic_cells():
    from cellnest.synthetic import SyntheticSpec, synthetic_cells, to_uint

    grey, truth = synthetic_cells(SyntheticSpec(shape=(300, 280), n_cells=60, radius=(5, 9)), seed=5)
    image = np.repeat(to_uint(grey)[..., None], 3, -1)
    bounds = image_percentiles(image)
    blocked = segment_in_blocks(image, bounds, segment_normalized_classical, block=96, margin=40)
    from cellnest.normalize import apply_image_percentiles

    whole = segment_normalized_classical(apply_image_percentiles(image, bounds))
    f1_blocked = score_image(truth, blocked).f1
    assert f1_blocked >= score_image(truth, whole).f1 - 0.03 and f1_blocked > 0.8
