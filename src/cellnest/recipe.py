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
import math
import os
import re
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import yaml

from cellnest.data import TargetConfig
from cellnest.postprocess import PostprocessConfig
from cellnest.predict import PredictorConfig
from cellnest.validate import TUNE_METHODS

RECIPES_DIR = Path(__file__).with_name("recipes")


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads ``3e-4`` as a float (YAML 1.1 wants ``3.0e-4``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."),
)


class RecipeError(ValueError):
    """A recipe that cannot be used; the message names the file and the key."""


# A recipe is a few hundred bytes; these bounds refuse a file that is not one before it
# costs memory, including a "billion laughs" document whose aliases expand without end.
MAX_YAML_BYTES = 1 << 20
MAX_YAML_VALUES = 100_000


def _expanded_size(node: yaml.Node, sizes: dict[int, int]) -> int:
    """Number of values ``node`` becomes with every alias expanded (memoised per node, so
    counting costs the size of the document, not of its expansion)."""
    key = id(node)
    if key not in sizes:
        if isinstance(node, yaml.MappingNode):
            children = [child for pair in node.value for child in pair]
        elif isinstance(node, yaml.SequenceNode):
            children = node.value
        else:
            children = []
        sizes[key] = 1 + sum(_expanded_size(child, sizes) for child in children)
    return sizes[key]


def parse_yaml(text: str, where: str):
    """YAML text -> Python values with :class:`_Loader`, within the size limits above.

    Raises RecipeError naming ``where`` (a file, or a ``--set`` assignment)."""
    if len(text) > MAX_YAML_BYTES:
        raise RecipeError(f"{where}: {len(text)} bytes, above the {MAX_YAML_BYTES} a recipe may have")
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, {}) > MAX_YAML_VALUES:
            raise RecipeError(f"{where}: expands to more than {MAX_YAML_VALUES} values (YAML aliases); not a recipe")
        return loader.construct_document(node)
    except yaml.YAMLError as err:
        raise RecipeError(f"{where}: invalid YAML ({' '.join(str(err).split())})") from None
    except RecursionError:
        raise RecipeError(f"{where}: nested too deeply to be a recipe") from None
    finally:
        loader.dispose()


