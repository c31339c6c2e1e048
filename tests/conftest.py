"""Shared fixtures: seeded RNG per test, CUDA skip marker, tiny data made on the fly."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch


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
def _cache_dir(tmp_path, monkeypatch):
    """Keep each test's feature cache in its own temporary folder."""
    monkeypatch.setenv("REFINER_CACHE", str(tmp_path / "cache"))
