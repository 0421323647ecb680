"""Reading microscopy images and label maps; writing label maps atomically.

Images come back as ``(H, W, 3)`` float32 raw intensities following the NeurIPS 2022
CellSeg convention:

* 2-D grey ``(H, W)`` -> the grey channel repeated three times;
* ``(H, W, 1)`` -> repeated; ``(H, W, 2)`` -> ``[c0, c1, 0]`` (a zero third channel);
* ``(H, W, 3)`` as is; ``(H, W, 4)`` (RGBA or 4 channels) -> the first three, alpha dropped
  (the challenge baseline also keeps the first three channels of anything wider);
* channel-first ``(C, H, W)`` and multi-page TIFFs with ``C <= 4`` pages are moved to
  channel-last first. More than 4 pages is treated as a 3-D/time stack and refused.

Every failure raises :class:`ImageReadError` whose message is one line naming the file.

Size is checked from the file's header before any pixel is decoded: an image of more than
``max_pixels`` pixels (:data:`MAX_PIXELS` by default, ``--max-pixels`` on the command line)
is refused, so a small compressed file that declares 40000 x 40000 cannot exhaust memory.
"""

from __future__ import annotations

import math
import os
import secrets
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".bmp", ".jpg", ".jpeg")
TIFF_SUFFIXES = (".tif", ".tiff")
# A channel axis has at most this many entries; anything larger is a stack or a spatial axis.
MAX_CHANNELS = 4
# Largest image (height x width) read by default: 16384 x 16384. Segmenting one needs about
# 2.5 GiB (docs/reliability.md); pass a larger ``max_pixels`` (``--max-pixels``) when
# the machine has the memory.
MAX_PIXELS = 16384 * 16384
_FLOAT32_MAX = float(np.finfo(np.float32).max)
# Pillow's own decompression-bomb guard is a fixed 179 MP that it reports as an error we
# would call "corrupt"; our header check replaces it, so Pillow's is lifted while we decode.
_PILLOW_GUARD = threading.Lock()


def first_line(err: BaseException) -> str:
    """The first line of an exception's message, or its type's name when it has none (an
    empty file makes torch raise EOFError with no message)."""
    lines = [line for line in str(err).splitlines() if line.strip()]
    return lines[0].strip() if lines else type(err).__name__


class ImageReadError(ValueError):
    """An input file that cannot be used; ``str(err)`` is ``"<path>: <problem>"``."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = str(path)
        self.problem = " ".join(str(problem).split())  # one line, whatever the library said
        super().__init__(f"{self.path}: {self.problem}")


def _check_size(path: Path, shape: tuple[int, ...], max_pixels: int) -> None:
    """Refuse, before decoding, a header ``shape`` above ``max_pixels`` pixels.

    The pixel count is the product of the two largest axes (a channel or page axis is
    small); all axes together may hold at most ``MAX_CHANNELS`` times that, which also
    refuses a huge stack before it is read.
    """
    spatial = sorted(shape)[-2:] if len(shape) >= 2 else list(shape)
    pixels, elements = math.prod(spatial), math.prod(shape)
    if pixels > max_pixels or elements > MAX_CHANNELS * max_pixels:
        size = " x ".join(str(n) for n in shape)
        raise ImageReadError(path, f"image of {size} ({pixels / 1e6:.0f} MP) is above the limit of {max_pixels / 1e6:.0f} MP "
                                   "(--max-pixels); segment it block by block with --cluster local, or raise the limit if "
                                   "this machine has the memory (docs/reliability.md)")


def _read_array(path: Path, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode a file to an ndarray with its own dtype and axes, or raise ImageReadError.

    The size in the header is checked against ``max_pixels`` before decoding."""
    if not path.exists():
        raise ImageReadError(path, "file not found")
    if path.is_dir():
        raise ImageReadError(path, "is a directory, not an image file")
    suffix = path.suffix.lower()
    if suffix not in IMAGE_SUFFIXES:
        raise ImageReadError(path, f"unsupported file type '{suffix}' (supported: {', '.join(IMAGE_SUFFIXES)})")
    if path.stat().st_size == 0:
        raise ImageReadError(path, "file is empty (0 bytes)")
    try:
        if suffix in TIFF_SUFFIXES:
            array = _read_tiff(path, max_pixels)
        else:
            array = _read_with_pillow(path, max_pixels)
    except ImageReadError:
        raise
    except Exception as err:  # decoders raise many unrelated types; all mean "unreadable"
        raise ImageReadError(path, f"corrupt or not an image ({type(err).__name__}: {err})") from None
    array = np.asarray(array)
    if array.size == 0:
        raise ImageReadError(path, f"no pixel data: corrupt file or zero-size image (shape {array.shape})")
    if array.dtype.kind not in "buif":
        raise ImageReadError(path, f"unsupported pixel type {array.dtype}")
    return array


