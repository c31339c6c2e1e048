"""`refiner build`: fit g, fine-tune the refined model and its baselines, export a versioned artifact.

Paper Section 4.3: the refined model is A's trunk -> g (frozen) -> B's upper
layers, fine-tuned on the target task; it drops x^Delta. Baselines get the same
budget and seeds: A's and B's own features, and the order ablations
x^(0), x^(0)+x^(1), ... (Tables 3 and 4). Heads train on cached features, so
the frozen trunks run once per image, not once per epoch.
"""

from __future__ import annotations

import copy
import shutil
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from refiner.refine.config import BuildConfig
from refiner.refine.publish import export_images, publish
from refiner.refine.quantize import format_quantization
from refiner.refine.refined import NetCut, OutputSlice, RefinedModel, RefinedSpec, replace_classifier
from refiner.refine.predictions import FILE as PREDICTIONS, save_predictions, stack_runs
from refiner.refine.report import BuildReport, GFit, format_accuracy_table, format_noise_budget, seed_varies, write_build_report
from refiner.refine.results import CONTROL, REFINED, PairedTest, VariantResult, headline, paired_tests, worse_than_baselines
from refiner.data.tasks import SplitOptions, get_task, load_task
from refiner.engine import distributed as dist
from refiner.engine.comparison import CompareConfig, ComparisonReport, compare, load_fitted_g
from refiner.engine.device import Runtime
from refiner.engine.features import FeatureSet, default_cache_dir, iter_batches
from refiner.engine.finetune import HeadResult, finetune_head
from refiner.engine.fitting import FitResult, fit_isomorphism
from refiner.engine.isomorphism import IsomorphismNet
from refiner.engine.metrics import VarianceAccumulator, VarianceTable
from refiner.errors import CheckpointError, ConfigError, DivergedError
from refiner.models.checkpoints import Classifier
from refiner.models.layers import split_model
from refiner.progress import bar, stage

__all__ = ["BuildResult", "build", "derangement"]

# Paired tests per protocol: with a new target classifier (sound) full-label and target-restricted figures coincide.
METRICS = {"sound": ("acc_target",), "paper": ("acc_target", "acc")}


@dataclass
class BuildResult:
    """A finished build: its report.json as a typed object, the version folder it published, and the refined model."""

    report: BuildReport
    path: Path  # models/<name>/<version>
    model: RefinedModel  # carries .spec: refiner.export(result.model, ...) publishes it again

    @property
    def verdict(self) -> str:
        """One line: does Δ removal help, hurt, or sit within noise (seeds, test images, g fits)?"""
        return self.report.verdict

    @property
    def accuracies(self) -> dict[str, float]:
        """Variant name -> mean test accuracy over its runs (target classes, at the validation-chosen epoch)."""
        return {v.name: statistics.fmean(c / v.test_images for c in v.test_correct_target) for v in self.report.variants}

    @property
    def paired(self) -> list[PairedTest]:
        """refined − each baseline, run by run, with the primary test's noise budget."""
        return self.report.paired

    def summary(self) -> str:
        r = self.report
        return (
            f"{format_accuracy_table(r.variants, r.config.protocol)}\n\n{r.verdict}\n\n"
            + (f"{format_noise_budget(r.paired)}\n\n" if r.paired else "")
            + f"instability Var(x^Δ)/Var(x_B) on test: {r.comparison.tables['test'].instability:.4f}\n"
            f"ONNX ({r.export.precision}) max |logit diff| {r.export.max_abs_diff:.2e} at batch {r.export.batch_size}\n"
            + (f"{format_quantization(r.quantization)}\n" if r.quantization else "")
            + f"artifact: {self.path}\nreport: {self.path / 'report.html'}"
        )


@dataclass
class _Variant:
    name: str
    features: str
    head_from: str  # "A" or "B": whose upper layers are fine-tuned
    sets: list[dict[str, np.ndarray]]  # per fit of g (one entry when the features do not depend on g): split -> head input


@dataclass
class _Head:
    """One side's upper layers and how the target classes sit among its outputs."""

    upper: nn.Module  # the pretrained upper layers, including the base classifier
    target: list[int]  # output index of each target class (paper protocol; sound: 0..T-1 of a new classifier)
    new_classifier: str | None  # sound protocol: the architecture whose classifier a new target classifier replaces

    def fresh(self) -> nn.Module:
        """A trainable copy; under the sound protocol its new classifier is drawn from torch's current RNG (the seed)."""
        if self.new_classifier:
            return replace_classifier(self.upper, self.new_classifier, len(self.target))
        return copy.deepcopy(self.upper)


