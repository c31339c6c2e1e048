"""Stability of learning (paper Section 4.2, Tables 1 and 2).

Nets trained the same way (different initial seeds, or disjoint halves of the
training data via `refiner train --subset half-a/half-b`) are compared pair by
pair at each layer. The instability of a layer is Var(x^Delta) / Var(x) averaged
over all ordered pairs (A, B), A != B: how much of one net's feature the other
cannot reconstruct.
"""

from __future__ import annotations

import itertools
import statistics
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from refiner.reporting import img, report_folder
from refiner.analyses.figures import grouped_bars, setup_html, variance_rows, write_pages
from refiner.analyses.measure import as_net, AnalysisConfig, DataRecord, load_analysis_data, measure_pair, runtime_record
from refiner.engine.comparison import ComparisonReport, default_layer
from refiner.errors import ConfigError
from refiner.models.checkpoints import Classifier
from refiner.progress import bar
from refiner.reporting import html_table

__all__ = ["StabilityConfig", "LayerStability", "StabilityReport", "stability"]


class StabilityConfig(BaseModel):
    """Layers compared, and how g is fitted.

    Examples:
        >>> import refiner
        >>> refiner.StabilityConfig(layers=("features.4",)).layers
        ('features.4',)
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    analysis: AnalysisConfig = Field(default_factory=AnalysisConfig)
    layers: tuple[str, ...] | None = None  # None: the first net's default layer


class LayerStability(BaseModel):
    """One row of Table 1: means over ordered pairs, on the test split."""

    layer: str
    feature_shape: list[int]
    pairs: int
    var_orders: list[float]  # mean Var(x^(k)), k = 0..K
    var_delta: float  # mean Var(x^Delta)
    var_target: float  # mean Var(x)
    instability: float  # mean Var(x^Delta) / Var(x)
    instability_std: float  # over pairs
    cka: float  # mean linear CKA
    cka_std: float


class StabilityReport(BaseModel):
    """report.json of `refiner analyze stability`."""

    config: StabilityConfig
    data: DataRecord
    models: list[str]
    layers: list[LayerStability]
    pairs: list[ComparisonReport]  # every ordered pair at every layer, with its fit history
    seconds: float
    runtime: dict[str, object]  # device, its name, AMP mode, threads


def stability(
    nets: list[Classifier | nn.Module], task: str, out: str | Path, *, data_dir: str | Path | None = None,
    config: StabilityConfig | None = None, classes: list[str] | None = None, cache_dir: str | Path | None = None,
) -> StabilityReport:  # fmt: skip
    """Fit g for every ordered pair of nets at every layer (the stability of learning, paper Section 4.2); write `out`.

    Examples:
        >>> import refiner, tempfile, os
        >>> nets = [refiner.create_model("tiny_vgg", 6) for _ in range(2)]
        >>> quick = refiner.AnalysisConfig(fit=refiner.FitConfig(max_steps=10), train_per_class=8, test_per_class=4)
        >>> report = refiner.stability(nets, "digits", os.path.join(tempfile.mkdtemp(), "out"),
        ...                            config=refiner.StabilityConfig(analysis=quick))
        >>> len(report.pairs)  # A -> B and B -> A
        2
    """
    config, out = config or StabilityConfig(), Path(out)
    data_dir, cache_dir = (Path(p) if p is not None else None for p in (data_dir, cache_dir))
    nets = [as_net(n, task) for n in nets]
    if len(nets) < 2:
        raise ConfigError(f"stability compares nets pair by pair: give at least 2 models, got {len(nets)}")
    start = time.perf_counter()
    layers = config.layers or (default_layer(nets[0]),)
    with report_folder(out) as folder:
        data = load_analysis_data(task, data_dir, classes or nets[0].meta.class_names, config.analysis)
        runs = [(layer, i, j) for layer in layers for i, j in itertools.permutations(range(len(nets)), 2)]
        pairs: dict[str, list[ComparisonReport]] = {layer: [] for layer in layers}
        for layer, i, j in bar(runs, desc="stability", unit="pair"):
            pairs[layer].append(measure_pair(nets[i], nets[j], data, layer, layer, config.analysis, cache_dir).report)
        report = StabilityReport(
            runtime=runtime_record(config.analysis),
            config=config, data=DataRecord.of(data), models=[n.path.name for n in nets],
            layers=[_summary(layer, reports) for layer, reports in pairs.items()],
            pairs=[r for reports in pairs.values() for r in reports], seconds=time.perf_counter() - start,
        )  # fmt: skip
        _plots(folder, report)
        write_pages(folder, f"Stability of {len(nets)} nets", report, _sections(report))
    return report


def _summary(layer: str, reports: list[ComparisonReport]) -> LayerStability:
    tables = [r.tables["test"] for r in reports]
    mean = lambda values: statistics.fmean(values)  # noqa: E731
    instab, cka = [t.instability for t in tables], [t.cka for t in tables]
    return LayerStability(
        layer=layer,
        feature_shape=reports[0].b.feature_shape,
        pairs=len(tables),
        var_orders=[mean(v) for v in zip(*(t.var_orders for t in tables))],
        var_delta=mean(t.var_delta for t in tables),
        var_target=mean(t.var_target for t in tables),
        instability=mean(instab),
        instability_std=statistics.pstdev(instab),
        cka=mean(cka),
        cka_std=statistics.pstdev(cka),
    )


def _plots(folder: Path, report: StabilityReport) -> None:
    names = [s.layer for s in report.layers]
    grouped_bars(
        folder / "instability.png", names,
        {"instability Var(x^Δ)/Var(x)": [s.instability for s in report.layers], "linear CKA": [s.cka for s in report.layers]},
        "mean over ordered pairs", "Instability and linear CKA per layer",
        errors={"instability Var(x^Δ)/Var(x)": [s.instability_std for s in report.layers], "linear CKA": [s.cka_std for s in report.layers]},
    )  # fmt: skip
    orders = {f"Var(x^({k}))": [s.var_orders[k] for s in report.layers] for k in range(len(report.layers[0].var_orders))}
    orders["Var(x^Δ)"] = [s.var_delta for s in report.layers]
    grouped_bars(folder / "orders.png", names, orders, "variance (mean over pairs)", "Var of each order per layer")


def _sections(report: StabilityReport) -> list[tuple[str, str]]:
    setup = setup_html(report.data, report.config.analysis, {"nets": ", ".join(report.models)})
    k = len(report.layers[0].var_orders)
    head = ["layer", "shape", *(f"Var(x^({i}))" for i in range(k)), "Var(x^Δ)", "instability", "linear CKA", "pairs"]
    rows = [
        [
            s.layer, "×".join(map(str, s.feature_shape)), *(f"{v:.4f}" for v in s.var_orders), f"{s.var_delta:.4f}",
            f"{s.instability:.4f} ± {s.instability_std:.4f}", f"{s.cka:.4f} ± {s.cka_std:.4f}", str(s.pairs),
        ]
        for s in report.layers
    ]  # fmt: skip
    sections = [
        ("Setup", setup),
        (
            "Instability per layer (Table 1 layout; mean ± std over ordered pairs, test split)",
            html_table(head, rows) + img("instability.png", "instability per layer") + img("orders.png", "Var of each order"),
        ),
    ]
    for layer in report.layers:
        at_layer = [r for r in report.pairs if r.b.layer == layer.layer]
        tables = {f"{n}. {r.a.path} → {r.b.path}": r.tables["test"] for n, r in enumerate(at_layer, 1)}
        sections.append((f"Pairs at {layer.layer}", variance_rows("A → B", tables)))
    return sections
