"""Run folders: open or resume one, budgets, checkpoints, metrics, curves and the report.

A run folder holds::

    recipe.yaml     the resolved recipe (after --set overrides)
    checkpoint.pt   the latest resumable state (atomic; every few minutes)
    model.pt        the best model by validation F1 (:mod:`cellnest.modelfile`)
    val_scores.csv  that model's per-image validation scores
    metrics.csv     one row per validation: epoch, step, loss, lr, seconds, F1 per modality
    curves.png      loss and validation F1 against epochs
    report.md       what was trained, how long, and how well

``train``, ``selftrain`` (one folder per round) and ``compare`` (one per variant and
seed) all open their folders here. In a distributed run every rank opens the folder and
only rank 0 writes.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from cellnest.export import new_figure, write_figure
from cellnest.hardware import cpu_name
from cellnest.io import atomic_write, first_line, write_csv
from cellnest.modelfile import ModelFile
from cellnest.recipe import Recipe, RecipeError, read_yaml

RUN_FILES = ("recipe.yaml", "checkpoint.pt", "model.pt", "metrics.csv", "val_scores.csv")


class RunFolderError(ValueError):
    """The run folder exists and would be overwritten, or cannot be resumed."""


@dataclass(frozen=True)
class Budget:
    """When to stop; the first limit reached wins (None = no limit). ``epochs`` None means
    the recipe's: :meth:`for_recipe` fills it in, after which it is always set."""

    epochs: int | None = None
    steps: int | None = None
    seconds: float | None = None

    def for_recipe(self, recipe_epochs: int) -> "Budget":
        return self if self.epochs is not None else replace(self, epochs=recipe_epochs)

    def stop_now(self, state: "State") -> bool:
        """Out of steps or time (checked before every step)."""
        return (self.steps is not None and state.step >= self.steps) or (self.seconds is not None and state.seconds >= self.seconds)

    def spent(self, state: "State") -> bool:
        """Whether a run in ``state`` has nothing left to train under this budget."""
        return state.epoch >= self.epochs or self.stop_now(state)

    def describe(self) -> str:
        return f"epochs {self.epochs}, steps {self.steps}, seconds {self.seconds}"


def parse_duration(text: str) -> float:
    """``"90s"``, ``"30m"``, ``"2h"``, ``"1h30m"`` or plain seconds -> seconds."""
    text = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    parts = re.findall(r"(\d+(?:\.\d+)?)([hms])", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"cannot read duration {text!r} (examples: 90s, 30m, 2h, 1h30m)")
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts)


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