def build(
    clf_a: Classifier,
    clf_b: Classifier,
    task: str,
    data_dir: Path | None,
    config: BuildConfig,
    *,
    models: Path = Path("models"),
    classes: list[str] | None = None,
    split: SplitOptions | None = None,
    cache_dir: Path | None = None,
    g_file: Path | None = None,
) -> BuildResult | None:
    """Run the whole build and write models/<name>/<version>; nothing is written on failure.

    `g_file`: a g written by `refiner fit` for the same A, B and layers, used instead of fitting one.
    Under torchrun the features are extracted in shards, g is fitted with DDP,
    the variant x seed fine-tuning jobs are split across ranks, and rank 0
    exports and writes the artifact (other ranks return None).
    """
    _check_sources(clf_a, clf_b, task)
    runtime = Runtime.resolve(config.compare.runtime)
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    data = load_task(task, data_dir, target=True, classes=classes, options=split)
    stage(data.validation_line())
    fit = config.compare.fit
    how = f"from {Path(g_file).name}" if g_file else f"fitted until converged, at most {fit.max_steps} steps" if fit.epochs is None else f"fitted for {fit.epochs} epochs"
    stage(f"features of A and B, then g ({how})")
    if config.protocol == "paper":
        _check_label_spaces(clf_a, clf_b, data.classes)
    compare_config, fitted = config.compare, None
    if g_file is not None:
        if config.g_seeds > 1:
            raise ConfigError(f"--g reuses one fit of g, so --g-seeds {config.g_seeds} cannot refit it; drop one of them")
        compare_config, fitted = load_fitted_g(g_file, clf_a, clf_b, config.compare, task=task, classes=data.classes, data_dir=data_dir)
    g, comparison, pairs = compare(clf_a, clf_b, data, compare_config, cache_dir, measure=(), extra=("val", "test"), fitted=fitted)
    fits = [(g, comparison.fit), *_refit(pairs["train"], compare_config, config.g_seeds, runtime)]
    gs = [f[0] for f in fits]
    seconds["features_and_g"] = time.perf_counter() - start
    layer_a, layer_b = comparison.a.layer, comparison.b.layer
    trunk_a, head_a = split_model(clf_a.model, layer_a, clf_a.meta.preprocess.input_size)
    _, head_b = split_model(clf_b.model, layer_b, clf_b.meta.preprocess.input_size)
    heads = {"A": _head(head_a, clf_a, data.classes, config), "B": _head(head_b, clf_b, data.classes, config)}
    work = Path(tempfile.mkdtemp(prefix="build-", dir=_work_root(cache_dir)))
    try:
        t0 = time.perf_counter()
        variants, tables = _variants(gs, pairs, config, work)
        labels = {s: pairs[s][0].y for s in ("train", "val", "test")}
        seconds["refined_features_and_var"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        jobs = sum(len(v.sets) for v in variants) * config.seeds
        stage(f"fine-tuning {len(variants)} variants x {config.seeds} seeds{f' x {len(gs)} g fits' if len(gs) > 1 else ''} = {jobs} runs ({config.protocol} protocol, {config.head.epochs} epochs each)")
        results, predictions, refined_head, exported = _finetune_all(variants, labels, heads, config, runtime)
        seconds["finetune"] = time.perf_counter() - t0
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if not dist.is_main():
        dist.barrier()  # wait for rank 0's export so every process leaves together
        return None
    g, comparison.fit = fits[exported["g_fit"]]  # the report's Var table, fit and spec describe the g the model exports
    comparison.tables = tables[exported["g_fit"]]
    model = RefinedModel(copy.deepcopy(trunk_a), g.cpu(), refined_head.cpu()).eval()  # its own trunk: freezing it leaves A as it was
    for p in model.parameters():
        p.requires_grad_(False)
    t0 = time.perf_counter()
    stage("ONNX export and validation" + (" and INT8 quantisation" if config.export.quantize else ""))
    val_images, test = export_images(data, clf_a.meta.preprocess, config.export)
    paired = paired_tests(results, predictions, labels["test"], METRICS[config.protocol], config.seeds, config.resamples, config.bootstrap_seed)
    spec = _spec(config, data.classes, clf_a, clf_b, comparison, g, heads["B"].target)
    model.spec = spec  # what refiner.export needs to publish this model again
    g_fits = [GFit.of(fit, t["test"]) for (_, fit), t in zip(fits, tables)]
    try:
        with publish(models, config.name, model, spec, config.export, val_images, test) as out:
            seconds["export"] = time.perf_counter() - t0
            seconds["total"] = time.perf_counter() - start
            report = BuildReport(
                name=config.name, version=out.version, task=task, classes=data.classes, config=config,
                variants=results, paired=paired, verdict=headline(results, paired, config.seeds, len(gs)), comparison=comparison,
                seed_varies=seed_varies(config.protocol), g_fits=g_fits, exported_run=exported, g_file=Path(g_file).name if g_file else None, export=out.check,
                quantization=out.quantization, seconds=seconds, runtime={**runtime.record(), "processes": dist.world_size()},
            )  # fmt: skip
            save_predictions(out.folder / PREDICTIONS, {s: labels[s] for s in ("val", "test")}, predictions)
            write_build_report(out.folder, report)
    finally:
        dist.barrier()
    for v in results:
        if v.is_diverged:
            warnings.warn(
                f"fine-tuning on {v.features} diverged (non-finite loss or CE) in {sum(v.diverged)} of {len(v.diverged)} runs: "
                "marked diverged and left out of the paired tests; a lower --head-lr may help",
                stacklevel=2,
            )
    worse = worse_than_baselines(paired)
    if worse:
        warnings.warn(
            f"the exported refined model is worse than {', '.join(t.baseline for t in worse)} beyond noise (target-class "
            f"test accuracy, {', '.join(f'{100 * t.mean:+.2f}' for t in worse)} points, Holm-adjusted where secondary); see report.html",
            stacklevel=2,
        )
    x_b = next(v for v in results if v.features == "x_B")
    if overlap := data.overlap_warning(x_b.val_acc, x_b.test_acc, "x_B"):
        warnings.warn(overlap, stacklevel=2)
    return BuildResult(report=report, path=Path(models) / config.name / str(out.version), model=model)


def _check_sources(clf_a: Classifier, clf_b: Classifier, task: str) -> None:
    """A and B must come from the build task's dataset (when their checkpoints say)."""
    dataset = get_task(task).load
    for side, clf in (("A", clf_a), ("B", clf_b)):
        if clf.meta.task is not None and get_task(clf.meta.task).load is not dataset:
            raise CheckpointError(
                f"net {side} ({clf.path.name}) was trained on task {clf.meta.task!r}, whose data differ from "
                f"the build task {task!r}; build nets trained on the same dataset"
            )


def _check_label_spaces(clf_a: Classifier, clf_b: Classifier, target: list[str]) -> None:
    """The paper protocol keeps the base classifiers: A and B must share one label set holding every target class."""
    names_a, names_b = set(clf_a.meta.class_names), set(clf_b.meta.class_names)
    if names_a != names_b:
        raise ConfigError(
            f"--protocol paper keeps the base classifiers, but A and B disagree on class names: only in A "
            f"{sorted(names_a - names_b)}, only in B {sorted(names_b - names_a)}; use --protocol sound"
        )
    missing = [c for c in target if c not in names_a]
    if missing:
        raise ConfigError(
            f"--protocol paper scores target classes among the base nets' outputs, but {missing} are not among "
            f"their {len(names_a)} classes ({', '.join(clf_a.meta.class_names)}); use --protocol sound or --classes"
        )


def _head(upper: nn.Module, clf: Classifier, target: list[str], config: BuildConfig) -> _Head:
    """The paper keeps the pretrained classifier (targets at their base indices); sound gets a new target classifier per run."""
    if config.protocol == "paper":
        return _Head(upper, [clf.meta.class_names.index(c) for c in target], None)
    return _Head(upper, list(range(len(target))), clf.meta.arch)


def _refit(train: tuple[FeatureSet, FeatureSet], config: CompareConfig, g_seeds: int, runtime: Runtime) -> list[tuple[IsomorphismNet, FitResult]]:
    """g fitted again g_seeds - 1 times, from the next seeds: its own fitting noise enters the bootstrap."""
    if g_seeds < 2:
        return []
    stage(f"fitting g {g_seeds - 1} more times (--g-seeds {g_seeds})")
    out = []
    for j in range(1, g_seeds):
        seed = config.fit.seed + j
        out.append(fit_isomorphism(train[0].x, train[1].x, config.g, config.fit.model_copy(update={"seed": seed}), runtime=runtime, desc=f"fit g (seed {seed})"))
    return out


def _work_root(cache_dir: Path | None) -> Path:
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    return root


def _variants(
    gs: list[IsomorphismNet], pairs: dict[str, tuple[FeatureSet, FeatureSet]], config: BuildConfig, work: Path
) -> tuple[list[_Variant], list[dict[str, VarianceTable]]]:
    """Feature sources of every variant (x_A, x_B, g(x_A), the Delta-shuffle control, prefix sums of orders) and each g's Var tables."""
    k_max = gs[0].orders
    orders = list(range(k_max + 1)) if config.ablations else [k_max]
    splits = ("train", "val", "test")
    derived, control, tables = [], [], []
    for j, g in enumerate(gs):
        d, c, t = {}, {}, {}
        for s in splits:
            d[s], t[s] = _derive(g, *pairs[s], orders, work / str(j) / s, measure=s != "train")
            c[s] = _shuffled_delta(pairs[s][1].x, d[s][k_max], work / str(j) / s / "control.npy", seed=config.control_seed)
        derived.append(d)
        control.append(c)
        tables.append({s: t[s] for s in ("val", "test")})
    out = [
        _Variant("features from A", "x_A", "A", [{s: pairs[s][0].x for s in splits}]),
        _Variant("features from B (no Δ removal)", "x_B", "B", [{s: pairs[s][1].x for s in splits}]),
        _Variant("refined: g(x_A) (x^Δ removed)", REFINED, "B", [{s: d[s][k_max] for s in splits} for d in derived]),
        _Variant("control: x_B minus another image's x^Δ", CONTROL, "B", control),
    ]
    for m in orders[:-1]:
        name = " + ".join(f"x^({k})" for k in range(m + 1))
        out.append(_Variant(f"ablation: {name}", name, "B", [{s: d[s][m] for s in splits} for d in derived]))
    return out, tables


@torch.no_grad()
def _derive(
    g: IsomorphismNet, fa: FeatureSet, fb: FeatureSet, orders: list[int], folder: Path, measure: bool
) -> tuple[dict[int, np.ndarray], VarianceTable | None]:
    """x^(0) + ... + x^(m) in B's feature space for each m in `orders` (memory maps), and the Var table.

    One decomposition per batch serves both; when neither ablations nor the
    Var table are wanted, the plain forward pass g(x_A) is enough.
    """
    folder.mkdir(parents=True)
    shape = (len(fa.x), *g.shape_b)
    arrays = {m: np.lib.format.open_memmap(folder / f"order{m}.npy", mode="w+", dtype=np.float32, shape=shape) for m in orders}
    acc = VarianceAccumulator(g) if measure else None
    device = next(g.parameters()).device
    start = 0
    for xa, xb in iter_batches(fa.x, fb.x, batch_size=256):
        xa, xb = xa.to(device), xb.to(device)
        if acc is None and len(orders) == 1:
            arrays[orders[0]][start : start + len(xa)] = g(xa).cpu().numpy()
        else:
            dec = g.decompose(xa, xb if acc else None)
            if acc:
                acc.add(xa, xb, dec)
            sums = torch.stack(dec.components).cumsum(0)
            for m, arr in arrays.items():
                arr[start : start + len(xa)] = g.unstandardize(sums[m]).cpu().numpy()
        start += len(xa)
    for arr in arrays.values():
        arr.flush()
    return arrays, acc.table() if acc else None


def derangement(n: int, seed: int) -> np.ndarray:
    """A permutation with no fixed point: image i is paired with another image pi[i]."""
    if n < 2:
        raise ValueError(f"the Δ-shuffle control needs at least 2 images in a split, got {n}")
    order = np.random.default_rng(seed).permutation(n)
    pi = np.empty(n, dtype=np.int64)
    pi[order] = np.roll(order, -1)
    return pi


def _shuffled_delta(xb: np.ndarray, gxa: np.ndarray, path: Path, seed: int, batch: int = 256) -> np.ndarray:
    """x_B - x^Delta of another image of the same split (x^Delta = x_B - g(x_A)): Delta's energy, no image-specific content."""
    pi = derangement(len(xb), seed)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=xb.shape)
    for i in range(0, len(xb), batch):
        j = np.sort(pi[i : i + batch])  # memory maps read faster in order
        delta = dict(zip(j.tolist(), np.asarray(xb[j], dtype=np.float32) - gxa[j]))
        other = np.stack([delta[k] for k in pi[i : i + batch].tolist()])
        out[i : i + batch] = np.asarray(xb[i : i + batch], dtype=np.float32) - other
    out.flush()
    return out


