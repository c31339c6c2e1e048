"""Knowledge across born-again generations (paper Section 4.5, Fig. 4 right).

Generation 0 is the given net; generation t + 1 is a fresh net of the same
architecture trained on loss = CE + 0.5 * KD (temperature tau = 1) with
generation t as the teacher (Furlanello et al., 2018). Then the blind spots of
each generation with respect to the newest are measured: g fits the newest
generation's feature from generation t's, and x^Delta is what generation t lacks.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn
from torch.utils.data import Dataset

from refiner.reporting import img, report_folder
from refiner.analyses.figures import line_plot, setup_html, variance_rows, write_pages
from refiner.analyses.measure import (
    as_net,
    AnalysisConfig,
    DataRecord,
    accuracy_on_test,
    load_analysis_data,
    measure_pair,
    require_same_classes,
    runtime_record,
    save_net,
)
from refiner.data.datasets import ImageDataset
from refiner.engine.comparison import ComparisonReport
from refiner.engine.device import Runtime
from refiner.engine.training import TrainConfig, train_classifier
from refiner.models.architectures import create_model
from refiner.models.checkpoints import Classifier
from refiner.progress import bar
from refiner.reporting import html_table

__all__ = ["DistillationConfig", "Generation", "DistillationReport", "kd_loss", "distill", "distillation"]


class DistillationConfig(BaseModel):
    """How many generations, how each student is trained, and the layer compared.

    Examples:
        >>> import refiner
        >>> refiner.DistillationConfig(generations=2).kd_weight
        0.5
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    analysis: AnalysisConfig = Field(default_factory=AnalysisConfig)
    generations: int = Field(4, ge=1)  # students trained one after another
    train: TrainConfig = Field(default_factory=TrainConfig)  # each student's training; its seed is train.seed + generation
    kd_weight: float = Field(0.5, ge=0)  # loss = CE + kd_weight * KD
    temperature: float = Field(1.0, gt=0)  # tau of the softened distributions
    layer: str | None = None  # None: the architecture's default layer


class Generation(BaseModel):
    """One generation's accuracy and its blind spots w.r.t. the newest generation."""

    generation: int  # 0: the given net
    file: str  # checkpoint (students: inside the report folder)
    test_acc: float
    history: list[dict[str, float]]  # per-epoch training figures (empty for generation 0)
    blind_spots: ComparisonReport | None  # g: this generation -> the newest; None for the newest itself


class DistillationReport(BaseModel):
    """report.json of `refiner analyze distillation`."""

    config: DistillationConfig
    data: DataRecord
    model: str
    generations: list[Generation]
    seconds: float
    runtime: dict[str, object]  # device, its name, AMP mode, threads


def kd_loss(student: Tensor, teacher: Tensor, labels: Tensor, kd_weight: float, temperature: float) -> Tensor:
    """CE(student, labels) + kd_weight * tau^2 * KL(softmax(teacher / tau) || softmax(student / tau))."""
    kl = F.kl_div(
        F.log_softmax(student / temperature, 1), F.log_softmax(teacher / temperature, 1), reduction="batchmean", log_target=True
    )
    return F.cross_entropy(student, labels) + kd_weight * temperature**2 * kl


