from __future__ import annotations

import csv

import numpy as np
import pytest

from cellnest.data import Item, SampleCache, TargetConfig, grouped_kfold, load_folder, load_sample
from cellnest.io import write_labels


def test_load_folder_reads_layout_and_manifest(synthetic_folder):
    items = load_folder(synthetic_folder, require_labels=True)
    assert len(items) == 8
    assert all(i.label is not None and i.label.name == f"{i.name}_label.tiff" for i in items)
    assert {i.modality for i in items} == {"fluorescence", "brightfield"}
    assert all(i.group == i.name for i in items)  # no split_decisions.csv: one group per image


def test_groups_from_split_decisions(tmp_path, synthetic_folder):
    import shutil

    root = tmp_path / "train"
    shutil.copytree(synthetic_folder, root)
    with open(tmp_path / "split_decisions.csv", "w", newline="") as fh:  # beside the split, like mmcells
        writer = csv.writer(fh)
        writer.writerow(["name", "split", "source", "group"])
        for item in load_folder(root):
            writer.writerow([item.name, "train", "synthetic", item.name.split("_")[0]])
    items = load_folder(root)
    assert len({i.group for i in items}) == 4


def test_missing_labels_reported(tmp_path, synthetic_folder):
    import shutil

    root = tmp_path / "d"
    shutil.copytree(synthetic_folder, root)
    victim = sorted((root / "labels").iterdir())[0]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match="no label file"):
        load_folder(root, require_labels=True)
    assert sum(i.label is None for i in load_folder(root)) == 1


def _items(groups: list[str], modalities: list[str]) -> list[Item]:
    return [Item(f"img{i}", None, None, m, g) for i, (g, m) in enumerate(zip(groups, modalities))]  # type: ignore[arg-type]


def test_grouped_kfold_keeps_groups_together_and_covers_all():
    groups = ["a"] * 5 + ["b"] * 3 + [f"s{i}" for i in range(12)]
    modalities = ["fluo"] * 10 + ["DIC"] * 10
    items = _items(groups, modalities)
    folds = grouped_kfold(items, k=4, seed=1)
    seen = []
    for train, val in folds:
        assert not set(train) & set(val)
        assert sorted(train + val) == list(range(len(items)))
        val_groups = {items[i].group for i in val}
        train_groups = {items[i].group for i in train}
        assert not val_groups & train_groups
        seen += val
    assert sorted(seen) == list(range(len(items)))
    assert folds == grouped_kfold(items, k=4, seed=1)  # deterministic
    with pytest.raises(ValueError, match="cannot make 30 folds"):
        grouped_kfold(items, k=30)


def test_sample_arrays_shapes_and_dtypes(synthetic_folder):
    item = load_folder(synthetic_folder)[0]
    sample = load_sample(item, TargetConfig())
    h, w = sample.labels.shape
    assert sample.image.shape == (3, h, w) and sample.image.dtype == np.float32
    assert 0 <= sample.image.min() and sample.image.max() <= 1
    assert sample.classes.dtype == np.uint8 and set(np.unique(sample.classes)) <= {0, 1, 2}
    assert sample.weights.dtype == np.float32 and sample.weights.min() > 0


def test_cache_reuses_and_invalidates(tmp_path, synthetic_folder):
    import shutil

    root = tmp_path / "d"
    shutil.copytree(synthetic_folder, root)
    item = load_folder(root)[0]
    cache = SampleCache(tmp_path / "cache")
    first = cache.load(item, TargetConfig())
    direct = load_sample(item, TargetConfig())
    np.testing.assert_array_equal(first.image, direct.image)
    np.testing.assert_array_equal(first.weights, direct.weights)
    entry = first.meta["cache"]
    assert cache.load(item, TargetConfig()).meta["cache"] == entry  # reused
    assert cache.load(item, TargetConfig(boundary_width=2)).meta["cache"] != entry  # new setting, new key
    labels = np.array(direct.labels)
    labels[labels == 1] = 0
    write_labels(item.label, labels)
    changed = cache.load(item, TargetConfig())
    assert changed.meta["cache"] != entry and not (np.asarray(changed.labels) == 1).any()
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".tmp")]


def test_manifest_with_excel_bom_or_wrong_header(tmp_path, synthetic_folder):
    import shutil

    from cellnest.data import load_folder

    root = tmp_path / "data"
    shutil.copytree(synthetic_folder, root)
    text = (root / "manifest.csv").read_text()
    (root / "manifest.csv").write_text("\ufeff" + text, encoding="utf-8")  # Excel's "CSV UTF-8"
    assert {item.modality for item in load_folder(root)} == {item.modality for item in load_folder(synthetic_folder)} != {"unknown"}
    (root / "manifest.csv").write_text(text.replace("modality", "Modality", 1))
    with pytest.raises(ValueError, match=r"manifest.csv: needs the columns 'name' and 'modality'"):
        load_folder(root)