def _finetune_all(
    variants: list[_Variant], labels: dict[str, np.ndarray], heads: dict[str, _Head], config: BuildConfig, runtime: Runtime
) -> tuple[list[VariantResult], dict[str, dict[str, np.ndarray]], nn.Module, dict[str, int]]:
    """Fine-tune every variant for every g fit and seed (jobs split across ranks).

    Returns the results, the per-image predictions per variant, the exported
    head (best refined run on validation data), and that run's g fit and seed.
    Labels are target indices; the paper protocol maps them to each side's base indices.
    """
    jobs = [(v, j, seed) for v in variants for j in range(len(v.sets)) for seed in range(config.seeds)]
    mine: dict[int, dict[str, torch.Tensor]] = {}  # this rank's refined heads (state dicts)
    track_test = config.protocol == "paper"
    runs_here = len(range(dist.rank(), len(jobs), dist.world_size()))  # run_split's share of this rank
    options = ["--seeds N", "--head-epochs N", *(["--no-ablations"] if config.ablations else []), *(["--device cuda"] if runtime.device.type == "cpu" else [])]
    shown = bar(
        total=runs_here * config.head.epochs, desc=f"fine-tuning (0/{runs_here} runs done)", unit="epoch",
        advice=f"to shorten it: {', '.join(options)}",
    )  # fmt: skip

    def run(index: int) -> HeadResult:
        variant, j, seed = jobs[index]
        side = heads[variant.head_from]
        torch.manual_seed(seed)  # the new classifier's initialisation (sound), then data order and dropout
        head = side.fresh()
        for p in head.parameters():
            p.requires_grad_(True)
        rng = np.random.default_rng(seed)
        to_output = np.asarray(side.target)

        def loader(split: str, shuffle: bool = False):
            x, y = variant.sets[j][split], to_output[labels[split]]
            return lambda: iter_batches(x, y, indices=rng.permutation(len(y)) if shuffle else None, batch_size=config.head.batch_size)

        fits = f" g{j}" if len(variant.sets) > 1 else ""
        head, res = finetune_head(
            head, loader("train", True), loader("val"), loader("test"), config.head, seed,
            target=side.target, track_test=track_test, desc=f"{variant.features}{fits} seed {seed}", runtime=runtime, progress=shown,
        )  # fmt: skip
        if variant.features == REFINED:
            mine[index] = {k: v.detach().cpu() for k, v in head.state_dict().items()}
        shown.set_description_str(f"fine-tuning ({index // dist.world_size() + 1}/{runs_here} runs done)")
        return res

    runs = dist.run_split(list(range(len(jobs))), run)
    shown.close()
    results, predictions = [], {}
    for v in variants:
        mine_v = [(j, seed, runs[i]) for i, (w, j, seed) in enumerate(jobs) if w is v]
        results.append(VariantResult.from_runs(v.name, v.features, v.head_from, mine_v))
        predictions[v.features] = stack_runs(mine_v)
    best = _exported(jobs, runs)
    state = dist.broadcast(mine.get(best), src=best % dist.world_size())  # run_split gives job i to rank i % world
    side = heads["B"]
    head = side.fresh()
    head.load_state_dict(state)
    if config.protocol == "paper":  # the artifact answers in the target classes, sliced from the base outputs
        head = nn.Sequential(head, OutputSlice(side.target))
    _, g_fit, seed = jobs[best]
    return results, predictions, head.eval(), {"g_fit": g_fit, "seed": seed}


