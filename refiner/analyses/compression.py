"""Knowledge discarded by network compression (paper Section 4.4, Fig. 4 left).

The net is pruned in the manner of Han et al. (2015): the smallest-magnitude
share of all conv and linear weights is set to zero (one global threshold), and
the pruned net is fine-tuned with the zeros held. Then g reconstructs the
original net's feature from the pruned net's (g: pruned -> original); x^Delta is
the knowledge the compression discarded. Sparsity 0 is the unpruned net itself
(no fine-tuning), a control that discards nothing but g's fitting error.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn
from torch.nn.utils import prune

from refiner.reporting import img, report_folder
from refiner.analyses.figures import line_plot, picture_rows, save_pictures, setup_html, variance_rows, write_pages
from refiner.analyses.measure import (
    as_net,
    AnalysisConfig,
    DataRecord,
    Measured,
    accuracy_on_test,
    channel_shares,
    load_analysis_data,
    measure_pair,
    require_same_classes,
    runtime_record,
    save_net,
    top_images,
)
from refiner.data.datasets import ImageDataset
from refiner.data.tasks import TaskData
from refiner.engine.comparison import ComparisonReport
from refiner.engine.training import TrainConfig, train_classifier
from refiner.models.checkpoints import Classifier
from refiner.progress import bar
from refiner.reporting import html_table

__all__ = ["CompressionConfig", "PrunedNet", "CompressionReport", "magnitude_prune", "zero_fraction", "compression"]


class CompressionConfig(BaseModel):
    """Sparsities, fine-tuning of each pruned net, and the layer compared.

    Examples:
        >>> import refiner
        >>> refiner.CompressionConfig(sparsities=(0.5, 0.9)).sparsities
        (0.5, 0.9)
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    analysis: AnalysisConfig = Field(default_factory=AnalysisConfig)
    sparsities: tuple[float, ...] = (0.5, 0.8, 0.93)  # share of conv/linear weights set to zero, each in [0, 1)
    finetune: TrainConfig = Field(default_factory=lambda: TrainConfig(epochs=3, lr=0.01))  # after pruning (zeros held)
    layer: str | None = None  # None: the architecture's default layer
    images: int = Field(4, ge=0)  # test images pictured per sparsity

    @field_validator("sparsities")
    @classmethod
    def _in_range(cls, values: tuple[float, ...]) -> tuple[float, ...]:
        if not values:
            raise ValueError("give at least one sparsity, e.g. 0.5,0.8,0.93")
        bad = [v for v in values if not 0.0 <= v < 1.0]
        if bad:
            raise ValueError(f"sparsity {bad[0]} is outside [0, 1): it is the share of weights set to zero (0.9 = 90%)")
        return tuple(sorted(set(values)))


class PrunedNet(BaseModel):
    """One sparsity: the pruned net's accuracy and what it discarded."""

    sparsity: float  # requested share of conv/linear weights set to zero
    zero_fraction: float  # measured share of zero conv/linear weights after fine-tuning
    test_acc: float
    accuracy_drop: float  # original test accuracy - pruned test accuracy
    finetune: list[dict[str, float]]  # per-epoch figures of the fine-tuning (empty at sparsity 0)
    comparison: ComparisonReport  # g: pruned -> original; its test Var table holds Var(x^Delta), the discarded knowledge
    file: str  # the pruned, fine-tuned checkpoint inside the report folder


class CompressionReport(BaseModel):
    """report.json of `refiner analyze compression`."""

    config: CompressionConfig
    data: DataRecord
    model: str
    original_test_acc: float
    pruned: list[PrunedNet]
    pictured_channel: int | None  # channel with the largest discarded share at the highest sparsity
    pictured_images: list[int]
    seconds: float
    runtime: dict[str, object]  # device, its name, AMP mode, threads


def magnitude_prune(model: nn.Module, sparsity: float) -> nn.Module:
    """A copy of `model` whose smallest-magnitude `sparsity` share of conv and linear weights is masked to zero.

    One global threshold over all those weights; the masks stay attached
    (torch.nn.utils.prune), so training keeps the zeros.
    """
    pruned = copy.deepcopy(model)
    if sparsity > 0:
        params = [(m, "weight") for m in pruned.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=sparsity)
    return pruned


