"""Training recipes: one YAML file per system or baseline, validated section by section.

A recipe names the network, loss, optimiser, schedule, data sampling, targets,
augmentation, training budget, predictor and post-processing; nothing about a system is
a code path. Shipped recipes live in ``cellnest/recipes/<name>.yaml`` (``cellnest train
--recipe NAME``); a path to any YAML file works too. ``--set section.key=value`` overrides
any value (the value is parsed as YAML: ``--set optimizer.lr=3e-4``,
``--set model.cfg.gates=[2,1]``), and the resolved recipe is saved with every run.
"""

from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

import yaml

from cellnest.data import TargetConfig
from cellnest.postprocess import PostprocessConfig
from cellnest.predict import PredictorConfig

RECIPES_DIR = Path(__file__).with_name("recipes")


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads ``3e-4`` as a float (YAML 1.1 wants ``3.0e-4``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."),
)


def _parse(text: str):
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


class RecipeError(ValueError):
    """A recipe that cannot be used; the message names the file and the key."""


def _section(cls, data: dict | None, where: str):
    """Build dataclass ``cls`` from ``data``, refusing unknown keys (``where`` names them)."""
    data = dict(data or {})
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise RecipeError(f"{where}: unknown key(s) {unknown}; valid: {sorted(known)}")
    try:
        return cls(**data)
    except (TypeError, ValueError) as err:
        raise RecipeError(f"{where}: {err}") from None


@dataclass(frozen=True)
class NamedConfig:
    """A registry name plus its keyword arguments (networks, losses)."""

    name: str
    cfg: dict = field(default_factory=dict)


@dataclass(frozen=True)
class OptimizerConfig:
    """``adamw`` (betas, weight_decay) or ``sgd`` (momentum, nesterov, weight_decay)."""

    name: str = "adamw"
    lr: float = 1e-4
    weight_decay: float = 1e-4
    momentum: float = 0.99
    nesterov: bool = True
    betas: tuple[float, float] = (0.9, 0.999)

    def __post_init__(self) -> None:
        if self.name not in ("adamw", "sgd"):
            raise ValueError(f"optimizer name must be 'adamw' or 'sgd', got {self.name!r}")
        if not self.lr > 0:
            raise ValueError(f"optimizer lr must be > 0, got {self.lr}")


@dataclass(frozen=True)
class SchedulerConfig:
    """Learning-rate schedule, stepped once per epoch.

    ``constant``; ``step``: multiply by ``gamma`` every ``step_epochs`` epochs (Re-Unet:
    halved every 250); ``poly``: nnU-Net's ``(1 - epoch / epochs) ** 0.9``.
    """

    name: str = "constant"
    step_epochs: int = 250
    gamma: float = 0.5

    def __post_init__(self) -> None:
        if self.name not in ("constant", "step", "poly"):
            raise ValueError(f"scheduler name must be 'constant', 'step' or 'poly', got {self.name!r}")


@dataclass(frozen=True)
class DataConfig:
    """Patch sampling.

    patch_size : square training patch side, pixels.
    batch_size : patches per optimiser step (per process under DDP).
    patches_per_epoch : patches that make one epoch; None = one per training image
        (the challenge baseline's epoch: every image once, one random crop each).
    foreground_fraction : share of patches centred on a cell pixel (nnU-Net: 0.33).
    num_workers : DataLoader worker processes.
    """

    patch_size: int = 256
    batch_size: int = 8
    patches_per_epoch: int | None = None
    foreground_fraction: float = 0.33
    num_workers: int = 0


@dataclass(frozen=True)
class TrainConfig:
    """Budget, validation and run mechanics.

    epochs : the recipe's full budget (the CLI's --epochs/--steps/--time-budget cut it).
    val_every : validate every this many epochs (and at the end).
    val_limit : validate on at most this many images (None: all), to bound CPU time.
    checkpoint_minutes / checkpoint_steps : save a resumable checkpoint this often.
    amp : float16 autocast on CUDA (never on CPU). channels_last, compile: see docs.
    grad_clip : max gradient norm (nnU-Net uses 12); None disables.
    tune_postprocess : choose post-processing on the validation set at the end: each of
        ``tune_methods`` with its threshold grid (cellnest.validate.TUNE_GRIDS); the best
        method and thresholds are stored in model.pt.
    """

    epochs: int = 100
    val_every: int = 10
    val_limit: int | None = None
    checkpoint_minutes: float = 5.0
    checkpoint_steps: int | None = None
    seed: int = 0
    amp: bool = True
    channels_last: bool = False
    compile: bool = False
    grad_clip: float | None = 12.0
    tune_postprocess: bool = True
    tune_methods: tuple[str, ...] = ("components", "closing", "watershed")


