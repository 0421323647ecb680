"""Train a network from a recipe: budgets, validation by F1, exact resume, logs, DDP.

A run folder holds::

    recipe.yaml     the resolved recipe (after --set overrides)
    checkpoint.pt   the latest resumable state (atomic; every few minutes)
    model.pt        the best model by validation mean F1 (a model file, see cellnest.models)
    val_scores.csv  that model's per-image validation scores (recipe post-processing)
    metrics.csv     one row per validation: epoch, step, loss, lr, seconds, F1 per modality
    curves.png      loss and validation F1 against epochs
    report.md       what was trained, how long, and how well

Exact resume: a training patch is a pure function of (seed, global patch index)
(:mod:`cellnest.patches`), and the checkpoint stores the model, optimiser, scheduler,
gradient scaler, torch RNG state (dropout) and the position inside the epoch; a resumed
run therefore continues with the very batches an uninterrupted run would have seen. The
data pipeline uses no global numpy or Python RNG, so those are not stored.

Multi-GPU: ``torchrun --nproc-per-node N -m cellnest train ...`` runs one process per
device under DistributedDataParallel (NCCL on CUDA, Gloo on CPU); ranks draw disjoint
patches, and only rank 0 validates and writes.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import re
import time
from datetime import timedelta
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from cellnest.augment import build_augmentation
from cellnest.data import Item, Sample, SampleCache
from cellnest.evaluate import write_scores_csv
from cellnest.hardware import cpu_name
from cellnest.io import atomic_write, first_line
from cellnest.losses import build_loss
from cellnest.catalog import model_path
from cellnest.models import ModelFileError, build_network, read_model_file, save_model
from cellnest.nets import build_model
from cellnest.patches import PatchDataset, ResumableSampler, modality_weights
from cellnest.predict import resolve_device
from cellnest.recipe import Recipe, RecipeError, read_yaml
from cellnest.validate import Validation, summary_line, tune_thresholds, validate

log = logging.getLogger(__name__)

RUN_FILES = ("recipe.yaml", "checkpoint.pt", "model.pt", "metrics.csv", "val_scores.csv")


class TrainingDiverged(ValueError):
    """The training loss became NaN or infinite."""


class RunFolderError(ValueError):
    """The run folder exists and would be overwritten, or cannot be resumed."""


@dataclass(frozen=True)
class Budget:
    """When to stop; the first limit reached wins (None = no limit; epochs from the recipe)."""

    epochs: int | None = None
    steps: int | None = None
    seconds: float | None = None

    def spent(self, state: "State", recipe_epochs: int) -> bool:
        """Whether a run in ``state`` has nothing left to train under this budget."""
        epochs = self.epochs if self.epochs is not None else recipe_epochs
        return (state.epoch >= epochs or (self.steps is not None and state.step >= self.steps)
                or (self.seconds is not None and state.seconds >= self.seconds))


def parse_duration(text: str) -> float:
    """``"90s"``, ``"30m"``, ``"2h"``, ``"1h30m"`` or plain seconds -> seconds."""
    text = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    parts = re.findall(r"(\d+(?:\.\d+)?)([hms])", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"cannot read duration {text!r} (examples: 90s, 30m, 2h, 1h30m)")
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts)


class Heads(nn.Module):
    """Calls ``net.forward_heads``: DDP must wrap the module whose forward is trained."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.net.forward_heads(x)


