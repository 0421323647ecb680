"""Fuzzing the read -> normalise -> segment path over shapes, dtypes, layouts and values.

Whatever the pixels, a readable image must come back as cells: no exception, no NaN,
labels the size of the image. The one refusal: float64 values beyond float32's range.
"""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from cellnest.io import ImageReadError, read_image
from cellnest.models import ClassicalSegmenter
from cellnest.normalize import normalize_image

DTYPES = [np.uint8, np.uint16, np.int16, np.int32, np.uint32, np.float32, np.float64, np.bool_]


@st.composite
def images(draw) -> tuple[np.ndarray, tuple[int, int]]:
    """An array in one of the layouts the README lists, and its (height, width)."""
    height, width = draw(st.integers(5, 40)), draw(st.integers(5, 40))
    channels = draw(st.integers(1, 4))
    layout = draw(st.sampled_from(["grey", "last", "first"]))
    shape = {"grey": (height, width), "last": (height, width, channels), "first": (channels, height, width)}[layout]
    dtype = np.dtype(draw(st.sampled_from(DTYPES)))
    if dtype.kind == "f":
        info = np.finfo(dtype)
        elements = st.floats(float(info.min), float(info.max), allow_nan=False, allow_infinity=False, width=dtype.itemsize * 8)
    elif dtype.kind == "b":
        elements = st.booleans()
    else:
        info = np.iinfo(dtype)
        elements = st.integers(int(info.min), int(info.max))
    # A few distinct values, repeated: flat, two-level and extreme images come up often.
    palette = draw(st.lists(elements, min_size=1, max_size=6))
    picks = draw(arrays(np.intp, shape, elements=st.integers(0, len(palette) - 1)))
    return np.asarray(palette, dtype)[picks], (height, width)


@pytest.mark.filterwarnings("ignore:<tifffile.TiffWriter.write>:DeprecationWarning")  # RGB-looking test arrays
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(drawn=images())
def test_any_readable_image_gives_finite_input_and_labels_of_its_size(drawn, tmp_path):
    array, (height, width) = drawn
    path = tmp_path / "fuzz.tif"
    tifffile.imwrite(path, array)
    if array.dtype == np.float64 and np.abs(array).max() > np.finfo(np.float32).max:
        with pytest.raises(ImageReadError, match=r"fuzz.tif: pixel values up to .* do not fit float32"):
            read_image(path)
        return
    image = read_image(path)
    assert image.shape == (height, width, 3) and image.dtype == np.float32
    normalised = normalize_image(image)
    assert np.isfinite(normalised).all() and normalised.min() >= 0 and normalised.max() <= 1
    labels = ClassicalSegmenter()(read_image(path, dtype=None))
    assert labels.shape == (height, width) and labels.dtype.kind in "iu" and labels.min() >= 0
