"""Rerun a paper's comparison with one command: variants x seeds under an equal budget.

A comparison is a YAML file (shipped ones in ``cellnest/comparisons/``)::

    name: table3
    description: ...
    kind: train            # train | postprocess | selftrain
    budget: {steps: 300}   # or {time: 5m} or {epochs: 10}: the same for every variant
    seeds: [0, 1, 2]
    val_images: 40         # optional: score on a fixed random subset of the validation images
    set: [...]             # overrides applied to every variant (budget-driven sizes)
    variants:
      - {name: U-Net, recipe: unet, set: [...]}
      - {name: Attention U-Net++, recipe: attn-unetpp, vs: U-Net}  # vs: see below

``train``: every (variant, seed) is trained into ``OUT/<variant>/seed<k>`` (a finished
run is reused, an interrupted one resumed) without validation, so the model scored is
the one at the end of the budget (no checkpoint chosen on the images it is scored on),
then scored per image on the validation folder. ``val_images`` bounds the scoring time:
a subset drawn uniformly at random with a fixed seed (the same for every variant), so the
overall mean stays an unbiased estimate of the whole folder's. ``postprocess``: one trained model (``--model``) predicts the
validation images once, and every variant's ``postprocess`` settings decode the same
probabilities (no retraining; ``seeds`` is ignored). ``selftrain``: the first variant's
recipe runs ``cellnest selftrain --control`` per seed (``--unlabeled``, optionally from a
given ``--teacher``); the rows are the teacher, every round's student, and every round's
supervised-only twin of the same budget. Trained rows are scored with the recipe's
post-processing, never thresholds tuned on the images they are scored on.

The table gives, per variant and modality, the mean F1 over seeds with its standard
deviation, a 95% bootstrap interval (seeds, then images, resampled with replacement,
2000 draws, the same draws for every variant), and the difference to a reference variant with its
paired interval (the variant named by ``vs``, else the first variant; in ``selftrain``, a student against the teacher and a
supervised-only twin against the student of its round), as ``table.md``/``table.csv``,
and ``bars.png``.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from cellnest.data import SampleCache, load_folder
from cellnest.evaluate import read_scores_csv, write_scores_csv
from cellnest.export import new_figure, write_figure
from cellnest.io import atomic_write, write_csv
from cellnest.metrics import score_image
from cellnest.postprocess import PostprocessConfig, probabilities_to_instances
from cellnest.recipe import RecipeError, load_recipe, read_named_yaml

log = logging.getLogger(__name__)

COMPARISONS_DIR = Path(__file__).with_name("comparisons")
KINDS = ("train", "postprocess", "selftrain")
BOOTSTRAP_DRAWS = 2000


@dataclass(frozen=True)
class Variant:
    name: str
    recipe: str | None = None
    set: tuple[str, ...] = ()
    postprocess: dict = field(default_factory=dict)
    vs: str | None = None  # the variant its paired difference is taken against (default: the first)


@dataclass(frozen=True)
class Comparison:
    name: str
    description: str
    kind: str
    budget: dict
    seeds: tuple[int, ...]
    set: tuple[str, ...]
    variants: tuple[Variant, ...]
    val_images: int | None = None


def comparison_names() -> list[str]:
    return sorted(p.stem for p in COMPARISONS_DIR.glob("*.yaml"))


def load_comparison(name_or_path: str | os.PathLike) -> Comparison:
    """A shipped comparison by name, or a YAML file; errors name the file and key."""
    path, data = read_named_yaml(name_or_path, COMPARISONS_DIR, "comparison")
    known = {"name", "description", "kind", "budget", "seeds", "val_images", "set", "variants"}
    if not isinstance(data, dict) or set(data) - known:
        raise ValueError(f"{path}: a comparison is a mapping with keys {sorted(known)}")
    kind = data.get("kind", "train")
    if kind not in KINDS:
        raise ValueError(f"{path}: kind must be one of {KINDS}, got {kind!r}")
    variants = []
    for entry in data.get("variants") or []:
        extra = set(entry) - {"name", "recipe", "set", "postprocess", "vs"}
        if "name" not in entry or extra:
            raise ValueError(f"{path}: each variant needs a name and may have recipe, set, postprocess, vs (got {sorted(entry)})")
        if kind in ("train", "selftrain") and not entry.get("recipe"):
            raise ValueError(f"{path}: variant {entry['name']!r} needs a recipe")
        variants.append(Variant(entry["name"], entry.get("recipe"), tuple(entry.get("set") or ()),
                                dict(entry.get("postprocess") or {}), entry.get("vs")))
    if len(variants) < 1:
        raise ValueError(f"{path}: no variants")
    names = [v.name for v in variants]
    for v in variants:
        if v.vs is not None and kind == "selftrain":
            raise ValueError(f"{path}: variant {v.name!r}: selftrain comparisons take no vs (their rows have fixed references)")
        if v.vs is not None and (v.vs not in names or v.vs == v.name):
            raise ValueError(f"{path}: variant {v.name!r}: vs must name another variant, got {v.vs!r}")
    folders = [_slug(v.name) for v in variants]
    clashes = sorted({v.name for v, f in zip(variants, folders) if folders.count(f) > 1})
    if clashes:
        raise ValueError(f"{path}: variants {clashes} would share a run folder; rename them")
    budget = dict(data.get("budget") or {})
    if kind in ("train", "selftrain") and not set(budget) & {"steps", "time", "epochs"}:
        raise ValueError(f"{path}: a train comparison needs an equal budget: steps, time or epochs")
    val_images = data.get("val_images")
    if val_images is not None and not (isinstance(val_images, int) and val_images >= 1):
        raise ValueError(f"{path}: val_images must be a positive integer, got {val_images!r}")
    return Comparison(str(data.get("name", path.stem)), str(data.get("description", "")), kind, budget,
                      tuple(data.get("seeds") or [0]), tuple(data.get("set") or ()), tuple(variants), val_images)


def _slug(name: str) -> str:
    """A variant's folder name: "U-Net++" -> "U-Netpp", "G12+G21" -> "G12_and_G21"."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name.replace("++", "pp").replace("+", " and ")).strip("_")


