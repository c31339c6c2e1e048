"""Diagnose a weak net against a strong one (paper Section 4.1, Fig. 3).

Unreliable features: components of the weak net's feature that the strong net
cannot reconstruct (g: strong -> weak, x^Delta of the weak feature). Blind
spots: components of the strong net's feature that the weak net cannot
reconstruct (g: weak -> strong, x^Delta of the strong feature).
"""

from __future__ import annotations

import html
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from refiner.reporting import img, report_folder
from refiner.analyses.figures import channel_rows, picture_rows, save_pictures, setup_html, variance_rows, write_pages
from refiner.analyses.measure import (
    as_net,
    AnalysisConfig,
    ChannelShare,
    DataRecord,
    accuracies_on_test,
    channel_shares,
    load_analysis_data,
    measure_pair,
    runtime_record,
    top_images,
)
from refiner.engine.comparison import ComparisonReport
from refiner.errors import ConfigError
from refiner.models.checkpoints import Classifier
from refiner.progress import bar

__all__ = ["DiagnoseConfig", "Direction", "DiagnoseReport", "diagnose"]


class DiagnoseConfig(BaseModel):
    """Layers compared, g and data budget, and what to picture.

    Examples:
        >>> import refiner
        >>> refiner.DiagnoseConfig(layer_weak="features.4").images
        4
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    analysis: AnalysisConfig = Field(default_factory=AnalysisConfig)
    layer_weak: str | None = None  # None: the architecture's default layer
    layer_strong: str | None = None
    images: int = Field(4, ge=0)  # test images pictured per direction (those with the strongest x^Delta)
    channel: int | None = Field(None, ge=0)  # channel pictured; None: the one with the largest Delta share


class Direction(BaseModel):
    """One side of the diagnosis: whose feature is reconstructed, and what is left over."""

    name: str  # "unreliable features" or "blind spots"
    meaning: str
    comparison: ComparisonReport  # a: the net reconstructing, b: the net reconstructed; Var table of the test split
    channels: list[ChannelShare]  # every channel, largest Var(x^Delta_c)/Var(x_c) first
    pictured_channel: int | None  # None for vector features
    pictured_images: list[int]  # test-split indices


class DiagnoseReport(BaseModel):
    """report.json of `refiner analyze diagnose`."""

    config: DiagnoseConfig
    data: DataRecord
    weak: str
    strong: str
    test_acc: dict[str, float]  # "weak"/"strong" -> accuracy on the test split (nets predicting the data's classes)
    unreliable: Direction
    blind_spots: Direction
    seconds: float
    runtime: dict[str, object]  # device, its name, AMP mode, threads


_MEANINGS = {
    "unreliable features": "components of the weak net's feature that the strong net cannot reconstruct (g: strong → weak)",
    "blind spots": "components of the strong net's feature that the weak net cannot reconstruct (g: weak → strong)",
}


def diagnose(
    weak: Classifier | nn.Module, strong: Classifier | nn.Module, task: str, out: str | Path, *, data_dir: str | Path | None = None,
    config: DiagnoseConfig | None = None, classes: list[str] | None = None, cache_dir: str | Path | None = None,
) -> DiagnoseReport:  # fmt: skip
    """Find the weak net's unreliable features and blind spots (paper Section 4.1); write the report folder `out`.

    g is fitted both ways at `config`'s layers on the task's train split and measured on its test split.

    Examples:
        >>> import refiner, tempfile, os
        >>> weak, strong = refiner.create_model("tiny_vgg", 6), refiner.create_model("tiny_vgg", 6)
        >>> quick = refiner.AnalysisConfig(fit=refiner.FitConfig(max_steps=10), train_per_class=8, test_per_class=4)
        >>> report = refiner.diagnose(weak, strong, "digits", os.path.join(tempfile.mkdtemp(), "out"),
        ...                           config=refiner.DiagnoseConfig(analysis=quick, images=0))
        >>> [d.name for d in (report.unreliable, report.blind_spots)]
        ['unreliable features', 'blind spots']
    """
    config, out = config or DiagnoseConfig(), Path(out)
    data_dir, cache_dir = (Path(p) if p is not None else None for p in (data_dir, cache_dir))
    weak, strong = as_net(weak, task), as_net(strong, task)
    start = time.perf_counter()
    with report_folder(out) as folder:
        data = load_analysis_data(task, data_dir, classes or weak.meta.class_names, config.analysis)
        sides = {
            "unreliable features": (strong, weak, config.layer_strong, config.layer_weak),
            "blind spots": (weak, strong, config.layer_weak, config.layer_strong),
        }
        directions = {}
        for name, (src, dst, layer_src, layer_dst) in bar(sides.items(), desc="diagnose", unit="direction"):
            measured = measure_pair(src, dst, data, layer_src, layer_dst, config.analysis, cache_dir)
            shares = channel_shares(measured.g, *measured.test)
            channel, indices = None, []
            if measured.g.is_map:
                channel = _pictured_channel(config.channel, shares)
                indices = top_images(measured.g, *measured.test, channel, config.images)
                rows = picture_rows(measured.g, measured.test, data.test, dst.meta.preprocess, channel, indices)
                if rows:
                    save_pictures(folder / f"{_slug(name)}.png", rows, channel, f"{name} of {dst.path.name} (channel {channel})")
            directions[name] = Direction(
                name=name, meaning=_MEANINGS[name], comparison=measured.report, channels=shares,
                pictured_channel=channel, pictured_images=indices,
            )  # fmt: skip
        acc = accuracies_on_test({"weak": weak, "strong": strong}, data, config.analysis.runtime)
        report = DiagnoseReport(
            runtime=runtime_record(config.analysis),
            config=config, data=DataRecord.of(data), weak=weak.path.name, strong=strong.path.name, test_acc=acc,
            unreliable=directions["unreliable features"], blind_spots=directions["blind spots"],
            seconds=time.perf_counter() - start,
        )  # fmt: skip
        write_pages(folder, f"Diagnosis of {weak.path.name} against {strong.path.name}", report, _sections(report))
    return report


def _pictured_channel(requested: int | None, shares: list[ChannelShare]) -> int:
    if requested is None:
        return shares[0].channel
    if requested >= len(shares):
        raise ConfigError(f"--channel {requested} does not exist: the feature has {len(shares)} channels (0..{len(shares) - 1})")
    return requested


def _acc(report: DiagnoseReport, role: str) -> str:
    return f", test accuracy {report.test_acc[role]:.4f}" if role in report.test_acc else ""


def _slug(name: str) -> str:
    return name.replace(" ", "-")


def _sections(report: DiagnoseReport) -> list[tuple[str, str]]:
    setup = setup_html(
        report.data,
        report.config.analysis,
        {
            "weak net": f"{report.weak} at {report.unreliable.comparison.b.layer}{_acc(report, 'weak')}",
            "strong net": f"{report.strong} at {report.blind_spots.comparison.b.layer}{_acc(report, 'strong')}",
        },
    )
    tables = {d.name: d.comparison.tables["test"] for d in (report.unreliable, report.blind_spots)}
    sections = [("Setup", setup), ("Var table (test split)", variance_rows("direction", tables))]
    for d in (report.unreliable, report.blind_spots):
        body = f"<p>{html.escape(d.meaning)}. Channels ranked by the share of their variance that is Δ:</p>{channel_rows(d.channels)}"
        if d.pictured_images:
            body += (
                f"<p>Channel {d.pictured_channel} on the {len(d.pictured_images)} test images where its Δ part is strongest; "
                "x = g(x_A) + x^Δ, on one colour scale per image.</p>" + img(f"{_slug(d.name)}.png", d.name)
            )
        sections.append((d.name.capitalize(), body))
    return sections
