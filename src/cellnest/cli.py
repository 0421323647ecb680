"""``cellnest`` command line: parses arguments and calls one library function per command.

Errors a user can fix (a bad file, a missing folder, an unknown model) print one line
``cellnest: error: ...`` and exit with status 2; a batch where some images failed exits 1.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Sequence

from cellnest import __version__

log = logging.getLogger("cellnest")


def _cmd_segment(args: argparse.Namespace) -> int:
    from cellnest.catalog import DEFAULT_MODEL
    from cellnest.models import load_segmenter
    from cellnest.predict import resolve_device
    from cellnest.segment import Outputs, segment_files

    resolve_device(args.device)  # a bad --device fails before any work, whatever the model
    overrides = {k: v for k, v in (("tile", args.tile), ("overlap", args.overlap), ("tta", args.tta or None)) if v is not None}
    outputs = Outputs(overlay=args.overlay, measure=args.measure, geojson=args.geojson, rois=args.rois)
    if args.cluster or args.scheduler or any(str(i).rstrip("/").lower().endswith(".zarr") for i in args.inputs):
        from cellnest.distributed import SegmenterSpec, cluster_client, segment_inputs

        if outputs != Outputs():
            raise ValueError("--overlay, --measure, --geojson and --rois are written by the single-process path; "
                             "drop them with --cluster/--scheduler or OME-Zarr inputs")
        spec = SegmenterSpec(tuple(args.model or [DEFAULT_MODEL]), args.device, args.backend, tuple(sorted(overrides.items())))
        with cluster_client(args.cluster, args.scheduler) as client:
            results = segment_inputs(args.inputs, args.out, spec, client, args.block,
                                     "auto" if args.diameter is None else args.diameter, args.overwrite, not args.quiet)
    else:  # the model is loaded here, not also before the cluster path (its workers and driver load their own)
        segmenter = load_segmenter(args.model or [DEFAULT_MODEL], device=args.device, predictor=overrides,
                                   diameter=args.diameter, estimator=args.estimator, backend=args.backend)
        results = segment_files(args.inputs, args.out, segmenter, outputs, progress=not args.quiet, overwrite=args.overwrite,
                                max_pixels=args.max_pixels)
    done = [r for r in results if not r.error]
    failed = [r for r in results if r.error]
    seconds = sum(r.seconds for r in done)
    log.info(
        "segmented %d image(s), %d cell(s), %.2f s/image, peak memory %.0f MB -> %s",
        len(done),
        sum(r.cells for r in done),
        seconds / max(len(done), 1),
        peak_memory_mb(),
        Path(args.out) / "summary.csv",
    )
    if failed:
        log.error("%d input(s) failed: %s", len(failed), ", ".join(r.input for r in failed))
    return 1 if failed else 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from cellnest.evaluate import EVALUATION_FILES, evaluate_folders, write_evaluation
    from cellnest.io import refuse_existing
    from cellnest.metrics import format_table

    out = Path(args.out if args.out is not None else args.pred)
    if not args.overwrite:  # before the scoring, not after it
        refuse_existing([out / name for name in EVALUATION_FILES])
    evaluation = evaluate_folders(args.pred, args.gt, args.manifest, args.keep_border_cells, progress=not args.quiet,
                                  max_pixels=args.max_pixels)
    csv_path, json_path = write_evaluation(evaluation, out, overwrite=args.overwrite)
    print(format_table(evaluation.summary))
    if evaluation.missing:
        print(f"missing predictions ({len(evaluation.missing)}, scored F1 = 0): {', '.join(evaluation.missing)}")
    log.info("per-image scores: %s; summary: %s", csv_path, json_path)
    return 0


def _cmd_synth(args: argparse.Namespace) -> int:
    from cellnest.synthetic import write_synthetic_folder

    paths = write_synthetic_folder(args.out, args.count, args.seed)
    log.info("wrote %d synthetic image(s) with labels to %s", len(paths), args.out)
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from cellnest.data import SampleCache
    from cellnest.plan import plan_overrides, read_plan
    from cellnest.recipe import load_recipe
    from cellnest.assemble import train_from_folders
    from cellnest.run import Budget, parse_duration

    plan = read_plan(args.plan) if args.plan else None
    recipe = load_recipe(args.recipe, (plan_overrides(plan) if plan else []) + (args.set or []))
    budget = Budget(args.epochs, args.steps, parse_duration(args.time_budget) if args.time_budget else None)
    folds = None
    if args.folds == "all":
        folds = list(range(recipe.cv.folds))
    elif args.fold is not None:
        folds = [args.fold]
    cache = SampleCache(args.cache) if args.cache else SampleCache()
    results = train_from_folders(
        recipe, args.data, args.out, args.val, folds, budget, args.device, args.resume, cache, not args.quiet, args.init, plan
    )
    for name, state in results.items():
        best = (f"best validation F1 ({recipe.train.select_by}) {state.best_f1:.4f} (epoch {state.best_epoch})"
                if state.best_f1 >= 0 else "no validation")
        log.info("%s: %d epochs, %d steps, %.1f min; %s", name, state.epoch, state.step, state.seconds / 60, best)
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from cellnest.plan import fingerprint, format_plan, make_plan, write_plan

    out = Path(args.out)
    if out.exists() and not args.force:
        raise ValueError(f"{out}: already exists; use --force to replace it or choose another --out")
    plan = make_plan(fingerprint(args.data, progress=not args.quiet), args.device)
    write_plan(plan, out)
    print(format_plan(plan))
    log.info("wrote %s; train with: cellnest train --plan %s ...", out, out)
    return 0


def _cmd_selftrain(args: argparse.Namespace) -> int:
    from cellnest.data import SampleCache
    from cellnest.recipe import load_recipe
    from cellnest.selftrain import self_train
    from cellnest.run import Budget, parse_duration

    overrides = list(args.set or [])
    for key, value in (("method", args.method), ("rounds", args.rounds), ("overlays", args.overlays)):
        if value is not None:
            overrides.append(f"selftrain.{key}={value}")
    recipe = load_recipe(args.recipe, overrides)
    budget = Budget(args.epochs, args.steps, parse_duration(args.time_budget) if args.time_budget else None)
    cache = SampleCache(args.cache) if args.cache else SampleCache()
    rows = self_train(recipe, args.labeled, args.unlabeled, args.out, args.val, args.teacher, budget, args.device,
                      args.resume, cache, not args.quiet, args.control)
    for row in rows:
        log.info("round %s (%s): %s", row["round"], row["arm"], ", ".join(f"{k[3:]} {v:.4f}" for k, v in row.items() if k.startswith("f1_")) or "no validation")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from cellnest.compare import load_comparison, run_comparison

    comparison = load_comparison(args.config)
    rows = run_comparison(comparison, args.data, args.val, args.out, args.model, args.unlabeled, args.device, not args.quiet, args.teacher)
    for row in rows:
        if row["modality"] == "all":
            vs = "" if row["reference"] == row["variant"] else (
                f"; {row['delta']:+.4f} vs {row['reference']} (paired 95% CI {row['delta_low']:+.4f} to {row['delta_high']:+.4f})")
            print(f"{row['variant']}: mean F1 {row['mean_f1']:.4f} +/- {row['sd']:.4f} (95% CI {row['ci_low']:.4f}-{row['ci_high']:.4f}){vs}")
    log.info("table: %s", Path(args.out) / "table.md")
    return 0


def _cmd_tune(args: argparse.Namespace) -> int:
    from cellnest.validate import TUNE_METHODS, retune_model_file

    config, f1, per_method = retune_model_file(args.model, args.data, args.out, args.methods or TUNE_METHODS, args.device, args.limit,
                                               not args.quiet)
    print("| post-processing | best F1 (mean of per-modality means) |\n|---|---|")
    for method, score in per_method.items():
        print(f"| {method} | {score:.4f} |")
    log.info("chose %s (F1, mean of per-modality means, %.4f) -> %s", config.to_dict(), f1, args.out)
    return 0


def _cmd_ship(args: argparse.Namespace) -> int:
    from cellnest.metrics import format_table
    from cellnest.ship import ship_model

    window = {k: v for k, v in (("tile", args.tile), ("overlap", args.overlap)) if v is not None}
    shipped = ship_model(args.run, args.name, args.val, args.out, args.train_data, args.command, not args.quiet,
                         speed_side=args.speed_side, force=args.force, predictor=window)
    print(format_table(shipped.summary))
    log.info("%.3f s/image, %.2f s per %dx%d image -> %s, %s", shipped.seconds_per_image, shipped.seconds_large,
             shipped.speed_side, shipped.speed_side, shipped.weights, shipped.card)
    return 0


def _cmd_export_bioimageio(args: argparse.Namespace) -> int:
    import importlib.util

    if importlib.util.find_spec("bioimageio") is None or importlib.util.find_spec("bioimageio.spec") is None:
        raise ValueError("export-bioimageio needs bioimageio.core: pip install -c constraints.txt -e '.[bioimageio]'")
    from cellnest.bioimageio import export_package

    rdf = export_package(args.model, args.out, overwrite=args.overwrite)
    log.info("wrote the bioimage.io package %s; check it with: bioimageio test %s", rdf.parent, rdf)
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from cellnest.catalog import DEFAULT_MODEL, available_models, shipped_models

    shipped = shipped_models()
    for name in available_models():
        card = shipped[name].with_suffix(".md") if name in shipped else None
        where = f"  model card: {card}" if card is not None and card.is_file() else ""
        print(f"{name}{'  (default)' if name == DEFAULT_MODEL else ''}{where}")
    return 0


def bounded_int(low: int, high: int | None = None):
    """argparse type: an integer in [low, high], else a one-line usage error."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected {low}..{high if high is not None else ''}, got {value}")
        return value

    return parse