def _run_scores(run_dir: Path, model: Path, val_items, recipe, device: str) -> list[tuple[str, str, float]]:
    """Per-image F1 of ``model`` on the validation images, decoded with the recipe's
    post-processing (never thresholds tuned on these same images), so rows differ only in
    training. Cached in ``run_dir/scores.csv`` while it covers these images and is newer
    than the model; a model trained in ``run_dir`` brings its own ``val_scores.csv`` (the
    trainer scored it the same way), used when it covers every validation image.
    """
    from cellnest.modelfile import ModelFile
    from cellnest.validate import validate

    names = sorted(i.name for i in val_items)

    def usable(scores: Path) -> bool:
        return (scores.exists() and scores.stat().st_mtime >= model.stat().st_mtime
                and sorted(n for n, _, _ in read_scores_csv(scores)) == names)

    path, own = run_dir / "scores.csv", run_dir / "val_scores.csv"
    if not usable(path):
        if model.parent == run_dir and usable(own):
            atomic_write(path, lambda tmp: tmp.write_bytes(own.read_bytes()))
        else:
            samples = [SampleCache().load(i, recipe.targets, recipe.data.diameter, recipe.data.min_cell_pixels) for i in val_items]
            kept = ModelFile.load(model)
            result = validate(kept.build_network(), samples, kept.predictor, recipe.postprocess, device)
            path.parent.mkdir(parents=True, exist_ok=True)
            write_scores_csv(path, result.scores)
    return read_scores_csv(path)


def _budget(comparison: Comparison):
    from cellnest.run import Budget, parse_duration

    b = comparison.budget
    return Budget(b.get("epochs"), b.get("steps"), parse_duration(str(b["time"])) if "time" in b else None)