def _exported(jobs: list[tuple[_Variant, int, int]], runs: list[HeadResult]) -> int:
    """The refined run the artifact keeps: the best on validation data, the first on ties; diverged runs never."""
    refined = [i for i, (v, _, _) in enumerate(jobs) if v.features == REFINED and not runs[i].diverged]
    if not refined:
        raise DivergedError("every fine-tuning run of the refined model diverged (non-finite loss): nothing to export; lower --head-lr")
    return max(refined, key=lambda i: (runs[i].val.correct, -i))


def _spec(
    config: BuildConfig, classes: list[str], clf_a: Classifier, clf_b: Classifier, comparison: ComparisonReport, g: IsomorphismNet,
    b_target: list[int],
) -> RefinedSpec:  # fmt: skip
    """How to rebuild the exported refined model (b_target: the target classes among B's outputs), with the build's provenance."""
    kept = config.protocol == "paper"
    return RefinedSpec(
        a=NetCut.of(clf_a, comparison.a.layer), b=NetCut.of(clf_b, comparison.b.layer), g=comparison.g, shape_a=list(g.shape_a), shape_b=list(g.shape_b),
        head="kept" if kept else "new", indices=b_target if kept else None,
        class_names=classes, preprocess=clf_a.meta.preprocess,
        info={
            "a": {"file": comparison.a.path, "sha256": comparison.a.sha256, "arch": comparison.a.arch},
            "b": {"file": comparison.b.path, "sha256": comparison.b.sha256, "arch": comparison.b.arch},
            "instability_test": comparison.tables["test"].instability,
            "protocol": config.protocol,
        },
    )  # fmt: skip