def distill(
    student: nn.Module, teacher: nn.Module, train: Dataset, val: Dataset, config: TrainConfig, kd_weight: float, temperature: float,
    desc: str = "student",
) -> list[dict[str, float]]:  # fmt: skip
    """Train `student` from scratch on kd_loss against a frozen teacher (the recipe of `train_classifier`)."""
    teacher.eval().to(Runtime.resolve(config.runtime).device)

    def loss_fn(logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            soft = teacher(x)
        return kd_loss(logits, soft, y, kd_weight, temperature)

    return train_classifier(student, train, val, config, loss_fn=loss_fn, desc=desc)


def distillation(
    clf: Classifier | nn.Module, task: str, out: str | Path, *, data_dir: str | Path | None = None,
    config: DistillationConfig | None = None, classes: list[str] | None = None, cache_dir: str | Path | None = None,
) -> DistillationReport:  # fmt: skip
    """Train born-again generations from `clf`, measure each one's blind spots w.r.t. the newest (paper Section 4.5); write `out`.

    Examples:
        >>> import refiner, tempfile, os
        >>> net = refiner.create_model("tiny_vgg", 6)
        >>> quick = refiner.AnalysisConfig(fit=refiner.FitConfig(max_steps=10), train_per_class=8, test_per_class=4)
        >>> config = refiner.DistillationConfig(analysis=quick, generations=1, train=refiner.TrainConfig(epochs=1))
        >>> report = refiner.distillation(net, "digits", os.path.join(tempfile.mkdtemp(), "out"), config=config)
        >>> len(report.generations)  # the net handed in, and one student
        2
    """
    config, out = config or DistillationConfig(), Path(out)
    data_dir, cache_dir = (Path(p) if p is not None else None for p in (data_dir, cache_dir))
    clf = as_net(clf, task)
    start = time.perf_counter()
    workers = config.analysis.runtime
    with report_folder(out) as folder:
        data = load_analysis_data(task, data_dir, classes or clf.meta.class_names, config.analysis)
        require_same_classes(data, clf)
        pre = clf.meta.preprocess
        train, val = (ImageDataset(data.split(s), data.classes, pre) for s in ("train", "val"))
        nets, histories = [clf], [[]]
        for t in bar(range(1, config.generations + 1), desc="generations", unit="generation"):
            torch.manual_seed(config.train.seed + t)
            student = create_model(clf.meta.arch, clf.meta.num_classes, pre.input_size[0])
            train_config = config.train.model_copy(update={"seed": config.train.seed + t})
            history = distill(student, nets[-1].model, train, val, train_config, config.kd_weight, config.temperature, f"generation {t}")
            info = {"generation": t, "teacher": nets[-1].path.name, "root": clf.path.name, "history": history}
            nets.append(save_net(folder / "nets" / f"generation-{t}.pt", student, clf.meta.model_copy(update={"info": info})))
            histories.append(history)
        newest = nets[-1]
        blind = [measure_pair(net, newest, data, config.layer, config.layer, config.analysis, cache_dir).report for net in bar(nets[:-1], desc="blind spots", unit="generation")]
        generations = [
            Generation(
                generation=t, file=clf.path.name if t == 0 else f"nets/{net.path.name}", test_acc=accuracy_on_test(net, data, workers),
                history=histories[t], blind_spots=blind[t] if t < len(blind) else None,
            )  # fmt: skip
            for t, net in enumerate(nets)
        ]
        report = DistillationReport(
            config=config, data=DataRecord.of(data), model=clf.path.name, generations=generations,
            seconds=time.perf_counter() - start, runtime=runtime_record(config.analysis),
        )  # fmt: skip
        _plot(folder, report)
        write_pages(folder, f"Born-again generations of {clf.path.name}", report, _sections(report))
    return report


def _plot(folder: Path, report: DistillationReport) -> None:
    measured = [g for g in report.generations if g.blind_spots is not None]
    tables = [g.blind_spots.tables["test"] for g in measured]
    line_plot(
        folder / "blind-spots.png", [g.generation for g in measured],
        {"Var(x^Δ): blind spots w.r.t. the newest": [t.var_delta for t in tables], "linear CKA with the newest": [t.cka for t in tables]},
        "generation", "variance / CKA", f"Blind spots w.r.t. generation {report.generations[-1].generation}",
        right={"test accuracy": [g.test_acc for g in measured]}, right_label="test accuracy",
    )  # fmt: skip


def _sections(report: DistillationReport) -> list[tuple[str, str]]:
    c = report.config
    newest = report.generations[-1]
    layer = report.generations[0].blind_spots.b.layer
    setup = setup_html(
        report.data, c.analysis,
        {
            "generation 0": f"{report.model}; the layer compared is {layer}",
            "students": f"{c.generations} generations, each trained from scratch for {c.train.epochs} epochs on "
            f"CE + {c.kd_weight:g}·KD (τ = {c.temperature:g}) with the previous generation as teacher",
        },
    )  # fmt: skip
    rows = [
        [str(g.generation), g.file, f"{g.test_acc:.4f}"]
        + ([f"{g.blind_spots.tables['test'].var_delta:.4f}", f"{g.blind_spots.tables['test'].cka:.4f}"] if g.blind_spots else ["—", "—"])
        for g in report.generations
    ]
    tables = {f"generation {g.generation} → {newest.generation}": g.blind_spots.tables["test"] for g in report.generations if g.blind_spots}
    return [
        ("Setup", setup),
        (
            f"Blind spots w.r.t. generation {newest.generation} (test split)",
            html_table(["generation", "file", "test acc", "Var(x^Δ) blind spots", "linear CKA"], rows) + img("blind-spots.png", "blind spots"),
        ),
        (f"Var table of g: generation t → {newest.generation}", variance_rows("g", tables)),
    ]
