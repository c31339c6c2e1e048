"""Compare two classifiers on a task: fit g between their features, then measure the Var table."""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from refiner.data.samples import Preprocess
from refiner.data.tasks import TaskData, get_task, same_dataset
from refiner.engine import distributed as dist
from refiner.engine.device import Runtime, RuntimeConfig
from refiner.engine.features import Batches, FeatureSet, batch_features, classifier_features, features_cached, iter_batches
from refiner.engine.fitting import FitConfig, FitResult, fit_isomorphism
from refiner.engine.isomorphism import IsomorphismConfig, IsomorphismNet, load_isomorphism
from refiner.engine.metrics import VarianceTable, measure_isomorphism
from refiner.errors import CheckpointError, ConfigError
from refiner.models.checkpoints import Classifier
from refiner.models.layers import TokensToMap, feature_shape, split_model
from refiner.progress import bar

__all__ = ["Sources", "CompareConfig", "NetSide", "ComparisonReport", "compare", "default_layer", "measure_split", "load_fitted_g", "fitted_report"]


class CompareConfig(BaseModel):
    """Which layers to compare and how to fit g."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    layer_a: str | None = None  # None: the architecture's default layer
    layer_b: str | None = None
    g: IsomorphismConfig = Field(default_factory=IsomorphismConfig)
    fit: FitConfig = Field(default_factory=FitConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)  # device, AMP, threads, workers
    cache_dtype: Literal["float32", "float16"] = "float32"  # storage of cached features (float16 halves the disk)


class NetSide(BaseModel):
    """One side of a comparison, for the record."""

    path: str
    sha256: str
    arch: str
    layer: str
    feature_shape: list[int]
    preprocess: Preprocess | None = None  # what its images were fed as (None: before it was recorded, or batches from Python)
    class_names: list[str] | None = None  # names of its outputs (None in reports written before they were recorded)
    weights_sha256: str | None = None  # hash of the weights themselves (None in reports written before it was recorded)
    input_size: tuple[int, int, int] | None = None  # (C, H, W) its images had (None in reports written before it was recorded)


class ComparisonReport(BaseModel):
    """Provenance, fit history and the Var table per split (paper Section 4.2)."""

    task: str | None  # None: batches handed in from Python, of no task refiner knows
    classes: list[str] | None  # None: as for task
    data_root: str | None = None  # the resolved --data folder (None: bundled data, or a report written before it was recorded)
    val_from: str | None = None  # where validation came from: "train" (carved), "val" (the val/ folder), "test" (half of test); None in older reports
    a: NetSide
    b: NetSide
    g: IsomorphismConfig
    fit: FitResult
    tables: dict[str, VarianceTable]  # split name -> Var table
    seconds: dict[str, float]
    runtime: dict[str, object]  # device, its name, AMP mode, threads, workers


def default_layer(clf: Classifier) -> str:
    return clf.default_layer


Sources = dict[str, tuple[Batches, Batches | None]]  # split name -> (A's batches, B's batches; None: the same as A's)


def _side(clf: Classifier, layer: str, shape: tuple[int, ...], fed_by_caller: bool) -> NetSide:
    return NetSide(
        path=clf.path.name, sha256=clf.sha256, arch=clf.meta.arch, layer=layer, feature_shape=list(shape),
        preprocess=None if fed_by_caller else clf.meta.preprocess, class_names=clf.meta.class_names, weights_sha256=clf.weights_sha256,
        input_size=clf.meta.preprocess.input_size,
    )  # fmt: skip


def measure_split(g: IsomorphismNet, fa: FeatureSet, fb: FeatureSet) -> VarianceTable:
    return measure_isomorphism(g, iter_batches(fa.x, fb.x, batch_size=128))


def compare(
    clf_a: Classifier,
    clf_b: Classifier,
    data: TaskData | Sources,
    config: CompareConfig | None = None,
    cache_dir: Path | None = None,
    measure: tuple[str, ...] = ("train", "test"),
    extra: tuple[str, ...] = (),
    fitted: tuple[IsomorphismNet, FitResult] | None = None,
) -> tuple[IsomorphismNet, ComparisonReport, dict[str, tuple[FeatureSet, FeatureSet]]]:
    """Fit g: x_A -> x_B on the training split and measure the Var table on `measure` splits.

    `data`: a task's splits (features cached on disk), or the caller's batches per split name
    (features held in memory). `fitted`: a g fitted before for these layers (and its fit
    record); fitting is skipped. Returns g, the report, and the feature pairs of every
    split touched (train, `measure` and `extra`: splits the caller measures itself).
    """
    config = config or CompareConfig()
    runtime = Runtime.resolve(config.runtime)
    layer_a = config.layer_a or default_layer(clf_a)
    layer_b = config.layer_b or default_layer(clf_b)
    shapes, tokens = [], []
    for clf, layer in ((clf_a, layer_a), (clf_b, layer_b)):
        trunk, _ = split_model(clf.model, layer, clf.meta.preprocess.input_size)
        shapes.append(feature_shape(trunk, clf.meta.preprocess.input_size, f"{clf.meta.arch} ({clf.path.name})"))
        tokens.append(isinstance(trunk, TokensToMap))
    _check_token_pairing(layer_a, layer_b, shapes, tokens)
    if len(shapes[0]) != len(shapes[1]):
        raise ConfigError(
            f"layer {layer_a!r} of A gives shape {shapes[0]} but layer {layer_b!r} of B gives {shapes[1]}: "
            "both must be feature maps or both vectors"
        )
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    splits = list(dict.fromkeys(("train", *measure, *extra)))
    sides = ((clf_a, layer_a), (clf_b, layer_b))
    pairs = _task_features(data, sides, splits, cache_dir, runtime, config) if isinstance(data, TaskData) else _batch_pairs(data, sides, splits, runtime, cache_dir)
    seconds["features"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    fa, fb = pairs["train"]
    if fitted is None:
        g, fit = fit_isomorphism(fa.x, fb.x, config.g, config.fit, runtime=runtime)
    else:
        g, fit = fitted
        if (tuple(g.shape_a), tuple(g.shape_b)) != (tuple(shapes[0]), tuple(shapes[1])):
            raise ConfigError(f"the given g maps {tuple(g.shape_a)} -> {tuple(g.shape_b)}, but the layers give {shapes[0]} -> {shapes[1]}")
        g = g.to(runtime.device)
    seconds["fit"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    tables = {split: measure_split(g, *pairs[split]) for split in measure}
    seconds["measure"] = time.perf_counter() - t0
    task = data if isinstance(data, TaskData) else None
    report = ComparisonReport(
        task=task.task if task else None,
        classes=task.classes if task else None,
        data_root=str(task.root) if task and task.root is not None else None,
        val_from=task.val_from if task else None,
        a=_side(clf_a, layer_a, shapes[0], task is None),
        b=_side(clf_b, layer_b, shapes[1], task is None),
        g=g.config,
        fit=fit,
        tables=tables,
        seconds=seconds,
        runtime=runtime.record(),
    )
    return g, report, pairs


def _task_features(data: TaskData, sides, splits: list[str], cache_dir: Path | None, runtime: Runtime, config: CompareConfig) -> dict:
    """Both nets' features of each split of a task, from the disk cache or extracted into it under one progress bar."""
    missing = sum(
        len(dist.shard(len(data.split(s)))) for s in splits for clf, layer in sides
        if not features_cached(clf, layer, data, s, cache_dir, runtime, config.cache_dtype)
    )  # fmt: skip
    cpu = ", --device cuda" if runtime.device.type == "cpu" else ""
    shown = bar(total=missing, desc="features", unit="image", advice=f"they are cached; to shorten it: fewer images (--train-per-class N){cpu}") if missing else None
    pairs = {
        split: tuple(classifier_features(clf, layer, data, split, cache_dir, runtime=runtime, dtype=config.cache_dtype, progress=shown) for clf, layer in sides)
        for split in splits
    }
    if shown is not None:
        shown.close()
    return pairs


