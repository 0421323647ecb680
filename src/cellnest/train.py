"""The training loop: it receives ready parts and runs them until the budget is spent.

:class:`Trainer` knows nothing of recipes, networks or data sets (torch-em's trainer is the
model): :mod:`cellnest.assemble` builds the parts from a recipe, :mod:`cellnest.run` owns
the run folder. A 1x1 convolution and a list of batches train as well as a U-Net++.

Exact resume: a training patch is a pure function of (seed, global patch index)
(:mod:`cellnest.patches`), and the checkpoint stores the model, optimiser, scheduler,
gradient scaler, torch RNG state (dropout) and the position inside the epoch; a resumed
run therefore continues with the very batches an uninterrupted run would have seen. The
data pipeline uses no global numpy or Python RNG, so those are not stored.

Multi-GPU: under torchrun every rank runs this loop on its own part of each batch
(DistributedDataParallel); only rank 0 validates and writes.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Protocol

import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

from cellnest.io import first_line
from cellnest.modelfile import ModelFile
from cellnest.run import Budget, RunFolder, RunFolderError, State, checkpoint_payload
from cellnest.validate import Validation, summary_line

log = logging.getLogger(__name__)


class TrainingDiverged(ValueError):
    """The training loss became NaN or infinite."""


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


@dataclass(frozen=True)
class LoopSettings:
    """How the loop runs (defaults: one CPU process, a checkpoint every 10 minutes)."""

    val_every: int = 1  # validate every this many epochs (and at the end)
    checkpoint_steps: int = 0  # also checkpoint every this many steps (0 = by time only)
    checkpoint_minutes: float = 10.0
    grad_clip: float = 0.0
    amp: bool = False  # float16 autocast and gradient scaling (CUDA only)
    channels_last: bool = False
    select_by: str = "modality_mean"  # which validation F1 picks the best model
    rank: int = 0
    world: int = 1


# model, its state and its validation (None without validation data) -> the model file to keep
Packager = Callable[[nn.Module, State, Validation | None], ModelFile]


class Trainer:
    """Train ``model`` with ready parts.

    Parameters
    ----------
    model : the network being trained; its ``forward_heads(x)`` (or ``forward``) gives a
        list of deep-supervision outputs, main head first.
    loss : ``loss(outputs, classes, weights) -> scalar``; ``loss.uses_weight_map`` says
        whether batches carry weight maps.
    optimizer, scheduler : a torch optimiser and an epoch-wise scheduler.
    loader : batches (dicts with ``image``, ``classes`` and, if used, ``weights``); its
        length is the epoch; a ``sampler`` with ``set_epoch(epoch, start)`` resumes inside
        an epoch (otherwise the batches already seen are skipped).
    validator : ``validator(model) -> Validation`` or None for no validation.
    run : the run folder (:class:`cellnest.run.RunFolder`).
    extra : an :class:`ExtraTerm` added to the loss.
    budget : when to stop; ``budget.epochs`` must be set.
    package : the model file to keep of the best model (None: none is kept).
    forward : what computes the outputs (DDP or compiled wrapper of ``model``; default
        ``model.forward_heads``, or ``[model(x)]``).
    """

    def __init__(self, model: nn.Module, loss: nn.Module, optimizer: torch.optim.Optimizer, scheduler, loader: Iterable[dict],
                 validator: Callable[[nn.Module], Validation] | None, run: RunFolder, extra: ExtraTerm | None = None, *,
                 budget: Budget, package: Packager | None = None, settings: LoopSettings = LoopSettings(),
                 forward: Callable[[torch.Tensor], list[torch.Tensor]] | None = None, device: torch.device | str = "cpu",
                 progress: bool = True):
        if budget.epochs is None:
            raise ValueError("the trainer needs a budget with epochs (Budget.for_recipe)")
        self.model, self.loss, self.optimizer, self.scheduler, self.loader = model, loss, optimizer, scheduler, loader
        self.validator, self.run, self.extra, self.budget, self.package = validator, run, extra, budget, package
        self.settings, self.device, self.progress = settings, torch.device(device), progress
        self.forward = forward or getattr(model, "forward_heads", None) or (lambda x: [model(x)])
        self.memory_format = torch.channels_last if settings.channels_last else torch.contiguous_format
        self.amp = settings.amp and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.state = State()
        if extra is not None:
            extra.setup(model, self.device)

    # -- checkpoints -------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        self.run.save_checkpoint(checkpoint_payload(
            self.state, model=self.model.state_dict(), optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(), scaler=self.scaler.state_dict(),
            extra=self.extra.state_dict() if self.extra is not None else {}))

    def resume(self) -> None:
        """Restore everything from the run's checkpoint (see the module docstring)."""
        ckpt = self.run.load_checkpoint()
        try:
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
        except Exception as err:  # a foreign checkpoint fails in many ways
            raise RunFolderError(f"{self.run / 'checkpoint.pt'}: cannot resume ({type(err).__name__}: {first_line(err)})") from None
        log.info("resumed %s at epoch %d, step %d", self.run, self.state.epoch, self.state.step)

    # -- one step ----------------------------------------------------------------------
    def _step(self, batch: dict) -> float:
        image = batch["image"].to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
        classes = batch["classes"].to(self.device, non_blocking=True)
        weights = batch["weights"].to(self.device, non_blocking=True) if getattr(self.loss, "uses_weight_map", False) else None
        self.optimizer.zero_grad(set_to_none=True)
        if self.extra is not None:  # one forward pass for both (DDP allows one per step)
            extra_input, context = self.extra.inputs(self.state.step, self.device)
            image = torch.cat([image, extra_input.contiguous(memory_format=self.memory_format)])
        with torch.autocast("cuda", dtype=torch.float16, enabled=self.amp):
            outputs = self.forward(image)
        n = classes.shape[0]
        loss = self.loss([o[:n].float() for o in outputs], classes, weights)
        if self.extra is not None:
            loss = loss + self.extra.loss(outputs[0][n:].float(), context)
        self.scaler.scale(loss).backward()
        if self.settings.grad_clip:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.settings.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.extra is not None:
            self.extra.after_step(self.model)
        return float(loss.detach())

    def _stop_now(self) -> bool:
        """Out of steps or time; the same answer on every rank (rank 0's clock decides)."""
        stop = self.budget.stop_now(self.state)
        if self.settings.world > 1:
            flag = torch.tensor([float(stop)], device=self.device if dist.get_backend() == "nccl" else "cpu")
            dist.broadcast(flag, 0)
            stop = bool(flag.item())
        return stop

    # -- validation ----------------------------------------------------------------------
    def _validate(self, loss: float) -> None:
        """Rank 0 validates, logs a metrics row, keeps the best model; others wait."""
        state = self.state
        state.validated_step = state.step
        if self.settings.rank == 0:
            row = {"epoch": state.epoch, "step": state.step, "train_loss": round(loss, 5),
                   "lr": self.optimizer.param_groups[0]["lr"], "seconds": round(state.seconds, 1)}
            result = self.validator(self.model) if self.validator is not None else None
            if result is not None:
                row.update({f"f1_{m}": round(s["mean_f1"], 5) for m, s in result.summary.items()})
                log.info("epoch %d step %d: loss %.4f, validation F1 %s", state.epoch, state.step, loss, summary_line(result.summary))
            if result is None or result.score(self.settings.select_by) > state.best_f1:
                if result is not None:  # without validation the latest model is the best known
                    state.best_f1, state.best_epoch = result.score(self.settings.select_by), state.epoch
                if self.package is not None:
                    self.run.save_model(self.package(self.model, state, result))
                if result is not None:
                    self.run.write_scores(result.scores)
            state.history.append(row)
            self.run.write_metrics(state.history)
        if self.settings.world > 1:
            dist.barrier()

    def _diverged(self, loss: float, first_step: int) -> None:
        """Stop on a non-finite loss with one line, keeping the last good checkpoint; a run
        that never saved one leaves no files behind, so the same --out can be used again."""
        lr = self.optimizer.param_groups[0]["lr"]
        kept = self.run.has_checkpoint
        if not kept and first_step == 0:
            self.run.discard_unstarted()
        where = ("its last checkpoint is kept; train again with a lower optimizer.lr in another --out"
                 if kept else "nothing was kept; train again with a lower optimizer.lr")
        raise TrainingDiverged(f"{self.run}: the loss became {loss} at step {self.state.step + 1} (learning rate {lr:.3g}); "
                               f"{where}")

    # -- the loop ------------------------------------------------------------------------
    def fit(self, finish: Callable[[State], None] | None = None) -> State:
        """Train until the budget is spent; returns the final state.

        ``finish(state)`` runs once on rank 0 after the last validation and before the run
        is marked finished (post-processing tuning, the report): a run killed during it
        does it again on resume.
        """
        s, state = self.settings, self.state
        self.model.train()
        first_step, seconds_before, fit_start = state.step, state.seconds, time.monotonic()
        last_save, loss_avg, stop = time.monotonic(), float("nan"), False
        steps_per_epoch = len(self.loader)
        sampler = getattr(self.loader, "sampler", None)
        while state.epoch < self.budget.epochs and not stop:
            batches: Iterable[dict] = self.loader
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(state.epoch, start=state.batch_in_epoch * self.loader.batch_size * s.world)
            else:  # a plain iterable: skip what this epoch already trained on
                batches = itertools.islice(self.loader, state.batch_in_epoch, None)
            bar = tqdm(batches, desc=f"epoch {state.epoch + 1}/{self.budget.epochs}", unit="step", initial=state.batch_in_epoch,
                       total=steps_per_epoch, disable=not self.progress or s.rank != 0, leave=False)
            for batch in bar:
                state.seconds = seconds_before + time.monotonic() - fit_start  # wall clock: data, steps, validation
                if self._stop_now():
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
                                patches_s=f"{len(batch['image']) * s.world / max(time.monotonic() - start, 1e-9):.1f}")
                if (s.checkpoint_steps and state.step % s.checkpoint_steps == 0) or time.monotonic() - last_save > 60 * s.checkpoint_minutes:
                    self.save_checkpoint()
                    last_save = time.monotonic()
            bar.close()
            if stop:
                break
            state.epoch += 1
            state.batch_in_epoch = 0
            self.scheduler.step()
            if state.epoch % s.val_every == 0 or state.epoch == self.budget.epochs:
                self._validate(loss_avg)
                self.save_checkpoint()
                last_save = time.monotonic()
        self.loader = batches = bar = None  # ends persistent loader workers before the final validation and tuning
        if state.finished and state.step == first_step:
            return state  # a finished run resumed under the same budget: nothing to redo
        if state.validated_step != state.step:
            self._validate(loss_avg)
        if s.rank == 0 and finish is not None:
            finish(state)
        if s.world > 1:
            dist.barrier()
        state.finished = True
        self.save_checkpoint()
        return state
