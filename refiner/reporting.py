"""Human-readable tables, plots and HTML pages of the figures refiner measures."""

from __future__ import annotations

import html
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from refiner.atomic import atomic_dir
from refiner.engine import distributed as dist
from refiner.engine.device import RuntimeConfig
from refiner.errors import ConfigError
from refiner.engine.fitting import FitConfig, FitResult
from refiner.engine.metrics import VarianceTable

__all__ = [
    "GLOSSARY",
    "format_variance_table",
    "format_rows",
    "variance_rows",
    "html_table",
    "save_bar_plot",
    "save_fit_curve",
    "fit_curve_figure",
    "describe_fit",
    "describe_runtime",
    "format_fit",
    "page",
    "img",
    "report_folder",
]


def variance_rows(tables: dict[str, VarianceTable], label: str = "split") -> tuple[list[str], list[list[str]]]:
    """Header and rows of a Var table, one row per entry of `tables` (a split, a pair, ...)."""
    orders = len(next(iter(tables.values())).var_orders)
    head = [label, *(f"Var(x^({k}))" for k in range(orders)), "Var(x^Δ)", "Var(x_B)", "instability", "CKA", "images"]
    rows = [
        [split, *(f"{v:.4f}" for v in t.var_orders), f"{t.var_delta:.4f}", f"{t.var_target:.4f}", f"{t.instability:.4f}", f"{t.cka:.4f}", str(t.images)]
        for split, t in tables.items()
    ]
    return head, rows


def format_variance_table(tables: dict[str, VarianceTable]) -> str:
    """Plain-text Var table, one row per split (paper Table 1/2 layout)."""
    return format_rows(*variance_rows(tables))


