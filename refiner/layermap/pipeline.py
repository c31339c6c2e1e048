"""`refiner atlas`: a layer x layer CKA map of two nets in one streamed pass, then knowledge consistency on matched pairs."""

from __future__ import annotations

import hashlib
import itertools
import json
import time
from collections.abc import Callable, Iterator
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from refiner.layermap.stream import LayerInfo, capture_model, choose_layers, paired_batches, probe_layers, stream_cka
from refiner.data.tasks import TaskData
from refiner.engine.comparison import CompareConfig, Sources, compare, default_layer
from refiner.engine.features import Batches, exports_dir, images_of
from refiner.engine.ortforward import choose_forward
from refiner.engine.device import Runtime, RuntimeConfig
from refiner.engine.fitting import FitConfig
from refiner.engine.isomorphism import IsomorphismConfig
from refiner.errors import ConfigError, LayerError, RefinerError
from refiner.models.checkpoints import Classifier
from refiner.progress import bar, stage

__all__ = ["AtlasConfig", "ConsistencyRow", "AtlasReport", "plan_layers", "estimate", "run_atlas"]

METHOD = "minibatch linear CKA, unbiased HSIC_1 averaged over minibatches (Nguyen, Raghu and Kornblith 2021; Song et al. 2012)"


class AtlasConfig(BaseModel):
    """What the atlas measures and how."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    layers_a: list[str] | None = None  # None: the clean split points, thinned evenly by depth to max_layers
    layers_b: list[str] | None = None
    max_layers: int = Field(16, ge=1)  # per net, when the layers are chosen automatically
    images: int = Field(1000, ge=1)  # images of the split, a seeded random subset when the split has more
    split: str = "test"  # a task's split measured (the CLI), or the name the caller's batches are recorded under
    batch_size: int = Field(64, ge=1)  # images per minibatch (per process under torchrun)
    seed: int = 0  # draws the image subset and g's initialisation
    positions: bool | Literal["auto"] = "auto"  # also refiner's (image, position) CKA for pairs with the same positions (auto: if cheap)
    consistency: Literal["none", "matched", "diagonal"] = "matched"  # which pairs get a fitted g
    g: IsomorphismConfig = Field(default_factory=IsomorphismConfig)
    fit: FitConfig = Field(default_factory=lambda: FitConfig(max_steps=2000))  # a bounded budget per pair
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)


class ConsistencyRow(BaseModel):
    """Knowledge consistency of one pair of layers: g fitted on the training split, measured on the test split."""

    layer_a: str
    layer_b: str
    cka: float  # the grid's minibatch CKA of the pair
    cka_positions: float | None = None  # refiner's (image, position) CKA, x_A resized to B's size as g does
    instability: float | None = None  # Var(x^Delta) / Var(x_B)
    var_orders: list[float] = []  # Var(x^(k)), k = 0..K
    var_delta: float | None = None
    holdout_mse: float | None = None  # g's best held-out MSE on training pairs (units of Var(x_B))
    steps: int | None = None  # optimiser steps taken, and why fitting stopped
    stop: str | None = None
    seconds: float | None = None
    default: bool = False  # the pair `refiner build` uses without --layer-a/--layer-b
    flags: str  # the build/fit flags that select this pair
    skipped: str | None = None  # why no g was fitted (e.g. a token layer against an image map)


class AtlasReport(BaseModel):
    """atlas.json: the CKA grid (rows = A's layers), its provenance, and the consistency rows."""

    a: dict[str, str]  # file, sha256, arch
    b: dict[str, str]
    task: str | None  # None: batches handed in from Python
    split: str
    images: int  # images measured (all processes)
    batches: int
    seed: int
    method: str
    layers_a: list[str]
    layers_b: list[str]
    shapes_a: list[list[int]]
    shapes_b: list[list[int]]
    cka: list[list[float | None]]  # minibatch unbiased CKA, rows = A's layers (None: a constant layer)
    cka_low: list[list[float | None]] | None = None  # its 95 % bootstrap interval over the batches (None: one batch)
    cka_high: list[list[float | None]] | None = None
    cka_positions: list[list[float | None]] | None = None  # refiner's (image, position) CKA; None where positions differ
    default_pair: list[str]  # the layers `refiner build` uses by default
    consistency_mode: str
    consistency: list[ConsistencyRow] = []
    seconds: dict[str, float]
    runtime: dict[str, object]
    complete: bool = True  # False while pairs are still being fitted (written after the CKA pass and after each pair)
    pairs_total: int = 0  # the pairs that get a g; len(consistency) of them are done
    run_key: str = ""  # digest of what was asked (nets, data, layers, settings): a re-run with the same key resumes


def plan_layers(clf: Classifier, asked: list[str] | None, max_layers: int) -> list[LayerInfo]:
    """The layers of `clf` the atlas captures (asked, or chosen automatically with the default layer kept)."""
    name = f"{clf.meta.arch} ({clf.path.name})"
    return choose_layers(probe_layers(clf.model, clf.meta.preprocess.input_size, name), asked, _default_or_none(clf), max_layers)


def _default_or_none(clf: Classifier) -> str | None:
    try:
        return default_layer(clf)
    except LayerError:  # a module with no clean cut of its own: every layer still maps
        return None


def estimate(infos_a: list[LayerInfo], infos_b: list[LayerInfo], config: AtlasConfig, images: int | None, batch: int) -> str:
    """One line: memory the pass holds per batch (how long it takes is said after its first batch, measured)."""
    per_image = sum(4 * int(np.prod(i.shape)) for i in [*infos_a, *infos_b])
    grams = 8 * (len(infos_a) + len(infos_b)) * batch * batch * 3
    sums = 8 * sum(i.shape[0] * j.shape[0] for i in infos_a for j in infos_b if _same_positions(i, j)) if config.positions else 0
    mib = (2 * per_image * batch + grams + sums) / 2**20
    fits = "" if config.consistency == "none" else (
        f"; then a g per pair ({config.consistency}), up to {config.fit.max_steps} steps each, after its training features are cached"
    )  # fmt: skip
    count = f"{images} images in batches of {batch}" if images is not None else f"batches of {batch}"
    return (
        f"{count}: about {mib:.0f} MiB held per batch (captured layers twice, Gram matrices, running sums) beside the nets' "
        f"own activations{fits}"
    )


def _same_positions(a: LayerInfo, b: LayerInfo) -> bool:
    key = lambda s: s[1:] if len(s) == 3 else s[:1] if len(s) == 2 else () if len(s) == 1 else None  # noqa: E731
    return len(a.shape) == len(b.shape) and key(a.shape) == key(b.shape)


def run_atlas(
    clf_a: Classifier, clf_b: Classifier, data: Batches, config: AtlasConfig, *, data_b: Batches | None = None,
    train: TaskData | Sources | None = None, task: str | None = None, cache_dir=None,
    checkpoint: Callable[[AtlasReport], None] | None = None, resume: AtlasReport | None = None,
) -> AtlasReport:  # fmt: skip
    """Measure the CKA grid between every chosen layer of A and of B over `data`, then fit g on the pairs `config.consistency` names.

    `data` (and B's view of the same images, `data_b`, when B is fed differently) gives the
    minibatches of the estimator as they come; the nets' input sizes are those of the first
    batch. `train`: where g is fitted for the consistency rows (a task's splits, whose
    `config.split` is then the measured one, or the caller's batches by split name); None: no rows.
    `checkpoint` is called with the report so far (complete=False) after the CKA pass and after each
    pair, and with the whole report at the end; `resume`, a partial report of the same run (same
    run_key), skips the CKA pass and the pairs it holds.
    """
    runtime = Runtime.resolve(config.runtime)
    t_start = time.perf_counter()
    if train is not None and config.consistency != "none" and not isinstance(train, TaskData) and _one_pass(data, data_b):
        raise ConfigError("data is a one-pass iterator, but the consistency rows read it again: pass a DataLoader or a list of batches")
    first_a, data = _peek(data, "data")
    first_b, data_b = _peek(data_b, "data_b") if data_b is not None else (first_a, None)
    clf_a, clf_b = clf_a.fed_at(tuple(first_a.shape[1:])), clf_b.fed_at(tuple(first_b.shape[1:]))
    infos_a = plan_layers(clf_a, config.layers_a, config.max_layers)
    infos_b = plan_layers(clf_b, config.layers_b, config.max_layers)
    names_a, names_b = [i.name for i in infos_a], [i.name for i in infos_b]
    default_pair = [_default_or_none(clf_a) or "", _default_or_none(clf_b) or ""]
    measured = train if isinstance(train, TaskData) else None if train is None else {**train, config.split: (data, data_b)}
    task = task if task is not None else train.task if isinstance(train, TaskData) else None
    key = run_key(clf_a, clf_b, config, names_a, names_b, task, first_a, first_b, _length(data), measured is not None)
    if resume is not None and resume.run_key != key:
        raise ConfigError("the partial atlas to resume was measured with other nets, data, layers or settings; start it afresh")
    if resume is not None:
        stage(f"resuming: the CKA grid and {len(resume.consistency)} of {resume.pairs_total} pairs are done")
        report = resume.model_copy(update={"runtime": runtime.record()})
    else:
        net_a, net_b = capture_model(clf_a.model, names_a, runtime), capture_model(clf_b.model, names_b, runtime)
        batch, batches = len(first_a), _length(data)
        onnx_cache = exports_dir(cache_dir)
        net_a = choose_forward(net_a, names_a, first_a, runtime, onnx_cache, "net A", batches)
        net_b = choose_forward(net_b, names_b, first_b, runtime, onnx_cache, "net B", batches)
        stage(estimate(infos_a, infos_b, config, _images(data, batch), batch))
        stage(f"CKA of {len(names_a)} x {len(names_b)} layers on {config.split} images")
        result = stream_cka(net_a, net_b, names_a, names_b, paired_batches(data, data_b), runtime, positions=config.positions, total=_length(data))
        del net_a, net_b
        positions = None
        if result.position_cka:
            positions = [[_num(result.position_cka.get((i, j))) for j in range(len(names_b))] for i in range(len(names_a))]
        low, high = result.cka_interval or (None, None)
        report = AtlasReport(
            a=_record(clf_a), b=_record(clf_b), task=task, split=config.split, images=result.images, batches=result.batches,
            seed=config.seed, method=METHOD, layers_a=names_a, layers_b=names_b, shapes_a=[list(i.shape) for i in infos_a],
            shapes_b=[list(i.shape) for i in infos_b], cka=_grid(result.cka), cka_low=_grid(low), cka_high=_grid(high),
            cka_positions=positions, default_pair=default_pair, consistency_mode=config.consistency if measured is not None else "none",
            seconds=result.seconds, runtime=runtime.record(), complete=measured is None, run_key=key,
        )  # fmt: skip
    if measured is not None:
        pairs = _pairs(config, np.array(report.cka, dtype=float), names_a, names_b, default_pair)
        report = report.model_copy(update={"pairs_total": len(pairs), "complete": False})
        if checkpoint is not None:
            checkpoint(report)
        report = _consistency(clf_a, clf_b, measured, config, report, pairs, cache_dir, checkpoint)
    seconds = {**report.seconds, "total": report.seconds.get("total", 0.0) * (resume is not None) + time.perf_counter() - t_start}
    report = report.model_copy(update={"complete": True, "seconds": seconds})
    if checkpoint is not None:
        checkpoint(report)
    return report


def run_key(
    clf_a: Classifier, clf_b: Classifier, config: AtlasConfig, names_a: list[str], names_b: list[str], task: str | None,
    first_a: Tensor, first_b: Tensor, batches: int | None, consistency: bool,
) -> str:  # fmt: skip
    """What decides the atlas's numbers: both nets' weights, the settings (not the device), the layers, and the data
    (its first batch and length, the task): a re-run with the same key measures the same thing, so it may resume."""
    settings = config.model_dump(mode="json", exclude={"runtime"})  # the device and forward change values within float tolerance only
    parts = [_record(clf_a), _record(clf_b), settings, names_a, names_b, task, batches, consistency, list(first_a.shape), list(first_b.shape)]
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode())
    for x in (first_a, first_b):
        digest.update(x.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _grid(values: np.ndarray | None) -> list[list[float | None]] | None:
    return None if values is None else [[_num(v) for v in row] for row in values]


def _record(clf: Classifier) -> dict[str, str]:
    return {"file": clf.path.name, "sha256": clf.sha256, "arch": clf.meta.arch}


def _peek(batches: Batches, what: str) -> tuple[Tensor, Batches]:
    """The first batch's images, and batches that give that batch again first (nothing is read twice or skipped)."""
    if isinstance(batches, (list, tuple)):
        if not batches:
            raise ConfigError(f"{what} gave no batches")
        return images_of(batches[0], what), batches
    iterator = iter(batches)
    try:
        first = next(iterator)
    except StopIteration:
        raise ConfigError(f"{what} gave no batches") from None
    again = itertools.chain([first], iterator) if iterator is batches else _Restarted(first, iterator, batches)
    return images_of(first, what), again


class _Restarted:
    """A re-iterable's batches after its first was read: the pass already begun goes on (a shuffled loader keeps
    its order); later passes start afresh."""

    def __init__(self, first, rest: Iterator, batches: Batches) -> None:
        self._pass, self.batches = itertools.chain([first], rest), batches

    def __iter__(self) -> Iterator:
        current, self._pass = self._pass, None
        return current if current is not None else iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _one_pass(*batches: Batches | None) -> bool:
    return any(b is not None and iter(b) is b for b in batches)


def _images(data: Batches, batch: int) -> int | None:
    """Images in `data` when it can say (a DataLoader's dataset), else its number of batches times the first's size."""
    dataset = getattr(getattr(data, "batches", data), "dataset", None)
    if dataset is not None and hasattr(dataset, "__len__"):
        return len(dataset)
    n = _length(data)
    return n * batch if n is not None else None


def _length(data: Batches) -> int | None:
    try:
        return len(data)
    except TypeError:
        return None


@torch.no_grad()
def _num(v: float | None) -> float | None:
    return None if v is None or not np.isfinite(v) else float(v)


def _pairs(config: AtlasConfig, grid: np.ndarray, names_a: list[str], names_b: list[str], default_pair: list[str]) -> list[tuple[int, int]]:
    """The (row, column) pairs that get a g, with `refiner build`'s default pair added for comparison."""
    if config.consistency == "diagonal":
        pairs = [(i, i) for i in range(min(grid.shape))]
    elif config.consistency == "matched":
        pairs = [(i, int(np.nanargmax(row))) for i, row in enumerate(grid) if np.isfinite(row).any()]
    else:
        return []
    la, lb = default_pair
    if pairs and la in names_a and lb in names_b and (names_a.index(la), names_b.index(lb)) not in pairs:
        pairs.append((names_a.index(la), names_b.index(lb)))
    return pairs


def _consistency(
    clf_a: Classifier, clf_b: Classifier, data: TaskData | Sources, config: AtlasConfig, report: AtlasReport,
    pairs: list[tuple[int, int]], cache_dir, checkpoint: Callable[[AtlasReport], None] | None,
) -> AtlasReport:  # fmt: skip
    """A g per pair, with a bounded budget, skipping the pairs `report` already holds; a pair g cannot join (token map
    against image map, not a clean cut) is kept, with why. One overall progress over the pairs, and once the first fit
    says the whole will take over 10 minutes, the estimate and the options that shorten it (refiner.progress.bar)."""
    names_a, names_b = report.layers_a, report.layers_b
    done = {(r.layer_a, r.layer_b) for r in report.consistency}
    todo = [(i, j) for i, j in pairs if (names_a[i], names_b[j]) not in done]
    rows = list(report.consistency)
    advice = (
        "to shorten: --consistency none (the CKA grid only), --max-layers N (fewer pairs), --g-steps N (a smaller budget per g), "
        "--train-per-class N (fewer training images); Ctrl-C keeps the pairs done, and the same command resumes"
    )  # fmt: skip
    overall = bar(total=len(pairs), initial=len(pairs) - len(todo), desc="g fits", unit="pair", advice=advice)
    try:
        for i, j in todo:
            la, lb = names_a[i], names_b[j]
            row = {"layer_a": la, "layer_b": lb, "cka": float(report.cka[i][j]), "default": [la, lb] == report.default_pair, "flags": f"--layer-a {la} --layer-b {lb}"}
            stage(f"g {len(rows) + 1}/{len(pairs)}: {la} -> {lb}, up to {config.fit.max_steps} steps")
            compare_config = CompareConfig(layer_a=la, layer_b=lb, g=config.g, fit=config.fit.model_copy(update={"seed": config.seed}), runtime=config.runtime)
            try:
                _, compared, _ = compare(clf_a, clf_b, data, compare_config, cache_dir, measure=(config.split,))
            except RefinerError as e:
                rows.append(ConsistencyRow(**row, skipped=str(e)))
            else:
                table, fit = compared.tables[config.split], compared.fit
                rows.append(
                    ConsistencyRow(
                        **row, cka_positions=_num(table.cka), instability=_num(table.instability), var_orders=table.var_orders,
                        var_delta=_num(table.var_delta), holdout_mse=_num(min(fit.holdout_mse)) if fit.holdout_mse else None,
                        steps=fit.total_steps, stop=fit.stop, seconds=compared.seconds.get("fit"),
                    )  # fmt: skip
                )
            overall.update(1)
            report = report.model_copy(update={"consistency": list(rows)})
            if checkpoint is not None:
                checkpoint(report)
    finally:
        overall.close()
    return report
