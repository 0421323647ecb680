"""Random training patches: determinism by index, foreground oversampling, padding, resumable sampler."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi
from torch.utils.data import DataLoader

from cellnest.augment import AugmentConfig, build_augmentation
from cellnest.data import Sample, TargetConfig, prepare_sample
from cellnest.patches import PatchDataset, ResumableSampler, modality_weights
from cellnest.synthetic import SyntheticSpec, synthetic_cells


def make_sample(shape=(96, 96), n_cells=8, seed=0, weights=True, read_only=True) -> Sample:
    image, labels = synthetic_cells(SyntheticSpec(shape=shape, n_cells=n_cells, radius=(4, 6)), seed=seed)
    sample = prepare_sample(np.stack([image] * 3, -1), labels, TargetConfig(weight_maps=weights), name=f"s{seed}")
    for name in ("image", "classes", "weights"):
        array = getattr(sample, name)
        if array is not None and read_only:
            array.flags.writeable = False  # like the cache's memory maps
    return sample


@pytest.fixture(scope="module")
def samples() -> list[Sample]:
    return [make_sample(seed=0), make_sample((80, 120), seed=1, weights=False)]


def test_patch_shapes_dtypes_and_determinism(samples):
    dataset = PatchDataset(samples, patch_size=48, length=10, seed=3, augment=build_augmentation(AugmentConfig()))
    assert len(dataset) == 10
    for index in (0, 7, 10_123):  # indices beyond length are valid (global counter)
        patch = dataset[index]
        assert patch["image"].shape == (3, 48, 48) and patch["image"].dtype == torch.float32
        assert patch["classes"].shape == (48, 48) and patch["classes"].dtype == torch.int64
        assert patch["weights"].shape == (48, 48) and patch["weights"].dtype == torch.float32
        assert patch["index"] == index
        again = dataset[index]
        for key in ("image", "classes", "weights"):
            assert torch.equal(patch[key], again[key])
    assert not torch.equal(dataset[1]["image"], dataset[2]["image"])
    other_seed = PatchDataset(samples, patch_size=48, length=10, seed=4)
    assert not torch.equal(other_seed[1]["image"], PatchDataset(samples, patch_size=48, length=10, seed=3)[1]["image"])


def test_without_augmentation_patch_is_a_crop_of_a_memory_map(samples, tmp_path):
    np.save(tmp_path / "image.npy", samples[1].image)
    np.save(tmp_path / "classes.npy", samples[1].classes)
    mapped = Sample("mapped", "unknown", np.load(tmp_path / "image.npy", mmap_mode="r"),
                    classes=np.load(tmp_path / "classes.npy", mmap_mode="r"))  # fmt: skip
    dataset = PatchDataset([mapped], patch_size=32, length=4, seed=0)
    patch = dataset[0]
    patch["image"] += 0  # a writable copy, not a view of the map
    assert torch.all(patch["weights"] == 1)  # sample without a weight map
    image = torch.tensor(samples[1].image)
    found = [
        (y, x) for y in range(80 - 31) for x in range(120 - 31) if torch.equal(image[:, y : y + 32, x : x + 32], patch["image"])
    ]
    assert found


def test_dataloader_workers_give_identical_batches(samples):
    dataset = PatchDataset(samples, patch_size=32, length=8, seed=1, augment=build_augmentation(AugmentConfig()))

    def batches(workers):
        sampler = ResumableSampler(8, epoch=2)
        return list(DataLoader(dataset, batch_size=4, sampler=sampler, num_workers=workers))

    serial, parallel = batches(0), batches(2)
    assert len(serial) == len(parallel) == 2
    for a, b in zip(serial, parallel):
        assert torch.equal(a["index"], b["index"])
        for key in ("image", "classes", "weights"):
            assert torch.equal(a[key], b[key])
    assert serial[0]["index"].tolist() == [16, 17, 18, 19]


def test_foreground_oversampling():
    sparse = make_sample((200, 200), n_cells=1, seed=5)
    assert 0 < (np.asarray(sparse.classes) > 0).mean() < 0.01

    def with_foreground(fraction):
        dataset = PatchDataset([sparse], patch_size=24, length=40, foreground_fraction=fraction)
        return sum(bool((dataset[i]["classes"] > 0).any()) for i in range(40))

    assert with_foreground(1.0) == 40
    assert with_foreground(0.0) < 20


def test_small_images_are_padded(samples):
    small = make_sample((20, 30), n_cells=2, seed=2)
    dataset = PatchDataset([small], patch_size=40, length=4, foreground_fraction=0.5)
    for index in range(4):
        patch = dataset[index]
        assert patch["image"].shape == (3, 40, 40)
        padding = 40 * 40 - 20 * 30  # filled with image 0, classes 0, weights 1
        assert int((patch["image"] == 0).all(0).sum()) >= padding
        assert int((patch["weights"] == 1).sum()) >= padding
        assert int((patch["classes"] > 0).sum()) == int((np.asarray(small.classes) > 0).sum())  # all of it inside


def test_image_weights_choose_images(samples):
    dataset = PatchDataset(samples, patch_size=16, length=20, image_weights=[0.0, 1.0], foreground_fraction=0)
    assert all(torch.all(dataset[i]["weights"] == 1) for i in range(20))  # only the weightless sample
    with pytest.raises(ValueError, match="image_weights"):
        PatchDataset(samples, patch_size=16, length=4, image_weights=[1.0])


def test_unlabelled_sample_rejected():
    sample = make_sample(read_only=False)
    sample.classes = None
    with pytest.raises(ValueError, match="s0"):
        PatchDataset([sample], patch_size=16, length=4)


def test_sampler_resume_equals_tail_of_full_epoch():
    full = list(ResumableSampler(10, epoch=3))
    assert full == list(range(30, 40))
    for k in (0, 4, 10):
        resumed = ResumableSampler(10, start=k, epoch=3)
        assert list(resumed) == full[k:] and len(resumed) == 10 - k


@pytest.mark.parametrize("start", [0, 3, 8])
def test_sampler_ranks_disjoint_and_covering(start):
    world = 3
    per_rank = [list(ResumableSampler(12, start=start, epoch=1, rank=r, world_size=world)) for r in range(world)]
    everything = sorted(i for indices in per_rank for i in indices)
    assert everything == list(range(12 + start, 24))
    assert all(len(ResumableSampler(12, start=start, rank=r, world_size=world)) == len(per_rank[r]) for r in range(world))
    # after s steps of batch B on every rank, the consumed indices are exactly [start, start + s*B*W)
    steps, batch = 1, 1
    consumed = sorted(i for indices in per_rank for i in indices[: steps * batch])
    assert consumed == list(range(12 + start, 12 + start + steps * batch * world))


def test_sampler_set_epoch_and_validation():
    sampler = ResumableSampler(4, start=2)
    sampler.set_epoch(1)
    assert list(sampler) == [4, 5, 6, 7]
    with pytest.raises(ValueError):
        ResumableSampler(4, rank=2, world_size=2)
    with pytest.raises(ValueError):
        ResumableSampler(4, start=5)


def test_modality_weights_share_patches_between_modalities():
    modalities = ["fluo"] * 9 + ["dic"]
    assert modality_weights(modalities, 0.0) is None  # uniform over images
    shares = {}
    for balance in (0.5, 1.0):
        w = modality_weights(modalities, balance)
        shares[balance] = w[-1] / w.sum()
    assert shares[1.0] == pytest.approx(0.5)  # each modality gets half the patches
    assert shares[0.5] == pytest.approx(1 / (1 + 9 / 3))  # 9 images at 1/3 each vs 1 at 1


def test_scale_jitter_shows_cells_at_random_sizes(samples):
    plain = PatchDataset(samples[:1], patch_size=48, length=4, seed=0, foreground_fraction=1.0)
    jittered = PatchDataset(samples[:1], patch_size=48, length=64, seed=0, foreground_fraction=1.0, scale_jitter=1.0)
    areas = []
    for index in range(64):
        patch = jittered[index]
        assert patch["image"].shape == (3, 48, 48) and set(patch["classes"].unique().tolist()) <= {0, 1, 2}
        assert torch.equal(patch["classes"], jittered[index]["classes"])  # still a pure function of the index
        areas.append(float((patch["classes"] > 0).float().mean()))
    # Zoomed in (f > 1) the patch is mostly cell, zoomed out mostly background: the spread of
    # foreground fractions is far wider than without jitter.
    plain_areas = [float((plain[i]["classes"] > 0).float().mean()) for i in range(4)]
    assert np.ptp(areas) > 2 * np.ptp(plain_areas)
    with pytest.raises(ValueError, match="scale_jitter"):
        PatchDataset(samples, patch_size=48, length=4, scale_jitter=3.0)


def test_jittered_classes_are_made_from_the_resized_labels():
    # Two touching 40 x 40 cells. The sample's class map is deliberately blank: a jittered
    # patch must take its classes from the instance labels, boundary band included.
    labels = np.zeros((64, 96), np.int32)
    labels[12:52, 8:48], labels[12:52, 48:88] = 1, 2
    sample = Sample("touching", "m", np.zeros((3, 64, 96), np.float32), labels, np.zeros((64, 96), np.uint8))
    dataset = PatchDataset([sample], patch_size=64, length=8, seed=0, foreground_fraction=0.0, scale_jitter=0.5,
                           boundary_width=1)
    for index in range(8):
        classes = dataset[index]["classes"].numpy()
        assert (classes == 1).any() and (classes == 2).any()
        interior = ndi.label(classes == 1)[0]
        assert interior.max() <= 2  # the touching cells stay two interiors, split by the boundary