def _variant_recipe(comparison: Comparison, variant: Variant, seed: int):
    """The variant's recipe with the comparison's and its own overrides at ``seed``."""
    try:
        return load_recipe(variant.recipe, [*comparison.set, *variant.set, f"train.seed={seed}"])
    except RecipeError as err:
        raise ValueError(f"variant {variant.name!r}: {err}") from None


def run_comparison(
    comparison: Comparison,
    data: str | os.PathLike | None,
    val: str | os.PathLike,
    out: str | os.PathLike,
    model: str | os.PathLike | None = None,
    unlabeled: str | os.PathLike | None = None,
    device: str = "auto",
    progress: bool = True,
    teacher: str | os.PathLike | None = None,
) -> list[dict]:
    """Train or decode every variant, score it, and write the table and plot to ``out``.

    ``teacher`` (selftrain comparisons): start every seed from this model instead of
    training round 0.
    """
    from cellnest.assemble import train_from_folders
    from cellnest.run import RunFolder

    if teacher is not None and comparison.kind != "selftrain":
        raise ValueError(f"--teacher is for selftrain comparisons; {comparison.name!r} is a {comparison.kind} comparison")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    val_items = load_folder(val, require_labels=True)
    if comparison.val_images is not None and comparison.val_images < len(val_items):
        keep = np.random.default_rng(0).choice(len(val_items), comparison.val_images, replace=False)
        val_items = [val_items[i] for i in sorted(keep)]
    per_variant: dict[str, list[list[tuple[str, str, float]]]] = {}
    # variant -> the variant its paired difference is taken against
    references: dict[str, str] = {v.name: v.vs for v in comparison.variants if v.vs}
    if comparison.kind == "train":
        if data is None:
            raise ValueError("a train comparison needs --data (the labelled training folder)")
        budget = _budget(comparison)
        for variant in comparison.variants:
            runs = []
            for seed in comparison.seeds:
                run_dir = out / _slug(variant.name) / f"seed{seed}"
                recipe = _variant_recipe(comparison, variant, seed)
                run = RunFolder(run_dir)
                if run.finished_state(budget, recipe) is None:  # not yet trained, interrupted, or a larger budget
                    run.discard_unstarted()
                    train_from_folders(recipe, data, run_dir, None, None, budget, device, run.has_checkpoint, progress=progress)
                runs.append(_run_scores(run_dir, run_dir / "model.pt", val_items, recipe, device))
                log.info("%s seed %d: mean F1 %.4f", variant.name, seed, np.mean([f for _, _, f in runs[-1]]))
            per_variant[variant.name] = runs
    elif comparison.kind == "selftrain":
        if data is None or unlabeled is None:
            raise ValueError("a selftrain comparison needs --data (labelled) and --unlabeled")
        from cellnest.selftrain import self_train

        variant = comparison.variants[0]  # the recipe whose rounds are compared
        for seed in comparison.seeds:
            recipe = _variant_recipe(comparison, variant, seed)
            run_dir = out / f"seed{seed}"
            # resumes what is unfinished and reuses finished rounds as they are
            self_train(recipe, data, unlabeled, run_dir, val, teacher, _budget(comparison), device, True, progress=progress, control=True)
            first = Path(teacher) if teacher else run_dir / "round0" / "model.pt"
            per_variant.setdefault("teacher", []).append(_run_scores(run_dir / "round0", first, val_items, recipe, device))
            for r in range(1, recipe.selftrain.rounds + 1):
                rounds = f"{r} round{'s' if r > 1 else ''}"
                references.update({rounds: "teacher", f"{rounds}, supervised only": rounds})
                for arm, name in ((f"round{r}", rounds), (f"control{r}", f"{rounds}, supervised only")):
                    per_variant.setdefault(name, []).append(_run_scores(run_dir / arm, run_dir / arm / "model.pt", val_items, recipe, device))
    else:
        if model is None:
            raise ValueError("a postprocess comparison needs --model (one trained model)")
        from cellnest.modelfile import ModelFile
        from cellnest.predict import Predictor

        kept = ModelFile.load(model)
        samples = [SampleCache().load(i, kept.inference_targets, kept.cell_diameter) for i in val_items]
        predictor = Predictor(kept.build_network(), kept.predictor, device)
        probabilities = [predictor(np.asarray(s.image)) for s in samples]
        base = kept.postprocess
        for variant in comparison.variants:
            config = PostprocessConfig.from_dict({**base.to_dict(), **variant.postprocess})
            scores = [score_image(np.asarray(s.labels), probabilities_to_instances(p, config), s.name, s.modality)
                      for s, p in zip(samples, probabilities)]
            per_variant[variant.name] = [[(s.name, s.modality, s.f1) for s in scores]]
    rows = summarise(per_variant, references=references)
    write_table(out, comparison, rows)
    return rows