def pixel_count(text: str) -> int:
    """argparse type for ``--max-pixels``: ``268435456``, ``2.7e8`` or ``16384x16384``."""
    try:
        sides = [float(part) for part in text.lower().replace("_", "").split("x")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a pixel count such as 268435456, 2.7e8 or 16384x16384, got {text!r}") from None
    value = 1.0
    for side in sides:
        value *= side
    if len(sides) > 2 or not 1 <= value <= 1e13:
        raise argparse.ArgumentTypeError(f"expected a pixel count from 1 to 1e13 (or HxW), got {text!r}")
    return int(value)


def add_max_pixels(parser: argparse.ArgumentParser) -> None:
    from cellnest.io import MAX_PIXELS

    parser.add_argument("--max-pixels", type=pixel_count, default=MAX_PIXELS, metavar="N",
                        help=f"refuse images above N pixels (height x width; also 20000x20000), checked from the file "
                        f"header before decoding (default {MAX_PIXELS}, 16384x16384)")


def peak_memory_mb() -> float:
    """Peak resident memory of this process (MB; Linux and macOS report it differently)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def parse_diameter(text: str) -> float | str:
    """``--diameter``: 'auto', 'native' or a positive number of pixels."""
    if text in ("auto", "native"):
        return text
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected 'auto', 'native' or a number of pixels > 0, got {text!r}")
    return value


def _add_run_options(p: argparse.ArgumentParser, per: str) -> None:
    """Budget, overrides, resume, device and cache options of the training commands."""
    p.add_argument("--epochs", type=bounded_int(1), help=f"stop after this many epochs{per} (default: the recipe's)")
    p.add_argument("--steps", type=bounded_int(1), help=f"stop after this many optimiser steps{per}")
    p.add_argument("--time-budget", help=f"stop after this much wall-clock time{per}, e.g. 30m, 2h, 1h30m")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a recipe value (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint(s)")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--cache", help="sample cache folder (default: $CELLNEST_CACHE or ~/.cache/cellnest)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cellnest", description="Microscopy cell instance segmentation.")
    parser.add_argument("--version", action="version", version=f"cellnest {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars or info messages")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("segment", help="segment images into <name>_label.tiff instance maps")
    p.add_argument("inputs", nargs="+", help="image files, folders or glob patterns")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--model",
        action="append",
        help="model name (see `cellnest models`; default: the one marked there), .pt file or run folder; "
        "repeat to ensemble",
    )
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--tile", type=bounded_int(16, 8192), help="sliding-window tile size in pixels (default: the model's)")
    p.add_argument("--overlap", type=float, help="sliding-window overlap fraction (default: the model's)")
    p.add_argument("--tta", action="store_true", help="flip test-time augmentation (4x slower)")
    p.add_argument("--diameter", type=parse_diameter, help="typical cell diameter in pixels, 'auto' (estimated per "
                   "image) or 'native' (no rescaling); the image is resized to the model's training cell size "
                   "(default: auto for models trained at one cell size, else native)")
    p.add_argument("--estimator", choices=("size_model", "search", "combined"), help="how --diameter auto estimates the "
                   "size (default: the model's size model if it has one, else the multi-scale search)")
    p.add_argument("--backend", choices=("auto", "torch", "onnx", "openvino"), default="auto",
                   help="what runs the network: auto (the fastest installed runtime on CPU, PyTorch on CUDA), torch, "
                   "onnx (ONNX Runtime) or openvino; a missing runtime falls back to PyTorch with a note")
    p.add_argument("--overwrite", action="store_true", help="replace outputs that already exist in --out (never "
                   "allowed in a folder holding ground truth)")
    p.add_argument("--overlay", action="store_true", help="also write <name>_overlay.png with cell outlines")
    p.add_argument("--measure", action="store_true", help="also write <name>_cells.csv with per-cell measurements")
    p.add_argument("--geojson", action="store_true", help="also write <name>_cells.geojson polygons for QuPath")
    p.add_argument("--rois", action="store_true", help="also write <name>_rois.zip, an ImageJ ROI set for Fiji's ROI Manager")
    add_max_pixels(p)
    p.add_argument("--cluster", metavar="local[:N]", help="segment block by block on a dask LocalCluster of N worker "
                   "processes (huge images, OME-Zarr, large folders; docs/distributed.md)")
    p.add_argument("--scheduler", metavar="ADDRESS", help="segment block by block on a running dask scheduler "
                   "(e.g. tcp://10.0.0.1:8786, one started by dask-jobqueue on SLURM)")
    p.add_argument("--block", type=bounded_int(64, 16384), default=2048, help="block side with --cluster/--scheduler "
                   "(pixels; also the output's zarr chunk)")
    p.set_defaults(func=_cmd_segment)

    p = sub.add_parser("evaluate", help="score predictions with the NeurIPS 2022 CellSeg F1")
    p.add_argument("--pred", required=True, help="folder of <name>_label.tiff predictions")
    p.add_argument("--gt", required=True, help="ground-truth folder (with labels/ or the label files)")
    p.add_argument("--manifest", help="CSV with name,modality (default: manifest.csv beside the ground truth)")
    p.add_argument("--out", help="where evaluation.csv/json go (default: the prediction folder)")
    p.add_argument("--keep-border-cells", action="store_true", help="do not drop cells touching the 2-px frame")
    p.add_argument("--overwrite", action="store_true", help="replace evaluation.csv/json if they exist")
    add_max_pixels(p)
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("synth", help="write synthetic images with labels (challenge layout)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--count", type=bounded_int(1), default=None, help="number of images (default: the 4 demo looks)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_synth)

    p = sub.add_parser("train", help="train a network from a recipe on a labelled folder")
    p.add_argument("--recipe", required=True, help="shipped recipe name (attn-unetpp, re-unet, unet, ...) or a YAML file")
    p.add_argument("--data", required=True, help="labelled training folder (challenge layout)")
    p.add_argument("--val", help="labelled validation folder (ignored with --fold/--folds)")
    p.add_argument("--out", required=True, help="run folder (never overwritten; see --resume)")
    p.add_argument("--fold", type=bounded_int(0), help="train one grouped cross-validation fold (0-based)")
    p.add_argument("--folds", choices=["all"], help="train every fold, then write folds.md")
    p.add_argument("--init", help="fine-tune: start from this model (shipped name, .pt or run folder) of the recipe's network")
    p.add_argument("--plan", help="plan.yaml from `cellnest plan`: its cell diameter, patch and batch size (before --set)")
    _add_run_options(p, "")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("plan", help="measure a labelled folder (cell sizes, image sizes, intensities) and write a training plan")
    p.add_argument("data", help="labelled folder (challenge layout)")
    p.add_argument("--out", default="plan.yaml", help="plan file to write (default: plan.yaml; never overwritten without --force)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="size the batch for this device")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.set_defaults(func=_cmd_plan)

    p = sub.add_parser("selftrain", help="learn from unlabelled images: pseudo-label rounds or teacher-student consistency")
    p.add_argument("--recipe", required=True, help="recipe name or YAML file (its selftrain section sets the method)")
    p.add_argument("--labeled", required=True, help="labelled training folder")
    p.add_argument("--unlabeled", required=True, help="folder of unlabelled images")
    p.add_argument("--val", help="labelled validation folder")
    p.add_argument("--out", required=True, help="run folder: round0 (teacher), round1, ... and selftrain.md")
    p.add_argument("--method", choices=["pseudo_label", "consistency"], help="override the recipe's method")
    p.add_argument("--rounds", type=bounded_int(1), help="student rounds after the teacher (default: the recipe's)")
    p.add_argument("--teacher", help="start from this model file instead of training round 0")
    p.add_argument("--overlays", type=int, metavar="N",
                   help="outline overlays of N pseudo-labelled images per round, for a glance (default: the recipe's, 4; 0 = none)")
    p.add_argument("--control", action="store_true",
                   help="also train, each round, a supervised-only twin of the same budget (labelled images alone)")
    _add_run_options(p, " per round")
    p.set_defaults(func=_cmd_selftrain)

    p = sub.add_parser("compare", help="rerun a comparison (variants x seeds, equal budget) and write a table and plot")
    p.add_argument("config", help="shipped comparison (table3, table4, postprocess, selftrain, selftrain-consistency) or a YAML file")
    p.add_argument("--data", help="labelled training folder (train and selftrain comparisons)")
    p.add_argument("--val", required=True, help="labelled folder every variant is scored on")
    p.add_argument("--out", required=True, help="comparison folder (finished runs are reused, interrupted ones resumed)")
    p.add_argument("--model", help="the trained model of a postprocess comparison")
    p.add_argument("--unlabeled", help="unlabelled images of a selftrain comparison")
    p.add_argument("--teacher", help="selftrain comparison: start from this model instead of training round 0")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser("tune", help="choose a model's post-processing method and thresholds on labelled images")
    p.add_argument("--model", required=True, help="model file (.pt) or run folder")
    p.add_argument("--data", required=True, help="labelled folder (challenge layout)")
    p.add_argument("--out", required=True, help="where the re-tuned model file goes (not the input)")
    p.add_argument("--methods", nargs="+", help="methods to try (default: components, closing and watershed)")
    p.add_argument("--limit", type=bounded_int(1), help="use only the first N images")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=_cmd_tune)

    p = sub.add_parser("ship", help="package a run's model as float16 weights with a measured model card")
    p.add_argument("run", help="run folder (or its model.pt)")
    p.add_argument("--name", required=True, help="model name users pass to --model")
    p.add_argument("--val", required=True, help="labelled folder the card's accuracy is measured on")
    p.add_argument("--out", default=None, help="output folder (default: the package's weights folder)")
    p.add_argument("--train-data", help="the training folder, whose manifest.csv lists sources and licences")
    p.add_argument("--command", help="the command that trained the run, quoted in the card")
    p.add_argument("--force", action="store_true", help="replace an existing NAME.pt and NAME.md")
    p.add_argument("--speed-side", type=bounded_int(64, 8192), default=1000, help="side of the synthetic image timed for the card (pixels)")
    p.add_argument("--tile", type=bounded_int(16, 8192), help="store this sliding-window tile (pixels) instead of the run's")
    p.add_argument("--overlap", type=float, help="store this window overlap (0-1) instead of the run's")
    p.set_defaults(func=_cmd_ship)

    p = sub.add_parser("export-bioimageio", help="write a BioImage Model Zoo package of a model (TorchScript, ONNX and "
                       "PyTorch weights, test tensors, cover, model card)")
    p.add_argument("model", help="model name (see `cellnest models`), .pt file or run folder")
    p.add_argument("--out", required=True, help="package folder (rdf.yaml and its files)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.set_defaults(func=_cmd_export_bioimageio)

    p = sub.add_parser("models", help="list the available models")
    p.set_defaults(func=_cmd_models)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    try:
        return args.func(args)
    except (ValueError, OSError) as err:  # user-fixable: bad input, config, path or permission
        print(f"cellnest: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cellnest: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print("cellnest: error: out of memory (a smaller --tile, or an image split into parts, needs less)", file=sys.stderr)
        return 2
    except Exception as err:  # anything else still ends in one line; CELLNEST_DEBUG=1 shows the traceback
        if os.environ.get("CELLNEST_DEBUG"):
            raise
        message = " ".join(str(err).split())[:300] or "no message"
        print(f"cellnest: error: {type(err).__name__}: {message} (set CELLNEST_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1
