"""Real-data run on CIFAR-10 (marker `slow`; needs REFINER_CIFAR10 = folder holding cifar10/)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from refiner.data.tasks import SplitOptions, load_task
from refiner.engine.comparison import CompareConfig, compare
from refiner.engine.fitting import FitConfig
from refiner.engine.training import TrainConfig, train_base
from refiner.models.checkpoints import load_checkpoint

CIFAR = os.environ.get("REFINER_CIFAR10")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CIFAR, reason="set REFINER_CIFAR10 to the folder that holds the extracted cifar10/"),
]


def test_two_seeds_share_most_knowledge(tmp_path):
    """Two small nets from different seeds: g explains most of B's feature, far better than chance."""
    split = SplitOptions(train_per_class=300)
    for name, seed in (("a.pt", 0), ("b.pt", 1)):
        meta = train_base("tiny_vgg", "cifar10", Path(CIFAR), TrainConfig(epochs=4, seed=seed), tmp_path / name, split)
        assert meta.info["test_acc"] > 0.3  # well above 10% chance
    a, b = load_checkpoint(tmp_path / "a.pt"), load_checkpoint(tmp_path / "b.pt")
    data = load_task("cifar10", Path(CIFAR), target=True, options=split)
    _, report, _ = compare(a, b, data, CompareConfig(fit=FitConfig(epochs=5)), tmp_path / "cache")
    test = report.tables["test"]
    assert 0.0 < test.instability < 0.8
    assert test.var_orders[0] > test.var_orders[-1]
    assert 0.2 < test.cka <= 1.0


def test_int8_export_of_a_cifar_refined_model_keeps_its_accuracy(tmp_path):
    """A real build with --quantize int8: calibrated on validation images, within a point of fp32 on 2,000 test images."""
    from refiner.refine.config import BuildConfig
    from refiner.refine.pipeline import build
    from refiner.refine.publish import ExportOptions
    from refiner.engine.finetune import HeadConfig

    split = SplitOptions(train_per_class=300)
    for name, seed in (("a.pt", 0), ("b.pt", 1)):
        train_base("tiny_vgg", "cifar10", Path(CIFAR), TrainConfig(epochs=4, seed=seed), tmp_path / name, split)
    a, b = load_checkpoint(tmp_path / "a.pt"), load_checkpoint(tmp_path / "b.pt")
    config = BuildConfig(
        name="int8", compare=CompareConfig(fit=FitConfig(epochs=5)), head=HeadConfig(epochs=3), seeds=1, ablations=False,
        export=ExportOptions(quantize="int8"),
    )  # fmt: skip
    result = build(a, b, "cifar-animal", Path(CIFAR), config, models=tmp_path / "models", split=split, cache_dir=tmp_path / "cache")
    q = result.report.quantization
    assert q.test_images == 2000 and q.calibration_images == 128
    assert q.accuracy_drop_points <= 1.0 and q.top1_agreement >= 0.9