class ExtraTerm(Protocol):
    """An extra loss on extra inputs, added to the supervised loss at every step.

    The trainer concatenates ``inputs()`` to the labelled batch so that one forward pass
    serves both (DDP allows one per step), hands the extra part of the main head's logits
    to ``loss()``, and calls ``after_step()`` after the optimiser step. Its state goes into
    checkpoints. Used by the teacher-student consistency term (:mod:`cellnest.selftrain`).
    """

    def setup(self, student: nn.Module, device: torch.device) -> None: ...
    def inputs(self, step: int, device: torch.device) -> tuple[torch.Tensor, object]: ...
    def loss(self, logits: torch.Tensor, context: object) -> torch.Tensor: ...
    def after_step(self, student: nn.Module) -> None: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class State:
    """Where a run is; saved in every checkpoint."""

    epoch: int = 0
    batch_in_epoch: int = 0
    step: int = 0
    seconds: float = 0.0
    best_f1: float = -1.0
    best_epoch: int = -1
    finished: bool = False  # reached its budget and wrote its report
    validated_step: int = -1  # step of the last validation, on every rank (history is rank 0's)
    history: list[dict] = field(default_factory=list)


def _lr_factor(recipe: Recipe, total_epochs: int):
    s = recipe.scheduler
    if s.name == "step":
        return lambda epoch: s.gamma ** (epoch // s.step_epochs)
    if s.name == "poly":
        return lambda epoch: max(1.0 - epoch / max(total_epochs, 1), 0.0) ** 0.9
    return lambda epoch: 1.0


def build_optimizer(recipe: Recipe, params) -> torch.optim.Optimizer:
    o = recipe.optimizer
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov, weight_decay=o.weight_decay)
    return torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)


def distributed_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment; (0, 1, 0) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))


def prepare_run_folder(out: Path, resume: bool) -> None:
    """Refuse to overwrite an earlier run unless resuming it."""
    existing = [f for f in RUN_FILES if (out / f).exists()]
    if existing and not resume:
        raise RunFolderError(f"{out}: already holds a run ({', '.join(existing)}); use --resume or another --out")
    out.mkdir(parents=True, exist_ok=True)


def check_same_recipe(out: Path, recipe: Recipe) -> None:
    """Refuse to continue or reuse the run in ``out`` with another recipe than its own."""
    saved_path = out / "recipe.yaml"
    if not saved_path.exists():
        return
    try:
        saved = Recipe.from_dict(read_yaml(saved_path), str(saved_path))
    except RecipeError as err:
        raise RunFolderError(f"{saved_path}: cannot resume ({first_line(err)})") from None
    changed = recipe.differences(saved)
    if changed:
        raise RunFolderError(f"{out}: the recipe differs from the run's recipe.yaml in {changed}; resume with the same recipe and --set values")


def finished_state(out: Path, budget: Budget, recipe: Recipe) -> State | None:
    """The state of a run of ``recipe`` in ``out`` that finished and has nothing left under
    ``budget`` (so it can be reused without loading its data), else None."""
    path = out / "checkpoint.pt"
    if not ((out / "model.pt").exists() and path.exists()):
        return None
    check_same_recipe(out, recipe)
    try:
        state = State(**torch.load(path, map_location="cpu", weights_only=True)["state"])
    except (OSError, RuntimeError, KeyError, TypeError, ValueError) as err:
        raise RunFolderError(f"{path}: cannot read ({first_line(err)})") from None
    return state if state.finished and budget.spent(state, recipe.train.epochs) else None


def discard_unstarted_run(out: Path) -> None:
    """Remove the files of a run stopped before its first checkpoint: nothing in it can be
    resumed. Only for run folders a tool manages itself (comparisons, self-training rounds)."""
    if not (out / "checkpoint.pt").exists():
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)


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