def _read_tiff(path: Path, max_pixels: int) -> np.ndarray:
    """The first series of a TIFF, after checking its declared shape."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        _check_size(path, tuple(series.shape), max_pixels)
        return series.asarray()


def _read_with_pillow(path: Path, max_pixels: int) -> np.ndarray:
    """PNG, BMP or JPEG by Pillow, with its colour mode made explicit: grey+alpha keeps the
    grey, palette and CMYK become RGB (a CMYK JPEG read as raw channels comes in
    inverted), RGBA stays (its alpha is dropped later)."""
    from PIL import Image

    with _PILLOW_GUARD:
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            image = Image.open(path)  # reads the header only
        finally:
            Image.MAX_IMAGE_PIXELS = saved
    with image:
        _check_size(path, (image.height, image.width), max_pixels)
        if image.mode in ("LA", "La"):
            return np.asarray(image.getchannel(0))
        if image.mode in ("P", "PA"):
            image = image.convert("RGBA" if image.mode == "PA" or "transparency" in image.info else "RGB")
        elif image.mode in ("CMYK", "YCbCr", "LAB", "HSV", "1"):
            image = image.convert("L" if image.mode == "1" else "RGB")
        return np.asarray(image)


def _to_channel_last(array: np.ndarray, path: Path) -> np.ndarray:
    """Return ``(H, W, C)`` with ``1 <= C <= MAX_CHANNELS`` from a 2-D or 3-D array."""
    # Drop singleton axes (e.g. a (1, H, W) single-page TIFF or (H, W, 1) PNG).
    squeezed = np.squeeze(array)
    if squeezed.ndim < 2:
        raise ImageReadError(path, f"image too small to segment (shape {array.shape})")
    if squeezed.ndim == 2:
        return squeezed[..., None]
    if squeezed.ndim != 3:
        raise ImageReadError(path, f"expected a 2-D image, got a {array.ndim}-D array of shape {array.shape}")
    first, last = squeezed.shape[0], squeezed.shape[-1]
    # Both ends small (a (3, 256, 4) array): the smaller one is the channel axis.
    if last <= MAX_CHANNELS and not (first < last):
        return squeezed
    if first <= MAX_CHANNELS:
        return np.moveaxis(squeezed, 0, -1)
    if last <= MAX_CHANNELS:
        return squeezed
    raise ImageReadError(
        path, f"looks like a 3-D or time stack (shape {array.shape}); cellnest segments 2-D images with <= {MAX_CHANNELS} channels"
    )


def read_image(path: str | os.PathLike, dtype: np.dtype | type | None = np.float32, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Read a microscopy image as three channels.

    Parameters
    ----------
    path : a ``.tif/.tiff/.png/.bmp/.jpg/.jpeg`` file.
    dtype : output dtype; ``None`` keeps the file's own (a 10k x 10k uint8 RGB image is
        300 MB as uint8 and 1.2 GB as float32), and a grey image then comes back as a
        read-only view of its one channel (100 MB).
    max_pixels : largest height x width read; checked from the header before decoding.

    Returns
    -------
    image : (H, W, 3) array of raw intensities (not normalised), float32 by default.

    Raises
    ------
    ImageReadError : missing, empty, corrupt, non-image, 4-D or stack input, odd dtype,
        non-finite values, or above ``max_pixels``.
    """
    path = Path(path)
    array = _read_array(path, max_pixels)
    image = _to_channel_last(array, path)
    if image.shape[0] < 2 or image.shape[1] < 2:
        raise ImageReadError(path, f"image too small to segment (shape {array.shape})")
    if image.dtype.kind == "f" and not np.isfinite(image).all():
        raise ImageReadError(path, "image contains NaN or infinite values")
    if image.dtype.itemsize > 4 and image.dtype.kind == "f" and np.abs(image).max() > _FLOAT32_MAX:
        raise ImageReadError(path, f"pixel values up to {np.abs(image).max():.3g} do not fit float32; rescale the image")
    if image.dtype.kind == "b":
        image = image.astype(np.uint8)
    if dtype is not None:
        image = image.astype(dtype, copy=False)
    return three_channels(image, view=dtype is None)


def three_channels(image: np.ndarray, view: bool = False) -> np.ndarray:
    """(H, W) or (H, W, C) -> (H, W, 3) by the rule in the module docstring (grey repeated,
    a zero third channel for two, the first three of more). ``view``: a grey image comes
    back as a read-only broadcast view (a third of the memory) instead of a copy."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    channels = image.shape[-1]
    if channels == 1:
        return np.broadcast_to(image, (*image.shape[:2], 3)) if view else np.repeat(image, 3, axis=-1)
    if channels == 2:
        return np.concatenate([image, np.zeros_like(image[..., :1])], axis=-1)
    return np.ascontiguousarray(image[..., :3])


def read_labels(path: str | os.PathLike, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Read an instance label map.

    Returns
    -------
    labels : (H, W) integer array (uint16, uint32 or int32), 0 = background.

    Raises
    ------
    ImageReadError : unreadable file, not 2-D, negative or non-integer values, or above
        ``max_pixels``.
    """
    path = Path(path)
    array = np.squeeze(_read_array(path, max_pixels))
    if array.ndim != 2:
        raise ImageReadError(path, f"label map must be 2-D, got shape {array.shape}")
    if array.dtype.kind == "f":
        if not np.isfinite(array).all() or np.any(array != np.round(array)):
            raise ImageReadError(path, "label map has non-integer values")
        array = array.astype(np.int64)
    if array.dtype.kind == "b":
        array = array.astype(np.uint8)
    if array.dtype.kind == "i" and array.min() < 0:
        raise ImageReadError(path, "label map has negative values")
    return array


