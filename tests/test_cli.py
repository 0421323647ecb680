from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest

from cellnest.cli import main
from cellnest.io import read_labels


def test_segment_then_evaluate(tmp_path, synthetic_folder, capsys):
    out = tmp_path / "out"
    assert main(["-q", "segment", str(synthetic_folder), "--out", str(out), "--overlay", "--model", "classical"]) == 0
    labels = sorted(out.glob("*_label.tiff"))
    assert len(labels) == 8 and len(list(out.glob("*_overlay.png"))) == 8
    assert read_labels(labels[0]).max() > 0
    with open(out / "summary.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 8 and all(int(r["cells"]) > 0 and not r["error"] for r in rows)

    assert main(["-q", "evaluate", "--pred", str(out), "--gt", str(synthetic_folder)]) == 0
    table = capsys.readouterr().out
    assert "| fluorescence |" in table and "| all | 8 |" in table
    summary = json.loads((out / "evaluation.json").read_text())
    assert summary["summary"]["all"]["mean_f1"] > 0.7 and summary["missing_predictions"] == []


def test_bad_files_are_reported_and_batch_continues(tmp_path, synthetic_folder, capsys):
    import tifffile

    inputs = tmp_path / "in"
    shutil.copytree(synthetic_folder / "images", inputs)
    (inputs / "broken.tif").write_bytes(b"not a tiff at all")
    (inputs / "empty.png").write_bytes(b"")
    (inputs / "notes.jpg").write_text("a text file with an image suffix")
    tifffile.imwrite(inputs / "stack.tif", np.zeros((2, 3, 16, 16), np.uint8))
    tifffile.imwrite(inputs / "nan.tif", np.full((16, 16), np.nan, np.float32))
    out = tmp_path / "out"
    code = main(["-q", "segment", str(inputs), str(tmp_path / "nothing*.png"), "--out", str(out), "--model", "classical"])
    assert code == 1
    printed = "".join(capsys.readouterr())
    for name, message in [("broken.tif", "corrupt"), ("empty.png", "file is empty"), ("notes.jpg", "corrupt or not an image"),
                          ("stack.tif", "expected a 2-D image"), ("nan.tif", "image contains NaN")]:
        assert f"{name}: {message}" in printed, name
    assert len(list(out.glob("*_label.tiff"))) == 8  # every good image was segmented
    with open(out / "summary.csv") as fh:
        errors = {r["name"]: r["error"] for r in csv.DictReader(fh) if r["error"]}
    assert set(errors) == {"broken", "empty", "notes", "stack", "nan", "nothing*"}
    assert all("\n" not in e for e in errors.values())


def test_missing_prediction_counts_as_zero(tmp_path, synthetic_folder, capsys):
    pred = tmp_path / "pred"
    shutil.copytree(synthetic_folder / "labels", pred)
    victim = sorted(pred.iterdir())[0]
    victim.unlink()
    assert main(["-q", "evaluate", "--pred", str(pred), "--gt", str(synthetic_folder)]) == 0
    text = capsys.readouterr().out
    assert victim.name.replace("_label.tiff", "") in text
    with open(pred / "evaluation.csv") as fh:
        f1 = {r["name"]: float(r["f1"]) for r in csv.DictReader(fh)}
    assert f1.pop(victim.name.replace("_label.tiff", "")) == 0.0
    assert all(v == 1.0 for v in f1.values())


@pytest.mark.parametrize(
    "argv, message",
    [
        (["segment", "x.png", "--out", "o", "--model", "nope"], "unknown model 'nope'"),
        (["evaluate", "--pred", "/no/such/dir", "--gt", "/no/gt"], "prediction folder not found"),
    ],
)
def test_user_errors_are_one_line(tmp_path, capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cellnest: error:") and message in err and "\n" not in err


def test_input_never_overwritten(tmp_path, capsys):
    """Outputs that would land on an input or on ground truth beside the inputs are refused,
    even with --overwrite (which only lets a run replace its own earlier outputs)."""
    import tifffile

    from cellnest.io import write_labels

    folder = tmp_path / "data"
    folder.mkdir()
    tifffile.imwrite(folder / "a.tif", np.zeros((20, 20), np.uint8))
    write_labels(folder / "a_label.tiff", np.ones((20, 20), np.uint16))  # a.tif's ground truth, beside it
    tifffile.imwrite(folder / "b.tif", np.zeros((20, 20), np.uint8))
    write_labels(folder / "b_label.tiff", np.ones((20, 20), np.uint16))  # given as an input, and b.tif's output name
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    argv = ["-q", "segment", str(folder / "a.tif"), str(folder / "b.tif"), str(folder / "b_label.tiff"), "--out", str(folder),
            "--model", "classical", "--overwrite"]
    assert main(argv) == 1
    printed = "".join(capsys.readouterr())
    assert f"a.tif: refusing to overwrite existing {folder / 'a_label.tiff'} beside the inputs" in printed
    assert f"b.tif: refusing to overwrite input file {folder / 'b_label.tiff'}" in printed
    assert all((folder / name).read_bytes() == data for name, data in before.items())


@pytest.mark.parametrize("argv", [["--help"], ["models"], ["segment", "--help"]])
def test_quick_commands_do_not_import_torch(argv):
    """`cellnest --help` and `cellnest models` answer at once: no torch import (~3 s)."""
    import subprocess
    import sys

    code = ("import sys\nfrom cellnest.cli import main\ntry:\n    main(%r)\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'torch was imported'" % (argv,))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-500:]


def test_any_exception_ends_in_one_line(monkeypatch, capsys):
    """Errors outside ValueError/OSError (here an IndexError deep inside) still give one line, no traceback."""
    import cellnest.cli as cli

    def broken(_args):
        raise IndexError("list index out of range")

    monkeypatch.setattr(cli, "_cmd_models", broken)
    monkeypatch.delenv("CELLNEST_DEBUG", raising=False)
    assert main(["models"]) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines() == ["cellnest: error: IndexError: list index out of range (set CELLNEST_DEBUG=1 for the traceback)"]


@pytest.mark.parametrize("argv, message", [
    (["train", "--recipe", "unet", "--data", "x", "--out", "y", "--steps", "-1"], "--steps: expected 1.., got -1"),
    (["segment", "x", "--out", "y", "--tile", "4"], "--tile: expected 16..8192, got 4"),
    (["ship", "run", "--name", "n", "--val", "v", "--speed-side", "200000"], "--speed-side: expected 64..8192, got 200000"),
    (["tune", "--model", "m", "--data", "d", "--out", "o", "--limit", "-1"], "--limit: expected 1.., got -1"),
])
def test_out_of_range_numbers_are_refused_before_any_work(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
