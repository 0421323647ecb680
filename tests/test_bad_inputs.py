"""A corpus of bad (and odd but valid) inputs across the commands, made by code.

Each case is run as a user would, through ``cellnest.cli.main``, and its exact outcome is
checked: a non-zero exit with one line naming the file and the problem, or a valid result
with the right cells. No traceback may reach the user in any case.
"""

from __future__ import annotations

import csv
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from cellnest.catalog import model_path
from cellnest.cli import main
from cellnest.io import read_labels, write_labels
from cellnest.recipe import load_recipe
from cellnest.synthetic import SyntheticSpec, synthetic_cells, to_uint, write_synthetic_folder

from conftest import disk


@dataclass
class Outcome:
    """What a case must give: the exit code, text that must appear on one line of the
    output together with ``names`` (the file the message must name), and for a valid
    result the number of cells in each written label file."""

    code: int
    says: str = ""
    names: str = ""
    cells: dict[str, int] = field(default_factory=dict)


@pytest.fixture
def cli(capsys, caplog):
    """Run ``cellnest`` in this process -> (exit code, everything it printed or logged)."""
    def run(argv: list[str]) -> tuple[int, str]:
        caplog.clear()
        try:
            code = main(argv)
        except SystemExit as stop:  # argparse usage errors
            code = stop.code
        out, err = capsys.readouterr()
        return code, out + err + caplog.text

    return run


def check(outcome: Outcome, code: int, printed: str, out: Path | None = None) -> None:
    assert "Traceback" not in printed, printed
    assert code == outcome.code, printed
    if outcome.says:
        lines = [line for line in printed.splitlines() if outcome.says in line and outcome.names in line]
        assert lines, f"no line with {outcome.says!r} and {outcome.names!r} in:\n{printed}"
    for name, cells in outcome.cells.items():
        labels = read_labels(out / f"{name}_label.tiff")
        assert len(np.unique(labels[labels > 0])) == cells, name


# -- segment -------------------------------------------------------------------------------

def disks_image(shape=(96, 96), value=255) -> tuple[np.ndarray, int]:
    """A 0/``value`` image of six well-separated disks, and their count."""
    image = np.zeros(shape, np.uint8)
    for i, centre in enumerate([(20, 20), (20, 60), (50, 35), (75, 20), (75, 65), (48, 80)]):
        image[disk(shape, centre, 8)] = value
    return image, 6


