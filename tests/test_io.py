from __future__ import annotations

import numpy as np
import pytest
import tifffile
import imageio.v3 as iio

from cellnest.io import ImageReadError, read_image, read_labels, write_labels


@pytest.mark.parametrize(
    "shape, dtype, suffix, expect_channels",
    [
        ((20, 30), np.uint8, ".png", "grey"),
        ((20, 30), np.uint16, ".tif", "grey"),
        ((20, 30), np.int32, ".tif", "grey"),
        ((20, 30), np.float32, ".tiff", "grey"),
        ((20, 30, 3), np.uint8, ".png", "rgb"),
        ((20, 30, 3), np.uint8, ".bmp", "rgb"),
        ((20, 30, 4), np.uint8, ".png", "rgba"),
        ((20, 30, 2), np.uint16, ".tif", "two"),
        ((3, 20, 30), np.uint16, ".tif", "chw"),
        ((1, 20, 30), np.uint8, ".tif", "grey1"),
    ],
)
def test_read_image_layouts(tmp_path, shape, dtype, suffix, expect_channels):
    rng = np.random.default_rng(0)
    data = rng.integers(1, 200, size=shape).astype(dtype)
    path = tmp_path / f"img{suffix}"
    if suffix in (".tif", ".tiff"):
        tifffile.imwrite(path, data, photometric="rgb" if shape[-1] == 3 else "minisblack")
    else:
        iio.imwrite(path, data)
    image = read_image(path)
    assert image.shape == (20, 30, 3) and image.dtype == np.float32
    if expect_channels in ("grey", "grey1"):
        flat = data.reshape(20, 30)
        for c in range(3):
            np.testing.assert_array_equal(image[..., c], flat)
    elif expect_channels in ("rgb", "rgba"):
        np.testing.assert_array_equal(image, data[..., :3])
    elif expect_channels == "two":
        np.testing.assert_array_equal(image[..., :2], data)
        assert not image[..., 2].any()
    elif expect_channels == "chw":
        np.testing.assert_array_equal(image, np.moveaxis(data, 0, -1))


def test_read_jpeg(tmp_path):
    data = np.full((16, 16, 3), 120, np.uint8)
    iio.imwrite(tmp_path / "a.jpg", data)
    assert read_image(tmp_path / "a.jpg").shape == (16, 16, 3)


def test_multipage_tiff_channels(tmp_path):
    pages = np.stack([np.full((10, 12), v, np.uint8) for v in (10, 20, 30)])
    tifffile.imwrite(tmp_path / "pages.tif", pages, photometric="minisblack")
    image = read_image(tmp_path / "pages.tif")
    assert image.shape == (10, 12, 3) and image[0, 0].tolist() == [10, 20, 30]


def _write_bytes(path, content: bytes):
    path.write_bytes(content)
    return path


BAD_INPUTS = [
    ("missing.tif", None, "file not found"),
    ("empty.tif", b"", "file is empty"),
    ("corrupt.tif", b"II*\x00garbage-not-a-tiff" * 5, "corrupt"),
    ("truncated.png", b"\x89PNG\r\n\x1a\n\x00\x00", "corrupt"),
    ("notes.png", b"these are my notes, not a picture\n", "corrupt or not an image"),
    ("table.csv", b"a,b\n1,2\n", "unsupported file type '.csv'"),
]


