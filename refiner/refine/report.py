"""report.json / report.html of a build: the accuracy table per variant, the Var table, provenance."""

from __future__ import annotations

import html
import statistics
from collections.abc import Sequence
from pathlib import Path

from pydantic import BaseModel

from refiner.data.tasks import validation_source
from refiner.refine.config import BuildConfig
from refiner.refine.export import ExportCheck
from refiner.refine.quantize import QuantCheck
from refiner.refine.results import PairedTest, VariantResult
from refiner.engine.comparison import ComparisonReport
from refiner.engine.fitting import FitResult
from refiner.engine.metrics import VarianceTable
from refiner.reporting import GLOSSARY, describe_fit, format_fit, format_rows, html_table, page, save_bar_plot, save_fit_curve, variance_rows

__all__ = ["GFit", "BuildReport", "format_accuracy_table", "format_noise_budget", "seed_varies", "write_build_report"]


class GFit(BaseModel):
    """One fit of g in a build (--g-seeds): how well it fitted and what it leaves in x^Δ."""

    seed: int | None  # None: a g from an older `refiner fit` file, which did not record its seed
    holdout_mse: float  # lowest held-out MSE of the fit
    instability_test: float  # Var(x^Δ)/Var(x_B) on the test split

    @classmethod
    def of(cls, fit: FitResult, test: VarianceTable) -> GFit:
        return cls(seed=fit.seed, holdout_mse=min(fit.holdout_mse, default=float("nan")), instability_test=test.instability)


class BuildReport(BaseModel):
    """report.json: the accuracy table, the paired tests and their verdict, the Var table and provenance."""

    name: str
    version: int
    task: str
    classes: list[str]
    config: BuildConfig
    variants: list[VariantResult]
    paired: list[PairedTest]  # refined vs every other variant, per accuracy metric (the primary first declared in results.PRIMARY)
    verdict: str  # one line: does Delta removal help, hurt, or sit within noise here (seeds, test images, g fits)?
    comparison: ComparisonReport  # the exported model's g: its fit record and Var tables
    seed_varies: str = ""  # what a fine-tuning seed sets (it depends on the protocol)
    g_fits: list[GFit] = []  # every fit of g (one unless --g-seeds)
    exported_run: dict[str, int] = {}  # the refined run exported (best on validation): its g fit and seed
    g_file: str | None = None  # the `refiner fit` file g came from; None: fitted by this build
    export: ExportCheck
    quantization: QuantCheck | None = None  # --quantize int8: agreement and accuracy drop on test images
    seconds: dict[str, float]
    runtime: dict[str, object]  # device, its name, AMP mode, threads, workers, processes


def _ms(values: Sequence[float], scale: float = 100.0, digits: int = 2) -> str:
    """Mean ± sample std (n - 1); the mean alone for one run."""
    mean = f"{scale * statistics.fmean(values):.{digits}f}"
    return f"{mean} ± {scale * statistics.stdev(values):.{digits}f}" if len(values) > 1 else mean


def _accuracy_rows(variants: Sequence[VariantResult], protocol: str) -> tuple[list[str], list[list[str]]]:
    """Figures at the validation-chosen epoch; the paper protocol adds full-label, last-epoch and best-on-test accuracy."""
    head = ["variant", "head from", "test acc, target classes", "test CE, target classes"]
    if protocol == "paper":
        head += ["test acc, all outputs", "last epoch", "best on test (optimistic)"]
    head += ["val acc", "runs"]
    rows = []
    for v in variants:
        if v.is_diverged:
            rows.append([v.name, v.head_from, "diverged", *["-"] * (len(head) - 4), str(len(v.diverged))])
            continue
        row = [v.name, v.head_from, _ms(v.test_acc_target), _ms(v.test_ce_target, 1.0, 3)]
        if protocol == "paper":
            row += [_ms(v.test_acc), _ms(v.last_acc), _ms(v.best_test_acc) if v.best_test_acc else "-"]
        row += [f"{100 * statistics.fmean(v.val_acc):.2f}", str(len(v.test_acc))]
        rows.append(row)
    return head, rows


def _paired_rows(tests: Sequence[PairedTest]) -> tuple[list[str], list[list[str]]]:
    head = ["refined vs", "metric", "role", "difference (points)", "bootstrap 95% CI", "bootstrap p", "Holm p", "t over runs: p", "McNemar p per run", "verdict"]
    rows = []
    for t in tests:
        lo, hi = (100 * v for v in t.bootstrap.ci95)
        ci = f"{lo:+.2f} to {hi:+.2f}" + (" (no image differs: bound)" if t.bootstrap.widened else "")
        t_p = f"{t.t_test.p:.3g}" if t.t_test.p is not None else f"- ({t.t_test.note})"
        mcnemar = ", ".join(f"{m.p:.2g}" for m in t.mcnemar)
        role = "primary" if t.primary else "secondary"
        holm = "-" if t.p_holm is None else f"{t.p_holm:.3g}"
        rows.append([t.baseline, t.metric, role, f"{100 * t.mean:+.2f}", ci, f"{t.bootstrap.p:.3g}", holm, t_p, mcnemar, t.verdict])
    return head, rows


