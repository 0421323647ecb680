"""Package a trained run for users: float16 weights plus a model card with measured figures.

    cellnest ship runs/re-unet --name re-unet --val ../shared/data/mmcells/tuning \\
        --train-data ../shared/data/mmcells/train --command "cellnest train ..."

writes ``NAME.pt`` (the run's ``model.pt``, whose floating-point weights are stored as
float16: half the size, cast back to float32 on load) and ``NAME.md`` (the model card)
into ``--out``, by default the package's ``weights/`` folder, where ``--model NAME`` finds
them. The card's accuracy and speed are measured on the written float16 file, not copied
from the training log: what the card says is what a user gets. Inputs are checked before
anything is written, an existing NAME.pt is replaced only with ``force``, and a failed
measurement leaves no NAME.pt behind.
"""

from __future__ import annotations

import csv
import os
import re
import statistics
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from cellnest.data import load_folder
from cellnest.diameter import training_diameter
from cellnest.sizemodel import with_size_model
from cellnest.evaluate import score_segmenter
from cellnest.hardware import cpu_name
from cellnest.io import atomic_write
from cellnest.metrics import format_table, modality_mean, summarize
from cellnest.predict import PredictorConfig
from cellnest.catalog import WEIGHTS_DIR
from cellnest.modelfile import ModelFile
from cellnest.models import load_segmenter
from cellnest.synthetic import SyntheticSpec, synthetic_cells, to_uint

NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")
SPEED_REPEATS = 3


@dataclass(frozen=True)
class Shipped:
    """What :func:`ship_model` wrote and measured."""

    weights: Path
    card: Path
    summary: dict[str, dict[str, float]]
    seconds_per_image: float
    speed_side: int
    seconds_large: float  # one speed_side x speed_side RGB image end to end


def training_sources(train_dir: str | os.PathLike) -> list[tuple[str, str, str, int]]:
    """``(source, modality, licence, images)`` rows from ``train_dir/manifest.csv``."""
    path = Path(train_dir) / "manifest.csv"
    if not path.is_file():
        raise ValueError(f"{path}: not found (the card lists the training sources and their licences from it)")
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        missing = {"source", "modality", "license"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path}: lacks column(s) {sorted(missing)}")
        rows = list(reader)
    if not rows:
        raise ValueError(f"{path}: lists no images")
    counts = Counter((r.get("source") or "?", r.get("modality") or "?", r.get("license") or "?") for r in rows)
    return [(s, m, lic, n) for (s, m, lic), n in sorted(counts.items())]