@pytest.mark.parametrize("name, content, message", BAD_INPUTS)
def test_bad_files_have_one_line_messages(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        _write_bytes(path, content)
    with pytest.raises(ImageReadError) as err:
        read_image(path)
    text = str(err.value)
    assert text.startswith(str(path)) and message in text and "\n" not in text


@pytest.mark.parametrize(
    "array, message",
    [
        (np.zeros((2, 3, 20, 20), np.uint8), "expected a 2-D image, got a 4-D array"),
        (np.zeros((12, 20, 20), np.uint8), "looks like a 3-D or time stack"),
        (np.zeros((0, 20), np.uint8), "zero-size"),
        (np.array([[np.nan, 1.0], [1.0, 1.0]], np.float32), "NaN or infinite"),
        (np.zeros((1, 50), np.uint8), "too small"),
    ],
)
def test_bad_arrays_have_clear_messages(tmp_path, array, message):
    path = tmp_path / "bad.tif"
    tifffile.imwrite(path, array, photometric="minisblack")
    with pytest.raises(ImageReadError, match=message):
        read_image(path)


def test_directory_is_refused(tmp_path):
    folder = tmp_path / "x.tif"
    folder.mkdir()
    with pytest.raises(ImageReadError, match="is a directory"):
        read_image(folder)


@pytest.mark.parametrize("top, dtype", [(5, np.uint16), (65535, np.uint16), (70000, np.uint32)])
def test_labels_round_trip_and_dtype(tmp_path, top, dtype):
    labels = np.zeros((8, 9), np.int64)
    labels[1, 1], labels[3, 4] = 1, top
    path = write_labels(tmp_path / "a_label.tiff", labels)
    back = read_labels(path)
    assert back.dtype == dtype
    np.testing.assert_array_equal(back, labels)
    assert [p.name for p in tmp_path.iterdir()] == ["a_label.tiff"]  # no temporary file left


def test_write_labels_is_atomic_on_failure(tmp_path):
    path = tmp_path / "keep_label.tiff"
    write_labels(path, np.ones((4, 4), np.uint16))
    with pytest.raises(ValueError):
        write_labels(path, -np.ones((4, 4), np.int32))
    np.testing.assert_array_equal(read_labels(path), 1)  # the old file survived
    assert len(list(tmp_path.iterdir())) == 1


@pytest.mark.parametrize(
    "array, message",
    [
        (np.zeros((3, 4, 5), np.uint16), "must be 2-D"),
        (np.array([[0.5, 1.0], [0, 0]], np.float32), "non-integer"),
        (np.array([[-1, 2], [0, 0]], np.int32), "negative"),
    ],
)
def test_bad_label_files(tmp_path, array, message):
    path = tmp_path / "x_label.tiff"
    tifffile.imwrite(path, array, photometric="minisblack")
    with pytest.raises(ImageReadError, match=message):
        read_labels(path)


@pytest.mark.parametrize("compression", ["lzw", "zlib", "packbits"])
def test_compressed_tiffs_are_read(tmp_path, compression):
    """LZW is what microscopes and Fiji write most; it needs imagecodecs (a dependency)."""
    import tifffile

    array = (np.arange(64 * 48) % 251).astype(np.uint8).reshape(64, 48)
    tifffile.imwrite(tmp_path / "image.tif", array, compression=compression)
    image = read_image(tmp_path / "image.tif", dtype=None)
    assert image.shape == (64, 48, 3) and np.array_equal(image[..., 0], array)


def test_colour_layouts_follow_the_readme(tmp_path):
    from PIL import Image

    grey = (np.arange(40 * 30) % 200).astype(np.uint8).reshape(40, 30)
    Image.fromarray(np.stack([grey, np.full_like(grey, 255)], -1), mode="LA").save(tmp_path / "grey_alpha.png")
    image = read_image(tmp_path / "grey_alpha.png", dtype=None)
    assert image.shape == (40, 30, 3) and all(np.array_equal(image[..., c], grey) for c in range(3))  # alpha dropped

    rgb = np.zeros((40, 30, 3), np.uint8)
    rgb[..., 0] = 220  # red
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    image = read_image(tmp_path / "cmyk.jpg", dtype=None)
    assert image[..., 0].mean() > 180 and image[..., 1].mean() < 60  # red stays red, not inverted

    tifffile.imwrite(tmp_path / "narrow.tif", np.zeros((3, 256, 4), np.uint8), photometric="minisblack")
    assert read_image(tmp_path / "narrow.tif").shape == (256, 4, 3)  # channel-first, 4 px wide
