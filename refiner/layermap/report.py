"""The atlas folder: atlas.json, heatmap PNGs with layer names on the axes, and report.html."""

from __future__ import annotations

import html
import os
import tempfile
from pathlib import Path

import numpy as np

from refiner.engine import distributed as dist
from refiner.errors import ConfigError
from refiner.layermap.pipeline import AtlasReport
from refiner.reporting import GLOSSARY, format_rows, html_table, img, page, report_folder

__all__ = ["write_atlas", "update_atlas", "read_atlas", "heatmap_figure", "save_heatmap", "consistency_rows", "best_matches", "format_atlas"]

ATLAS_GLOSSARY = GLOSSARY.replace(
    "</dl>",
    "<dt>minibatch CKA (the grid)</dt><dd>linear CKA between two layers with each image's whole feature flattened into "
    "one vector, estimated without bias: HSIC_1 (Song et al., 2012) on each batch of images, averaged over batches "
    "(Nguyen, Raghu and Kornblith, 2021). 1: the same representation up to rotation and scale; 0: unrelated. It compares "
    "layers of any shape, so a ViT block against a CNN stage.</dd>"
    "<dt>position CKA</dt><dd>refiner's own linear CKA, with every (image, position) a sample and the channels its "
    "features; defined only for layers with the same positions (equal H x W, or equal token count). It is the CKA "
    "printed next to the instability by `refiner fit` and `build`.</dd>"
    "<dt>matched pair</dt><dd>for each layer of A, the layer of B with the highest minibatch CKA.</dd>"
    "<dt>held-out MSE</dt><dd>g's reconstruction error of x_B on the training pairs held out from fitting, in units of "
    "Var(x_B); with a small step budget (--g-steps) it is an upper bound of what a converged g reaches.</dd>"
    "</dl>",
)


def heatmap_figure(grid: list[list[float | None]], rows: list[str], cols: list[str], title: str, marks: list[tuple[int, int]] = ()):
    """A layer x layer heatmap as a matplotlib Figure (rows: A's layers, top to bottom by depth), values printed when the grid is small."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    values = np.array([[np.nan if v is None else v for v in row] for row in grid], dtype=float)
    fig, ax = plt.subplots(figsize=(2.5 + 0.45 * len(cols), 1.8 + 0.4 * len(rows)))
    shown = ax.imshow(values, cmap="magma", vmin=0, vmax=1, aspect="auto", origin="lower")
    ax.set_xticks(range(len(cols)), cols, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    if len(rows) * len(cols) <= 400:
        for (i, j), v in np.ndenumerate(values):
            if np.isfinite(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=5, color="white" if v < 0.6 else "black")
    for i, j in marks:
        ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="#2ca02c", linewidth=1.5))
    ax.set_xlabel("B's layers")
    ax.set_ylabel("A's layers")
    ax.set_title(title, fontsize=9)
    fig.colorbar(shown, ax=ax, fraction=0.04)
    fig.tight_layout()
    return fig


def save_heatmap(path: Path, grid: list[list[float | None]], rows: list[str], cols: list[str], title: str, marks: list[tuple[int, int]] = ()) -> None:
    """`heatmap_figure` written as a PNG."""
    import matplotlib.pyplot as plt

    fig = heatmap_figure(grid, rows, cols, title, marks)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def consistency_rows(report: AtlasReport) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the consistency table (text and HTML)."""
    fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    rows = report.consistency
    orders = max((len(r.var_orders) for r in rows), default=0)
    head = ["A's layer", "B's layer", "CKA", "95 % interval", "position CKA", "instability", *(f"Var(x^({k}))" for k in range(orders)), "held-out MSE", "g steps", "note"]
    out = []
    for r in rows:
        note = "default of build" if r.default else ""
        if r.skipped:
            note = (note + "; " if note else "") + "no g: " + r.skipped.split(";")[0].split(":")[-1].strip()[:60]
        vo = [fmt(v) for v in r.var_orders] + ["-"] * (orders - len(r.var_orders))
        steps = "-" if r.steps is None else f"{r.steps}, converged" if r.stop == "converged" else f"{r.steps}, budget reached: not converged" if r.stop == "budget" else f"{r.steps} ({r.stop})"
        interval = _interval(report, report.layers_a.index(r.layer_a), report.layers_b.index(r.layer_b))
        out.append([r.layer_a, r.layer_b, fmt(r.cka), interval, fmt(r.cka_positions), fmt(r.instability), *vo, fmt(r.holdout_mse), steps, note])
    return head, out


def format_atlas(report: AtlasReport) -> str:
    """The plain-text summary: each A layer's best match (with its interval), the consistency rows, and the flags of the pairs."""
    lines = [f"minibatch CKA of {len(report.layers_a)} x {len(report.layers_b)} layers on {report.images} {report.split} images ({report.batches} batches)"]
    if not report.complete:
        lines += [f"PARTIAL: {_progress_line(report)}"]
    lines += [_interval_line(report), _default_line(report)]
    if report.consistency:
        lines += ["", _convergence_line(report), format_rows(*consistency_rows(report)), "", "flags to build or fit on another pair:"]
        lines += [f"  {r.flags}" + ("  (default)" if r.default else "") for r in report.consistency]
    else:
        lines += ["", format_rows(*best_matches(report))]
    return "\n".join(lines)


def best_matches(report: AtlasReport) -> tuple[list[str], list[list[str]]]:
    """Each A layer, its best match in B, and their CKA with its interval."""
    rows = []
    for i, (name, row) in enumerate(zip(report.layers_a, report.cka)):
        j = int(np.argmax([-1.0 if v is None else v for v in row]))
        rows.append([name, report.layers_b[j], "-" if row[j] is None else f"{row[j]:.4f}", _interval(report, i, j)])
    return ["A's layer", "best match in B", "CKA", "95 % interval"], rows


