"""Where the time of a segmentation goes: exclusive wall-clock seconds per named stage.

    with recording() as seconds:
        segmenter.run(image)
    # seconds == {"normalise": 0.01, "size": 0.4, "resample": 0.02, "network": 1.1, ...}

The pipeline marks its stages with :func:`stage`; outside :func:`recording` a stage costs
one global lookup. Stages nest and time is *exclusive*: a network pass inside the cell-size
estimate counts as ``size``'s own work only where ``size`` has no inner stage, so the
stages of one run add up to its wall-clock time (this is what a stage table needs, and
what neither ``cProfile``, which counts per function, nor ``torch.profiler``, which sees only
operators, gives directly).

Stages used: ``read``, ``normalise``, ``size`` (cell-size estimate), ``resample`` (to and
from the model's cell size), ``network``, ``postprocess``, ``write``.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Iterator

_current: "_Recorder | None" = None


class _Recorder:
    def __init__(self) -> None:
        self.thread = threading.get_ident()  # stages of other threads (prefetching reads) are not counted
        self.seconds: defaultdict[str, float] = defaultdict(float)
        self.children: list[float] = []  # per open stage: time spent in its inner stages


@contextmanager
def recording() -> Iterator[dict[str, float]]:
    """Record stage times of the enclosed code into the yielded dict (filled on exit)."""
    global _current
    outer, recorder = _current, _Recorder()
    result: dict[str, float] = {}
    _current = recorder
    try:
        yield result
    finally:
        _current = outer
        result.update(recorder.seconds)


@contextmanager
def stage(name: str) -> Iterator[None]:
    """Count the enclosed code's exclusive time towards ``name`` while recording."""
    recorder = _current
    if recorder is None or recorder.thread != threading.get_ident():
        yield
        return
    start = time.perf_counter()
    recorder.children.append(0.0)
    try:
        yield
    finally:
        elapsed = time.perf_counter() - start
        inner = recorder.children.pop()
        recorder.seconds[name] += elapsed - inner
        if recorder.children:
            recorder.children[-1] += elapsed
