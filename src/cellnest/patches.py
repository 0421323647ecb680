"""Random training patches, deterministic by index, and a sampler that resumes mid-epoch.

:class:`PatchDataset` maps any non-negative index to one patch: the index seeds a
``numpy.random.Generator`` (``default_rng([seed, index])``) that picks the image, the crop
and the augmentation seed. Nothing depends on call order, worker process or rank, so the
trainer can replay exactly the patches of an interrupted run.

:class:`ResumableSampler` hands out the global indices ``epoch * length + i``. How the
trainer uses the two::

    dataset = PatchDataset(samples, patch_size=256, length=L, seed=recipe_seed, augment=aug)
    sampler = ResumableSampler(L, start=state.start, epoch=state.epoch, rank=rank, world_size=W)
    loader = DataLoader(dataset, batch_size=B, sampler=sampler, num_workers=n, drop_last=True)
    for epoch in range(state.epoch, epochs):
        sampler.set_epoch(epoch, start=state.start if epoch == state.epoch else 0)
        for step, batch in enumerate(loader):
            ...
            # checkpoint: epoch and start = sampler.start + (step + 1) * B * W

The index ``i`` of an epoch goes to rank ``i % W``, so after ``s`` steps the ranks together
have consumed exactly ``i < start + s * B * W``: the checkpoint's ``start`` is the same
for every rank. Choose ``L`` a multiple of ``B * W`` so every rank runs the same number of
steps (DDP needs that).
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch
from skimage.transform import resize
from torch.utils.data import Dataset, Sampler

from cellnest.augment import Augmentation
from cellnest.data import Sample
from cellnest.targets import instances_to_classes

MAX_FOREGROUND_LOCATIONS = 10_000  # per image, as nnU-Net: enough to sample from, small to keep


class PatchDataset(Dataset):
    """Square training patches cut from labelled samples (nnU-Net-style foreground oversampling).

    Parameters
    ----------
    samples : labelled :class:`~cellnest.data.Sample` s (image (3, H, W) float32, classes
        (H, W); weights (H, W) or None). Arrays may be read-only memory maps; crops are copied.
    patch_size : side P of the square patch, pixels.
    length : patches per epoch (``len(dataset)``); any index >= 0 is valid, beyond it too.
    seed : base seed; patch ``index`` depends only on ``(seed, index)`` and the samples.
    foreground_fraction : probability that the crop contains a foreground pixel (classes >
        0) chosen at random, placed near the patch centre (jitter +-P/4); otherwise the crop
        position is uniform. Images without foreground always get a uniform crop.
    augment : applied as ``augment(item, seed=derived)`` after cropping, or None.
    image_weights : relative probability of each sample (default: uniform).
    scale_jitter : octaves; each patch draws ``f = 2 ** U(-scale_jitter, scale_jitter)``,
        crops a window of side ``round(P / f)`` and resizes it to P (image and weights
        linearly, anti-aliased when shrinking), so cells appear ``f`` times their sample
        size. The classes are made anew from the resized instance labels (nearest
        neighbour) with ``boundary_width``, so boundary bands keep their width and
        touching cells stay apart; samples without labels resize their classes by nearest
        neighbour. 0 crops P directly.

    Images smaller than P are padded to P at a random offset: image with 0, classes with 0
    (background), weights with 1.0, so the padding is learnt as empty background. (At
    prediction time a small image runs whole, with only the network's reflect padding to
    its size multiple: the padded area never reaches the post-processing.)

    Returns per index a dict: ``image`` (3, P, P) float32 tensor, ``classes`` (P, P) int64,
    ``weights`` (P, P) float32 (ones when the sample has no weight map), ``index`` int.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        patch_size: int,
        length: int,
        seed: int = 0,
        foreground_fraction: float = 0.33,
        augment: Augmentation | None = None,
        image_weights: Sequence[float] | None = None,
        scale_jitter: float = 0.0,
        boundary_width: int = 1,
    ):
        if not samples:
            raise ValueError("PatchDataset needs at least one sample")
        if patch_size < 1 or length < 1:
            raise ValueError(f"patch_size and length must be >= 1, got {patch_size} and {length}")
        if not 0.0 <= foreground_fraction <= 1.0:
            raise ValueError(f"foreground_fraction must be in [0, 1], got {foreground_fraction}")
        for sample in samples:
            _check_sample(sample)
        self.samples = list(samples)
        self.patch_size = int(patch_size)
        self.length = int(length)
        self.seed = int(seed)
        self.foreground_fraction = float(foreground_fraction)
        self.augment = augment
        if not 0.0 <= scale_jitter <= 2.0:
            raise ValueError(f"scale_jitter must be in [0, 2] octaves, got {scale_jitter}")
        self.scale_jitter = float(scale_jitter)
        self.boundary_width = int(boundary_width)
        self.probabilities = _probabilities(image_weights, len(self.samples))
        # Flat indices of (a strided subset of) each image's foreground pixels, computed once
        # here so that worker processes share them instead of each scanning every image.
        self.foreground = [_foreground_locations(s.classes) for s in self.samples] if foreground_fraction > 0 else None

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[dict]:
        # Indices beyond ``length`` are valid, so the default __getitem__ iteration would never end.
        return (self[i] for i in range(self.length))

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if index < 0:
            raise IndexError(f"patch index must be >= 0, got {index}")
        rng = np.random.default_rng([self.seed, index])
        if self.probabilities is None:
            which = int(rng.integers(len(self.samples)))
        else:
            which = int(rng.choice(len(self.samples), p=self.probabilities))
        sample = self.samples[which]
        height, width = sample.classes.shape
        window = self.patch_size  # side of the crop in sample pixels
        if self.scale_jitter > 0:
            window = max(int(round(self.patch_size / 2.0 ** rng.uniform(-self.scale_jitter, self.scale_jitter))), 8)
        centre = None
        if self.foreground is not None and rng.random() < self.foreground_fraction and self.foreground[which].size:
            flat = self.foreground[which][rng.integers(self.foreground[which].size)]
            centre = divmod(int(flat), width)
        top = _start(rng, height, window, None if centre is None else centre[0])
        left = _start(rng, width, window, None if centre is None else centre[1])
        item = {
            "image": _crop(sample.image, top, left, window, 0.0, np.float32),
            "classes": _crop(sample.classes, top, left, window, 0, np.int64),
            "weights": (
                _crop(sample.weights, top, left, window, 1.0, np.float32)
                if sample.weights is not None
                else np.ones((window, window), np.float32)
            ),
        }
        if window != self.patch_size:
            labels = _crop(sample.labels, top, left, window, 0, np.int32) if sample.labels is not None else None
            item = _resize_patch(item, self.patch_size, labels, self.boundary_width)
        augment_seed = int(rng.integers(2**32))  # drawn even without augmentation: same stream either way
        if self.augment is not None:
            item = self.augment(item, seed=augment_seed)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(item["image"], dtype=np.float32)),
            "classes": torch.from_numpy(np.ascontiguousarray(item["classes"], dtype=np.int64)),
            "weights": torch.from_numpy(np.ascontiguousarray(item["weights"], dtype=np.float32)),
            "index": index,
        }