def _batch_pairs(data: Sources, sides, splits: list[str], runtime: Runtime, cache_dir: Path | None) -> dict:
    """Both nets' features of each split of the caller's batches, in one pass (B reads A's batches unless given its own)."""
    absent = [s for s in splits if s not in data]
    if absent:
        raise ConfigError(f"no batches given for {', '.join(absent)}; given: {', '.join(data) or 'none'}")
    pairs = {}
    for split in splits:
        pairs[split] = batch_features(sides, *data[split], runtime=runtime, desc=split, cache_dir=cache_dir)
    return pairs


def _check_token_pairing(layer_a: str, layer_b: str, shapes: list[tuple[int, ...]], tokens: list[bool]) -> None:
    """Tokens (a C x L x 1 map in sequence order) pair only with tokens of the same count, never with an image map."""
    if not any(tokens):
        return
    what = [f"{s[1]} tokens" if t else "x".join(map(str, s[1:])) + " map" if len(s) == 3 else "a vector" for s, t in zip(shapes, tokens)]
    if tokens[0] != tokens[1] and all(len(s) == 3 for s in shapes):
        raise ConfigError(
            f"layer {layer_a!r} of A gives {what[0]} and layer {layer_b!r} of B {what[1]}: resizing one onto the other "
            "would mix the token order with image rows; pair token layers with token layers, or choose vector layers"
        )
    if all(tokens) and shapes[0][1] != shapes[1][1]:
        raise ConfigError(
            f"layer {layer_a!r} of A gives {what[0]} and layer {layer_b!r} of B {what[1]}: g pairs tokens one to one, "
            "so both nets need the same token count (patch size and input size)"
        )


