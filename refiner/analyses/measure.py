"""What every analysis shares: the data budget, fitting g between two nets, per-channel Var.

All figures live in the target net's standardised space (see `IsomorphismNet`),
so Var(x) is about 1 per channel and Var(x^Delta) reads as a share of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn
from torch.utils.data import DataLoader

from refiner.data.datasets import ImageDataset
from refiner.data.tasks import SplitOptions, TaskData, load_task
from refiner.engine import distributed as dist
from refiner.engine.comparison import CompareConfig, ComparisonReport, compare
from refiner.engine.device import Runtime, RuntimeConfig
from refiner.engine.features import FeatureSet, iter_batches
from refiner.engine.fitting import FitConfig
from refiner.engine.isomorphism import IsomorphismConfig, IsomorphismNet
from refiner.engine.training import evaluate
from refiner.errors import ConfigError
from refiner.models.checkpoints import CheckpointMeta, Classifier, load_checkpoint, save_checkpoint

__all__ = [
    "AnalysisConfig",
    "Measured",
    "ChannelShare",
    "DataRecord",
    "as_net",
    "load_analysis_data",
    "measure_pair",
    "channel_shares",
    "accuracy_on_test",
    "accuracies_on_test",
    "require_same_classes",
    "top_images",
    "runtime_record",
    "save_net",
]


class AnalysisConfig(BaseModel):
    """How g is fitted and how much data an analysis reads.

    Examples:
        >>> import refiner
        >>> refiner.AnalysisConfig(test_per_class=20).fit.max_steps
        20000
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    g: IsomorphismConfig = Field(default_factory=IsomorphismConfig)
    fit: FitConfig = Field(default_factory=FitConfig)
    train_per_class: int | None = Field(None, ge=1)  # training images per class (g fitting, fine-tuning); None: all
    test_per_class: int | None = Field(None, ge=1)  # test images per class measured; None: all
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)  # device, AMP, threads, workers
    cache_dtype: Literal["float32", "float16"] = "float32"  # storage of cached features


@dataclass
class Measured:
    """g fitted from A's feature to B's, its report (Var table of the test split) and the test features."""

    g: IsomorphismNet
    report: ComparisonReport
    test: tuple[FeatureSet, FeatureSet]  # (x_A, x_B) of the test split


class ChannelShare(BaseModel):
    """One channel of x: Var(x_c), Var(x^Delta_c) and their ratio (None for a dead channel)."""

    channel: int
    var_feature: float
    var_delta: float
    share: float | None  # Var(x^Delta_c) / Var(x_c)


class DataRecord(BaseModel):
    """Which data an analysis read, for the record."""

    task: str
    classes: list[str]
    images: dict[str, int]  # split -> number of images

    @classmethod
    def of(cls, data: TaskData) -> DataRecord:
        return cls(task=data.task, classes=data.classes, images={s: len(data.split(s)) for s in ("train", "test")})


def as_net(model: nn.Module | Classifier, task: str) -> Classifier:
    """A net from `refiner.load` as it is; a plain nn.Module (not copied), fed with the task's preprocessing."""
    from refiner.data.tasks import get_task

    return model if isinstance(model, Classifier) else Classifier.of(model, preprocess=get_task(task).preprocess)


def load_analysis_data(task: str, data_dir: Path | None, classes: list[str], config: AnalysisConfig) -> TaskData:
    """The task's splits for `classes`, trimmed to the configured images per class."""
    data = load_task(task, data_dir, target=False, classes=classes, options=SplitOptions(train_per_class=config.train_per_class))
    if config.test_per_class is not None:
        seen: dict[str, int] = {}
        kept = []
        for s in data.test:
            seen[s.label] = seen.get(s.label, 0) + 1
            if seen[s.label] <= config.test_per_class:
                kept.append(s)
        data.test = kept
    return data


def measure_pair(
    clf_a: Classifier, clf_b: Classifier, data: TaskData, layer_a: str | None, layer_b: str | None,
    config: AnalysisConfig, cache_dir: Path | None,
) -> Measured:  # fmt: skip
    """Fit g: x_A -> x_B on the training split; measure the Var table on the test split."""
    compare_config = CompareConfig(layer_a=layer_a, layer_b=layer_b, g=config.g, fit=config.fit, runtime=config.runtime, cache_dtype=config.cache_dtype)
    g, report, pairs = compare(clf_a, clf_b, data, compare_config, cache_dir, measure=("test",))
    return Measured(g=g, report=report, test=pairs["test"])