def modality_weights(modalities: Sequence[str], balance: float) -> np.ndarray | None:
    """Per-image sampling weights ``1 / n_m ** balance`` (n_m: images of that modality).

    Returns (N,) float64, or None for ``balance == 0`` (uniform over images).
    """
    if balance == 0:
        return None
    _, inverse, counts = np.unique(np.asarray(modalities, dtype=str), return_inverse=True, return_counts=True)
    return 1.0 / counts[inverse].astype(np.float64) ** float(balance)


def _check_sample(sample: Sample) -> None:
    if sample.classes is None:
        raise ValueError(f"sample {sample.name!r} has no classes (unlabelled); PatchDataset needs labelled samples")
    if sample.image.ndim != 3 or sample.image.shape[1:] != sample.classes.shape:
        raise ValueError(
            f"sample {sample.name!r}: image {sample.image.shape} must be (C, H, W) with classes (H, W) "
            f"{sample.classes.shape}"
        )
    if sample.weights is not None and sample.weights.shape != sample.classes.shape:
        raise ValueError(f"sample {sample.name!r}: weights {sample.weights.shape} differ from classes {sample.classes.shape}")


def _probabilities(image_weights: Sequence[float] | None, n: int) -> np.ndarray | None:
    if image_weights is None:
        return None
    weights = np.asarray(image_weights, dtype=np.float64)
    if weights.shape != (n,):
        raise ValueError(f"image_weights needs one weight per sample ({n}), got shape {weights.shape}")
    if not np.all(np.isfinite(weights)) or np.any(weights < 0) or weights.sum() <= 0:
        raise ValueError("image_weights must be finite, >= 0, and not all 0")
    return weights / weights.sum()