def _section(cls, data: dict | None, where: str):
    """Build dataclass ``cls`` from ``data``, refusing unknown keys (``where`` names them)."""
    data = dict(data or {})
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise RecipeError(f"{where}: unknown key(s) {unknown}; valid: {sorted(known)}")
    bad = next(((k, v) for k, v in data.items() if isinstance(v, float) and not math.isfinite(v)), None)
    if bad is not None:  # NaN passes every comparison, and 1e999 reads as inf: both fail much later
        raise RecipeError(f"{where}: {bad[0]} must be a finite number, got {bad[1]}")
    try:
        return cls(**data)
    except (TypeError, ValueError) as err:
        raise RecipeError(f"{where}: {err}") from None


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


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
    modality_balance : exponent b of the image sampling weight 1 / n_m**b (n_m = training
        images of the image's modality): 0 samples images uniformly (the papers), 1 gives
        every modality the same share of patches, 0.5 lies between. A generalist needs the
        rare modalities (40 phase-contrast vs 467 fluorescence images in mmcells/train).
    num_workers : DataLoader worker processes, or "auto": none on the CPU (workers would
        take cores from the network), and on CUDA up to 8 per process, one core left for the
        training loop. Patches are a pure function of their index, so the number of
        workers never changes a patch. Measured on an H100 with 16 cores (attn-unetpp, 300
        steps of 8x256 px): 44.4 s with 0 workers, 18.5 s with 6, 12.9 s with "auto" (8).
    diameter : train at one cell size: every labelled image (training and validation) is
        resized so that its median cell diameter (from its labels) becomes this many
        pixels, and the model records it for inference (``--diameter auto``). None trains
        at the images' native scale (the papers). Cellpose uses 30; see ``cellnest plan``.
    scale_jitter : each patch is cut at a random extra scale ``2 ** U(-scale_jitter,
        scale_jitter)`` (octaves; :class:`cellnest.patches.PatchDataset`), so a network
        trained at one ``diameter`` tolerates errors of the estimate at inference.
    min_cell_pixels : a cell left with fewer pixels after resizing is removed (background,
        weight 0 in weight maps).
    exclude_sources : training images whose manifest ``source`` is in this list are left
        out (a leave-one-source-out run: train without a source, score it).
    """

    patch_size: int = 256
    batch_size: int = 8
    patches_per_epoch: int | None = None
    foreground_fraction: float = 0.33
    modality_balance: float = 0.0
    num_workers: int | str = "auto"
    diameter: float | None = None
    scale_jitter: float = 0.0
    min_cell_pixels: int = 4
    exclude_sources: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _require(isinstance(self.exclude_sources, (list, tuple)) and all(isinstance(s, str) for s in self.exclude_sources),
                 f"exclude_sources must be a list of source names, got {self.exclude_sources!r}")
        _require(self.diameter is None or (_is_number(self.diameter) and 4 <= self.diameter <= 256),
                 f"diameter must be null or a number of pixels in [4, 256], got {self.diameter!r}")
        _require(_is_number(self.scale_jitter) and 0 <= self.scale_jitter <= 2,
                 f"scale_jitter must be in [0, 2] octaves, got {self.scale_jitter!r}")
        _require(isinstance(self.min_cell_pixels, int) and self.min_cell_pixels >= 1,
                 f"min_cell_pixels must be an integer >= 1, got {self.min_cell_pixels!r}")
        _require(isinstance(self.patch_size, int) and self.patch_size >= 16, f"patch_size must be an integer >= 16, got {self.patch_size!r}")
        _require(isinstance(self.batch_size, int) and self.batch_size >= 1, f"batch_size must be an integer >= 1, got {self.batch_size!r}")
        _require(self.patches_per_epoch is None or (isinstance(self.patches_per_epoch, int) and self.patches_per_epoch >= 1),
                 f"patches_per_epoch must be null or an integer >= 1, got {self.patches_per_epoch!r}")
        _require(_is_number(self.foreground_fraction) and 0 <= self.foreground_fraction <= 1,
                 f"foreground_fraction must be in [0, 1], got {self.foreground_fraction!r}")
        _require(_is_number(self.modality_balance) and 0 <= self.modality_balance <= 1,
                 f"modality_balance must be in [0, 1], got {self.modality_balance!r}")
        _require(self.num_workers == "auto" or (isinstance(self.num_workers, int) and self.num_workers >= 0),
                 f"num_workers must be 'auto' or an integer >= 0, got {self.num_workers!r}")


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
    select_by : what "best" means for the kept model and the tuned post-processing:
        ``"modality_mean"`` (mean over modalities of their mean F1, so a validation set of
        mostly nuclei does not decide alone) or ``"image_mean"`` (the challenge's figure).
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
    tune_methods: tuple[str, ...] = TUNE_METHODS
    select_by: str = "modality_mean"

    def __post_init__(self) -> None:
        from cellnest.postprocess import METHODS

        _require(self.select_by in ("modality_mean", "image_mean"), f"select_by must be 'modality_mean' or 'image_mean', got {self.select_by!r}")
        for name in ("epochs", "val_every"):
            value = getattr(self, name)
            _require(isinstance(value, int) and value >= 1, f"{name} must be an integer >= 1, got {value!r}")
        _require(self.val_limit is None or (isinstance(self.val_limit, int) and self.val_limit >= 1), f"val_limit must be null or >= 1, got {self.val_limit!r}")
        _require(_is_number(self.checkpoint_minutes) and self.checkpoint_minutes > 0, f"checkpoint_minutes must be > 0, got {self.checkpoint_minutes!r}")
        _require(self.checkpoint_steps is None or (isinstance(self.checkpoint_steps, int) and self.checkpoint_steps >= 1),
                 f"checkpoint_steps must be null or an integer >= 1, got {self.checkpoint_steps!r}")
        _require(isinstance(self.seed, int), f"seed must be an integer, got {self.seed!r}")
        _require(self.grad_clip is None or (_is_number(self.grad_clip) and self.grad_clip > 0), f"grad_clip must be null or > 0, got {self.grad_clip!r}")
        unknown = [m for m in self.tune_methods if m not in METHODS]
        _require(not unknown, f"tune_methods has unknown method(s) {unknown}; valid: {sorted(METHODS)}")


@dataclass(frozen=True)
class CVConfig:
    """Cross-validation: number of grouped folds and the split seed."""

    folds: int = 5
    seed: int = 0

    def __post_init__(self) -> None:
        _require(isinstance(self.folds, int) and self.folds >= 2, f"folds must be an integer >= 2, got {self.folds!r}")


@dataclass(frozen=True)
class SelfTrainConfig:
    """Semi-supervised learning from unlabelled images (:mod:`cellnest.selftrain`).

    method : "pseudo_label" (Re-Unet) or "consistency" (Attention U-Net++).
    rounds : student generations after the teacher.
    finetune_lr : learning rate of the students (they start from the teacher).
    confidence : pseudo-label pixels whose top class probability is below this get weight
        0 (0 = every pixel counts).
    consistency_weight : weight of the consistency term against the supervised loss.
    ema : mean-teacher decay (e.g. 0.99); None keeps the teacher fixed.
    unlabeled_batch : unlabelled patches per step (consistency).
    gamma_range, noise_std : the strong view's intensity changes (consistency).
    overlays : pseudo-labelled images per round written with outlines, for a glance.
    """

    method: str = "pseudo_label"
    rounds: int = 3
    finetune_lr: float = 3e-3
    confidence: float = 0.0
    consistency_weight: float = 1.0
    ema: float | None = None
    unlabeled_batch: int = 4
    gamma_range: tuple[float, float] = (0.7, 1.5)
    noise_std: float = 0.1
    overlays: int = 4

    def __post_init__(self) -> None:
        if self.method not in ("pseudo_label", "consistency"):
            raise ValueError(f"selftrain method must be 'pseudo_label' or 'consistency', got {self.method!r}")
        if self.rounds < 1:
            raise ValueError(f"selftrain rounds must be >= 1, got {self.rounds}")
        if self.ema is not None and not 0 < self.ema < 1:
            raise ValueError(f"selftrain ema must be in (0, 1) or null, got {self.ema}")
        if self.overlays < 0:
            raise ValueError(f"selftrain overlays must be >= 0, got {self.overlays}")


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
    "selftrain": SelfTrainConfig,
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
    selftrain: SelfTrainConfig
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
        _check_model_and_loss(built["model"], built["loss"], where)
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

    def differences(self, other: "Recipe") -> list[str]:
        """Sections whose resolved values differ, e.g. to refuse resuming a run with another
        recipe. A default and the same value written out are equal (lists and tuples alike);
        ``selftrain.rounds`` and ``selftrain.overlays`` are left out, as they do not change
        how any one round trains (so a finished self-training run can take more rounds), and
        so is ``data.num_workers``, which never changes a patch (a run may resume on another
        machine)."""
        def normal(section: Any) -> Any:
            if is_dataclass(section):
                section = replace(section, rounds=1, overlays=0) if isinstance(section, SelfTrainConfig) else section
                section = replace(section, num_workers=0) if isinstance(section, DataConfig) else section
                section = {f.name: getattr(section, f.name) for f in fields(section)}
            if isinstance(section, dict):
                return {k: normal(v) for k, v in section.items()}
            return tuple(normal(v) for v in section) if isinstance(section, (list, tuple)) else section

        text = {"name", "description", "source", "raw"}
        return sorted(f.name for f in fields(self) if f.name not in text and normal(getattr(self, f.name)) != normal(getattr(other, f.name)))


def _check_model_and_loss(model: NamedConfig, loss: NamedConfig, where: str) -> None:
    """Fail at load time, not after the cache is built: names and keys must exist."""
    from cellnest.losses import build_loss
    from cellnest.nets import config_keys

    try:
        valid = config_keys(model.name)
        unknown = sorted(set(model.cfg) - set(valid))
        if unknown:
            raise ValueError(f"unknown cfg key(s) {unknown} for {model.name!r}; valid: {', '.join(valid)}")
    except ValueError as err:
        raise RecipeError(f"{where}: model: {err}") from None
    try:
        build_loss(loss.name, **loss.cfg)
    except (TypeError, ValueError) as err:
        raise RecipeError(f"{where}: loss: {err}") from None


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
    value = parse_yaml(text, f"--set {assignment!r}")
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise RecipeError(f"--set {assignment!r}: '{key}' is not a section")
    node[keys[-1]] = value


def read_named_yaml(name_or_path: str | os.PathLike, folder: Path, what: str) -> tuple[Path, Any]:
    """A shipped YAML file by name (``folder/<name>.yaml``) or any path, parsed.

    Raises RecipeError naming the file (unknown name, invalid YAML).
    """
    path = Path(name_or_path)
    if not path.suffix and (folder / f"{name_or_path}.yaml").is_file():
        path = folder / f"{name_or_path}.yaml"
    if not path.is_file():
        shipped = sorted(p.stem for p in folder.glob("*.yaml"))
        raise RecipeError(f"unknown {what} '{name_or_path}' (shipped: {', '.join(shipped)}, or a .yaml file)")
    return path, read_yaml(path)


def read_yaml(path: str | os.PathLike):
    """A YAML file (recipe, plan, a run's recipe.yaml) parsed by :func:`parse_yaml`, its
    size checked before it is read. Raises RecipeError naming the file."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_YAML_BYTES:
            raise RecipeError(f"{path}: {size} bytes, above the {MAX_YAML_BYTES} a recipe may have")
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise RecipeError(f"{path}: cannot read ({' '.join(str(err).split())})") from None
    return parse_yaml(text, str(path))


def load_recipe(name_or_path: str | os.PathLike, overrides: Sequence[str] = ()) -> Recipe:
    """Load a shipped recipe by name, or a YAML file, then apply ``--set`` overrides.

    Raises
    ------
    RecipeError : unknown name, unreadable YAML, unknown or invalid key (one line).
    """
    path, data = read_named_yaml(name_or_path, RECIPES_DIR, "recipe")
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping of sections")
    for assignment in overrides:
        apply_override(data, assignment)
    return Recipe.from_dict(data, str(path))

