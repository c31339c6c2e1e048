"""Shared fixtures: seeded RNG per test, CUDA skip marker, tiny data made on the fly."""

from __future__ import annotations

import functools
import json
import os
import random
import shutil

import numpy as np
import pytest
import torch
from tqdm import tqdm

# Tiny tensors run faster on one thread, and two threads thrash on a shared 2-core machine.
torch.set_num_threads(1)
os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars are noise in test logs (and in subprocesses) ...
tqdm.__init__ = functools.partialmethod(tqdm.__init__, disable=True)  # ... also where tqdm was imported before this file


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "needs_cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seeded_rng():
    """Seed every RNG and restore torch's state after the test."""
    state = torch.get_rng_state()
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    yield
    torch.set_rng_state(state)


@pytest.fixture(autouse=True)
def _not_quiet():
    """Each test starts with progress on: a `--quiet` run in an earlier test leaves the module-level switch set."""
    from refiner.progress import set_quiet

    set_quiet(False)
    yield
    set_quiet(False)


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
    """Keep each test's feature cache in its own temporary folder."""
    monkeypatch.setenv("REFINER_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="session")
def digit_nets(tmp_path_factory):
    """Two tiny base nets trained briefly on scikit-learn's digits with different seeds."""
    from refiner.data.tasks import SplitOptions
    from refiner.engine.training import TrainConfig, train_base
    from refiner.models.checkpoints import load_checkpoint

    folder = tmp_path_factory.mktemp("nets")
    split = SplitOptions(train_per_class=40)
    for name, seed in (("a.pt", 0), ("b.pt", 1)):
        train_base("tiny_vgg", "digits", None, TrainConfig(epochs=3, batch_size=32, lr=0.05, seed=seed), folder / name, split)
    return load_checkpoint(folder / "a.pt"), load_checkpoint(folder / "b.pt")


@pytest.fixture(scope="session")
def tiny_build(tmp_path_factory, digit_nets):
    """A real `refiner build` on digits with tiny nets; returns the BuildResult (artifact under result.path)."""
    from refiner.refine.config import BuildConfig
    from refiner.refine.pipeline import build
    from refiner.engine.comparison import CompareConfig
    from refiner.engine.finetune import HeadConfig
    from refiner.engine.fitting import FitConfig

    models = tmp_path_factory.mktemp("models")
    config = BuildConfig(
        name="digits-tiny",
        compare=CompareConfig(fit=FitConfig(epochs=3, lr_start=1e-2, lr_end=1e-3)),
        head=HeadConfig(epochs=2),
        seeds=2,
    )
    return build(*digit_nets, "digits", None, config, models=models, cache_dir=tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def served(tiny_build, tmp_path_factory):
    """The tiny build's artifact in a private model repository, with real images (tests/serving_support.py)."""
    from serving_support import Served

    from refiner.data.tasks import load_task

    models = tmp_path_factory.mktemp("serving-models")  # a private copy: other tests may add versions
    shutil.copytree(tiny_build.path.parent, models / tiny_build.report.name)
    metadata = json.loads((tiny_build.path / "metadata.json").read_text())
    data = load_task(tiny_build.report.task, None, target=True)
    images = [s.load() for s in data.val[:8]]
    return Served(models, tiny_build.report.name, tiny_build.report.version, metadata, tiny_build.model, images)