def _foreground_locations(classes: np.ndarray) -> np.ndarray:
    """Flat indices of foreground pixels, every k-th one so at most MAX_FOREGROUND_LOCATIONS."""
    flat = np.flatnonzero(np.asarray(classes) > 0)
    step = -(-flat.size // MAX_FOREGROUND_LOCATIONS) if flat.size else 1
    return flat[::step].copy()


def _start(rng: np.random.Generator, size: int, patch: int, centre: int | None) -> int:
    """Crop start along one axis; negative when the image is smaller than the patch (padding).

    Valid starts lie in [min(0, size - patch), max(0, size - patch)]: the crop stays inside
    the image, or, for a small image, contains all of it. Around ``centre`` the start is
    drawn with a jitter of +-patch/4 and clamped, so the centre pixel stays in the crop.
    """
    low, high = min(0, size - patch), max(0, size - patch)
    if centre is None:
        return int(rng.integers(low, high + 1))
    jitter = patch // 4
    start = centre - patch // 2 + int(rng.integers(-jitter, jitter + 1))
    return int(min(max(start, low), high))


def _crop(array: np.ndarray, top: int, left: int, patch: int, fill: float, dtype: type) -> np.ndarray:
    """Copy ``array[..., top:top+patch, left:left+patch]``, filling outside the image with ``fill``."""
    height, width = array.shape[-2:]
    out = np.full(array.shape[:-2] + (patch, patch), fill, dtype=dtype)
    y0, y1 = max(top, 0), min(top + patch, height)
    x0, x1 = max(left, 0), min(left + patch, width)
    out[..., y0 - top : y1 - top, x0 - left : x1 - left] = array[..., y0:y1, x0:x1]
    return out


def _resize_patch(item: dict, size: int, labels: np.ndarray | None, boundary_width: int) -> dict:
    """Resize a square crop's arrays to ``size``: image (C, w, w) and weights linearly
    (anti-aliased when shrinking); classes made anew from the crop's instance ``labels``
    resized by nearest neighbour, or, without labels, the classes resized by nearest
    neighbour (they stay in {0, 1, 2})."""
    shrink = item["classes"].shape[0] > size
    image = resize(item["image"], (item["image"].shape[0], size, size), order=1, preserve_range=True, anti_aliasing=shrink)
    nearest = labels if labels is not None else item["classes"]
    nearest = resize(nearest, (size, size), order=0, preserve_range=True, anti_aliasing=False)
    classes = instances_to_classes(nearest.astype(np.int32), boundary_width) if labels is not None else nearest
    return {
        "image": image.astype(np.float32, copy=False),
        "classes": classes.astype(np.int64),
        "weights": resize(item["weights"], (size, size), order=1, preserve_range=True, anti_aliasing=False).astype(np.float32),
    }


class ResumableSampler(Sampler[int]):
    """Global patch indices of one epoch, from ``start``, for one DDP rank.

    Yields ``epoch * length + i`` for ``i`` in ``range(start, length)`` with
    ``i % world_size == rank``. Ranks see disjoint patches that together cover the epoch;
    a run resumed with ``start = k`` yields exactly the tail an uninterrupted run would.
    """

    def __init__(self, length: int, start: int = 0, epoch: int = 0, rank: int = 0, world_size: int = 1):
        if length < 1:
            raise ValueError(f"sampler length must be >= 1, got {length}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.length = int(length)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.set_epoch(epoch, start)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Move to ``epoch``, beginning at within-epoch position ``start`` (as DistributedSampler)."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if not 0 <= start <= self.length:
            raise ValueError(f"start must be in [0, {self.length}], got {start}")
        self.epoch = int(epoch)
        self.start = int(start)

    def _positions(self) -> range:
        first = self.start + (self.rank - self.start) % self.world_size  # first i >= start on this rank
        return range(first, self.length, self.world_size)

    def __iter__(self) -> Iterator[int]:
        offset = self.epoch * self.length
        return (offset + i for i in self._positions())

    def __len__(self) -> int:
        return len(self._positions())