def _noise_rows(test: PairedTest) -> tuple[list[str], list[list[str]]]:
    rows = [[n.source, f"{100 * n.std:.2f}" if n.std is not None else "not measured (one draw)"] for n in test.noise_budget or []]
    return ["noise source (resampled alone)", f"std of refined − {test.baseline} (points)"], rows


def format_accuracy_table(variants: Sequence[VariantResult], protocol: str) -> str:
    """Plain-text accuracy table, one row per variant (paper Tables 3/4 layout; accuracy in %), and how to read ±."""
    return format_rows(*_accuracy_rows(variants, protocol)) + "\n(mean ± sample std, n − 1, over the runs counted in `runs`)"


def format_noise_budget(tests: Sequence[PairedTest]) -> str:
    """Plain-text noise budget of the primary comparison ('' when it was not tested)."""
    primary = next((t for t in tests if t.primary), None)
    return format_rows(*_noise_rows(primary)) if primary else ""


_ACCURACY_NOTE = (
    "<p>Mean ± sample std (n − 1) over runs (fine-tuning seeds, times fits of g with --g-seeds). <i>Target classes</i>: "
    "argmax over the target classes' outputs only, which does not reward adapting to the target label set; <i>all "
    "outputs</i> (paper protocol): argmax over every base class, the paper's score. <i>Best on test</i> is chosen by test "
    "data (as the paper reports) and is optimistic. The control feeds B's upper layers x_B minus another image's x^Δ: the "
    "energy of x^Δ without its image-specific content. <i>diverged</i>: a run's loss went non-finite; the variant is left "
    "out of the tests. Every accuracy is recomputable from predictions.npz.</p>"
)


def seed_varies(protocol: str) -> str:
    """What one fine-tuning seed sets under `protocol`, as report.json and report.html say it."""
    if protocol == "sound":
        return "the new target classifier's initialisation, the order of training batches and dropout"
    return "the order of training batches and dropout (the kept classifier starts from B's weights)"


def _paired_note(protocol: str) -> str:
    return (
        "<p>refined − baseline on the same test images, run by run. A seed sets " + seed_varies(protocol) + "; the refined model and "
        "each baseline share it. <b>Primary</b> (declared before the build): refined vs x_B on target-class accuracy; it "
        "alone decides the verdict. The p and interval are a paired bootstrap (10,000+ resamples): fits of g, then seeds, "
        "then test images are resampled, with the same images for both variants, so the interval covers fine-tuning "
        "seeds, the sampling of the test set and (with --g-seeds) g's own fit. Secondary comparisons carry Holm-adjusted "
        "p-values; the t-test over runs (seed noise only) and the exact McNemar test per run (test images only) are shown "
        "for reference. Nothing covers the choice of base nets: the verdict is about these A and B.</p>"
    )


def _noise_html(report: BuildReport) -> str:
    primary = next((t for t in report.paired if t.primary), None)
    if primary is None:
        return "<p>Not tested: a variant diverged.</p>"
    fits = ""
    if len(report.g_fits) > 1:
        rows = [["?" if f.seed is None else str(f.seed), f"{f.holdout_mse:.4f}", f"{f.instability_test:.4f}"] for f in report.g_fits]
        fits = html_table(["g seed", "held-out MSE", "instability on test"], rows)
    return html_table(*_noise_rows(primary)) + fits


def write_build_report(folder: Path, report: BuildReport) -> None:
    """report.json, accuracy.png, variance.png and report.html of a build."""
    (folder / "report.json").write_text(report.model_dump_json(indent=2))
    v = report.variants
    shown = [x for x in v if not x.is_diverged]
    save_bar_plot(
        folder / "accuracy.png", [x.features for x in shown], [100 * statistics.fmean(x.test_acc_target) for x in shown],
        [100 * statistics.stdev(x.test_acc_target) if len(x.test_acc_target) > 1 else 0.0 for x in shown],
        "test accuracy, target classes (%)", "Accuracy per variant (mean ± sample std over runs)", zoom=True,
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
        f"{html.escape(validation_source(c.val_from)).capitalize()}.<br>"
        f"ONNX export: max |logit diff| {report.export.max_abs_diff:.2e} at batch {report.export.batch_size}.</p>"
    )
    sections = [
        ("Setup", setup),
        ("Verdict", f"<p><b>{html.escape(report.verdict)}</b></p>"),
        (f"Accuracy ({report.config.protocol} protocol, epoch chosen on validation data)", html_table(*_accuracy_rows(v, report.config.protocol)) + _ACCURACY_NOTE + "<p><img src='accuracy.png'></p>"),
        ("Paired tests", html_table(*_paired_rows(report.paired)) + _paired_note(report.config.protocol)),
        ("Noise budget of the primary comparison", _noise_html(report)),
        ("Var table", html_table(*variance_rows(c.tables)) + "<p><img src='variance.png'></p>"),
        ("Fitting g", f"<p>{html.escape(describe_fit(report.config.compare.fit))}.<br>{html.escape(format_fit(c.fit))}.</p><p><img src='fit.png'></p>"),
        ("What the figures mean", GLOSSARY),
        ("Device", html_table(["", ""], [[k, str(val)] for k, val in report.runtime.items()])),
        ("Wall time (s)", html_table(["stage", "seconds"], [[k, f"{s:.1f}"] for k, s in report.seconds.items()])),
    ]
    (folder / "report.html").write_text(page(f"{report.name} v{report.version}", sections))