def zero_fraction(model: nn.Module) -> float:
    """Share of conv and linear weights that are exactly zero."""
    weights = [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


def compression(
    clf: Classifier | nn.Module, task: str, out: str | Path, *, data_dir: str | Path | None = None,
    config: CompressionConfig | None = None, classes: list[str] | None = None, cache_dir: str | Path | None = None,
) -> CompressionReport:  # fmt: skip
    """Prune and fine-tune at each sparsity, measure the knowledge the pruned net discarded (paper Section 4.4); write `out`.

    Examples:
        >>> import refiner, tempfile, os
        >>> net = refiner.create_model("tiny_vgg", 6)
        >>> quick = refiner.AnalysisConfig(fit=refiner.FitConfig(max_steps=10), train_per_class=8, test_per_class=4)
        >>> config = refiner.CompressionConfig(analysis=quick, sparsities=(0.5,), images=0,
        ...                                    finetune=refiner.TrainConfig(epochs=1))
        >>> report = refiner.compression(net, "digits", os.path.join(tempfile.mkdtemp(), "out"), config=config)
        >>> [p.sparsity for p in report.pruned]
        [0.5]
    """
    config, out = config or CompressionConfig(), Path(out)
    data_dir, cache_dir = (Path(p) if p is not None else None for p in (data_dir, cache_dir))
    clf = as_net(clf, task)
    start = time.perf_counter()
    workers = config.analysis.runtime
    with report_folder(out) as folder:
        data = load_analysis_data(task, data_dir, classes or clf.meta.class_names, config.analysis)
        require_same_classes(data, clf)
        original_acc = accuracy_on_test(clf, data, workers)
        results, measured = [], []
        for sparsity in bar(config.sparsities, desc="compression", unit="sparsity"):
            pruned, history = _prune_and_finetune(clf, sparsity, data, config.finetune)
            file = Path("nets") / f"pruned-{sparsity:.2f}.pt"
            info = {"pruned_from": clf.path.name, "pruned_from_sha256": clf.sha256, "sparsity": sparsity, "finetune": history}
            pruned_clf = save_net(folder / file, pruned, clf.meta.model_copy(update={"info": info}))
            acc = accuracy_on_test(pruned_clf, data, workers)
            m = measure_pair(pruned_clf, clf, data, config.layer, config.layer, config.analysis, cache_dir)
            measured.append(m)
            results.append(
                PrunedNet(
                    sparsity=sparsity, zero_fraction=zero_fraction(pruned), test_acc=acc, accuracy_drop=original_acc - acc,
                    finetune=history, comparison=m.report, file=file.as_posix(),
                )  # fmt: skip
            )
        channel, indices = _pictures(folder, measured, results, data, clf, config.images)
        report = CompressionReport(
            runtime=runtime_record(config.analysis),
            config=config, data=DataRecord.of(data), model=clf.path.name, original_test_acc=original_acc, pruned=results,
            pictured_channel=channel, pictured_images=indices, seconds=time.perf_counter() - start,
        )  # fmt: skip
        _plots(folder, report)
        write_pages(folder, f"Knowledge discarded by pruning {clf.path.name}", report, _sections(report))
    return report


def _prune_and_finetune(clf: Classifier, sparsity: float, data: TaskData, config: TrainConfig) -> tuple[nn.Module, list[dict[str, float]]]:
    model = magnitude_prune(clf.model, sparsity)
    history: list[dict[str, float]] = []
    if sparsity > 0:
        pre = clf.meta.preprocess
        train, val = (ImageDataset(data.split(s), data.classes, pre) for s in ("train", "val"))
        history = train_classifier(model, train, val, config)
        for module in model.modules():
            if hasattr(module, "weight_mask"):
                prune.remove(module, "weight")  # make the zeros part of the weights
    return model.eval(), history


@torch.no_grad()
def _pictures(
    folder: Path, measured: list[Measured], results: list[PrunedNet], data: TaskData, clf: Classifier, n: int
) -> tuple[int | None, list[int]]:
    """One picture per sparsity, all of the same channel and images (chosen at the highest sparsity)."""
    last = measured[-1]
    if not last.g.is_map or n == 0:
        return None, []
    channel = channel_shares(last.g, *last.test)[0].channel
    indices = top_images(last.g, *last.test, channel, n)
    for m, r in zip(measured, results):
        rows = picture_rows(m.g, m.test, data.test, clf.meta.preprocess, channel, indices)
        title = f"discarded at sparsity {r.sparsity:.2f}: x = original's feature, g(x_A) = kept by the pruned net, x^Δ = discarded"
        save_pictures(folder / f"discarded-{r.sparsity:.2f}.png", rows, channel, title)
    return channel, indices


def _plots(folder: Path, report: CompressionReport) -> None:
    p = report.pruned
    tables = [r.comparison.tables["test"] for r in p]
    line_plot(
        folder / "discarded.png", [r.sparsity for r in p],
        {"Var(x^Δ): discarded knowledge": [t.var_delta for t in tables], "linear CKA (pruned, original)": [t.cka for t in tables]},
        "sparsity (share of weights set to zero)", "variance / CKA", "Discarded knowledge and accuracy drop",
        right={"accuracy drop": [r.accuracy_drop for r in p]}, right_label="test accuracy drop",
    )  # fmt: skip
    by_var = sorted(zip(tables, p), key=lambda tr: tr[0].var_delta)
    line_plot(
        folder / "drop-vs-discarded.png", [t.var_delta for t, _ in by_var], {"accuracy drop": [r.accuracy_drop for _, r in by_var]},
        "Var(x^Δ) (discarded knowledge)", "test accuracy drop", "Accuracy drop against discarded knowledge",
        point_labels=[f"sparsity {r.sparsity:g}" for _, r in by_var],
    )  # fmt: skip


def _sections(report: CompressionReport) -> list[tuple[str, str]]:
    layer = report.pruned[0].comparison.b.layer
    setup = setup_html(
        report.data, report.config.analysis,
        {
            "net": f"{report.model} at {layer}, test accuracy {report.original_test_acc:.4f}",
            "pruning": f"global magnitude pruning of conv and linear weights, then {report.config.finetune.epochs} fine-tuning "
            f"epochs (peak lr {report.config.finetune.lr:g}) with the zeros held; g: pruned → original",
        },
    )  # fmt: skip
    head = ["sparsity", "zero weights", "test acc", "accuracy drop", "Var(x^Δ) discarded", "Var(x^Δ)/Var(x)", "linear CKA"]
    rows = [
        [
            f"{r.sparsity:.2f}", f"{r.zero_fraction:.3f}", f"{r.test_acc:.4f}", f"{r.accuracy_drop:+.4f}",
            f"{r.comparison.tables['test'].var_delta:.4f}", f"{r.comparison.tables['test'].instability:.4f}",
            f"{r.comparison.tables['test'].cka:.4f}",
        ]
        for r in report.pruned
    ]  # fmt: skip
    sections = [
        ("Setup", setup),
        ("Discarded knowledge against accuracy (test split)", html_table(head, rows) + img("discarded.png", "discarded knowledge") + img("drop-vs-discarded.png", "accuracy drop")),
        ("Var table of g: pruned → original", variance_rows("sparsity", {f"{r.sparsity:.2f}": r.comparison.tables["test"] for r in report.pruned})),
    ]
    if report.pictured_images:
        body = (
            f"<p>Channel {report.pictured_channel} of the original net's feature (the channel with the largest discarded share at "
            f"the highest sparsity) on the {len(report.pictured_images)} test images where that share is strongest.</p>"
        )
        body += "".join(img(f"discarded-{r.sparsity:.2f}.png", f"sparsity {r.sparsity:.2f}") for r in report.pruned)
        sections.append(("Pictures of the discarded components", body))
    return sections
