"""Report folders of the analyses: report.json, PNG plots, heatmap pictures and report.html.

A folder is written atomically: it appears complete or not at all.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel

from refiner import reporting
from refiner.analyses.measure import AnalysisConfig, ChannelShare, DataRecord
from refiner.data.samples import Preprocess, Sample
from refiner.engine.device import Runtime
from refiner.engine.features import FeatureSet
from refiner.engine.isomorphism import IsomorphismNet
from refiner.engine.metrics import VarianceTable
from refiner.reporting import html_table, page

__all__ = [
    "PictureRow",
    "write_pages",
    "variance_rows",
    "channel_rows",
    "line_plot",
    "grouped_bars",
    "picture_rows",
    "save_pictures",
    "setup_html",
]


@dataclass
class PictureRow:
    """One pictured image: the input and one channel of x, its isomorphic part g(x_A) and its Delta part."""

    image: np.ndarray  # (H, W, 3) uint8, as the net sees it
    feature: np.ndarray  # (h, w), x_c in the target's standardised space
    isomorphic: np.ndarray  # (h, w), g(x_A)_c
    delta: np.ndarray  # (h, w), x^Delta_c = x_c - g(x_A)_c
    caption: str


def write_pages(folder: Path, title: str, report: BaseModel, sections: list[tuple[str, str]]) -> None:
    """report.json (every figure) and report.html (what a person reads)."""
    (folder / "report.json").write_text(report.model_dump_json(indent=2))
    (folder / "report.html").write_text(page(title, sections))


def variance_rows(label: str, tables: dict[str, VarianceTable]) -> str:
    """HTML Var table, one row per entry: Var of each order, Var(x^Delta), instability and linear CKA."""
    return html_table(*reporting.variance_rows(tables, label))


def channel_rows(shares: list[ChannelShare], top: int = 10) -> str:
    """HTML ranking of the channels with the largest Var(x^Delta_c) / Var(x_c)."""
    rows = [
        [str(s.channel), f"{s.var_feature:.4f}", f"{s.var_delta:.4f}", "dead" if s.share is None else f"{s.share:.4f}"]
        for s in shares[:top]
    ]
    return html_table(["channel", "Var(x_c)", "Var(x^Δ_c)", "Var(x^Δ_c)/Var(x_c)"], rows)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def line_plot(
    path: Path, x: Sequence[float], series: dict[str, Sequence[float]], xlabel: str, ylabel: str, title: str,
    right: dict[str, Sequence[float]] | None = None, right_label: str = "", point_labels: Sequence[str] | None = None,
) -> None:  # fmt: skip
    """Lines with markers against x; `right` series go on a second y axis; `point_labels` annotate the first series."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.6, 3.6))
    for name, values in series.items():
        ax.plot(x, values, marker="o", label=name)
    for xi, yi, text in zip(x, next(iter(series.values())), point_labels or []):
        ax.annotate(text, (xi, yi), textcoords="offset points", xytext=(4, 6), fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    handles, labels = ax.get_legend_handles_labels()
    if right:
        ax2 = ax.twinx()
        for i, (name, values) in enumerate(right.items()):
            ax2.plot(x, values, marker="s", linestyle="--", color=f"C{len(series) + i}", label=name)
        ax2.set_ylabel(right_label)
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def grouped_bars(
    path: Path, groups: list[str], series: dict[str, Sequence[float]], ylabel: str, title: str,
    errors: dict[str, Sequence[float]] | None = None,
) -> None:  # fmt: skip
    """One cluster of bars per group, one bar per series (optional error bars)."""
    plt = _pyplot()
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(groups)), 3.6))
    for i, (name, values) in enumerate(series.items()):
        pos = np.arange(len(groups)) + (i - (len(series) - 1) / 2) * width
        ax.bar(pos, values, width, yerr=(errors or {}).get(name), capsize=3, label=name)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@torch.no_grad()
def picture_rows(
    g: IsomorphismNet, test: tuple[FeatureSet, FeatureSet], samples: list[Sample], pre: Preprocess, channel: int, indices: list[int]
) -> list[PictureRow]:
    """Channel `channel` of x, g(x_A) and x^Delta for the test images at `indices`."""
    if not indices:
        return []
    fa, fb = test
    order = np.asarray(indices)
    runtime = Runtime.of(g)
    xa, xb = runtime.to(*(torch.from_numpy(np.ascontiguousarray(f.x[order])) for f in (fa, fb)))
    dec = g.decompose(xa, xb)
    feature, iso, delta = runtime.to_host(g.standardize_target(xb)[:, channel], dec.output[:, channel], dec.delta[:, channel])
    _, h, w = pre.input_size
    rows = []
    for j, i in enumerate(indices):
        image = np.asarray(samples[i].load().convert("RGB").resize((w, h), Image.BILINEAR))
        caption = f"test image {i} ({samples[i].label})"
        rows.append(PictureRow(image, feature[j], iso[j], delta[j], caption))
    return rows


def save_pictures(path: Path, rows: list[PictureRow], channel: int, title: str) -> None:
    """Per image: the input, then x_c, g(x_A)_c and x^Delta_c as heatmaps over it (one colour scale per image)."""
    plt = _pyplot()
    fig, axes = plt.subplots(len(rows), 4, figsize=(10, 2.6 * len(rows)), squeeze=False)
    heads = ["input", f"x, channel {channel}", "isomorphic part g(x_A)", "Δ part x^Δ"]
    for r, row in enumerate(rows):
        h, w = row.image.shape[:2]
        gray = row.image.mean(2)
        scale = float(max(np.abs(m).max() for m in (row.feature, row.isomorphic, row.delta))) or 1.0
        axes[r, 0].imshow(row.image)
        axes[r, 0].set_ylabel(row.caption, fontsize=8)
        for c, fmap in enumerate((row.feature, row.isomorphic, row.delta), start=1):
            axes[r, c].imshow(gray, cmap="gray", alpha=0.5)
            shown = axes[r, c].imshow(
                fmap, cmap="RdBu_r", vmin=-scale, vmax=scale, alpha=0.7, extent=(-0.5, w - 0.5, h - 0.5, -0.5), interpolation="bilinear"
            )
        fig.colorbar(shown, cax=axes[r, 3].inset_axes((1.04, 0.0, 0.05, 1.0)))
        for c in range(4):
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
            if r == 0:
                axes[r, c].set_title(heads[c], fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def setup_html(data: DataRecord, config: AnalysisConfig, nets: dict[str, str]) -> str:
    """The setup paragraph every report starts with."""
    items = [f"{html.escape(role)}: {html.escape(text)}" for role, text in nets.items()]
    items += [
        f"task <b>{html.escape(data.task)}</b>, {len(data.classes)} classes, "
        f"{data.images['train']} training images (g is fitted on them), {data.images['test']} test images (measured)",
        f"g: K = {config.g.orders}, λ = {config.g.lam}, kernel {config.g.kernel_size}; " +
        html.escape(reporting.describe_fit(config.fit)),
        html.escape(reporting.describe_runtime(config.runtime)),
        "Var figures are in the target feature's per-channel standardised space (Var(x) ≈ 1).",
    ]
    return "<ul>" + "".join(f"<li>{i}</li>" for i in items) + "</ul>"