@dataclass(frozen=True)
class CVConfig:
    """Cross-validation: number of grouped folds and the split seed."""

    folds: int = 5
    seed: int = 0


SECTIONS: dict[str, type] = {
    "model": NamedConfig,
    "loss": NamedConfig,
    "optimizer": OptimizerConfig,
    "scheduler": SchedulerConfig,
    "data": DataConfig,
    "targets": TargetConfig,
    "train": TrainConfig,
    "predictor": PredictorConfig,
    "postprocess": PostprocessConfig,
    "cv": CVConfig,
}
FREE_SECTIONS = ("augment",)  # validated by their own modules' from_dict
TEXT_KEYS = ("name", "description", "source")


@dataclass(frozen=True)
class Recipe:
    """A validated recipe; ``raw`` keeps the resolved dict for saving."""

    name: str
    description: str
    source: str
    model: NamedConfig
    loss: NamedConfig
    optimizer: OptimizerConfig
    scheduler: SchedulerConfig
    data: DataConfig
    targets: TargetConfig
    augment: Any
    train: TrainConfig
    predictor: PredictorConfig
    postprocess: PostprocessConfig
    cv: CVConfig
    raw: dict

    @classmethod
    def from_dict(cls, data: dict, where: str = "recipe") -> "Recipe":
        from cellnest.augment import AugmentConfig

        unknown = sorted(set(data) - set(SECTIONS) - set(FREE_SECTIONS) - set(TEXT_KEYS))
        if unknown:
            raise RecipeError(f"{where}: unknown section(s) {unknown}; valid: {sorted([*SECTIONS, *FREE_SECTIONS, *TEXT_KEYS])}")
        for required in ("model", "loss"):
            if required not in data:
                raise RecipeError(f"{where}: missing section '{required}'")
        built = {name: _section(kind, data.get(name), f"{where}: {name}") for name, kind in SECTIONS.items()}
        try:
            augment = AugmentConfig.from_dict(data.get("augment") or {})
        except ValueError as err:
            raise RecipeError(f"{where}: augment: {err}") from None
        return cls(
            name=str(data.get("name", Path(where).stem)),
            description=str(data.get("description", "")),
            source=str(data.get("source", "")),
            augment=augment,
            raw=copy.deepcopy(data),
            **built,
        )

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.raw, sort_keys=False)


def recipe_names() -> list[str]:
    """Names of the recipes shipped with cellnest."""
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def apply_override(data: dict, assignment: str) -> None:
    """Apply one ``section.key[.subkey]=value`` assignment in place (value parsed as YAML)."""
    if "=" not in assignment:
        raise RecipeError(f"--set {assignment!r}: expected section.key=value")
    path, text = assignment.split("=", 1)
    keys = path.strip().split(".")
    if len(keys) < 2:
        raise RecipeError(f"--set {assignment!r}: expected section.key=value (e.g. optimizer.lr=3e-4)")
    value = _parse(text)
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise RecipeError(f"--set {assignment!r}: '{key}' is not a section")
    node[keys[-1]] = value


def load_recipe(name_or_path: str | os.PathLike, overrides: Sequence[str] = ()) -> Recipe:
    """Load a shipped recipe by name, or a YAML file, then apply ``--set`` overrides.

    Raises
    ------
    RecipeError : unknown name, unreadable YAML, unknown or invalid key (one line).
    """
    path = Path(name_or_path)
    if not path.suffix and (RECIPES_DIR / f"{name_or_path}.yaml").is_file():
        path = RECIPES_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise RecipeError(f"unknown recipe '{name_or_path}' (shipped: {', '.join(recipe_names())}, or a .yaml file)")
    try:
        data = _parse(path.read_text())
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: invalid YAML ({' '.join(str(err).split())})") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping of sections")
    for assignment in overrides:
        apply_override(data, assignment)
    return Recipe.from_dict(data, str(path))