class RunFolder:
    """One run's folder. ``writer`` is False on the ranks of a distributed run that only read."""

    def __init__(self, path: str | Path, writer: bool = True):
        self.path, self.writer = Path(path), writer

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def __str__(self) -> str:
        return str(self.path)

    # -- opening -----------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path, recipe: Recipe, resume: bool, writer: bool = True) -> "RunFolder":
        """Start a run in ``path`` or, with ``resume`` and a checkpoint there, continue it.

        Refuses a folder that holds a run unless resuming it, and a resumed run whose
        recipe differs from its ``recipe.yaml``; writes ``recipe.yaml`` for a new run.
        """
        run = cls(path, writer)
        existing = [f for f in RUN_FILES if (run / f).exists()]
        if existing and not (resume and run.has_checkpoint) and writer:  # rank 0 decides (it may have just written)
            raise RunFolderError(f"{path}: already holds a run ({', '.join(existing)}); use --resume or another --out")
        run.path.mkdir(parents=True, exist_ok=True)
        run.check_recipe(recipe)
        if writer and not (run / "recipe.yaml").exists():
            atomic_write(run / "recipe.yaml", lambda tmp: tmp.write_text(recipe.to_yaml()))
        return run

    @property
    def has_checkpoint(self) -> bool:
        return (self / "checkpoint.pt").exists()

    @property
    def model_path(self) -> Path:
        return self / "model.pt"

    def check_recipe(self, recipe: Recipe) -> None:
        """Refuse to continue or reuse this run with another recipe than its own."""
        saved_path = self / "recipe.yaml"
        if not saved_path.exists():
            return
        try:
            saved = Recipe.from_dict(read_yaml(saved_path), str(saved_path))
        except RecipeError as err:
            raise RunFolderError(f"{saved_path}: cannot resume ({first_line(err)})") from None
        changed = recipe.differences(saved)
        if changed:
            raise RunFolderError(f"{self.path}: the recipe differs from the run's recipe.yaml in {changed}; resume with the "
                                 "same recipe and --set values")

    def finished_state(self, budget: Budget, recipe: Recipe) -> State | None:
        """The state of a run of ``recipe`` here that finished and has nothing left under
        ``budget`` (so it can be reused without loading its data), else None."""
        if not (self.model_path.exists() and self.has_checkpoint):
            return None
        self.check_recipe(recipe)
        state = State(**self.load_checkpoint()["state"])
        return state if state.finished and budget.for_recipe(recipe.train.epochs).spent(state) else None

    def discard_unstarted(self) -> None:
        """Remove the files of a run stopped before its first checkpoint: nothing in it can
        be resumed, and a new run may start here."""
        if self.writer and not self.has_checkpoint:
            for name in RUN_FILES:
                (self / name).unlink(missing_ok=True)

    # -- checkpoints and the model ----------------------------------------------------
    def save_checkpoint(self, payload: dict) -> None:
        if self.writer:
            atomic_write(self / "checkpoint.pt", lambda tmp: torch.save(payload, tmp))

    def load_checkpoint(self) -> dict:
        path = self / "checkpoint.pt"
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(payload, dict) or not isinstance(payload.get("state"), dict):
                raise ValueError("not a cellnest checkpoint")
            return payload
        except Exception as err:  # an empty, truncated, foreign or malicious file raises many types
            raise RunFolderError(f"{path}: cannot resume ({type(err).__name__}: {first_line(err)})") from None

    def save_model(self, model: ModelFile) -> None:
        if self.writer:
            model.save(self.model_path)

    # -- records ------------------------------------------------------------------------
    def write_scores(self, scores) -> None:
        """``val_scores.csv``: the kept model's per-image validation scores."""
        from cellnest.evaluate import write_scores_csv

        if self.writer:
            write_scores_csv(self / "val_scores.csv", scores)

    def write_metrics(self, rows: Sequence[dict]) -> None:
        """``metrics.csv`` and ``curves.png`` from the validation history."""
        if self.writer:
            write_csv(self / "metrics.csv", rows)
            write_curves(self / "curves.png", rows)

    def write_report(self, recipe: Recipe, state: State, budget: Budget, note: str) -> None:
        """``report.md``: recipe, budget, time, and the validation table of the best model."""
        from cellnest.metrics import format_table

        lines = [f"# Training report: {recipe.name}", "", recipe.description, "",
                 f"- stopped at epoch {state.epoch}, step {state.step}, after {state.seconds / 60:.1f} min of training",
                 f"- budget: {budget.for_recipe(recipe.train.epochs).describe()}",
                 f"- best validation F1 ({recipe.train.select_by}) {state.best_f1:.4f} at epoch {state.best_epoch}"
                 if state.best_f1 >= 0 else "- no validation data",
                 f"- torch {torch.__version__} on {cpu_name()}", ""]
        if self.model_path.exists():
            validation = ModelFile.load(self.model_path).meta.get("validation")
            if validation:
                lines += ["Validation of `model.pt` (challenge F1, recipe post-processing):", "", format_table(validation), ""]
        if note:
            lines += [note, ""]
        scores = "`val_scores.csv` (its per-image validation scores), " if (self / "val_scores.csv").exists() else ""
        lines += [f"Files: `model.pt` (best model), {scores}`metrics.csv`, `curves.png`, `recipe.yaml`, `checkpoint.pt`.", ""]
        if self.writer:
            atomic_write(self / "report.md", lambda tmp: tmp.write_text("\n".join(lines)))


def write_curves(path: Path, rows: Sequence[dict]) -> None:
    """Loss and validation F1 against epochs, as PNG."""
    epochs = [r["epoch"] for r in rows]
    fig, axes = new_figure(1, 2, figsize=(10, 4))
    ax_loss, ax_f1 = axes[0]
    ax_loss.plot(epochs, [r["train_loss"] for r in rows], marker="o")
    ax_loss.set(xlabel="epoch", ylabel="training loss (EMA)", title="loss")
    for key in sorted({k for r in rows for k in r if k.startswith("f1_")}):
        ax_f1.plot(epochs, [r.get(key, np.nan) for r in rows], marker="o", label=key[3:], linewidth=2.5 if key == "f1_all" else 1)
    ax_f1.set(xlabel="epoch", ylabel="mean F1 (IoU 0.5)", title="validation F1", ylim=(0, 1))
    if ax_f1.lines:
        ax_f1.legend(fontsize=8)
    write_figure(path, fig)


def checkpoint_payload(state: State, **parts) -> dict:
    """What a checkpoint holds: the run's state, the state dicts of ``parts`` (model,
    optimizer, scheduler, scaler, extra) and the torch RNG states (dropout)."""
    return {**parts, "state": asdict(state), "rng_torch": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