@torch.no_grad()
def channel_shares(g: IsomorphismNet, fa: FeatureSet, fb: FeatureSet) -> list[ChannelShare]:
    """Per-channel Var(x^Delta_c) / Var(x_c), streamed, largest share first (dead channels last)."""
    runtime = Runtime.of(g)
    sums: dict[str, Tensor] = {}
    count = 0
    for xa, xb in iter_batches(fa.x, fb.x, batch_size=128):
        xa, xb = runtime.to(xa, xb)
        target = g.standardize_target(xb).double()
        delta = g.decompose(xa, xb).delta.double()
        for key, value in (("x", target), ("xx", target**2), ("d", delta), ("dd", delta**2)):
            s = value.sum((0, 2, 3))
            sums[key] = sums[key] + s if key in sums else s
        count += target.shape[0] * target.shape[2] * target.shape[3]
    var_x = (sums["xx"] / count - (sums["x"] / count) ** 2).clamp_min(0)
    var_d = (sums["dd"] / count - (sums["d"] / count) ** 2).clamp_min(0)
    var_x, var_d = runtime.to_host(var_x, var_d)
    rows = [
        ChannelShare(channel=c, var_feature=float(vx), var_delta=float(vd), share=float(vd / vx) if vx > 1e-8 else None)
        for c, (vx, vd) in enumerate(zip(var_x, var_d))
    ]
    return sorted(rows, key=lambda r: -1.0 if r.share is None else r.share, reverse=True)


def require_same_classes(data: TaskData, *nets: Classifier) -> None:
    """Accuracy needs the data's class indices to be the nets' own."""
    for clf in nets:
        if clf.meta.class_names != data.classes:
            raise ConfigError(
                f"{clf.path.name} predicts classes {clf.meta.class_names}, but the data were loaded for {data.classes}; "
                "leave --classes out (the nets' own classes are used) or train the nets on these classes"
            )


def accuracies_on_test(nets: dict[str, Classifier], data: TaskData, runtime: RuntimeConfig | None = None) -> dict[str, float]:
    """Test accuracy of each net that predicts exactly the data's classes (others are left out)."""
    return {name: accuracy_on_test(clf, data, runtime) for name, clf in nets.items() if clf.meta.class_names == data.classes}


def accuracy_on_test(clf: Classifier, data: TaskData, runtime: RuntimeConfig | None = None) -> float:
    """Top-1 accuracy of a classifier on the test split (on the runtime's device), fed with its own preprocessing."""
    rt = Runtime.resolve(runtime)
    dataset = ImageDataset(data.test, data.classes, clf.meta.preprocess)
    loader = DataLoader(dataset, batch_size=256, num_workers=rt.workers, pin_memory=rt.pin_memory)
    return evaluate(clf.model.to(rt.device), loader, rt)["acc"]


@torch.no_grad()
def top_images(g: IsomorphismNet, fa: FeatureSet, fb: FeatureSet, channel: int, n: int) -> list[int]:
    """Indices of the n test images whose x^Delta is strongest in `channel` (mean square)."""
    runtime = Runtime.of(g)
    batches = iter_batches(fa.x, fb.x, batch_size=128)
    energy = [g.decompose(*runtime.to(xa, xb)).delta[:, channel].pow(2).mean((1, 2)) for xa, xb in batches]
    (energy,) = runtime.to_host(torch.cat(energy))
    return np.argsort(-energy, kind="stable")[:n].tolist()


def runtime_record(config: AnalysisConfig) -> dict[str, object]:
    """Device, its name, AMP mode and threads, for report.json."""
    return Runtime.resolve(config.runtime).record()


def save_net(path: Path, model: nn.Module, meta: CheckpointMeta) -> Classifier:
    """Write a net into the report folder and load it back.

    Under torchrun rank 0 writes and every rank loads that one file: a checkpoint's hash differs from one write to
    the next, and the feature cache is keyed by it.
    """
    written = str(save_checkpoint(path, model, meta)) if dist.is_main() else None
    return load_checkpoint(Path(dist.broadcast(written)))
