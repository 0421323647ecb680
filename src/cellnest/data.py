"""Datasets in the challenge layout, grouped k-fold splits, and the on-disk sample cache.

A dataset folder looks like::

    root/images/<name>.<tif|tiff|png|bmp|jpg|jpeg>
    root/labels/<name>_label.tiff        (absent for unlabelled data)
    root/manifest.csv                    (optional: name, modality, ...)
    root/split_decisions.csv or root/../split_decisions.csv   (optional: name, group)

:func:`load_folder` lists it as :class:`Item` records; :class:`SampleCache` turns an item
into a :class:`Sample` (normalised image, labels, 3-class target, weight map) once and
keeps it on disk, keyed by the file contents and the target settings.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from cellnest.diameter import interior_median_diameter, rescale_image, rescale_labels, training_scale
from cellnest.io import ImageReadError, list_images, read_image, read_labels
from cellnest.normalize import LOWER_PERCENTILE, UPPER_PERCENTILE, channels_first, normalize_image
from cellnest.targets import instances_to_classes, weight_map

log = logging.getLogger(__name__)

CACHE_VERSION = 3  # bump when the cached arrays' meaning changes
MAX_SAMPLE_PIXELS = 2**26  # 67 MP: a resized training image (its float32 arrays stay under ~1.3 GB)


@dataclass(frozen=True)
class Item:
    """One image of a dataset folder (paths only; nothing is read)."""

    name: str
    image: Path
    label: Path | None = None
    modality: str = "unknown"
    group: str = ""  # leakage group for k-fold; defaults to the name
    source: str = ""  # where the image comes from (manifest.csv), for leave-one-source-out runs


def label_path_for(labels_dir: Path, name: str) -> Path | None:
    """The label file of image ``name``: ``<name>_label.tiff`` (or ``.tif``), if present."""
    for suffix in (".tiff", ".tif"):
        path = labels_dir / f"{name}_label{suffix}"
        if path.exists():
            return path
    return None


def read_csv_column(path: Path, column: str, required: bool = False) -> dict[str, str]:
    """Map ``name`` -> ``column`` from a CSV with a ``name`` header; {} if the file is absent.

    A byte-order mark (Excel's "CSV UTF-8") is skipped. A file that exists but lacks the
    ``name`` or ``column`` header gives {} for an optional column and, with ``required``,
    a ValueError naming the file and the headers it has (not every modality "unknown").
    """
    if not path.is_file():
        return {}
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or "name" not in reader.fieldnames or column not in reader.fieldnames:
            if required:
                raise ValueError(f"{path}: needs the columns 'name' and '{column}', has {reader.fieldnames or 'none'}")
            return {}
        return {row["name"]: row[column] for row in reader if row.get(column)}


def load_folder(root: str | os.PathLike, require_labels: bool = False) -> list[Item]:
    """List the images of a challenge-layout folder with their labels, modality and group.

    Parameters
    ----------
    root : folder with ``images/`` (or images directly inside it), optional ``labels/``.
    require_labels : raise if an image has no label file.

    Returns
    -------
    Items sorted by name.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: dataset folder not found")
    images_dir = root / "images" if (root / "images").is_dir() else root
    labels_dir = root / "labels"
    modality = read_csv_column(root / "manifest.csv", "modality", required=True)
    source = read_csv_column(root / "manifest.csv", "source")
    group = read_csv_column(root / "split_decisions.csv", "group") or read_csv_column(
        root.parent / "split_decisions.csv", "group"
    )
    items = []
    for image in list_images(images_dir):
        name = image.stem
        label = label_path_for(labels_dir, name)
        if require_labels and label is None:
            raise FileNotFoundError(f"{image}: no label file {labels_dir / (name + '_label.tiff')}")
        items.append(Item(name, image, label, modality.get(name, "unknown"), group.get(name, name), source.get(name, "")))
    if not items:
        raise FileNotFoundError(f"{images_dir}: no images found")
    return items


def grouped_kfold(items: Sequence[Item], k: int = 5, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """Split items into ``k`` folds so that no group is on both sides, balanced per modality.

    Groups are shuffled with ``seed``, then placed largest first into the fold that has
    the fewest images of that group's modality (ties: fewest images overall).

    Returns
    -------
    ``k`` pairs ``(train_indices, validation_indices)`` into ``items``.
    """
    if k < 2:
        raise ValueError(f"k must be >= 2, got {k}")
    groups: dict[str, list[int]] = {}
    for index, item in enumerate(items):
        groups.setdefault(item.group or item.name, []).append(index)
    if len(groups) < k:
        raise ValueError(f"cannot make {k} folds from {len(groups)} groups")
    order = sorted(groups)
    random.Random(seed).shuffle(order)
    order.sort(key=lambda g: -len(groups[g]))  # stable: ties keep the shuffled order
    per_modality = [dict() for _ in range(k)]
    totals = [0] * k
    folds: list[list[int]] = [[] for _ in range(k)]
    for g in order:
        members = groups[g]
        modality = items[members[0]].modality
        fold = min(range(k), key=lambda f: (per_modality[f].get(modality, 0), totals[f]))
        folds[fold].extend(members)
        per_modality[fold][modality] = per_modality[fold].get(modality, 0) + len(members)
        totals[fold] += len(members)
    all_indices = set(range(len(items)))
    return [(sorted(all_indices - set(f)), sorted(f)) for f in folds]


@dataclass(frozen=True)
class TargetConfig:
    """How an image and its labels become training arrays (part of every recipe)."""

    lower_percentile: float = LOWER_PERCENTILE
    upper_percentile: float = UPPER_PERCENTILE
    boundary_width: int = 1
    weight_maps: bool = True
    w0: float = 10.0
    sigma: float = 5.0
    class_balance: bool = True
    border_on: str = "background"

    def __post_init__(self) -> None:
        if not 0 <= self.lower_percentile < self.upper_percentile <= 100:
            raise ValueError(f"need 0 <= lower_percentile < upper_percentile <= 100, got {self.lower_percentile}, {self.upper_percentile}")
        if not isinstance(self.boundary_width, int) or self.boundary_width < 1:
            raise ValueError(f"boundary_width must be an integer >= 1, got {self.boundary_width!r}")
        if not (0 < self.sigma < math.inf and 0 <= self.w0 < math.inf):  # written so that NaN fails too
            raise ValueError(f"need sigma > 0 and w0 >= 0, got sigma={self.sigma}, w0={self.w0}")
        if self.border_on not in ("background", "all"):
            raise ValueError(f"border_on must be 'background' or 'all', got {self.border_on!r}")


@dataclass
class Sample:
    """Arrays of one image, ready for patch sampling.

    image : (3, H, W) float32 in [0, 1] (normalised).
    labels : (H, W) int32 instance map, or None for unlabelled images.
    classes : (H, W) uint8 3-class target (0 background, 1 interior, 2 boundary), or None.
    weights : (H, W) float32 Ronneberger weight map, or None.
    meta : ``diameter`` (the image's median cell diameter in its own pixels, from its
        labels) and ``scale`` (the factor the arrays were resized by; 1 = native).
    """

    name: str
    modality: str
    image: np.ndarray
    labels: np.ndarray | None = None
    classes: np.ndarray | None = None
    weights: np.ndarray | None = None
    meta: dict = field(default_factory=dict)


def prepare_sample(
    image: np.ndarray,
    labels: np.ndarray | None,
    config: TargetConfig,
    name: str = "",
    modality: str = "unknown",
    diameter: float | None = None,
    min_cell_pixels: int = 4,
) -> Sample:
    """Normalise an (H, W, 3) image and compute targets from (H, W) labels (pure function).

    With ``diameter`` (pixels), image and labels are resized so that the labels' median
    cell diameter (cells cut by the image edge left out, as at inference:
    :func:`cellnest.diameter.interior_median_diameter`) becomes ``diameter``: the image
    is normalised at its own size, then resized linearly (the order inference uses), the
    labels by nearest neighbour; cells left with fewer than ``min_cell_pixels`` pixels
    become background and get weight 0 in the weight map (losses without weight maps see
    them as background: 4 of 28,376 cells in mmcells/train at 30 px). Targets and weight
    maps are computed at the new size, so boundaries keep their width and sigma stays in
    the network's pixels. Unlabelled images keep their size.
    """
    if labels is not None and labels.shape != image.shape[:2]:
        raise ValueError(f"{name}: label shape {labels.shape} differs from image shape {image.shape[:2]}")
    native = interior_median_diameter(labels) if labels is not None else None
    scale = training_scale(native, diameter)
    if image.shape[0] * image.shape[1] * scale**2 > MAX_SAMPLE_PIXELS:
        raise ValueError(f"{name}: resizing this {image.shape[1]}x{image.shape[0]} image by {scale:.2f} for cells of "
                         f"{diameter} px would exceed {MAX_SAMPLE_PIXELS // 10**6} MP; crop it into tiles for training")
    normalised = normalize_image(image, config.lower_percentile, config.upper_percentile)
    dropped = None
    if scale != 1.0:
        normalised = rescale_image(normalised, scale)
        labels, dropped = rescale_labels(labels, scale, min_cell_pixels)
    sample = Sample(name, modality, channels_first(normalised),
                    meta={"diameter": native, "scale": scale})
    if labels is None:
        return sample
    sample.labels = labels.astype(np.int32)
    sample.classes = instances_to_classes(sample.labels, config.boundary_width)
    if config.weight_maps:
        sample.weights = weight_map(
            sample.labels,
            sample.classes,
            w0=config.w0,
            sigma=config.sigma,
            class_balance=config.class_balance,
            border_on=config.border_on,
        )
        if dropped is not None:
            sample.weights[dropped] = 0.0
    return sample


def load_sample(item: Item, config: TargetConfig, diameter: float | None = None, min_cell_pixels: int = 4) -> Sample:
    """Read an item's files and prepare its arrays (no cache); see :func:`prepare_sample`."""
    image = read_image(item.image)
    labels = read_labels(item.label) if item.label is not None else None
    try:
        return prepare_sample(image, labels, config, item.name, item.modality, diameter, min_cell_pixels)
    except ValueError as err:  # name the label file, not just the item
        raise ImageReadError(item.label or item.image, str(err).split(": ", 1)[-1]) from None


def default_cache_dir() -> Path:
    """``$CELLNEST_CACHE`` or ``~/.cache/cellnest``."""
    return Path(os.environ.get("CELLNEST_CACHE", Path.home() / ".cache" / "cellnest"))


class SampleCache:
    """Prepared samples on disk, keyed by file contents, :class:`TargetConfig` and training cell size.

    Each entry is a folder of ``.npy`` files opened memory-mapped, so patch sampling reads
    only the pages it touches. Entries are written to a temporary folder and renamed, so a
    killed process never leaves a half entry. Changing an image, its labels or a target
    setting gives a new key: a stale entry is never reused.
    """

    ARRAYS = ("image", "labels", "classes", "weights")

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root) if root is not None else default_cache_dir()

    def key(self, item: Item, config: TargetConfig, diameter: float | None = None, min_cell_pixels: int = 4) -> str:
        digest = hashlib.sha256()
        digest.update(f"v{CACHE_VERSION}".encode())
        digest.update(json.dumps(asdict(config), sort_keys=True).encode())
        digest.update(json.dumps([diameter, min_cell_pixels]).encode())
        for path in (item.image, item.label):
            if path is not None:
                digest.update(Path(path).read_bytes())
        return digest.hexdigest()[:32]

    def load(self, item: Item, config: TargetConfig, diameter: float | None = None, min_cell_pixels: int = 4) -> Sample:
        """The item's prepared sample (see :func:`prepare_sample`), computed and stored on first use."""
        entry = self.root / self.key(item, config, diameter, min_cell_pixels)
        if not (entry / "meta.json").exists():
            self._store(entry, load_sample(item, config, diameter, min_cell_pixels))
        arrays = {n: np.load(entry / f"{n}.npy", mmap_mode="r") for n in self.ARRAYS if (entry / f"{n}.npy").exists()}
        stored = json.loads((entry / "meta.json").read_text())
        meta = {"cache": str(entry), "diameter": stored.get("diameter"), "scale": stored.get("scale", 1.0)}
        return Sample(item.name, item.modality, meta=meta, **arrays)

    def _store(self, entry: Path, sample: Sample) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.root))
        try:
            for name in self.ARRAYS:
                array = getattr(sample, name)
                if array is not None:
                    np.save(tmp / f"{name}.npy", array)
            (tmp / "meta.json").write_text(json.dumps({"name": sample.name, "modality": sample.modality, **sample.meta}))
            try:
                os.rename(tmp, entry)
            except OSError:  # another process stored the same entry first: theirs is identical
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