def format_rows(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    line = lambda r: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([line(head), "  ".join("-" * w for w in widths), *(line(r) for r in rows)])


def html_table(head: list[str], rows: list[list[str]]) -> str:
    cells = lambda tag, r: "".join(f"<{tag}>{html.escape(c)}</{tag}>" for c in r)  # noqa: E731
    return "<table><tr>" + cells("th", head) + "</tr>" + "".join(f"<tr>{cells('td', r)}</tr>" for r in rows) + "</table>"


def save_bar_plot(
    path: Path, labels: list[str], values: list[float], errors: list[float] | None, ylabel: str, title: str, zoom: bool = False
) -> None:
    """A labelled bar chart as PNG (matplotlib, no display needed); `zoom` fits the y axis to the bars so differences show."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(labels)), 3.6))
    ax.bar(range(len(values)), values, yerr=errors, capsize=4, color="#4c72b0")
    ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right", fontsize=8)
    if zoom and values:
        errs = errors or [0.0] * len(values)
        lo, hi = min(v - e for v, e in zip(values, errs)), max(v + e for v, e in zip(values, errs))
        pad = max(0.15 * (hi - lo), 0.5)
        ax.set_ylim(lo - pad, hi + pad)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


GLOSSARY = (
    "<dl>"
    "<dt>x^(k)</dt><dd>the part of x_B that A's feature explains through k non-linearities of g (k-order isomorphic "
    "knowledge); x^(0) is what a linear map of x_A explains.</dd>"
    "<dt>x^Δ = x_B − g(x_A)</dt><dd>what A cannot explain of B's feature. The refined model drops it.</dd>"
    "<dt>Var(·)</dt><dd>variance in B's standardised feature space, so Var(x_B) ≈ 1 and each Var reads as a share of "
    "B's feature. The orders and x^Δ add up to about Var(x_B) (they are not exactly orthogonal).</dd>"
    "<dt>instability = Var(x^Δ) / Var(x_B)</dt><dd>0: B's feature is entirely explained by A's; 1: not at all. "
    "Between nets of the same architecture trained from different seeds it is typically 0.05–0.2 in early layers "
    "and 0.3–0.5 in late ones; near 1 means unrelated features, or a g that did not converge (see its fit curve).</dd>"
    "<dt>linear CKA</dt><dd>centred kernel alignment of x_A and x_B (Kornblith et al., 2019): 1 for features equal "
    "up to rotation and scale, near 0 for unrelated ones. It needs no fitted g, so it is a check on the instability.</dd>"
    "</dl>"
)

_STYLE = "body{font-family:sans-serif;max-width:60em;margin:2em auto}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.3em .6em;text-align:right}td:first-child,th:first-child{text-align:left}"


def page(title: str, sections: list[tuple[str, str]]) -> str:
    """A self-contained HTML page of (heading, html body) sections."""
    body = "".join(f"<h2>{html.escape(h)}</h2>{b}" for h, b in sections)
    return f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>"


def describe_fit(config: FitConfig) -> str:
    """One line on how g was fitted."""
    if config.epochs is not None:
        return f"g fitted for {config.epochs} epochs, Adam lr {config.lr_start:g} -> {config.lr_end:g} log-spaced, batch {config.batch_size}"
    return (
        f"g fitted to convergence: Adam lr {config.lr_start:g}, cut x{config.lr_decay:g} after {config.plateau} checks without "
        f"improvement (floor {config.lr_end:g}), stop after {config.patience} (checks every {config.eval_every} steps, "
        f"budget {config.max_steps} steps), batch {config.batch_size}"
    )


def describe_runtime(config: RuntimeConfig) -> str:
    return f"device {config.device}, AMP {config.amp}"


def format_fit(fit: FitResult) -> str:
    """One line on how fitting ended."""
    last = fit.holdout_mse[-1] if fit.holdout_mse else float("nan")
    best = min(fit.holdout_mse) if fit.holdout_mse else float("nan")
    return (
        f"g: {fit.total_steps} steps ({fit.stop}; weights of step {fit.best_step} kept), held-out MSE {best:.4f} "
        f"(last check {last:.4f}), p = {', '.join(f'{p:.3f}' for p in fit.p)}, {fit.seconds:.1f} s, {fit.samples_per_s:.0f} samples/s"
    )


def fit_curve_figure(fit: FitResult):
    """The fitting curve as a matplotlib Figure: train and held-out MSE, p^(k) and the learning rate against steps."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    axes[0].plot(fit.steps, fit.train_mse, label="train")
    axes[0].plot(fit.steps, fit.holdout_mse, label="held-out")
    axes[0].axvline(fit.best_step, color="grey", ls=":", label="kept")
    axes[0].set_yscale("log")
    axes[0].set_ylabel("MSE (units of Var(x_B))")
    axes[0].legend()
    for k, series in enumerate(zip(*fit.p_history) if fit.p_history else []):
        axes[1].plot(fit.steps, series, label=f"p^({k + 1})")
    axes[1].set_ylabel("p^(k)")
    if fit.p_history and fit.p_history[0]:
        axes[1].legend()
    axes[2].plot(fit.steps, fit.lr)
    axes[2].set_yscale("log")
    axes[2].set_ylabel("learning rate")
    for ax in axes:
        ax.set_xlabel("optimiser steps")
    fig.suptitle(f"fitting g: {fit.stop} after {fit.total_steps} steps")
    fig.tight_layout()
    return fig


def save_fit_curve(path: Path, fit: FitResult) -> None:
    """`fit_curve_figure` written as a PNG."""
    import matplotlib.pyplot as plt

    fig = fit_curve_figure(fit)
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)


@contextmanager
def report_folder(out: Path) -> Iterator[Path]:
    """A temporary folder renamed to `out` when the block succeeds; refuses an existing `out` up front.

    Under torchrun only rank 0 writes `out`; the other ranks work in a private folder deleted afterwards.
    """
    out = Path(out)
    if dist.broadcast(out.exists()):  # rank 0's answer, so that every rank stops or none does
        raise ConfigError(f"report folder {str(out)!r} already exists; choose another --out or remove it")
    if not dist.is_main():
        with tempfile.TemporaryDirectory(prefix=f"refiner-{out.name}-rank{dist.rank()}-") as tmp:
            yield Path(tmp)
        return
    try:
        with atomic_dir(out) as tmp:
            yield tmp
    except FileExistsError as e:  # another run wrote `out` meanwhile
        raise ConfigError(str(e)) from e


def img(name: str, alt: str) -> str:
    return f"<p><img src='{html.escape(name)}' alt='{html.escape(alt)}' style='max-width:100%'></p>"
