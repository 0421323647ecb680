"""Folder segmentation: read-ahead and background writes keep input order and report every failure."""

from __future__ import annotations

import csv
import shutil

import pytest

from cellnest.models import ClassicalSegmenter
from cellnest.segment import Outputs, segment_files


def test_write_failures_are_reported_in_input_order(tmp_path, synthetic_folder):
    inputs = tmp_path / "in"
    shutil.copytree(synthetic_folder / "images", inputs)
    names = sorted(p.stem for p in inputs.iterdir())
    out = tmp_path / "out"
    (out / f"{names[2]}_label.tiff").mkdir(parents=True)  # a folder where a label file must go: the write fails
    (inputs / "broken.tif").write_bytes(b"not a tiff")  # a read failure, read ahead in the other thread
    results = segment_files([inputs], out, ClassicalSegmenter(), Outputs(overlay=True), progress=False, overwrite=True)
    assert [r.name for r in results] == sorted(names + ["broken"])
    failed = {r.name: r.error for r in results if r.error}
    assert set(failed) == {names[2], "broken"}
    assert "IsADirectoryError" in failed[names[2]] and "corrupt" in failed["broken"]
    for r in results:
        assert bool(r.output) != bool(r.error)
    assert len(list(out.glob("*_label.tiff"))) == len(names)  # the folder counts: len(names) - 1 files + 1 folder
    assert len(list(out.glob("*_overlay.png"))) == len(names) - 1
    with open(out / "summary.csv") as fh:
        assert [row["name"] for row in csv.DictReader(fh)] == [r.name for r in results]


def test_symlink_loop_fails_that_input_only(tmp_path, synthetic_folder):
    inputs = tmp_path / "in"
    shutil.copytree(synthetic_folder / "images", inputs)
    (inputs / "a.tif").symlink_to(inputs / "b.tif")
    (inputs / "b.tif").symlink_to(inputs / "a.tif")
    results = segment_files([str(inputs / "*.tif"), str(inputs)], tmp_path / "out", ClassicalSegmenter(), progress=False)
    failed = {r.name: r.error for r in results if r.error}
    assert set(failed) == {"a", "b"} and all("symlink loop" in e for e in failed.values())
    assert sum(1 for r in results if not r.error) == len(list((synthetic_folder / "images").iterdir()))


def test_existing_outputs_and_ground_truth_are_never_replaced(tmp_path, synthetic_folder):
    from cellnest.segment import OutputExistsError

    with pytest.raises(OutputExistsError, match="holds ground truth"):  # `--out DATA/labels`, even with overwrite
        segment_files([synthetic_folder], synthetic_folder / "labels", ClassicalSegmenter(), progress=False, overwrite=True)
    out = tmp_path / "out"
    out.mkdir()
    (out / "summary.csv").write_text("the user's own table\n")
    with pytest.raises(OutputExistsError, match="summary.csv: exists"):
        segment_files([synthetic_folder], out, ClassicalSegmenter(), progress=False)
    assert (out / "summary.csv").read_text() == "the user's own table\n" and not list(out.glob("*_label.tiff"))
    results = segment_files([synthetic_folder], out, ClassicalSegmenter(), progress=False, overwrite=True)
    assert all(not r.error for r in results) and len(list(out.glob("*_label.tiff"))) == len(results)