class Trainer:
    """One training run of one model on one split (a fold, or train vs validation folder).

    It receives ready samples and a recipe, builds model, loss, optimiser and data, and
    runs until the budget is spent. See the module docstring for the run folder.
    """

    def __init__(
        self,
        recipe: Recipe,
        train_samples: Sequence[Sample],
        val_samples: Sequence[Sample],
        out: str | os.PathLike,
        budget: Budget = Budget(),
        device: str = "auto",
        progress: bool = True,
        init_weights: dict[str, torch.Tensor] | None = None,
        extra: "ExtraTerm | None" = None,
        provenance: dict | None = None,
    ):
        self.recipe, self.out, self.budget, self.progress = recipe, Path(out), budget, progress
        self.extra = extra
        self.provenance = dict(provenance or {})  # e.g. validation folder, fine-tuning start; kept in model.pt
        self.train_samples = list(train_samples)
        self.val_subset = list(val_samples)[: recipe.train.val_limit]
        # Validation uses the training memory format: a Predictor converts the model it gets.
        self.predictor_config = replace(recipe.predictor, channels_last=recipe.train.channels_last)
        self.rank, self.world, local_rank = distributed_env()
        if self.world > 1 and not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() and device != "cpu" else "gloo"
            # Rank 0 validates and tunes alone; the others wait, so allow hours, not NCCL's default.
            dist.init_process_group(backend, timeout=timedelta(hours=3))
        self.device = resolve_device(f"cuda:{local_rank}" if self.world > 1 and torch.cuda.is_available() and device != "cpu" else device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)

        torch.manual_seed(recipe.train.seed)  # identical initial weights on every rank
        model_cfg = recipe.model
        self.model = build_model(model_cfg.name, **model_cfg.cfg)
        if init_weights is not None:  # warm start: fine-tuning (--init), self-training students from their teacher
            self.model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in init_weights.items()})
        self.model.to(self.device)
        if extra is not None:
            extra.setup(self.model, self.device)
        self.memory_format = torch.channels_last if recipe.train.channels_last else torch.contiguous_format
        self.model.to(memory_format=self.memory_format)
        heads: nn.Module = Heads(self.model)
        if recipe.train.compile:
            heads = torch.compile(heads)
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            heads = nn.parallel.DistributedDataParallel(heads, device_ids=ids)
        self.heads = heads
        self.loss = build_loss(recipe.loss.name, **recipe.loss.cfg)
        self.optimizer = build_optimizer(recipe, self.model.parameters())
        self.epochs = budget.epochs if budget.epochs is not None else recipe.train.epochs
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _lr_factor(recipe, self.epochs))
        self.amp = recipe.train.amp and self.device.type == "cuda"
        # torchrun's LOCAL_WORLD_SIZE: processes on this machine (WORLD_SIZE spans all machines)
        self.workers = loader_workers(recipe.data.num_workers, self.device, int(os.environ.get("LOCAL_WORLD_SIZE", self.world)))
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)

        patches = recipe.data.patches_per_epoch or len(self.train_samples)
        self.per_step = recipe.data.batch_size * self.world
        self.steps_per_epoch = max(patches // self.per_step, 1)
        self.dataset = PatchDataset(
            self.train_samples,
            patch_size=recipe.data.patch_size,
            length=self.steps_per_epoch * self.per_step,
            seed=recipe.train.seed,
            foreground_fraction=recipe.data.foreground_fraction,
            augment=build_augmentation(recipe.augment),
            scale_jitter=recipe.data.scale_jitter,
            boundary_width=recipe.targets.boundary_width,
            image_weights=modality_weights([s.modality for s in self.train_samples], recipe.data.modality_balance),
        )
        self.state = State()

    # -- checkpoints -------------------------------------------------------------------
    def _checkpoint(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "state": asdict(self.state),
            "rng_torch": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "extra": self.extra.state_dict() if self.extra is not None else {},
        }

    def save_checkpoint(self) -> None:
        if self.rank == 0:
            atomic_write(self.out / "checkpoint.pt", lambda tmp: torch.save(self._checkpoint(), tmp))

    def resume(self) -> None:
        """Restore everything from ``checkpoint.pt`` (see the module docstring)."""
        path = self.out / "checkpoint.pt"
        check_same_recipe(self.out, self.recipe)
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
            self.model.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scheduler.load_state_dict(ckpt["scheduler"])
            self.scaler.load_state_dict(ckpt["scaler"])
            self.state = State(**ckpt["state"])
            if self.extra is not None:
                self.extra.load_state_dict(ckpt.get("extra", {}))
            torch.set_rng_state(ckpt["rng_torch"])
            if ckpt["rng_cuda"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(ckpt["rng_cuda"])
        except Exception as err:  # an empty, truncated, foreign or malicious file raises many types
            raise RunFolderError(f"{path}: cannot resume ({type(err).__name__}: {first_line(err)})") from None
        log.info("resumed %s at epoch %d, step %d", self.out, self.state.epoch, self.state.step)

    # -- one step ----------------------------------------------------------------------
    def _step(self, batch: dict) -> float:
        image = batch["image"].to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
        classes = batch["classes"].to(self.device, non_blocking=True)
        weights = batch["weights"].to(self.device, non_blocking=True) if self.loss.uses_weight_map else None
        self.optimizer.zero_grad(set_to_none=True)
        if self.extra is not None:  # one forward pass for both (DDP allows one per step)
            extra_input, context = self.extra.inputs(self.state.step, self.device)
            image = torch.cat([image, extra_input.contiguous(memory_format=self.memory_format)])
        with torch.autocast("cuda", dtype=torch.float16, enabled=self.amp):
            outputs = self.heads(image)
        n = classes.shape[0]
        loss = self.loss([o[:n].float() for o in outputs], classes, weights)
        if self.extra is not None:
            loss = loss + self.extra.loss(outputs[0][n:].float(), context)
        self.scaler.scale(loss).backward()
        if self.recipe.train.grad_clip:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.recipe.train.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.extra is not None:
            self.extra.after_step(self.model)
        return float(loss.detach())

    def _out_of_budget(self) -> bool:
        """Same answer on every rank (rank 0's clock decides)."""
        b, s = self.budget, self.state
        stop = (b.steps is not None and s.step >= b.steps) or (b.seconds is not None and s.seconds >= b.seconds)
        if self.world > 1:
            flag = torch.tensor([float(stop)], device=self.device if dist.get_backend() == "nccl" else "cpu")
            dist.broadcast(flag, 0)
            stop = bool(flag.item())
        return stop

    # -- validation and records ----------------------------------------------------------
    def _validate(self, loss: float) -> Validation | None:
        """Rank 0 validates, logs a metrics row, keeps the best model; others wait."""
        result = None
        self.state.validated_step = self.state.step
        if self.rank == 0:
            samples = self.val_subset
            row = {"epoch": self.state.epoch, "step": self.state.step, "train_loss": round(loss, 5),
                   "lr": self.optimizer.param_groups[0]["lr"], "seconds": round(self.state.seconds, 1)}
            if samples:
                result = validate(self.model, samples, self.predictor_config, self.recipe.postprocess, self.device)
                row.update({f"f1_{m}": round(s["mean_f1"], 5) for m, s in result.summary.items()})
                log.info("epoch %d step %d: loss %.4f, validation F1 %s", self.state.epoch, self.state.step, loss, summary_line(result.summary))
                if result.score(self.recipe.train.select_by) > self.state.best_f1:
                    self.state.best_f1, self.state.best_epoch = result.score(self.recipe.train.select_by), self.state.epoch
                    self.save_model(self.recipe.postprocess, result)
                    write_scores_csv(self.out / "val_scores.csv", result.scores)
            else:
                self.save_model(self.recipe.postprocess, None)  # no validation set: the latest is the best we know
            self.state.history.append(row)
            self.write_metrics()
        if self.world > 1:
            dist.barrier()
        return result

    def save_model(self, postprocess, result: Validation | None) -> None:
        m = self.recipe.model
        meta = {
            "recipe": self.recipe.name, "epoch": self.state.epoch, "step": self.state.step,
            "train_seconds": round(self.state.seconds, 1), "device": str(self.device),
            "host": cpu_name(), "torch": str(torch.__version__),
            "validation": result.summary if result else {}, **self.provenance,
        }
        if self.recipe.data.diameter is not None:  # trained at one cell size: inference rescales to it
            meta.update(cell_diameter=float(self.recipe.data.diameter), size_normalised=True)
        save_model(self.out / "model.pt", self.model, {"name": m.name, "cfg": dict(m.cfg), "in_channels": 3, "out_channels": 3},
                   asdict(self.recipe.targets), self.recipe.predictor, postprocess, meta)

    def write_metrics(self) -> None:
        rows = self.state.history
        columns = list(dict.fromkeys(k for r in rows for k in r))
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
        atomic_write(self.out / "metrics.csv", lambda tmp: tmp.write_text(buffer.getvalue()))
        write_curves(self.out / "curves.png", rows)

    def _diverged(self, loss: float, first_step: int) -> None:
        """Stop on a non-finite loss with one line, keeping the last good checkpoint; a run
        that never saved one leaves no files behind, so the same --out can be used again."""
        lr = self.optimizer.param_groups[0]["lr"]
        kept = (self.out / "checkpoint.pt").exists()
        if not kept and self.rank == 0 and first_step == 0:
            discard_unstarted_run(self.out)
        where = ("its last checkpoint is kept; train again with a lower optimizer.lr in another --out"
                 if kept else "nothing was kept; train again with a lower optimizer.lr")
        raise TrainingDiverged(f"{self.out}: the loss became {loss} at step {self.state.step + 1} (learning rate {lr:.3g}); "
                               f"{where}")

    # -- the loop ------------------------------------------------------------------------
    def fit(self) -> State:
        """Train until the budget is spent; returns the final state."""
        recipe, state = self.recipe, self.state
        if self.rank == 0 and not (self.out / "recipe.yaml").exists():
            atomic_write(self.out / "recipe.yaml", lambda tmp: tmp.write_text(recipe.to_yaml()))
        self.model.train()
        first_step, seconds_before, fit_start = state.step, state.seconds, time.monotonic()
        last_save, loss_avg, stop = time.monotonic(), float("nan"), False
        sampler = ResumableSampler(self.dataset.length, rank=self.rank, world_size=self.world)
        # One loader for the whole run, its workers kept between epochs: starting them anew
        # each epoch cost more than a short epoch takes on a GPU. Its own generator: an
        # iterator otherwise draws a seed from the global torch RNG, which a resumed run
        # would then consume at a different point (patches themselves use no torch RNG).
        loader = DataLoader(self.dataset, batch_size=recipe.data.batch_size, sampler=sampler,
                            num_workers=self.workers, persistent_workers=self.workers > 0, drop_last=True,
                            generator=torch.Generator().manual_seed(recipe.train.seed))
        while state.epoch < self.epochs and not stop:
            sampler.set_epoch(state.epoch, start=state.batch_in_epoch * self.per_step)
            bar = tqdm(loader, desc=f"epoch {state.epoch + 1}/{self.epochs}", unit="step",
                       initial=state.batch_in_epoch, total=self.steps_per_epoch, disable=not self.progress or self.rank != 0, leave=False)
            for batch in bar:
                state.seconds = seconds_before + time.monotonic() - fit_start  # wall clock: data, steps, validation
                if self._out_of_budget():
                    stop = True
                    break
                start = time.monotonic()
                loss = self._step(batch)
                if not math.isfinite(loss):
                    self._diverged(loss, first_step)
                state.step += 1
                state.batch_in_epoch += 1
                loss_avg = loss if math.isnan(loss_avg) else 0.9 * loss_avg + 0.1 * loss
                bar.set_postfix(loss=f"{loss_avg:.4f}", lr=f"{self.optimizer.param_groups[0]['lr']:.2e}",
                                patches_s=f"{self.per_step / max(time.monotonic() - start, 1e-9):.1f}")
                every = recipe.train.checkpoint_steps
                if (every and state.step % every == 0) or time.monotonic() - last_save > 60 * recipe.train.checkpoint_minutes:
                    self.save_checkpoint()
                    last_save = time.monotonic()
            bar.close()
            if stop:
                break
            state.epoch += 1
            state.batch_in_epoch = 0
            self.scheduler.step()
            if state.epoch % recipe.train.val_every == 0 or state.epoch == self.epochs:
                self._validate(loss_avg)
                self.save_checkpoint()
                last_save = time.monotonic()
        loader = bar = None  # ends the persistent workers before the final validation and tuning
        if state.finished and state.step == first_step:
            return state  # a finished run resumed under the same budget: nothing to redo
        if state.validated_step != state.step:
            self._validate(loss_avg)
        if self.rank == 0:
            self.finish()
        if self.world > 1:
            dist.barrier()
        state.finished = True
        self.save_checkpoint()
        return state

    def finish(self) -> None:
        """Tune post-processing thresholds on validation data for the best model; write the report."""
        tuned_note = ""
        samples = self.val_subset
        if samples and self.recipe.train.tune_postprocess and (self.out / "model.pt").exists():
            from cellnest.models import build_network, read_model_file, write_model_file

            bundle = read_model_file(self.out / "model.pt")
            result = validate(build_network(bundle), samples, self.predictor_config, self.recipe.postprocess, self.device, keep_probabilities=True)
            select_by = self.recipe.train.select_by
            untuned = result.score(select_by)
            tuned, tuned_f1, per_method = tune_thresholds(result.probabilities, samples, self.recipe.postprocess,
                                                          self.recipe.train.tune_methods, select_by)
            methods = ", ".join(f"{m} {f:.4f}" for m, f in per_method.items())
            if tuned_f1 > untuned:
                bundle["postprocess"] = tuned.to_dict()
                bundle["meta"].update({"postprocess_tuned_f1": round(tuned_f1, 5), "postprocess_untuned_f1": round(untuned, 5),
                                       "postprocess_methods_f1": per_method, "postprocess_select_by": select_by})
                write_model_file(self.out / "model.pt", bundle)
                tuned_note = (f"Post-processing tuned on the validation images ({select_by} F1): {untuned:.4f} with the recipe's "
                              f"{self.recipe.postprocess.method} -> {tuned_f1:.4f} with {tuned.method} ({tuned.to_dict()}). "
                              f"Best mean F1 per method: {methods}.")
            else:
                tuned_note = f"Tuning found nothing better than the recipe's post-processing ({select_by} F1 {untuned:.4f}; per method: {methods})."
        write_report(self.out, self.recipe, self.state, self.budget, tuned_note)


def write_curves(path: Path, rows: Sequence[dict]) -> None:
    """Loss and validation F1 against epochs, as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in rows]
    fig, (ax_loss, ax_f1) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [r["train_loss"] for r in rows], marker="o")
    ax_loss.set(xlabel="epoch", ylabel="training loss (EMA)", title="loss")
    for key in sorted({k for r in rows for k in r if k.startswith("f1_")}):
        ax_f1.plot(epochs, [r.get(key, np.nan) for r in rows], marker="o", label=key[3:], linewidth=2.5 if key == "f1_all" else 1)
    ax_f1.set(xlabel="epoch", ylabel="mean F1 (IoU 0.5)", title="validation F1", ylim=(0, 1))
    if ax_f1.lines:
        ax_f1.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    atomic_write(path, lambda tmp: tmp.write_bytes(buffer.getvalue()))


def write_report(out: Path, recipe: Recipe, state: State, budget: Budget, note: str) -> None:
    """``report.md``: recipe, budget, time, and the validation table of the best model."""
    from cellnest.metrics import format_table
    from cellnest.models import read_model_file

    lines = [f"# Training report: {recipe.name}", "", recipe.description, "",
             f"- stopped at epoch {state.epoch}, step {state.step}, after {state.seconds / 60:.1f} min of training",
             f"- budget: epochs {budget.epochs or recipe.train.epochs}, steps {budget.steps}, seconds {budget.seconds}",
             f"- best validation F1 ({recipe.train.select_by}) {state.best_f1:.4f} at epoch {state.best_epoch}" if state.best_f1 >= 0 else "- no validation data",
             f"- torch {torch.__version__} on {cpu_name()}", ""]
    if (out / "model.pt").exists():
        meta = read_model_file(out / "model.pt")["meta"]
        if meta.get("validation"):
            lines += ["Validation of `model.pt` (challenge F1, recipe post-processing):", "", format_table(meta["validation"]), ""]
    if note:
        lines += [note, ""]
    scores = "`val_scores.csv` (its per-image validation scores), " if (out / "val_scores.csv").exists() else ""
    lines += [f"Files: `model.pt` (best model), {scores}`metrics.csv`, `curves.png`, `recipe.yaml`, `checkpoint.pt`.", ""]
    atomic_write(out / "report.md", lambda tmp: tmp.write_text("\n".join(lines)))


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
        resuming = resume and (run_dir / "checkpoint.pt").exists()
        if resume and not resuming and not name:
            raise RunFolderError(f"{run_dir}: nothing to resume (no checkpoint.pt)")
        prepare_run_folder(run_dir, resuming)
        if plan is not None and distributed_env()[0] == 0:
            from cellnest.plan import write_plan

            write_plan(plan, run_dir / "plan.yaml")
        log.info("%s: %d training and %d validation images -> %s", name or "run", len(train_items), len(val_items), run_dir)
        train_samples = load_samples(train_items, recipe, cache, progress)
        val_samples = load_samples(val_items, recipe, cache, progress)
        trainer = Trainer(recipe, train_samples, val_samples, run_dir, budget, device, progress, init_weights=init_weights,
                          provenance=provenance)
        if resume and (run_dir / "checkpoint.pt").exists():
            trainer.resume()
        results[name or "run"] = trainer.fit()
        if recipe.data.diameter is not None and distributed_env()[0] == 0:
            add_size_model(run_dir / "model.pt", train_items, trainer.device, progress)
        if dist.is_initialized():
            dist.barrier()  # the other ranks wait for rank 0's size model before the next fold
    if folds is not None and len(folds) > 1 and distributed_env()[0] == 0:
        write_fold_summary(out, results)
    if dist.is_initialized():
        dist.destroy_process_group()
    return results


def add_size_model(path: Path, items: Sequence[Item], device: torch.device, progress: bool) -> None:
    """Fit the size model of a model trained at one cell size on its training images, in
    place (``--diameter auto`` estimates each image's cell size with it); once per file."""
    from cellnest.models import write_model_file
    from cellnest.sizemodel import with_size_model

    bundle = read_model_file(path)
    if not bundle.get("size_model"):
        write_model_file(path, with_size_model(bundle, items, device, progress))


def initial_weights(model: str, recipe: Recipe) -> dict[str, torch.Tensor]:
    """Weights of a model (shipped name, model file or run folder) to fine-tune with ``recipe``.

    Raises ValueError (one line) when its network is not the one ``recipe`` builds.
    """
    path = model_path(model)
    if path is None:
        raise ValueError("the classical baseline has no weights to fine-tune; give a network model")
    bundle = read_model_file(path)
    trained_with = bundle.get("meta", {}).get("recipe", "the recipe it was trained with")
    # Build the recipe's network and load the weights into it: the only test that accepts
    # every equivalent spelling of a config and refuses every mismatch.
    as_recipe = {**bundle, "network": {"name": recipe.model.name, "cfg": dict(recipe.model.cfg), "in_channels": 3, "out_channels": 3}}
    try:
        build_network(as_recipe, path)
    except ModelFileError as err:
        raise ValueError(f"{path}: not the network of recipe {recipe.name} ({err.problem}); fine-tune with --recipe {trained_with}") from None
    return bundle["state_dict"]


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
