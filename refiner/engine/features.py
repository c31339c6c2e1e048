"""On-disk feature cache: trunk features of a split, keyed by (checkpoint, layer, task split).

Features are written chunk by chunk into a .npy memory map inside a temporary
folder that is renamed into place when complete, so an interrupted run leaves
no partial entry, and readers map the file instead of loading it into RAM.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from refiner.atomic import atomic_dir
from refiner.data.datasets import ImageDataset, fingerprint
from refiner.data.tasks import TaskData
from refiner.models.checkpoints import Classifier
from refiner.models.layers import split_model

__all__ = ["FeatureSet", "default_cache_dir", "cached_features", "classifier_features", "iter_batches"]


@dataclass
class FeatureSet:
    """Features (N, ...) as a read-only memory map, and their class indices (N,)."""

    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.y)


def default_cache_dir() -> Path:
    """$REFINER_CACHE, else ~/.cache/refiner/features."""
    env = os.environ.get("REFINER_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "refiner" / "features"


def _key(parts: dict[str, object]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


@torch.no_grad()
def cached_features(
    trunk: nn.Module,
    dataset: Dataset,
    key_parts: dict[str, object],
    cache_dir: Path | None = None,
    *,
    batch_size: int = 128,
    num_workers: int = 0,
    desc: str = "features",
) -> FeatureSet:
    """Return trunk features of `dataset`, computing and caching them on first use.

    `key_parts` must identify the trunk and the data (checkpoint hash, layer,
    task, split fingerprint, preprocessing).
    """
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    entry = root / _key(key_parts)
    if not (entry / "features.npy").is_file():
        try:
            with atomic_dir(entry) as tmp:
                _extract(trunk, dataset, tmp, batch_size, num_workers, desc)
                (tmp / "key.json").write_text(json.dumps(key_parts, indent=2, default=str))
        except FileExistsError:
            pass  # another process completed the same entry first
    return FeatureSet(np.load(entry / "features.npy", mmap_mode="r"), np.load(entry / "labels.npy"))


def classifier_features(
    clf: Classifier, layer: str, data: TaskData, split: str, cache_dir: Path | None = None, *, num_workers: int = 0
) -> FeatureSet:
    """Features of `clf` at `layer` on one split of a task, fed with clf's own preprocessing."""
    samples = data.split(split)
    trunk, _ = split_model(clf.model, layer)
    key = {
        "checkpoint": clf.sha256,
        "layer": layer,
        "task": data.task,
        "split": split,
        "classes": data.classes,
        "samples": fingerprint(samples),
        "preprocess": clf.meta.preprocess.model_dump(),
    }
    dataset = ImageDataset(samples, data.classes, clf.meta.preprocess)
    desc = f"{clf.path.name}:{layer} {split}"
    return cached_features(trunk, dataset, key, cache_dir, num_workers=num_workers, desc=desc)


def _extract(trunk: nn.Module, dataset: Dataset, out: Path, batch_size: int, num_workers: int, desc: str) -> None:
    was_training = trunk.training
    trunk.eval()
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
    feats = None
    labels = np.empty(len(dataset), dtype=np.int64)
    start = 0
    try:
        for x, y in tqdm(loader, desc=desc, unit="batch", leave=False):
            f = trunk(x).float().numpy()
            if feats is None:
                feats = np.lib.format.open_memmap(out / "features.npy", mode="w+", dtype=np.float32, shape=(len(dataset), *f.shape[1:]))
            feats[start : start + len(f)] = f
            labels[start : start + len(f)] = y.numpy()
            start += len(f)
    finally:
        trunk.train(was_training)
    assert feats is not None and start == len(dataset), "empty dataset or short read"
    feats.flush()
    del feats
    np.save(out / "labels.npy", labels)


def iter_batches(
    *arrays: np.ndarray, indices: np.ndarray | None = None, batch_size: int = 256
) -> Iterator[tuple[torch.Tensor, ...]]:
    """Yield aligned batches of several arrays as tensors, in the order of `indices`."""
    n = len(arrays[0])
    order = np.arange(n) if indices is None else np.asarray(indices)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        sorted_idx = np.sort(idx)  # sorted reads are faster on memory maps
        inverse = np.argsort(np.argsort(idx))
        yield tuple(torch.from_numpy(np.ascontiguousarray(a[sorted_idx][inverse])) for a in arrays)
