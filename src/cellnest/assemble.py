"""From a recipe to the ready parts of a training run, and ``cellnest train`` itself.

:func:`build_trainer` turns a recipe, prepared samples and a run folder into a
:class:`cellnest.train.Trainer`: the network (with its initial weights), loss, optimiser,
scheduler, data loader and its workers, validator, the model file to keep, distributed
setup. :func:`train_from_folders` runs it on a labelled folder, against a validation
folder or on grouped folds. Self-training and comparisons build their runs here too.
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from cellnest.augment import build_augmentation
from cellnest.catalog import model_path
from cellnest.data import Item, Sample, SampleCache
from cellnest.hardware import cpu_name
from cellnest.io import atomic_write
from cellnest.losses import build_loss
from cellnest.modelfile import ModelFile, ModelFileError, NetworkSpec
from cellnest.patches import PatchDataset, ResumableSampler, modality_weights
from cellnest.predict import resolve_device
from cellnest.recipe import Recipe
from cellnest.run import Budget, RunFolder, RunFolderError, State
from cellnest.train import ExtraTerm, LoopSettings, Trainer
from cellnest.validate import Validation, tune_kept_model, validate

log = logging.getLogger(__name__)


def distributed_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment; (0, 1, 0) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))


def training_device(device: str) -> torch.device:
    """The device of this process; under torchrun, joins the process group first (NCCL on
    CUDA, Gloo on the CPU) and takes the local rank's GPU."""
    _, world, local_rank = distributed_env()
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and device != "cpu" else "gloo"
        # Rank 0 validates and tunes alone; the others wait, so allow hours, not NCCL's default.
        dist.init_process_group(backend, timeout=timedelta(hours=3))
    chosen = resolve_device(f"cuda:{local_rank}" if world > 1 and torch.cuda.is_available() and device != "cpu" else device)
    if chosen.type == "cuda":
        torch.cuda.set_device(chosen)
    return chosen


def build_optimizer(recipe: Recipe, params) -> torch.optim.Optimizer:
    o = recipe.optimizer
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov, weight_decay=o.weight_decay)
    return torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)