def fitted_report(path: Path) -> ComparisonReport:
    """The record `refiner fit` wrote into a g file: nets (with their preprocessing and class names), layers, data, fit."""
    return ComparisonReport.model_validate(load_isomorphism(path)[1]["report"])


def load_fitted_g(
    path: Path, clf_a: Classifier, clf_b: Classifier, config: CompareConfig, *,
    task: str | None = None, classes: list[str] | None = None, data_dir: Path | None = None, other_preprocess: Literal["refuse", "warn"] = "refuse",
    other_classes: Literal["refuse", "warn"] = "refuse",
) -> tuple[CompareConfig, tuple[IsomorphismNet, FitResult]]:  # fmt: skip
    """Load a g from `refiner fit`, check that it was fitted between these very nets (sha256), layers and preprocessing.

    Given `task` (and its `data_dir`) and `classes`, also that g was fitted on that data (see `_check_data`;
    `other_classes="warn"`: an export, which answers `classes` but fits nothing on them, is warned when g's fit
    did not include them all). A net fed otherwise than g was fitted on is refused, or with `other_preprocess="warn"`
    (an export asked for another preprocessing) a warning. Returns the config with the g's layers filled in, and (g, its fit record).
    """
    g, info = load_isomorphism(path)
    report = ComparisonReport.model_validate(info["report"])
    _check_data(Path(path).name, report, task, classes, data_dir, other_classes)
    for side, clf, net, layer in (("A", clf_a, report.a, config.layer_a), ("B", clf_b, report.b, config.layer_b)):
        if net.sha256 != clf.sha256 and (net.weights_sha256 or net.sha256) != clf.weights_sha256:
            raise CheckpointError(
                f"{Path(path).name} was fitted with net {side} {net.path} (sha256 {net.sha256[:12]}), not with "
                f"{clf.path.name} (sha256 {clf.sha256[:12]}); refit g or pass the nets it was fitted for"
            )
        if layer is not None and layer != net.layer:
            raise ConfigError(f"{Path(path).name} was fitted at layer {net.layer!r} of {side}, not {layer!r}; drop --layer-{side.lower()} or refit g")
        if net.preprocess is not None and net.preprocess != clf.meta.preprocess:
            diff = {k: v for k, v in net.preprocess.model_dump().items() if v != clf.meta.preprocess.model_dump()[k]}
            now = {k: clf.meta.preprocess.model_dump()[k] for k in diff}
            if other_preprocess == "warn":
                warnings.warn(f"{Path(path).name} was fitted on {side}'s images preprocessed with {diff}, exported with {now}: its accuracy there is not measured", stacklevel=2)
                continue
            raise ConfigError(
                f"{Path(path).name} was fitted on {side}'s images preprocessed with {diff}, not as now ({now}); "
                "leave out the preprocessing options (g's are used by default), or refit g"
            )
    return config.model_copy(update={"layer_a": report.a.layer, "layer_b": report.b.layer}), (g, report.fit)


def _check_data(
    name: str, report: ComparisonReport, task: str | None, classes: list[str] | None, data_dir: Path | None, other_classes: Literal["refuse", "warn"]
) -> None:  # fmt: skip
    """Refuse a g fitted on another dataset or other classes; warn when only the folder differs (a moved copy is legitimate).

    A g fitted from Python on the caller's batches records no task: it is used with a warning that nothing was checked.
    """
    if report.task is None:
        if task is not None:
            warnings.warn(f"{name} was fitted from Python on batches of no known task: not checked against task {task!r} or its classes", stacklevel=3)
        return
    if task is not None and not same_dataset(task, report.task):
        raise ConfigError(
            f"{name} was fitted on task {report.task!r}, another dataset than task {task!r}; "
            f"pass --task {report.task} and its --data, or refit g with `refiner fit --task {task}`"
        )
    if classes is not None and other_classes == "warn":
        if unseen := [c for c in classes if c not in report.classes]:
            warnings.warn(
                f"{name} was fitted on the classes {','.join(report.classes)} of {report.task!r}, without {','.join(unseen)}: "
                "the export answers them through a g that never saw their images (its accuracy there is measured on export)",
                stacklevel=3,
            )
    elif classes is not None and set(classes) != set(report.classes):
        raise ConfigError(
            f"{name} was fitted on the classes {','.join(report.classes)} of {report.task!r}, not on {','.join(classes)}; "
            f"refit g with `refiner fit --task {task or report.task} --on target` (and the same --classes), or leave --g out"
        )
    if task is None:
        return
    root = str(Path(data_dir).resolve()) if data_dir is not None else None
    if report.data_root is None and get_task(report.task).needs_data:
        warnings.warn(f"{name} does not record its data folder (written by an older refiner): not checked against {root!r}", stacklevel=3)
    elif report.data_root != root:
        warnings.warn(
            f"{name} was fitted on the data in {report.data_root!r}, this run reads {root!r}: "
            "fine for a copy of the same dataset, otherwise refit g on this folder",
            stacklevel=3,
        )
