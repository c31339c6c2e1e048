"""Human-readable tables, plots and HTML pages of the figures refiner measures."""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from refiner.metrics import VarianceTable

if TYPE_CHECKING:
    from refiner.build import BuildReport, VariantResult

__all__ = [
    "format_variance_table",
    "format_accuracy_table",
    "variance_rows",
    "write_build_report",
    "html_table",
    "save_bar_plot",
    "page",
]


def variance_rows(tables: dict[str, VarianceTable], label: str = "split") -> tuple[list[str], list[list[str]]]:
    """Header and rows of a Var table, one row per entry of `tables` (a split, a pair, ...)."""
    orders = len(next(iter(tables.values())).var_orders)
    head = [label, *(f"Var(x^({k}))" for k in range(orders)), "Var(x^D)", "Var(x_B)", "instability", "CKA", "images"]
    rows = [
        [split, *(f"{v:.4f}" for v in t.var_orders), f"{t.var_delta:.4f}", f"{t.var_target:.4f}", f"{t.instability:.4f}", f"{t.cka:.4f}", str(t.images)]
        for split, t in tables.items()
    ]
    return head, rows


def _accuracy_rows(variants: Sequence[VariantResult]) -> tuple[list[str], list[list[str]]]:
    head = ["variant", "head from", "test acc (mean ± std)", "val acc (mean)", "seeds"]
    rows = [
        [v.name, v.head_from, f"{100 * v.mean:.2f} ± {100 * v.std:.2f}", f"{100 * sum(v.val_acc) / len(v.val_acc):.2f}", str(len(v.test_acc))]
        for v in variants
    ]
    return head, rows


def format_variance_table(tables: dict[str, VarianceTable]) -> str:
    """Plain-text Var table, one row per split (paper Table 1/2 layout)."""
    return _format_rows(*variance_rows(tables))


def format_accuracy_table(variants: Sequence[VariantResult]) -> str:
    """Plain-text accuracy table, one row per variant (paper Tables 3/4 layout)."""
    return _format_rows(*_accuracy_rows(variants))


def _format_rows(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    line = lambda r: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([line(head), "  ".join("-" * w for w in widths), *(line(r) for r in rows)])


def html_table(head: list[str], rows: list[list[str]]) -> str:
    cells = lambda tag, r: "".join(f"<{tag}>{html.escape(c)}</{tag}>" for c in r)  # noqa: E731
    return "<table><tr>" + cells("th", head) + "</tr>" + "".join(f"<tr>{cells('td', r)}</tr>" for r in rows) + "</table>"


def save_bar_plot(path: Path, labels: list[str], values: list[float], errors: list[float] | None, ylabel: str, title: str) -> None:
    """A labelled bar chart as PNG (matplotlib, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(labels)), 3.6))
    ax.bar(range(len(values)), values, yerr=errors, capsize=4, color="#4c72b0")
    ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


_STYLE = "body{font-family:sans-serif;max-width:60em;margin:2em auto}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.3em .6em;text-align:right}td:first-child,th:first-child{text-align:left}"


def page(title: str, sections: list[tuple[str, str]]) -> str:
    """A self-contained HTML page of (heading, html body) sections."""
    body = "".join(f"<h2>{html.escape(h)}</h2>{b}" for h, b in sections)
    return f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>"


def write_build_report(folder: Path, report: BuildReport) -> None:
    """report.json, accuracy.png, variance.png and report.html of a build."""
    (folder / "report.json").write_text(report.model_dump_json(indent=2))
    v = report.variants
    save_bar_plot(folder / "accuracy.png", [x.features for x in v], [100 * x.mean for x in v], [100 * x.std for x in v], "test accuracy (%)", "Accuracy per variant")
    test = report.comparison.tables["test"]
    labels = [f"x^({k})" for k in range(len(test.var_orders))] + ["x^Delta"]
    save_bar_plot(folder / "variance.png", labels, [*test.var_orders, test.var_delta], None, "variance", "Var of each order (test split)")
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
        ("Wall time (s)", html_table(["stage", "seconds"], [[k, f"{s:.1f}"] for k, s in report.seconds.items()])),
    ]
    (folder / "report.html").write_text(page(f"{report.name} v{report.version}", sections))
