"""report.json / report.html of a build: the accuracy table per variant, the Var table, provenance."""

from __future__ import annotations

import html
import statistics
from collections.abc import Sequence
from pathlib import Path

from pydantic import BaseModel

from refiner.build.config import BuildConfig
from refiner.build.export import ExportCheck
from refiner.build.quantize import QuantCheck
from refiner.build.results import PairedTest, VariantResult
from refiner.engine.comparison import ComparisonReport
from refiner.reporting import GLOSSARY, describe_fit, format_fit, format_rows, html_table, page, save_bar_plot, save_fit_curve, variance_rows

__all__ = ["BuildReport", "format_accuracy_table", "write_build_report"]


class BuildReport(BaseModel):
    """report.json: the accuracy table, the paired tests and their verdict, the Var table and provenance."""

    name: str
    version: int
    task: str
    classes: list[str]
    config: BuildConfig
    variants: list[VariantResult]
    paired: list[PairedTest]  # refined vs every other variant, per metric
    verdict: str  # one line: does Delta removal help, hurt, or sit within seed noise here?
    comparison: ComparisonReport
    g_file: str | None = None  # the `refiner fit` file g came from; None: fitted by this build
    export: ExportCheck
    quantization: QuantCheck | None = None  # --quantize int8: agreement and accuracy drop on test images
    seconds: dict[str, float]
    runtime: dict[str, object]  # device, its name, AMP mode, threads, workers, processes


def _ms(values: Sequence[float], scale: float = 100.0, digits: int = 2) -> str:
    sd = statistics.pstdev(values) if len(values) > 1 else 0.0
    return f"{scale * statistics.fmean(values):.{digits}f} ± {scale * sd:.{digits}f}"


def _accuracy_rows(variants: Sequence[VariantResult], protocol: str) -> tuple[list[str], list[list[str]]]:
    """Figures at the validation-chosen epoch; the paper protocol adds full-label, last-epoch and best-on-test accuracy."""
    head = ["variant", "head from", "test acc, target classes", "test CE, target classes"]
    if protocol == "paper":
        head += ["test acc, all outputs", "last epoch", "best on test (optimistic)"]
    head += ["val acc", "seeds"]
    rows = []
    for v in variants:
        row = [v.name, v.head_from, _ms(v.test_acc_target), _ms(v.test_ce_target, 1.0, 3)]
        if protocol == "paper":
            row += [_ms(v.test_acc), _ms(v.last_acc), _ms(v.best_test_acc) if v.best_test_acc else "-"]
        row += [f"{100 * statistics.fmean(v.val_acc):.2f}", str(len(v.test_acc))]
        rows.append(row)
    return head, rows


def _paired_rows(tests: Sequence[PairedTest]) -> tuple[list[str], list[list[str]]]:
    head = ["refined vs", "metric", "mean difference", "95% CI", "p", "verdict"]
    rows = []
    for t in tests:
        scale = 1.0 if t.metric.startswith("ce") else 100.0
        ci = f"{scale * t.ci95[0]:+.2f} to {scale * t.ci95[1]:+.2f}" if t.ci95 else "-"
        p = f"{t.p_value:.3g}" if t.p_value is not None else "-"
        rows.append([t.baseline, t.metric, f"{scale * t.mean:+.2f}", ci, p, t.verdict])
    return head, rows


def format_accuracy_table(variants: Sequence[VariantResult], protocol: str) -> str:
    """Plain-text accuracy table, one row per variant (paper Tables 3/4 layout; accuracy in %)."""
    return format_rows(*_accuracy_rows(variants, protocol))


_ACCURACY_NOTE = (
    "<p>Mean ± std over seeds. <i>Target classes</i>: argmax over the target classes' outputs only, which does not "
    "reward adapting to the target label set; <i>all outputs</i> (paper protocol): argmax over every base class, the "
    "paper's score. <i>Best on test</i> is chosen by test data (as the paper reports) and is optimistic. The control "
    "feeds B's upper layers x_B minus another image's x^Δ: the energy of x^Δ without its image-specific content.</p>"
)
_PAIRED_NOTE = (
    "<p>refined − baseline per seed (same seed: same initialisation and data order); 95% t interval of the mean and "
    "a two-sided paired t-test. The seeds vary fine-tuning only, not g or the base nets. Accuracy in points, CE in nats.</p>"
)


def write_build_report(folder: Path, report: BuildReport) -> None:
    """report.json, accuracy.png, variance.png and report.html of a build."""
    (folder / "report.json").write_text(report.model_dump_json(indent=2))
    v = report.variants
    save_bar_plot(
        folder / "accuracy.png", [x.features for x in v], [100 * statistics.fmean(x.test_acc_target) for x in v],
        [100 * statistics.pstdev(x.test_acc_target) for x in v], "test accuracy, target classes (%)",
        "Accuracy per variant (mean ± std over seeds)", zoom=True,
    )  # fmt: skip
    test = report.comparison.tables["test"]
    labels = [f"x^({k})" for k in range(len(test.var_orders))] + ["x^Δ"]
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
        ("Verdict", f"<p><b>{html.escape(report.verdict)}</b></p>"),
        (f"Accuracy ({report.config.protocol} protocol, epoch chosen on validation data)", html_table(*_accuracy_rows(v, report.config.protocol)) + _ACCURACY_NOTE + "<p><img src='accuracy.png'></p>"),
        ("Paired tests over seeds", html_table(*_paired_rows(report.paired)) + _PAIRED_NOTE),
        ("Var table", html_table(*variance_rows(c.tables)) + "<p><img src='variance.png'></p>"),
        ("Fitting g", f"<p>{html.escape(describe_fit(report.config.compare.fit))}.<br>{html.escape(format_fit(c.fit))}.</p><p><img src='fit.png'></p>"),
        ("What the figures mean", GLOSSARY),
        ("Device", html_table(["", ""], [[k, str(val)] for k, val in report.runtime.items()])),
        ("Wall time (s)", html_table(["stage", "seconds"], [[k, f"{s:.1f}"] for k, s in report.seconds.items()])),
    ]
    (folder / "report.html").write_text(page(f"{report.name} v{report.version}", sections))
