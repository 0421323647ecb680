"""Learning from unlabelled images: the two seed systems' semi-supervised methods.

``pseudo_label`` (Re-Unet): iterative self-training. Round 0 trains a teacher on the
labelled images (or takes ``--teacher``). In each round the teacher predicts the
unlabelled images with the real predictor; the soft outputs become one-hot pseudo-labels
(argmax), optionally counting only pixels whose top probability reaches ``confidence``
(through the weight map); a student, warm-started from the teacher at the fine-tuning
learning rate (the paper's 3e-3), trains on labelled + pseudo-labelled images and becomes
the next teacher.

``consistency`` (Attention U-Net++): the student trains on labelled images with the
supervised loss plus, on unlabelled patches, the mean squared difference between its
softmax on a strongly augmented view and the teacher's softmax on the weakly augmented
view. Weak view: a random flip. Strong view: the weak view turned by a random multiple of
90 degrees, with random gamma and Gaussian noise; the student's output is turned back so
pixels align. The teacher stays fixed, or follows the student as an exponential moving
average (``ema``, the mean teacher). Students start from the teacher's weights.

Both reuse :class:`cellnest.train.Trainer` (budget, resume, logs, DDP); every round's
pseudo-labels (with a few outline overlays), model and validation F1 stay in the run
folder, and ``selftrain.csv``/``selftrain.md`` hold the table per round.

``control=True`` adds the supervised-only arm of the same budget: each round also trains a
twin from the previous twin (round 0: the teacher) with the same student recipe, budget
and learning rate on the labelled images only, so the table says whether the unlabelled
images helped or only the extra steps did.
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from cellnest.data import Sample, SampleCache, load_folder
from cellnest.io import atomic_write, write_csv, write_labels, write_png
from cellnest.patches import PatchDataset
from cellnest.postprocess import probabilities_to_instances
from cellnest.predict import Predictor
from cellnest.recipe import Recipe, SelfTrainConfig, apply_override
from cellnest.targets import weight_map
from cellnest.assemble import build_trainer, distributed_env, load_samples
from cellnest.modelfile import ModelFile
from cellnest.run import Budget, RunFolder, State

log = logging.getLogger(__name__)

def pseudo_label(
    teacher: nn.Module, samples: Sequence[Sample], recipe: Recipe, device: str, confidence: float = 0.0, progress: bool = False
) -> list[Sample]:
    """Teacher predictions as training samples (one-hot classes, instances, weight maps).

    Returns samples with ``classes`` = argmax of the teacher's softmax, ``labels`` = its
    post-processed instances, and ``weights`` = the recipe's weight map (or ones), zeroed
    where the top probability is below ``confidence``.
    """
    predictor = Predictor(teacher, recipe.predictor, device)
    out = []
    for sample in tqdm(samples, desc="pseudo-label", unit="img", disable=not progress):
        probs = predictor(np.asarray(sample.image))
        classes = probs.argmax(0).astype(np.uint8)
        labels = probabilities_to_instances(probs, recipe.postprocess)
        t = recipe.targets
        if t.weight_maps:
            weights = weight_map(labels, classes, t.w0, t.sigma, t.class_balance, t.border_on)
        else:
            weights = np.ones(classes.shape, np.float32)
        if confidence > 0:
            weights = weights * (probs.max(0) >= confidence)
        out.append(Sample(sample.name, sample.modality, np.asarray(sample.image), labels, classes, weights.astype(np.float32)))
    return out


def _turn(x: torch.Tensor, k: Sequence[int], flips: Sequence[bool]) -> torch.Tensor:
    """Per sample: optional horizontal flip, then ``k`` quarter turns ((B, C, H, W), H == W)."""
    parts = []
    for sample, turns, flip in zip(x, k, flips):
        sample = torch.flip(sample, (2,)) if flip else sample
        parts.append(torch.rot90(sample, int(turns), (1, 2)))
    return torch.stack(parts)


class ConsistencyTerm:
    """Teacher-student consistency on unlabelled patches (see the module docstring).

    Implements :class:`cellnest.train.ExtraTerm`. Patches are a pure function of
    (seed, step, rank), so a resumed run sees the same ones; the EMA teacher's weights are
    checkpointed with the run.
    """

    def __init__(self, teacher: nn.Module, unlabeled: Sequence[Sample], patch_size: int, config: SelfTrainConfig, seed: int = 0):
        blank = [Sample(s.name, s.modality, np.asarray(s.image), np.zeros(np.shape(s.image)[1:], np.int32),
                        np.zeros(np.shape(s.image)[1:], np.uint8)) for s in unlabeled]
        self.dataset = PatchDataset(blank, patch_size, length=1, seed=seed, foreground_fraction=0.0)
        self.teacher, self.config, self.seed = teacher, config, seed
        self.rank, self.world, _ = distributed_env()

    def setup(self, student: nn.Module, device: torch.device) -> None:
        self.teacher.to(device).eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)

    def inputs(self, step: int, device: torch.device) -> tuple[torch.Tensor, object]:
        batch = self.config.unlabeled_batch
        first = (step * self.world + self.rank) * batch
        weak = torch.stack([self.dataset[first + i]["image"] for i in range(batch)]).to(device)
        rng = np.random.default_rng([self.seed, 7, step, self.rank])
        flips = rng.random(batch) < 0.5
        turns = rng.integers(0, 4, batch)
        weak = _turn(weak, [0] * batch, flips)
        with torch.no_grad():
            target = torch.softmax(self.teacher(weak).float(), 1)
        strong = _turn(weak, turns, [False] * batch)
        gamma = torch.from_numpy(rng.uniform(*self.config.gamma_range, batch)).float().to(device).view(-1, 1, 1, 1)
        noise = torch.from_numpy(rng.normal(0, self.config.noise_std, strong.shape)).float().to(device)
        strong = (strong.clamp(0, 1) ** gamma + noise).clamp(0, 1)
        return strong, (target, turns)

    def loss(self, logits: torch.Tensor, context: object) -> torch.Tensor:
        target, turns = context
        aligned = _turn(torch.softmax(logits, 1), [-t for t in turns], [False] * len(turns))
        return self.config.consistency_weight * F.mse_loss(aligned, target)

    @torch.no_grad()
    def after_step(self, student: nn.Module) -> None:
        if self.config.ema is None:
            return
        for t, s in zip(self.teacher.state_dict().values(), student.state_dict().values()):
            if t.is_floating_point():
                t.mul_(self.config.ema).add_(s.detach(), alpha=1 - self.config.ema)
            else:
                t.copy_(s)

    def state_dict(self) -> dict:
        return {"teacher": self.teacher.state_dict()} if self.config.ema is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if "teacher" in state:
            self.teacher.load_state_dict(state["teacher"])


def _student_recipe(recipe: Recipe, lr: float) -> Recipe:
    raw = copy.deepcopy(recipe.raw)
    apply_override(raw, f"optimizer.lr={lr}")
    return Recipe.from_dict(raw, recipe.name)


def _write_pseudo_labels(folder: Path, samples: Sequence[Sample], overlays: int) -> None:
    from cellnest.export import overlay_outlines
    from cellnest.normalize import channels_last

    shown = set(np.linspace(0, len(samples) - 1, overlays).round().astype(int)) if overlays and samples else set()
    for i, s in enumerate(samples):  # overlays spread over the folder, so several sources show
        write_labels(folder / f"{s.name}_label.tiff", s.labels)
        if i in shown:
            write_png(folder / f"{s.name}_overlay.png", overlay_outlines(channels_last(s.image), s.labels))


def self_train(
    recipe: Recipe,
    labeled: str | os.PathLike,
    unlabeled: str | os.PathLike,
    out: str | os.PathLike,
    val: str | os.PathLike | None = None,
    teacher: str | os.PathLike | None = None,
    budget: Budget = Budget(),
    device: str = "auto",
    resume: bool = False,
    cache: SampleCache | None = None,
    progress: bool = True,
    control: bool = False,
) -> list[dict]:
    """Run round 0 (teacher) and ``rounds`` student rounds; returns one row per round and arm.

    ``budget`` applies to every round. ``round<k>/`` holds each round's run (model.pt,
    metrics.csv, curves.png, report.md) and, for pseudo-labelling, ``pseudo/`` with the
    pseudo-labels it trained on; ``control<k>/`` the supervised-only twin (``control``).
    With ``resume``, rounds finished under ``budget`` are reused as they are (no pseudo-labels
    predicted again), interrupted ones resume, and ones stopped before their first
    checkpoint start over.
    """
    config = recipe.selftrain
    if recipe.data.diameter is not None:
        # Unlabelled images have no labels to size them by; sizing them with the teacher's
        # estimate is not built yet, and mixing scales would teach the student wrong sizes.
        raise ValueError(f"recipe {recipe.name}: self-training at one cell size (data.diameter) is not supported yet; "
                         "use --set data.diameter=null")
    out, cache = Path(out), cache or SampleCache()
    labeled_samples = load_samples(load_folder(labeled, require_labels=True), recipe, cache, progress)
    unlabeled_samples = load_samples(load_folder(unlabeled), recipe, cache, progress)
    val_samples = load_samples(load_folder(val, require_labels=True), recipe, cache, progress) if val else []

    writer = distributed_env()[0] == 0

    def finished(name: str, run_recipe: Recipe) -> State | None:
        return RunFolder(out / name, writer).finished_state(budget, run_recipe) if resume else None

    def run_round(name: str, run_recipe: Recipe, samples, init=None, extra=None) -> State:
        if resume:
            RunFolder(out / name, writer).discard_unstarted()
        run = RunFolder.open(out / name, run_recipe, resume, writer)
        trainer, finish = build_trainer(run_recipe, samples, val_samples, run, budget, device, progress, init_weights=init,
                                        extra=extra)
        if resume and run.has_checkpoint:
            trainer.resume()
        return trainer.fit(finish)

    rows = []
    if teacher is None:
        state = run_round("round0", recipe, labeled_samples)
        teacher = out / "round0" / "model.pt"
        rows.append(_row(0, "teacher", state, teacher))
    else:
        rows.append(_row(0, "teacher", None, Path(teacher)))
    twin = teacher
    student_recipe = _student_recipe(recipe, config.finetune_lr)
    for r in range(1, config.rounds + 1):
        taught = ModelFile.load(teacher)
        state = finished(f"round{r}", student_recipe)  # reused as it is: no pseudo-labels predicted again
        if state is None and config.method == "pseudo_label":
            pseudo = pseudo_label(taught.build_network(), unlabeled_samples, recipe, device, config.confidence, progress)
            if writer:
                _write_pseudo_labels(out / f"round{r}" / "pseudo", pseudo, config.overlays)
            state = run_round(f"round{r}", student_recipe, labeled_samples + pseudo, init=taught.state_dict)
        elif state is None:
            term = ConsistencyTerm(taught.build_network(), unlabeled_samples, recipe.data.patch_size, config, recipe.train.seed + r)
            state = run_round(f"round{r}", student_recipe, labeled_samples, init=taught.state_dict, extra=term)
        teacher = out / f"round{r}" / "model.pt"
        rows.append(_row(r, "student", state, teacher))
        log.info("round %d: best validation mean F1 %.4f", r, state.best_f1)
        if control:
            state = finished(f"control{r}", student_recipe) or run_round(f"control{r}", student_recipe, labeled_samples, init=ModelFile.load(twin).state_dict)
            twin = out / f"control{r}" / "model.pt"
            rows.append(_row(r, "supervised only", state, twin))
            log.info("round %d, supervised only: best validation mean F1 %.4f", r, state.best_f1)
    if writer:
        write_rounds(out, rows, config)
    return rows


def _row(round_: int, arm: str, state: State | None, model: Path) -> dict:
    validation = ModelFile.load(model).meta.get("validation", {}) if model.exists() else {}
    row = {"round": round_, "arm": arm, "model": str(model)}
    row.update({f"f1_{m}": round(v["mean_f1"], 4) for m, v in validation.items()})
    if state is not None:
        row["steps"] = state.step
    return row


def write_rounds(out: Path, rows: Sequence[dict], config: SelfTrainConfig) -> None:
    """``selftrain.csv`` and ``selftrain.md``: validation F1 per modality for every round."""
    columns = list(dict.fromkeys(k for r in rows for k in r))
    write_csv(out / "selftrain.csv", rows, columns)
    f1_columns = [c for c in columns if c.startswith("f1_")]
    lines = [f"Self-training ({config.method}), validation mean F1 of each round's best model (round 0 = teacher; "
             "'supervised only' = the same budget on the labelled images alone).", "",
             "| round | arm | " + " | ".join(c[3:] for c in f1_columns) + " |", "|---|---|" + "---|" * len(f1_columns)]
    for r in rows:
        lines.append(f"| {r['round']} | {r['arm']} | " + " | ".join(f"{r.get(c, float('nan')):.4f}" for c in f1_columns) + " |")
    atomic_write(out / "selftrain.md", lambda tmp: tmp.write_text("\n".join(lines) + "\n"))