def build_scheduler(recipe: Recipe, optimizer: torch.optim.Optimizer, epochs: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The recipe's epoch-wise learning-rate schedule over ``epochs``."""
    s = recipe.scheduler
    if s.name == "step":
        factor = lambda epoch: s.gamma ** (epoch // s.step_epochs)  # noqa: E731
    elif s.name == "poly":
        factor = lambda epoch: max(1.0 - epoch / max(epochs, 1), 0.0) ** 0.9  # noqa: E731
    else:
        factor = lambda epoch: 1.0  # noqa: E731
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def loader_workers(num_workers: int | str, device: torch.device, local_processes: int = 1) -> int:
    """DataLoader workers for ``data.num_workers`` ("auto": see :class:`DataConfig`);
    ``local_processes``: training processes sharing this machine's cores."""
    if num_workers != "auto":
        return int(num_workers)
    if device.type != "cuda":
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(0, min(8, cores // local_processes - 1))


def load_samples(items: Sequence[Item], recipe: Recipe, cache: SampleCache, progress: bool) -> list[Sample]:
    """Prepared arrays of every item (at the recipe's cell size), from the content-keyed cache."""
    d = recipe.data
    return [cache.load(item, recipe.targets, d.diameter, d.min_cell_pixels)
            for item in tqdm(items, desc="prepare", unit="img", disable=not progress)]


def training_loader(recipe: Recipe, samples: Sequence[Sample], device: torch.device) -> DataLoader:
    """Patches of ``samples`` in resumable order, this rank's share of every batch.

    One loader for the whole run, its workers kept between epochs: starting them anew each
    epoch cost more than a short epoch takes on a GPU. Its own generator: an iterator
    otherwise draws a seed from the global torch RNG, which a resumed run would then
    consume at a different point (patches themselves use no torch RNG).
    """
    rank, world, _ = distributed_env()
    d = recipe.data
    per_step = d.batch_size * world
    steps_per_epoch = max((d.patches_per_epoch or len(samples)) // per_step, 1)
    dataset = PatchDataset(
        samples, patch_size=d.patch_size, length=steps_per_epoch * per_step, seed=recipe.train.seed,
        foreground_fraction=d.foreground_fraction, augment=build_augmentation(recipe.augment), scale_jitter=d.scale_jitter,
        boundary_width=recipe.targets.boundary_width,
        image_weights=modality_weights([s.modality for s in samples], d.modality_balance),
    )
    # torchrun's LOCAL_WORLD_SIZE: processes on this machine (WORLD_SIZE spans all machines)
    workers = loader_workers(d.num_workers, device, int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    return DataLoader(dataset, batch_size=d.batch_size, sampler=ResumableSampler(dataset.length, rank=rank, world_size=world),
                      num_workers=workers, persistent_workers=workers > 0, drop_last=True,
                      generator=torch.Generator().manual_seed(recipe.train.seed))


def network_spec(recipe: Recipe) -> NetworkSpec:
    return NetworkSpec(recipe.model.name, dict(recipe.model.cfg))


def packager(recipe: Recipe, device: torch.device, provenance: dict):
    """The model file kept of the best model: network, normalisation, window, the recipe's
    post-processing, and what it was trained on and how (``meta``)."""
    def package(model: nn.Module, state: State, result: Validation | None) -> ModelFile:
        meta = {
            "recipe": recipe.name, "epoch": state.epoch, "step": state.step,
            "train_seconds": round(state.seconds, 1), "device": str(device),
            "host": cpu_name(), "torch": str(torch.__version__),
            "validation": result.summary if result else {}, **provenance,
        }
        if recipe.data.diameter is not None:  # trained at one cell size: inference rescales to it
            meta.update(cell_diameter=float(recipe.data.diameter), size_normalised=True)
        return ModelFile.of(model, network_spec(recipe), recipe.targets, recipe.predictor, recipe.postprocess, meta)

    return package


class Heads(nn.Module):
    """Calls ``net.forward_heads``: DDP must wrap the module whose forward is trained."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.net.forward_heads(x)


def build_trainer(recipe: Recipe, train_samples: Sequence[Sample], val_samples: Sequence[Sample], run: RunFolder,
                  budget: Budget = Budget(), device: str = "auto", progress: bool = True,
                  init_weights: dict[str, torch.Tensor] | None = None, extra: ExtraTerm | None = None,
                  provenance: dict | None = None) -> tuple[Trainer, callable]:
    """The trainer of one run, and its ``finish`` (post-processing tuning, report).

    ``init_weights``: a warm start (fine-tuning with ``--init``, self-training students
    from their teacher).
    """
    rank, world, _ = distributed_env()
    chosen = training_device(device)
    budget = budget.for_recipe(recipe.train.epochs)
    torch.manual_seed(recipe.train.seed)  # identical initial weights on every rank
    model = network_spec(recipe).build()
    if init_weights is not None:
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in init_weights.items()})
    model.to(chosen)
    t = recipe.train
    memory_format = torch.channels_last if t.channels_last else torch.contiguous_format
    forward: nn.Module = Heads(model.to(memory_format=memory_format))
    if t.compile:
        forward = torch.compile(forward)
    if world > 1:
        forward = nn.parallel.DistributedDataParallel(forward, device_ids=[chosen.index] if chosen.type == "cuda" else None)
    optimizer = build_optimizer(recipe, model.parameters())
    val_subset = list(val_samples)[: t.val_limit]
    # Validation uses the training memory format: a Predictor converts the model it gets.
    predictor = replace(recipe.predictor, channels_last=t.channels_last)
    validator = (lambda net: validate(net, val_subset, predictor, recipe.postprocess, chosen)) if val_subset else None
    settings = LoopSettings(val_every=t.val_every, checkpoint_steps=t.checkpoint_steps, checkpoint_minutes=t.checkpoint_minutes,
                            grad_clip=t.grad_clip, amp=t.amp, channels_last=t.channels_last, select_by=t.select_by,
                            rank=rank, world=world)
    trainer = Trainer(model, build_loss(recipe.loss.name, **recipe.loss.cfg), optimizer,
                      build_scheduler(recipe, optimizer, budget.epochs), training_loader(recipe, train_samples, chosen),
                      validator, run, extra, budget=budget, package=packager(recipe, chosen, dict(provenance or {})),
                      settings=settings, forward=forward, device=chosen, progress=progress)

    def finish(state: State) -> None:
        note = ""
        if val_subset and t.tune_postprocess and run.model_path.exists():
            note = tune_kept_model(run.model_path, val_subset, predictor, recipe.postprocess, chosen, t.tune_methods, t.select_by)
        run.write_report(recipe, state, budget, note)

    return trainer, finish


def train_from_folders(
    recipe: Recipe,
    data: str | os.PathLike,
    out: str | os.PathLike,
    val: str | os.PathLike | None = None,
    folds: Sequence[int] | None = None,
    budget: Budget = Budget(),
    device: str = "auto",
    resume: bool = False,
    cache: SampleCache | None = None,
    progress: bool = True,
    init: str | None = None,
    plan: dict | None = None,
) -> dict[str, State]:
    """Train on a labelled folder: against a validation folder, or on grouped folds.

    Parameters
    ----------
    data : labelled folder (challenge layout) to train on.
    out : run folder; with ``folds``, one sub-folder ``fold<k>`` per fold plus
        ``folds.md``, the table of fold F1s (each fold's ``model.pt`` is kept for ensembling).
    val : labelled folder to validate on (without ``folds``); None = no validation.
    folds : fold indices of ``recipe.cv.folds`` grouped folds to train (validation = the
        held-out fold; ``val`` is then ignored).
    init : fine-tune: start from this model (shipped name, model file or run folder)
        instead of random weights; its network must be the recipe's.
    plan : the :mod:`cellnest.plan` the recipe's values came from; written to each run
        folder as ``plan.yaml`` and kept in ``model.pt``'s meta.

    Returns
    -------
    ``{run name: final State}``.
    """
    from cellnest.data import grouped_kfold, load_folder

    out = Path(out)
    cache = cache or SampleCache()
    rank = distributed_env()[0]
    init_weights = initial_weights(init, recipe) if init is not None else None
    provenance = {"val_data": str(val) if val is not None and folds is None else None, "init": init}
    if plan is not None:
        provenance["plan"] = {"data": plan["data"], "network": plan.get("network", {})}
    items = load_folder(data, require_labels=True)
    if recipe.data.exclude_sources:
        unknown = sorted(set(recipe.data.exclude_sources) - {i.source for i in items})
        if unknown:
            raise ValueError(f"{data}: no images of source(s) {unknown} to exclude (sources: {sorted({i.source for i in items})})")
        items = [i for i in items if i.source not in recipe.data.exclude_sources]
    splits: dict[str, tuple[list[Item], list[Item]]] = {}
    if folds is not None:
        k = recipe.cv.folds
        bad = [f for f in folds if not 0 <= f < k]
        if bad:
            raise ValueError(f"fold {bad[0]} out of range: the recipe has {k} folds (0..{k - 1})")
        pairs = grouped_kfold(items, k, recipe.cv.seed)
        for f in folds:
            train_idx, val_idx = pairs[f]
            splits[f"fold{f}"] = ([items[i] for i in train_idx], [items[i] for i in val_idx])
    else:
        splits[""] = (items, load_folder(val, require_labels=True) if val is not None else [])
    results = {}
    for name, (train_items, val_items) in splits.items():
        run_dir = out / name if name else out
        if resume and not (run_dir / "checkpoint.pt").exists() and not name:
            raise RunFolderError(f"{run_dir}: nothing to resume (no checkpoint.pt)")
        run = RunFolder.open(run_dir, recipe, resume, writer=rank == 0)
        if plan is not None and rank == 0:
            from cellnest.plan import write_plan

            write_plan(plan, run_dir / "plan.yaml")
        log.info("%s: %d training and %d validation images -> %s", name or "run", len(train_items), len(val_items), run_dir)
        trainer, finish = build_trainer(recipe, load_samples(train_items, recipe, cache, progress),
                                        load_samples(val_items, recipe, cache, progress), run, budget, device, progress,
                                        init_weights=init_weights, provenance=provenance)
        if resume and run.has_checkpoint:
            trainer.resume()
        results[name or "run"] = trainer.fit(finish)
        if recipe.data.diameter is not None and rank == 0:
            add_size_model(run.model_path, train_items, trainer.device, progress)
        if dist.is_initialized():
            dist.barrier()  # the other ranks wait for rank 0's size model before the next fold
    if folds is not None and len(folds) > 1 and rank == 0:
        write_fold_summary(out, results)
    if dist.is_initialized():
        dist.destroy_process_group()
    return results


def add_size_model(path: Path, items: Sequence[Item], device: torch.device, progress: bool) -> None:
    """Fit the size model of a model trained at one cell size on its training images, in
    place (``--diameter auto`` estimates each image's cell size with it); once per file."""
    from cellnest.sizemodel import with_size_model

    model = ModelFile.load(path)
    if not model.size_model:
        with_size_model(model, items, device, progress).save(path)


def initial_weights(model: str, recipe: Recipe) -> dict[str, torch.Tensor]:
    """Weights of a model (shipped name, model file or run folder) to fine-tune with ``recipe``.

    Raises ValueError (one line) when its network is not the one ``recipe`` builds.
    """
    path = model_path(model)
    if path is None:
        raise ValueError("the classical baseline has no weights to fine-tune; give a network model")
    found = ModelFile.load(path)
    trained_with = found.meta.get("recipe", "the recipe it was trained with")
    # Build the recipe's network and load the weights into it: the only test that accepts
    # every equivalent spelling of a config and refuses every mismatch.
    try:
        replace(found, network=network_spec(recipe)).build_network()
    except ModelFileError as err:
        raise ValueError(f"{path}: not the network of recipe {recipe.name} ({err.problem}); fine-tune with --recipe {trained_with}") from None
    return found.state_dict


def write_fold_summary(out: Path, results: dict[str, State]) -> None:
    """``folds.md``: best validation F1 of every fold, with mean and standard deviation."""
    lines = ["| fold | best epoch | best mean F1 |", "|---|---|---|"]
    scores = []
    for name, state in results.items():
        lines.append(f"| {name} | {state.best_epoch} | {state.best_f1:.4f} |")
        scores.append(state.best_f1)
    lines.append(f"| mean +/- sd | | {np.mean(scores):.4f} +/- {np.std(scores):.4f} |")
    atomic_write(out / "folds.md", lambda tmp: tmp.write_text("\n".join(lines) + "\n"))
    log.info("fold summary:\n%s", "\n".join(lines))