def _interval(report: AtlasReport, i: int, j: int) -> str:
    if report.cka_low is None or report.cka_high is None or report.cka_low[i][j] is None or report.cka_high[i][j] is None:
        return "-"
    return f"[{report.cka_low[i][j]:.4f}, {report.cka_high[i][j]:.4f}]"


def _interval_line(report: AtlasReport) -> str:
    if report.cka_low is None:
        return "no interval: one batch of images (an interval resamples the batches)"
    return (
        f"intervals: 95 % percentile bootstrap over the {report.batches} batches of images (1,000 resamples), per cell; they cover "
        "which images were measured, not the nets' training seeds"
    )


def _progress_line(report: AtlasReport) -> str:
    return (
        f"{len(report.consistency)} of {report.pairs_total} pairs fitted; the CKA grid is whole. The same command "
        "resumes from here."
    )


def _convergence_line(report: AtlasReport) -> str:
    fitted = [r for r in report.consistency if r.steps is not None]
    stopped = [r for r in fitted if r.stop == "budget"]
    if not stopped:
        return f"every g of the {len(fitted)} fitted converged (held-out MSE stopped improving)"
    return (
        f"{len(stopped)} of {len(fitted)} g stopped at the --g-steps budget before converging: their instability and "
        "held-out MSE are upper bounds of a converged g's; a larger --g-steps fits them further"
    )


def _default_line(report: AtlasReport) -> str:
    la, lb = report.default_pair
    if la in report.layers_a and lb in report.layers_b:
        v = report.cka[report.layers_a.index(la)][report.layers_b.index(lb)]
        return f"default pair of `refiner build`: {la} -> {lb}, CKA {'-' if v is None else f'{v:.4f}'}"
    return f"default pair of `refiner build`: {la} -> {lb} (not among the layers mapped)"


def write_atlas(out: Path, report: AtlasReport) -> Path:
    """Write atlas.json, cka.png (and cka-positions.png) and report.html into a new folder `out`, atomically."""
    with report_folder(out) as folder:
        _write_files(folder, report)
    return Path(out)


def update_atlas(out: Path, report: AtlasReport) -> Path:
    """`write_atlas`, or when `out` holds this run's atlas already, its files replaced one by one, each atomically and
    atlas.json last (it says how far the run got). Only the main process writes under torchrun."""
    out = Path(out)
    if not (out / "atlas.json").exists():
        return write_atlas(out, report)
    if dist.is_main():
        with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp:
            _write_files(Path(tmp), report)
            for name in sorted(os.listdir(tmp), key=lambda n: n == "atlas.json"):
                os.replace(Path(tmp) / name, out / name)
    return out


def read_atlas(out: Path) -> AtlasReport | None:
    """The atlas.json of `out` (None when there is none); a file that is not one is a ConfigError naming it."""
    path = Path(out) / "atlas.json"
    if not path.exists():
        return None
    try:
        return AtlasReport.model_validate_json(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{str(path)!r} is not an atlas.json refiner can read ({str(e).splitlines()[0]}); remove the folder or choose another --out") from e


def _write_files(folder: Path, report: AtlasReport) -> None:
    marks = [(report.layers_a.index(r.layer_a), report.layers_b.index(r.layer_b)) for r in report.consistency]
    title = f"A = {report.a['file']} ({report.a['arch']}), B = {report.b['file']} ({report.b['arch']})"
    save_heatmap(folder / "cka.png", report.cka, report.layers_a, report.layers_b, f"minibatch CKA, {report.images} images\n{title}", marks)
    pictures = img("cka.png", "minibatch CKA heatmap")
    if report.cka_positions is not None and any(v is not None for row in report.cka_positions for v in row):
        save_heatmap(folder / "cka-positions.png", report.cka_positions, report.layers_a, report.layers_b, f"position CKA (equal positions only)\n{title}")
        pictures += img("cka-positions.png", "position CKA heatmap")
    progress = "" if report.complete else f"<li><b>partial</b>: {html.escape(_progress_line(report))}</li>"
    setup = (
        f"<ul>{progress}<li>A: {html.escape(report.a['file'])} ({html.escape(report.a['arch'])}); B: {html.escape(report.b['file'])} "
        f"({html.escape(report.b['arch'])})</li><li>task <b>{html.escape(report.task or '(batches from Python)')}</b>, {report.images} {html.escape(report.split)} "
        f"images in {report.batches} batches, seed {report.seed}</li><li>{html.escape(report.method)}</li>"
        f"<li>{html.escape(_interval_line(report))}</li><li>{html.escape(_default_line(report))}</li></ul>"
    )
    sections = [("Setup", setup), ("CKA, layer by layer", pictures), ("Best match of each A layer", html_table(*best_matches(report)))]
    if report.consistency:
        flags = "<ul>" + "".join(f"<li><code>{html.escape(r.flags)}</code>{' (default)' if r.default else ''}</li>" for r in report.consistency) + "</ul>"
        sections.append((
            f"Knowledge consistency on the {report.consistency_mode} pairs (squares on the heatmap)",
            f"<p>{html.escape(_convergence_line(report))}</p>" + html_table(*consistency_rows(report)) + flags,
        ))  # fmt: skip
    sections.append(("Glossary", ATLAS_GLOSSARY))
    (folder / "report.html").write_text(page("refiner atlas", sections))
    (folder / "atlas.json").write_text(report.model_dump_json(indent=2))