def png_header(width: int, height: int) -> bytes:
    """A PNG declaring ``width x height`` grey pixels, with almost no data after its header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def declared_tiff(path: Path, side: int) -> Path:
    """A zlib TIFF of ``side x side`` zeros written tile by tile (small on disk and in memory)."""
    tile = np.zeros((1024, 1024), np.uint8)
    count = (-(-side // 1024)) ** 2
    tifffile.imwrite(path, data=(tile for _ in range(count)), shape=(side, side), dtype=np.uint8, tile=(1024, 1024),
                     compression="zlib")
    return path


def _file(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _tif(array):
    return lambda p: tifffile.imwrite(p, array)


def _bytes(data: bytes):
    return lambda p: p.write_bytes(data)


def _pillow(array: np.ndarray, mode: str, **save):
    return lambda p: Image.fromarray(array).convert(mode).save(p, **save)


def _symlink_loop(p: Path) -> None:
    p.symlink_to(p.with_name("loop_b.tif"))
    p.with_name("loop_b.tif").symlink_to(p)


blobs, n_blobs = disks_image()
cells_grey = to_uint(synthetic_cells(SyntheticSpec(shape=(96, 96), n_cells=6, radius=(8, 10), min_gap=4.0), seed=3)[0])

# name -> (file name, how to write it, outcome). Each is segmented with the classical model.
SEGMENT_FILES: dict[str, tuple[str, Callable[[Path], None], Outcome]] = {
    "not a tiff": ("broken.tif", _bytes(b"II*\0 not really"), Outcome(1, "corrupt or not an image", "broken.tif")),
    "empty png": ("empty.png", _bytes(b""), Outcome(1, "file is empty (0 bytes)", "empty.png")),
    "text named jpg": ("notes.jpg", _bytes(b"hello"), Outcome(1, "corrupt or not an image", "notes.jpg")),
    "truncated png": ("cut.png", _bytes(png_header(64, 64)), Outcome(1, "corrupt or not an image", "cut.png")),
    "4-D array": ("hyper.tif", _tif(np.zeros((2, 3, 16, 16), np.uint8)), Outcome(1, "expected a 2-D image", "hyper.tif")),
    "z-stack": ("stack.tif", _tif(np.zeros((9, 32, 32), np.uint16)), Outcome(1, "looks like a 3-D or time stack", "stack.tif")),
    "NaN pixels": ("nan.tif", _tif(np.full((16, 16), np.nan, np.float32)), Outcome(1, "contains NaN or infinite", "nan.tif")),
    "infinite pixels": ("inf.tif", _tif(np.full((16, 16), np.inf, np.float32)), Outcome(1, "contains NaN or infinite", "inf.tif")),
    "complex pixels": ("complex.tif", _tif(np.zeros((16, 16), np.complex64)), Outcome(1, "unsupported pixel type", "complex.tif")),
    "one pixel": ("dot.tif", _tif(np.zeros((1, 1), np.uint8)), Outcome(1, "too small to segment", "dot.tif")),
    "one row": ("row.png", _pillow(np.zeros((1, 40), np.uint8), "L"), Outcome(1, "too small to segment", "row.png")),
    "gif": ("anim.gif", _bytes(b"GIF89a"), Outcome(1, "unsupported file type '.gif'", "anim.gif")),
    "folder named .tif": ("folder.tif", lambda p: p.mkdir(), Outcome(1, "folder holds no image files", "folder.tif")),
    "symlink loop": ("loop_a.tif", _symlink_loop, Outcome(1, "symlink loop", "loop_a.tif")),
    "dangling link": ("gone.tif", lambda p: p.symlink_to(p.with_name("nowhere.tif")), Outcome(1, "cannot resolve", "gone.tif")),
    # A decompression bomb by Pillow's own rule (over 179 MP) is our size check's to refuse,
    # not a "corrupt" file; the header is all that is read.
    "png header of 13500^2": ("bomb.png", _bytes(png_header(13500, 13500)), Outcome(1, "above the limit of 100 MP", "bomb.png")),
    "tiff header of 40000^2": ("huge.tif", lambda p: declared_tiff(p, 40000), Outcome(1, "40000 x 40000 (1600 MP) is above", "huge.tif")),
    # Odd but valid: these must give the right cells.
    "all zeros": ("zeros.tif", _tif(np.zeros((64, 64), np.uint16)), Outcome(0, cells={"zeros": 0})),
    "constant": ("flat.png", _pillow(np.full((64, 64), 77, np.uint8), "L"), Outcome(0, cells={"flat": 0})),
    "boolean constant": ("true.tif", _tif(np.ones((64, 64), bool)), Outcome(0, cells={"true": 0})),
    "binary 0/255": ("mask.png", _pillow(blobs, "L"), Outcome(0, cells={"mask": n_blobs})),
    "boolean mask": ("bool.tif", _tif(blobs > 0), Outcome(0, cells={"bool": n_blobs})),
    "grey + alpha": ("alpha.png", lambda p: Image.fromarray(np.dstack([blobs, np.full_like(blobs, 255)]), "LA").save(p),
                     Outcome(0, cells={"alpha": n_blobs})),
    "palette": ("palette.png", _pillow(blobs, "P"), Outcome(0, cells={"palette": n_blobs})),
    "CMYK jpeg": ("cmyk.jpg", _pillow(np.dstack([blobs] * 3), "CMYK", quality=100), Outcome(0, cells={"cmyk": n_blobs})),
    "channel-first RGB": ("planes.tif", _tif(np.stack([blobs] * 3)), Outcome(0, cells={"planes": n_blobs})),
    "LZW tiff": ("lzw.tif", lambda p: tifffile.imwrite(p, blobs, compression="lzw"), Outcome(0, cells={"lzw": n_blobs})),
    "16-bit dim": ("dim.tif", _tif((blobs.astype(np.uint16) * 3)), Outcome(0, cells={"dim": n_blobs})),
    "negative floats": ("neg.tif", _tif(blobs.astype(np.float32) - 1000), Outcome(0, cells={"neg": n_blobs})),
}


@pytest.mark.parametrize("case", SEGMENT_FILES, ids=list(SEGMENT_FILES))
def test_segment_file_corpus(case, tmp_path, cli):
    name, write, outcome = SEGMENT_FILES[case]
    inputs = tmp_path / "in"
    inputs.mkdir()
    write(inputs / name)
    out = tmp_path / "out"
    code, printed = cli(["-q", "segment", str(inputs / name), "--out", str(out), "--model", "classical",
                         "--max-pixels", "100000000"])
    check(outcome, code, printed, out)
    with open(out / "summary.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 1 and bool(rows[0]["error"]) == (outcome.code != 0)
    assert rows[0]["model"] == ("classical" if outcome.code == 0 else rows[0]["model"])


def test_a_two_pixel_image_with_the_smallest_tile(tmp_path, cli):
    """Once failed inside torch ("Expected more than 1 spatial element"): the default
    network on a 2 x 2 image with 16-px windows gives a valid, empty result."""
    tifffile.imwrite(tmp_path / "tiny.tif", np.array([[0, 255], [255, 0]], np.uint8))
    code, printed = cli(["-q", "segment", str(tmp_path / "tiny.tif"), "--out", str(tmp_path / "out"), "--tile", "16",
                         "--backend", "torch"])
    check(Outcome(0, cells={"tiny": 0}), code, printed, tmp_path / "out")


def _good_image(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(folder / "cells.tif", cells_grey)
    return folder / "cells.tif"


def _poisoned_model(folder: Path) -> Path:
    """A model file whose pickle would run code if it were unpickled."""
    marker = folder / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    torch.save({"format": "cellnest-model", "state_dict": Payload()}, folder / "evil.pt")
    return folder / "evil.pt"


def _oversized_model(folder: Path) -> Path:
    bundle = torch.load(model_path("re-unet"), map_location="cpu", weights_only=True)
    bundle["network"]["cfg"].update(base_filters=4096, max_filters=4096)
    torch.save(bundle, folder / "wide.pt")
    return folder / "wide.pt"


# name -> (extra arguments given the tmp folder, outcome). The input is one good image.
SEGMENT_OPTIONS: dict[str, tuple[Callable[[Path], list[str]], Outcome]] = {
    "empty .pt": (lambda t: ["--model", str(_file(t / "zero.pt", b""))], Outcome(2, "not a readable model file", "zero.pt")),
    "text .pt": (lambda t: ["--model", str(_file(t / "text.pt", b"weights"))], Outcome(2, "not a readable model file", "text.pt")),
    "code in a .pt": (lambda t: ["--model", str(_poisoned_model(t))], Outcome(2, "not a readable model file", "evil.pt")),
    "4096-filter model": (lambda t: ["--model", str(_oversized_model(t))], Outcome(2, "do not fit the network it declares", "wide.pt")),
    "unknown model": (lambda t: ["--model", "nonesuch"], Outcome(2, "unknown model", "nonesuch")),
    "device mps": (lambda t: ["--model", "classical", "--device", "mps"], Outcome(2, "is not supported", "mps")),
    "tile 8": (lambda t: ["--model", "classical", "--tile", "8"], Outcome(2, "expected 16..8192", "--tile")),
    "max-pixels 0": (lambda t: ["--model", "classical", "--max-pixels", "0"], Outcome(2, "expected a pixel count", "--max-pixels")),
    "negative diameter": (lambda t: ["--model", "classical", "--diameter", "-3"], Outcome(2, "a number of pixels > 0, got '-3'", "--diameter")),
    "infinite diameter": (lambda t: ["--model", "classical", "--diameter", "inf"], Outcome(2, "a number of pixels > 0, got 'inf'", "--diameter")),
    "image above --max-pixels": (lambda t: ["--model", "classical", "--max-pixels", "64x64"], Outcome(1, "above the limit", "cells.tif")),
}


@pytest.mark.parametrize("case", SEGMENT_OPTIONS, ids=list(SEGMENT_OPTIONS))
def test_segment_option_corpus(case, tmp_path, cli):
    extra, outcome = SEGMENT_OPTIONS[case]
    image = _good_image(tmp_path / "in")
    code, printed = cli(["-q", "segment", str(image), "--out", str(tmp_path / "out"), *extra(tmp_path)])
    check(outcome, code, printed)
    assert not (tmp_path / "pwned").exists()  # no code from a model file ever runs


def test_segment_refuses_a_folder_another_run_is_writing(tmp_path, cli):
    import fcntl

    image = _good_image(tmp_path / "in")
    out = tmp_path / "out"
    out.mkdir()
    with open(out / ".cellnest.lock", "a+") as held:  # as a running `cellnest segment` holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("pid 4242")
        held.flush()
        code, printed = cli(["-q", "segment", str(image), "--out", str(out), "--model", "classical", "--overwrite"])
    check(Outcome(2, "another cellnest run (pid 4242) is writing here", str(out)), code, printed)
    assert not list(out.glob("*_label.tiff")) and not (out / "summary.csv").exists()
    # Once that run has ended, the folder is free again.
    assert cli(["-q", "segment", str(image), "--out", str(out), "--model", "classical"])[0] == 0
    with open(out / "summary.csv") as fh:
        assert [r["model"] for r in csv.DictReader(fh)] == ["classical"]


# -- evaluate ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("labelled")
    write_synthetic_folder(root, count=2, seed=7)
    return root


def _prediction_copy(labelled: Path, folder: Path, change: Callable[[Path], None] | None = None) -> Path:
    folder.mkdir()
    for path in sorted((labelled / "labels").iterdir()):
        write_labels(folder / path.name, read_labels(path))
    if change is not None:
        change(folder)
    return folder


def _first_label(folder: Path) -> Path:
    return sorted(folder.glob("*_label.tiff"))[0]


def _truth_with(labelled: Path, folder: Path, array: np.ndarray) -> Path:
    (folder / "labels").mkdir(parents=True)
    name = _first_label(labelled / "labels").name
    tifffile.imwrite(folder / "labels" / name, array)
    return folder


def _manifest(folder: Path, text: str, encoding: str = "utf-8") -> Path:
    path = folder / "manifest.csv"
    path.write_text(text, encoding=encoding)
    return path


# name -> (argv after "evaluate" given (labelled, tmp), outcome)
EVALUATE: dict[str, tuple[Callable[[Path, Path], list[str]], Outcome]] = {
    "no prediction folder": (lambda d, t: ["--pred", str(t / "absent"), "--gt", str(d)], Outcome(2, "prediction folder not found", "absent")),
    "no ground truth": (lambda d, t: ["--pred", str(_prediction_copy(d, t / "p")), "--gt", str(t / "void")], Outcome(2, "ground-truth folder not found", "void")),
    "shapes differ": (lambda d, t: ["--pred", str(_prediction_copy(d, t / "p", lambda f: write_labels(_first_label(f), np.zeros((5, 5), np.uint16)))),
                                    "--gt", str(d)], Outcome(2, "differs from ground truth", "_label.tiff")),
    "corrupt prediction": (lambda d, t: ["--pred", str(_prediction_copy(d, t / "p", lambda f: _first_label(f).write_bytes(b"junk"))),
                                         "--gt", str(d)], Outcome(2, "corrupt or not an image", "_label.tiff")),
    "negative truth": (lambda d, t: ["--pred", str(_prediction_copy(d, t / "p")), "--gt",
                                     str(_truth_with(d, t / "gt", np.full((8, 8), -1, np.int16)))], Outcome(2, "negative values", "_label.tiff")),
    "fractional truth": (lambda d, t: ["--pred", str(_prediction_copy(d, t / "p")), "--gt",
                                       str(_truth_with(d, t / "gt", np.full((8, 8), 0.5, np.float32)))], Outcome(2, "non-integer values", "_label.tiff")),
    "manifest missing": (lambda d, t: ["--pred", str(_prediction_copy(d, t / "p")), "--gt", str(d), "--manifest", str(t / "m.csv")],
                         Outcome(2, "manifest not found", "m.csv")),
    "manifest without columns": (lambda d, t: ["--pred", str(_prediction_copy(d, t / "p")), "--gt", str(d), "--manifest",
                                               str(_manifest(t, "file;kind\nx;y\n"))], Outcome(2, "modality", "manifest.csv")),
    "evaluation.csv exists": (lambda d, t: ["--pred", str(_prediction_copy(d, t / "p", lambda f: (f / "evaluation.csv").write_text("mine"))),
                                            "--gt", str(d)], Outcome(2, "exists; cellnest never replaces", "evaluation.csv")),
    "max-pixels below the labels": (lambda d, t: ["--pred", str(_prediction_copy(d, t / "p")), "--gt", str(d), "--max-pixels", "100"],
                                    Outcome(2, "above the limit", "_label.tiff")),
}


@pytest.mark.parametrize("case", EVALUATE, ids=list(EVALUATE))
def test_evaluate_corpus(case, labelled, tmp_path, cli):
    argv, outcome = EVALUATE[case]
    code, printed = cli(["-q", "evaluate", *argv(labelled, tmp_path)])
    check(outcome, code, printed)
    if case == "evaluation.csv exists":
        assert (tmp_path / "p" / "evaluation.csv").read_text() == "mine"


def test_evaluate_reads_an_excel_manifest(labelled, tmp_path, cli):
    names = [p.name.removesuffix("_label.tiff") for p in sorted((labelled / "labels").iterdir())]
    manifest = _manifest(tmp_path, "name,modality\n" + "".join(f"{n},phase-contrast\n" for n in names), "utf-8-sig")
    pred = _prediction_copy(labelled, tmp_path / "p")
    code, printed = cli(["-q", "evaluate", "--pred", str(pred), "--gt", str(labelled), "--manifest", str(manifest)])
    assert code == 0 and "| phase-contrast | 2 |" in printed and "unknown" not in printed


# -- train ---------------------------------------------------------------------------------

TINY = ["--set", "model.name=unet", "--set", "model.cfg={channels: [8, 16], strides: [2], num_res_units: 1}",
        "--set", "data.patch_size=32", "--set", "data.batch_size=2", "--set", "data.patches_per_epoch=4",
        "--set", "train.tune_postprocess=false", "--set", "train.checkpoint_minutes=100"]


def _recipe(folder: Path, text: str) -> Path:
    path = folder / "recipe.yaml"
    path.write_text(text)
    return path


def _laughs(folder: Path) -> Path:
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    return _recipe(folder, "name: laughs\nsource:\n" + "".join(f"  {line}\n" for line in lines))


def _run_with_checkpoint(folder: Path, content: bytes | dict) -> Path:
    """A run folder with the TINY recipe and a given checkpoint.pt."""
    args = [a for a in TINY if a != "--set"]
    out = folder / "run"
    out.mkdir()
    (out / "recipe.yaml").write_text(load_recipe("unet", args).to_yaml())
    if isinstance(content, bytes):
        (out / "checkpoint.pt").write_bytes(content)
    else:
        torch.save(content, out / "checkpoint.pt")
    return out


# name -> (argv after the data and out given tmp, outcome); --recipe unet unless given.
TRAIN: dict[str, tuple[Callable[[Path], list[str]], Outcome]] = {
    "billion laughs": (lambda t: ["--recipe", str(_laughs(t))], Outcome(2, "expands to more than 100000 values", "recipe.yaml")),
    "2 MB recipe": (lambda t: ["--recipe", str(_recipe(t, "#" * 2_000_000))], Outcome(2, "above the 1048576", "recipe.yaml")),
    "python tag": (lambda t: ["--recipe", str(_recipe(t, "name: !!python/object/apply:os.system ['touch pwned']\n"))],
                   Outcome(2, "invalid YAML", "recipe.yaml")),
    "unclosed --set": (lambda t: ["--set", "a.b=[1,2"], Outcome(2, "invalid YAML", "--set 'a.b=[1,2'")),
    "lr 1e999": (lambda t: ["--set", "optimizer.lr=1e999"], Outcome(2, "lr must be a finite number, got inf", "optimizer")),
    "sigma nan": (lambda t: ["--set", "targets.sigma=.nan"], Outcome(2, "sigma must be a finite number, got nan", "targets")),
    "unknown key": (lambda t: ["--set", "optimizer.momentun=0.9"], Outcome(2, "unknown key(s) ['momentun']", "optimizer")),
    "steps -1": (lambda t: ["--steps", "-1"], Outcome(2, "expected 1..", "--steps")),
    "no data folder": (lambda t: ["--data", str(t / "nodata")], Outcome(2, "", "nodata")),
    "empty checkpoint": (lambda t: ["--out", str(_run_with_checkpoint(t, b"")), "--resume"], Outcome(2, "cannot resume", "checkpoint.pt")),
    "foreign checkpoint": (lambda t: ["--out", str(_run_with_checkpoint(t, {"weights": torch.zeros(3)})), "--resume"],
                           Outcome(2, "cannot resume", "checkpoint.pt")),
    "run folder in use": (lambda t: ["--out", str(_run_with_checkpoint(t, b""))], Outcome(2, "already holds a run", "run")),
}


@pytest.mark.parametrize("case", TRAIN, ids=list(TRAIN))
def test_train_corpus(case, labelled, tmp_path, cli, monkeypatch):
    monkeypatch.setenv("CELLNEST_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)  # where a "touch pwned" would land
    extra, outcome = TRAIN[case]
    given = extra(tmp_path)
    argv = ["-q", "train", "--recipe", "unet", "--data", str(labelled), "--out", str(tmp_path / "fresh"), "--device", "cpu",
            *TINY, "--steps", "2"]
    for flag in ("--recipe", "--data", "--out"):  # a case's own value replaces the default
        if flag in given:
            index = argv.index(flag)
            del argv[index:index + 2]
    code, printed = cli(argv + given)
    check(outcome, code, printed)
    assert not (tmp_path / "pwned").exists()


def test_a_diverging_run_says_so_and_does_not_block_a_rerun(labelled, tmp_path, cli, monkeypatch):
    monkeypatch.setenv("CELLNEST_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    argv = ["-q", "train", "--recipe", "unet", "--data", str(labelled), "--out", str(out), "--device", "cpu", *TINY, "--steps", "6"]
    code, printed = cli(argv + ["--set", "optimizer.lr=1e30"])
    check(Outcome(2, "the loss became nan", str(out)), code, printed)
    assert "lower optimizer.lr" in printed
    assert cli(argv + ["--set", "optimizer.lr=1e-3"])[0] == 0  # same --out, a sane rate


# -- tune and ship -------------------------------------------------------------------------

# name -> (argv given (labelled, tmp), outcome)
TUNE_SHIP: dict[str, tuple[Callable[[Path, Path], list[str]], Outcome]] = {
    "tune: no model": (lambda d, t: ["tune", "--model", str(t / "none.pt"), "--data", str(d), "--out", str(t / "o.pt")],
                       Outcome(2, "model file not found", "none.pt")),
    "tune: code in model": (lambda d, t: ["tune", "--model", str(_poisoned_model(t)), "--data", str(d), "--out", str(t / "o.pt")],
                            Outcome(2, "not a readable model file", "evil.pt")),
    "tune: limit -1": (lambda d, t: ["tune", "--model", "x.pt", "--data", str(d), "--out", "o.pt", "--limit", "-1"],
                       Outcome(2, "expected 1..", "--limit")),
    "tune: unlabelled data": (lambda d, t: ["tune", "--model", str(model_path("re-unet")), "--data", str(d / "images"),
                                            "--out", str(t / "o.pt")], Outcome(2, "", "images")),
    "ship: no model in run": (lambda d, t: ["ship", str(t), "--name", "x", "--val", str(d), "--out", str(t / "pkg")],
                              Outcome(2, "model file not found", "model.pt")),
    "ship: speed side 200000": (lambda d, t: ["ship", str(t), "--name", "x", "--val", str(d), "--speed-side", "200000"],
                                Outcome(2, "expected 64..8192", "--speed-side")),
    "ship: code in model": (lambda d, t: ["ship", str(_poisoned_model(t)), "--name", "x", "--val", str(d), "--out", str(t / "pkg")],
                            Outcome(2, "not a readable model file", "evil.pt")),
    "ship: 4096-filter model": (lambda d, t: ["ship", str(_oversized_model(t)), "--name", "x", "--val", str(d), "--out", str(t / "pkg")],
                                Outcome(2, "do not fit the network it declares", "wide.pt")),
}


@pytest.mark.parametrize("case", TUNE_SHIP, ids=list(TUNE_SHIP))
def test_tune_and_ship_corpus(case, labelled, tmp_path, cli):
    argv, outcome = TUNE_SHIP[case]
    code, printed = cli(["-q", *argv(labelled, tmp_path)])
    check(outcome, code, printed)
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "o.pt").exists()
