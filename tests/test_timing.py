"""Stage timing: exclusive seconds per stage that add up to the wall clock."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from cellnest.models import ClassicalSegmenter
from cellnest.synthetic import SyntheticSpec, synthetic_cells, to_uint
from cellnest.timing import recording, stage


def test_nested_stages_count_exclusive_time():
    with recording() as seconds:
        with stage("outer"):
            time.sleep(0.05)
            with stage("inner"):
                time.sleep(0.1)
            with stage("outer"):  # re-entering a name adds to it
                time.sleep(0.02)
    assert seconds["inner"] == pytest.approx(0.1, abs=0.04)
    assert seconds["outer"] == pytest.approx(0.07, abs=0.04)


def test_stages_outside_recording_or_in_other_threads_are_not_counted():
    with stage("free"):
        pass
    with recording() as seconds:
        worker = threading.Thread(target=lambda: stage("read").__enter__())
        worker.start()
        worker.join()
    assert seconds == {}


def test_segmenter_stages_cover_its_run():
    grey, _ = synthetic_cells(SyntheticSpec(shape=(192, 192), n_cells=12), seed=1)
    segmenter = ClassicalSegmenter(cell_diameter=20.0, diameter=30.0)  # resized by 2/3
    image = to_uint(grey)[..., None]
    start = time.perf_counter()
    with recording() as seconds:
        segmenter.run(image)
    wall = time.perf_counter() - start
    assert {"normalise", "resample"} <= set(seconds)
    assert sum(seconds.values()) <= wall
    assert np.all(np.array(list(seconds.values())) >= 0)