def summarise(per_variant: dict[str, list[list[tuple[str, str, float]]]], seed: int = 0,
              references: dict[str, str] | None = None) -> list[dict]:
    """Mean, sd over seeds and 95% bootstrap interval of F1, per variant and modality, and
    the paired difference to a reference variant (``references[variant]``; default: the
    first variant).

    Each run is a list of (image, modality, F1); every run must cover the same images, and
    every variant the same number of seeds. The bootstrap is two-stage (hierarchical): each
    draw resamples the seeds with replacement, then the images, and averages F1 over both,
    so the interval holds the spread between training runs as well as between images (at
    short budgets the spread between seeds is the larger). One draw serves every variant,
    seed k of one variant paired with seed k of another (the same crops of the same images;
    in ``selftrain`` the same chain of rounds), so the difference interval is paired: it
    cancels what all variants share (hard images), which the per-variant intervals cannot.
    With one seed this is the plain image bootstrap. With few seeds the resampled seeds
    take few distinct sets (10 for 3 seeds) and understate the spread between seeds, so
    each row also counts the seeds on which the variant beat its reference
    (``seeds_above``): 3 of 3 happens once in 8 when the two are alike.
    """
    ordered = {v: [sorted(run) for run in runs] for v, runs in per_variant.items()}
    names = {tuple(n for n, _, _ in run) for runs in ordered.values() for run in runs}
    if len(names) != 1:
        raise ValueError("every run of a comparison must be scored on the same images")
    first = next(iter(ordered))
    references = {v: (references or {}).get(v, first) for v in ordered}
    n_seeds = {len(runs) for runs in ordered.values()}
    if len(n_seeds) != 1:
        raise ValueError("every variant of a comparison must have the same number of seeds")
    modalities = np.array([m for _, m, _ in ordered[first][0]])
    rows: dict[str, list[dict]] = {v: [] for v in ordered}
    rng = np.random.default_rng(seed)
    seed_draws = rng.integers(0, n_seeds.pop(), size=(BOOTSTRAP_DRAWS, len(ordered[first])))
    for modality in [*sorted(set(modalities)), "all"]:
        cols = np.ones(len(modalities), bool) if modality == "all" else modalities == modality
        draws = rng.integers(0, int(cols.sum()), size=(BOOTSTRAP_DRAWS, int(cols.sum())))
        seed_means, boots = {}, {}
        for variant, runs in ordered.items():
            sub = np.array([[f for _, _, f in run] for run in runs])[:, cols]  # (seeds, images)
            per_draw = sub[:, draws].mean(axis=2).T  # (draws, seeds): each seed's mean over the drawn images
            seed_means[variant] = sub.mean(axis=1)
            boots[variant] = np.take_along_axis(per_draw, seed_draws, axis=1).mean(axis=1)
        for variant, runs in ordered.items():
            per_seed, boot, ref = seed_means[variant], boots[variant], references[variant]
            delta = boot - boots[ref]
            rows[variant].append({
                "variant": variant, "modality": modality, "n_images": int(cols.sum()), "seeds": len(runs),
                "mean_f1": float(per_seed.mean()), "sd": float(per_seed.std(ddof=1)) if len(runs) > 1 else 0.0,
                "ci_low": float(np.percentile(boot, 2.5)), "ci_high": float(np.percentile(boot, 97.5)),
                "reference": ref, "delta": float(per_seed.mean() - seed_means[ref].mean()),
                "delta_low": float(np.percentile(delta, 2.5)), "delta_high": float(np.percentile(delta, 97.5)),
                "seeds_above": int(np.sum(per_seed > seed_means[ref])),
            })
    return [row for variant_rows in rows.values() for row in variant_rows]