def label_dtype(labels: np.ndarray) -> np.dtype:
    """uint16 when the largest id fits, else uint32 (the formats Fiji and napari open)."""
    top = int(labels.max()) if labels.size else 0
    if top > np.iinfo(np.uint32).max:
        raise ValueError(f"label id {top} does not fit in uint32")
    return np.dtype(np.uint16) if top <= np.iinfo(np.uint16).max else np.dtype(np.uint32)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it over ``path``.

    A crash leaves either the old file or the new one, never half a file: the data is
    flushed to disk (fsync) before the rename. The temporary name keeps the suffix so
    that writers that pick a format by extension still work; the writer creates the file,
    so it gets the usual permissions (umask).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.{secrets.token_hex(4)}.tmp{path.suffix}")
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


class OutputExistsError(ValueError):
    """An output folder whose files a run would replace, or that holds ground truth."""


def refuse_existing(planned: Sequence[Path]) -> None:
    """Raise :class:`OutputExistsError` naming the first of ``planned`` that exists."""
    existing = next((Path(t) for t in planned if Path(t).exists() or Path(t).is_symlink()), None)
    if existing is not None:
        raise OutputExistsError(f"{existing}: exists; cellnest never replaces files it did not write in this run "
                                "(use --overwrite, or another --out)")


class FolderBusyError(OSError):
    """Another process is writing into the same output folder."""


@contextmanager
def folder_lock(folder: str | os.PathLike) -> Iterator[Path]:
    """Hold ``<folder>/.cellnest.lock`` for the duration, or raise :class:`FolderBusyError`.

    Two runs writing one folder would mix their outputs and leave a ``summary.csv`` that
    credits one model with the other's files. The lock is ``flock`` on a file that stays in
    the folder: the kernel drops it when its process dies, so a killed run never leaves a
    stale lock (removing the file could let a third run lock a different inode). Where
    ``fcntl`` is missing (Windows) the folder is not locked.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:
        yield folder
        return
    with open(folder / ".cellnest.lock", "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise FolderBusyError(f"{folder}: another cellnest run ({holder}) is writing here; wait for it to end or "
                                  "choose another --out") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}")
        handle.flush()
        try:
            yield folder
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def write_labels(path: str | os.PathLike, labels: np.ndarray) -> Path:
    """Write an instance map as a zlib-compressed uint16 ImageJ TIFF (uint32 plain TIFF
    above 65,535 cells), atomically.

    Parameters
    ----------
    path : destination, conventionally ``<name>_label.tiff``.
    labels : (H, W) non-negative integer array.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"{path}: label map must be 2-D, got shape {labels.shape}")
    if labels.dtype.kind not in "buif" or (labels.size and labels.min() < 0):
        raise ValueError(f"{path}: labels must be non-negative integers, got dtype {labels.dtype}")
    out = labels.astype(label_dtype(labels), copy=False)
    import tifffile

    # ImageJ's own format where it can hold the ids (ImageJ has no uint32): Fiji then opens
    # the file as a 16-bit image with its metadata; above 65,535 cells a plain TIFF.
    imagej = {"imagej": True, "metadata": {"axes": "YX"}} if out.dtype == np.uint16 else {}
    return atomic_write(path, lambda tmp: tifffile.imwrite(tmp, out, compression="zlib", **imagej))


def write_csv(path: str | os.PathLike, rows: Sequence[dict], columns: Sequence[str] | None = None) -> Path:
    """Rows of dicts as CSV, atomically; ``columns`` default to every key in first-seen order."""
    import csv
    import io

    columns = list(columns) if columns is not None else list(dict.fromkeys(k for row in rows for k in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write(path, lambda tmp: tmp.write_text(buffer.getvalue()))


def write_png(path: str | os.PathLike, rgb: np.ndarray) -> Path:
    """Write an (H, W, 3) uint8 picture (overlays, previews) as PNG, atomically."""
    import imageio.v3 as iio

    return atomic_write(path, lambda tmp: iio.imwrite(tmp, rgb, extension=".png"))


def list_images(root: str | os.PathLike) -> list[Path]:
    """Image files directly inside ``root`` (sorted), skipping hidden files and label maps."""
    root = Path(root)
    return sorted(
        p
        for p in root.iterdir()
        if p.is_file()
        and p.suffix.lower() in IMAGE_SUFFIXES
        and not p.name.startswith(".")
        and not p.stem.endswith("_label")
    )
