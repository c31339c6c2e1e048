"""report.json / report.html of a build: the accuracy table per variant, the Var table, provenance."""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path

from pydantic import BaseModel

from refiner.build.config import BuildConfig
from refiner.build.export import ExportCheck
from refiner.engine.comparison import ComparisonReport
from refiner.reporting import describe_fit, format_fit, format_rows, html_table, page, save_bar_plot, save_fit_curve, variance_rows

__all__ = ["VariantResult", "BuildReport", "format_accuracy_table", "write_build_report"]


class VariantResult(BaseModel):
    """Test accuracy of one feature source over seeds (epoch chosen on validation data)."""

    name: str
    features: str  # what the upper layers were fed
    head_from: str  # whose upper layers were fine-tuned
    val_acc: list[float]
    test_acc: list[float]
    mean: float
    std: float


class BuildReport(BaseModel):
    """report.json: the accuracy table, the Var table and provenance."""

    name: str
    version: int
    task: str
    classes: list[str]
    config: BuildConfig
    variants: list[VariantResult]
    comparison: ComparisonReport
    export: ExportCheck
    seconds: dict[str, float]
    runtime: dict[str, object]  # device, its name, AMP mode, threads, workers, processes


def _accuracy_rows(variants: Sequence[VariantResult]) -> tuple[list[str], list[list[str]]]:
    head = ["variant", "head from", "test acc (mean ± std)", "val acc (mean)", "seeds"]
    rows = [
        [v.name, v.head_from, f"{100 * v.mean:.2f} ± {100 * v.std:.2f}", f"{100 * sum(v.val_acc) / len(v.val_acc):.2f}", str(len(v.test_acc))]
        for v in variants
    ]
    return head, rows


def format_accuracy_table(variants: Sequence[VariantResult]) -> str:
    """Plain-text accuracy table, one row per variant (paper Tables 3/4 layout)."""
    return format_rows(*_accuracy_rows(variants))


def write_build_report(folder: Path, report: BuildReport) -> None:
    """report.json, accuracy.png, variance.png and report.html of a build."""
    (folder / "report.json").write_text(report.model_dump_json(indent=2))
    v = report.variants
    save_bar_plot(folder / "accuracy.png", [x.features for x in v], [100 * x.mean for x in v], [100 * x.std for x in v], "test accuracy (%)", "Accuracy per variant")
    test = report.comparison.tables["test"]
    labels = [f"x^({k})" for k in range(len(test.var_orders))] + ["x^Delta"]
    save_bar_plot(folder / "variance.png", labels, [*test.var_orders, test.var_delta], None, "variance", "Var of each order (test split)")
    save_fit_curve(folder / "fit.png", report.comparison.fit)
    c = report.comparison
    setup = (
        f"<p>Task <b>{html.escape(report.task)}</b>, classes: {html.escape(', '.join(report.classes))}.<br>"
        f"A: {html.escape(c.a.arch)} at {html.escape(c.a.layer)} ({html.escape(c.a.path)}); "
        f"B: {html.escape(c.b.arch)} at {html.escape(c.b.layer)} ({html.escape(c.b.path)}); K = {c.g.orders}, λ = {c.g.lam}.<br>"
        f"ONNX export: max |logit diff| {report.export.max_abs_diff:.2e} at batch {report.export.batch_size}.</p>"
    )
    sections = [
        ("Setup", setup),
        ("Accuracy (model selection on validation data)", html_table(*_accuracy_rows(v)) + "<p><img src='accuracy.png'></p>"),
        ("Var table", html_table(*variance_rows(c.tables)) + "<p><img src='variance.png'></p>"),
        ("Fitting g", f"<p>{html.escape(describe_fit(report.config.compare.fit))}.<br>{html.escape(format_fit(c.fit))}.</p><p><img src='fit.png'></p>"),
        ("Device", html_table(["", ""], [[k, str(val)] for k, val in report.runtime.items()])),
        ("Wall time (s)", html_table(["stage", "seconds"], [[k, f"{s:.1f}"] for k, s in report.seconds.items()])),
    ]
    (folder / "report.html").write_text(page(f"{report.name} v{report.version}", sections))