def time_one_image(segmenter: Callable[[np.ndarray], np.ndarray], side: int = 1000, repeats: int = SPEED_REPEATS, seed: int = 0) -> float:
    """Median seconds to segment a synthetic ``side`` x ``side`` uint8 RGB image end to end.

    End to end = normalisation, network and post-processing (no file I/O), after one
    warm-up call.
    """
    spec = SyntheticSpec(shape=(side, side), n_cells=max(side * side // 2500, 1))
    image, _ = synthetic_cells(spec, seed)
    image = np.repeat(to_uint(image, np.uint8)[..., None], 3, axis=-1)  # (H, W, 3), as read_image returns
    segmenter(image)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        segmenter(image)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_length(run_dir: Path) -> tuple[int | None, float | None]:
    """Steps and seconds of the whole run, from the last row of ``metrics.csv``."""
    path = run_dir / "metrics.csv"
    if not path.is_file():
        return None, None
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        return None, None
    return int(rows[-1]["step"]), float(rows[-1]["seconds"])


def _size_line(model: ModelFile) -> str:
    """The card's cell-size line: the size a model was trained at and how inference finds it."""
    meta = model.meta
    if meta.get("size_normalised"):
        fit = meta.get("size_model_fit", {})
        how = (f"its size model (ridge on pooled deep features; held-out median |log2 error| "
               f"{fit.get('held_out_median_abs_log2_error', '?')} on training windows)" if model.size_model else "the multi-scale search")
        return (f"- Cell size: trained with every image resized to a median cell diameter of {meta['cell_diameter']:g} px. "
                f"`--diameter auto` (the default) estimates each image's cell size with {how}, checks it on the cells found, "
                "and resizes; `--diameter PIXELS` gives the size, `--diameter native` turns resizing off.")
    if "cell_diameter" in meta:
        return (f"- Typical training cell diameter: {meta['cell_diameter']} px (median of per-image medians); trained at "
                "native scale; `--diameter PIXELS|auto` rescales images to it.")
    return "- Training cell diameter not recorded."


def model_card(
    *,
    name: str,
    model: ModelFile,
    recipe_text: str | None,
    summary: dict[str, dict[str, float]],
    val_dir: Path,
    seconds_per_image: float,
    speed_side: int,
    seconds_large: float,
    sources: list[tuple[str, str, str, int]],
    command: str | None,
    steps_seconds: tuple[int | None, float | None],
    size_bytes: int,
    cpu: str,
    threads: int,
    backend: str,
) -> str:
    """The model card's markdown (pure function of its arguments)."""
    meta, network, post, targets = model.meta, model.network, model.postprocess.to_dict(), model.targets
    params = sum(v.numel() for v in model.state_dict.values() if v.is_floating_point())
    steps, seconds = steps_seconds
    recipe = meta.get("recipe", "?")
    tuned = "postprocess_tuned_f1" in meta
    val_used = meta.get("val_data")
    same_val = val_used is not None and Path(val_used).resolve() == val_dir.resolve()
    modalities = sorted({m for _, m, _, _ in sources}) or sorted(g for g in summary if g != "all")
    lines = [
        f"# Model card: `{name}`",
        "",
        f"A generalist cell instance segmentation model trained by cellnest's own `train` command "
        f"(recipe `{recipe}`). Shipped in `cellnest/weights/`: `cellnest segment IMAGES --out OUT --model {name}`.",
        "",
        "## Network and outputs",
        "",
        f"- `{network.name}` {network.cfg}: {params / 1e6:.2f} M parameters, stored as float16 "
        f"({size_bytes / 2**20:.1f} MiB), run in float32.",
        "- Output: 3 classes per pixel (background, cell interior, cell boundary); instances by "
        f"`{post['method']}` post-processing, "
        + ("method and thresholds tuned on the run's validation images" if tuned else "the recipe's thresholds")
        + f": `{post}`.",
        "- Input: any 2-D grey or RGB image, 8/16-bit or float; each channel rescaled between its "
        f"percentiles {targets.lower_percentile:g} and {targets.upper_percentile:g} "
        f"of non-zero pixels. Sliding window: `{model.predictor.to_dict()}`.",
        _size_line(model),
        "",
        "## Training",
        "",
        f"- Best model at epoch {meta.get('epoch')} (step {meta.get('step')}, {float(meta.get('train_seconds', 0)) / 60:.1f} min); "
        + (f"the run stopped after {steps} steps and {seconds / 60:.1f} min." if steps is not None else "run length not recorded."),
        f"- Hardware: {meta.get('device', '?')} ({meta.get('host', '?')}), torch {meta.get('torch', '?')}.",
        "- Reproduce: " + (f"`{command}`" if command else "(command not recorded)"),
        f"- Validation folder of the run (best epoch{' and post-processing' if tuned else ''} chosen on it): "
        f"`{val_used or 'not recorded'}`" + ("; the accuracy below is measured on the same images, so it is optimistic by that selection." if same_val else "."),
        "",
    ]
    if sources:
        lines += [
            "Training data (images per source; every source keeps its own licence):",
            "",
            "| source | modality | licence | images |",
            "|---|---|---|---|",
            *[f"| {s} | {m} | {lic} | {n} |" for s, m, lic, n in sources],
            "",
        ]
    else:
        lines += ["Training data: not recorded (ship with --train-data).", ""]
    if recipe_text is not None:
        lines += [
            f"<details><summary>Resolved recipe ({recipe}, as saved in the run's recipe.yaml)</summary>",
            "", "```yaml", recipe_text.strip(), "```", "", "</details>", "",
        ]
    else:
        lines += ["The run's recipe.yaml was not found beside the model.", ""]
    lines += [
        "## Accuracy",
        "",
        f"Challenge F1 (IoU >= 0.5, border cells removed) of this float16 file on `{val_dir}` "
        f"({summary['all']['n']} images), measured by `cellnest ship`"
        + (" with `--diameter auto` (the default)" if meta.get("size_normalised") else "") + ":",
        "",
        format_table(summary),
        "",
        f"Mean of the per-modality mean F1s (every modality counts once): {modality_mean(summary):.4f}.",
        "",
        "## Speed",
        "",
        f"- {seconds_per_image:.3f} s per image of that folder (reading and segmentation) and "
        f"{seconds_large:.2f} s for a {speed_side} x {speed_side} RGB image end to end (median of {SPEED_REPEATS}), "
        f"{threads} threads, backend {backend}, on {cpu}.",
        "",
        "## Limits",
        "",
        f"- Trained on 2-D light microscopy ({', '.join(modalities)}); other modalities or cell types may need "
        f"fine-tuning: `cellnest train --recipe {recipe} --init {name} --data YOUR_LABELLED_FOLDER ...`.",
        "- Modalities with few training images score lower; see the per-modality table.",
    ]
    return "\n".join(lines) + "\n"


def ship_model(
    run: str | os.PathLike,
    name: str,
    val: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    train_data: str | os.PathLike | None = None,
    command: str | None = None,
    progress: bool = False,
    speed_side: int = 1000,
    force: bool = False,
    predictor: dict | None = None,
) -> Shipped:
    """Write ``out_dir/name.pt`` (float16) and ``out_dir/name.md`` from a run folder or model file.

    Raises
    ------
    ValueError : bad name, unreadable run or data, or an existing NAME.pt without
        ``force`` (one line naming it).

    ``predictor`` overrides the run's sliding-window settings in the shipped file (e.g. a
    larger tile for speed); the card's figures are measured with them.
    """
    if not NAME_PATTERN.match(name) or name == "classical":
        raise ValueError(f"model name {name!r} must be lower-case letters, digits, '-', '_' or '.', and not 'classical'")
    run, val = Path(run), Path(val)
    out_dir = Path(out_dir) if out_dir is not None else WEIGHTS_DIR
    source = run / "model.pt" if run.is_dir() else run
    target = out_dir / f"{name}.pt"
    found = ModelFile.load(source)
    found.build_network()  # weights that do not fit their network are refused before anything is written
    items = load_folder(val, require_labels=True)
    sources = training_sources(train_data) if train_data is not None else []
    trained_on = load_folder(train_data, require_labels=False) if train_data is not None else []
    diameter = training_diameter([i.label for i in trained_on if i.label is not None])
    if target.exists() and target.resolve() == source.resolve():
        raise ValueError(f"{target}: is the model being shipped; choose another --out or --name")
    if target.exists() and not force:
        raise ValueError(f"{target}: already exists; use --force to replace it")
    recipe_path = source.with_name("recipe.yaml")
    recipe_text = recipe_path.read_text() if recipe_path.is_file() else None

    window = PredictorConfig.from_dict({**found.predictor.to_dict(), **(predictor or {})})
    shipped = replace(found, predictor=window).with_meta(shipped_name=name).half()
    if diameter is not None and not shipped.meta.get("size_normalised"):  # a size-normalised model keeps its training diameter
        shipped = shipped.with_meta(cell_diameter=round(diameter, 2))
    if shipped.meta.get("size_normalised") and not shipped.size_model and trained_on:
        shipped = with_size_model(shipped, trained_on, progress=progress)  # --diameter auto's estimator
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = shipped.save(target)
    try:
        segmenter = load_segmenter(str(weights), device="cpu")
        scores, seconds_per_image = score_segmenter(segmenter, items, progress)
        seconds_large = time_one_image(segmenter, speed_side)
    except BaseException:
        weights.unlink(missing_ok=True)  # no half-shipped model without a card
        raise
    summary = summarize(scores)
    card_text = model_card(
        name=name, model=shipped, recipe_text=recipe_text, summary=summary, val_dir=val,
        seconds_per_image=seconds_per_image, speed_side=speed_side, seconds_large=seconds_large, sources=sources,
        command=command, steps_seconds=run_length(source.parent), size_bytes=weights.stat().st_size,
        cpu=cpu_name(), threads=torch.get_num_threads(), backend=getattr(segmenter.predictor.models[0].net, "backend", "torch"),
    )
    card = atomic_write(out_dir / f"{name}.md", lambda tmp: tmp.write_text(card_text))
    return Shipped(weights, card, summary, seconds_per_image, speed_side, seconds_large)