def write_table(out: Path, comparison: Comparison, rows: Sequence[dict]) -> None:
    """``table.md``, ``table.csv`` and ``bars.png`` (mean F1 over all images with its interval)."""
    write_csv(out / "table.csv", rows)
    n_images = next((r["n_images"] for r in rows if r["modality"] == "all"), 0)
    subset = f"; scored on a fixed random subset of {n_images} validation images" if comparison.val_images and n_images == comparison.val_images else ""
    lines = [f"# {comparison.name}", "", comparison.description, "", f"Budget: {comparison.budget or 'one trained model'}; "
             f"seeds: {list(comparison.seeds) if comparison.kind != 'postprocess' else 'n/a'}{subset}.", "",
             "| variant | modality | n | mean F1 | sd (seeds) | 95% bootstrap CI | difference (paired 95% CI) | vs | seeds above |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        vs = "" if r["reference"] == r["variant"] else f"{r['delta']:+.4f} [{r['delta_low']:+.4f}, {r['delta_high']:+.4f}]"
        above = f"{r['seeds_above']} of {r['seeds']}" if vs else ""
        lines.append(f"| {r['variant']} | {r['modality']} | {r['n_images']} | {r['mean_f1']:.4f} | {r['sd']:.4f} | "
                     f"[{r['ci_low']:.4f}, {r['ci_high']:.4f}] | {vs} | {'' if not vs else r['reference']} | {above} |")
    atomic_write(out / "table.md", lambda tmp: tmp.write_text("\n".join(lines) + "\n"))

    overall = [r for r in rows if r["modality"] == "all"]
    paired = [r for r in overall if r["reference"] != r["variant"]]
    # left: each variant's mean F1; right: the paired differences, which small effects need
    fig, axes = new_figure(1, 2 if paired else 1, figsize=(max(4, 1.3 * len(overall)) * (2 if paired else 1), 4.5))
    ax = axes[0, 0]
    errors = np.array([[r["mean_f1"] - r["ci_low"] for r in overall], [r["ci_high"] - r["mean_f1"] for r in overall]])
    ax.bar(range(len(overall)), [r["mean_f1"] for r in overall], yerr=errors, capsize=4, color="#4c72b0")
    ax.set_xticks(range(len(overall)), [r["variant"] for r in overall], rotation=30, ha="right")
    ax.set(ylabel="mean F1 (IoU 0.5), 95% CI", title=comparison.name, ylim=(0, 1))
    if paired:
        ax = axes[0, 1]
        errors = np.array([[r["delta"] - r["delta_low"] for r in paired], [r["delta_high"] - r["delta"] for r in paired]])
        ax.errorbar(range(len(paired)), [r["delta"] for r in paired], yerr=errors, fmt="o", capsize=4, color="#dd8452")
        ax.axhline(0, color="grey", lw=1)
        ax.set_xticks(range(len(paired)), [f"{r['variant']} - {r['reference']}" for r in paired], rotation=30, ha="right")
        ax.set(ylabel="F1 difference, paired 95% CI", title="differences (all images)")
    write_figure(out / "bars.png", fig)
