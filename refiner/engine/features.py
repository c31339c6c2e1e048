"""On-disk feature cache: trunk features of a split, keyed by (checkpoint, layer, task split).

Features are written chunk by chunk into a .npy memory map inside a temporary
folder that is renamed into place when complete, so an interrupted run leaves
no partial entry, and readers map the file instead of loading it into RAM.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import itertools
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, RandomSampler, Subset
from tqdm import tqdm

from refiner.atomic import atomic_dir
from refiner.data.datasets import ImageDataset
from refiner.data.samples import fingerprint
from refiner.data.tasks import TaskData
from refiner.engine import distributed as dist
from refiner.engine.device import Runtime
from refiner.engine.ortforward import trunk_forward
from refiner.errors import ConfigError, DataError
from refiner.models.checkpoints import Classifier
from refiner.models.layers import split_model
from refiner.progress import bar

__all__ = ["Batches", "FeatureSet", "default_cache_dir", "exports_dir", "cached_features", "classifier_features", "batch_features", "check_in_order", "paired", "features_cached", "inference_trunk", "images_of", "iter_batches"]


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


def exports_dir(cache_dir: Path | None) -> Path:
    """Where the onnxruntime exports of trunks and captured graphs are kept in a feature cache (one per graph, not per split)."""
    return (Path(cache_dir) if cache_dir else default_cache_dir()) / "onnx"


def _key(parts: dict[str, object]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _entry(key_parts: dict[str, object], cache_dir: Path | None, runtime: Runtime, dtype: str) -> Path:
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    return root / _key({**key_parts, "amp": runtime.config.amp, "dtype": dtype})


@torch.no_grad()
def cached_features(
    trunk: nn.Module,
    dataset: Dataset,
    key_parts: dict[str, object],
    cache_dir: Path | None = None,
    *,
    runtime: Runtime | None = None,
    batch_size: int = 128,
    dtype: str = "float32",
    desc: str = "features",
    progress: tqdm | None = None,
) -> FeatureSet:
    """Return trunk features of `dataset`, computing and caching them on first use.

    `key_parts` must identify the trunk and the data (checkpoint hash, layer,
    task, split fingerprint, preprocessing). Under torchrun every rank extracts
    its own block of images into the same entry, which rank 0 then publishes.
    `progress`: a bar over a whole stage, advanced by the images extracted (else this extraction has its own).
    """
    runtime = runtime or Runtime.resolve()
    entry = _entry(key_parts, cache_dir, runtime, dtype)
    if not (entry / "features.npy").is_file():
        if dist.is_distributed():
            _extract_sharded(trunk, dataset, entry, runtime, batch_size, dtype, desc, key_parts, progress)
        else:
            try:
                with atomic_dir(entry) as tmp:
                    _extract(trunk, dataset, tmp, runtime, batch_size, dtype, desc, range(len(dataset)), create=True, progress=progress)
                    (tmp / "key.json").write_text(json.dumps(key_parts, indent=2, default=str))
            except FileExistsError:
                pass  # another process completed the same entry first
    return FeatureSet(np.load(entry / "features.npy", mmap_mode="r"), np.load(entry / "labels.npy"))


def classifier_features(
    clf: Classifier, layer: str, data: TaskData, split: str, cache_dir: Path | None = None, *,
    runtime: Runtime | None = None, dtype: str = "float32", progress: tqdm | None = None,
) -> FeatureSet:  # fmt: skip
    """Features of `clf` at `layer` on one split of a task, fed with clf's own preprocessing (`progress`: see cached_features)."""
    runtime = runtime or Runtime.resolve()
    samples = data.split(split)
    dataset = ImageDataset(samples, data.classes, clf.meta.preprocess)
    desc = f"{clf.path.name}:{layer} {split}"
    trunk = _Lazy(lambda: inference_trunk(split_model(clf.model, layer, clf.meta.preprocess.input_size)[0], runtime))
    key = _classifier_key(clf, layer, data, split)
    return cached_features(trunk, dataset, key, cache_dir, runtime=runtime, dtype=dtype, desc=desc, progress=progress)


Batches = Iterable[Any]  # image batches: tensors (N, C, H, W), or tuples/lists (x, y, ...) whose first item is one


def images_of(batch: Any, what: str = "data") -> Tensor:
    """The image tensor of a batch: the batch itself, or the first item of (x, y, ...)."""
    x = batch[0] if isinstance(batch, (tuple, list)) and batch else batch
    if not isinstance(x, Tensor) or x.dim() < 2 or not x.is_floating_point():
        got = f"a tensor of shape {tuple(x.shape)} and dtype {x.dtype}" if isinstance(x, Tensor) else type(x).__name__
        raise DataError(f"{what} must yield float image batches (N, C, H, W) or tuples (x, y, ...) starting with one; got {got}")
    return x


def _labels_of(batch: Any, n: int) -> np.ndarray:
    """Class indices of a batch (x, y, ...) when y is one integer per image, else -1 (unknown)."""
    y = batch[1] if isinstance(batch, (tuple, list)) and len(batch) > 1 else None
    if isinstance(y, Tensor) and y.shape == (n,) and not y.is_floating_point():
        return y.cpu().numpy().astype(np.int64)
    return np.full(n, -1, dtype=np.int64)


def check_in_order(batches: Batches, what: str) -> None:
    """Refuse a shuffling DataLoader where two passes (or two loaders) must see the same images in the same order."""
    sampler = getattr(getattr(batches, "batch_sampler", None), "sampler", None) or getattr(batches, "sampler", None)
    if isinstance(sampler, RandomSampler):
        raise ConfigError(
            f"{what} is a shuffling DataLoader, but A's and B's batches must be the same images in the same order: "
            "make it with shuffle=False (pairing is by position), or pass one loader for both nets"
        )


def paired(batches: Batches, batches_b: Batches | None, what: str = "data") -> Iterator[tuple[Any, Any]]:
    """(A's batch, B's batch) in one pass: B reads A's batch unless it has its own loader, which must match it batch for batch."""
    if batches_b is None:
        yield from ((b, b) for b in batches)
        return
    check_in_order(batches, what)
    check_in_order(batches_b, f"{what}_b")
    end = object()
    for n, (a, b) in enumerate(itertools.zip_longest(batches, batches_b, fillvalue=end), 1):
        if a is end or b is end:
            raise DataError(f"{what} and {what}_b give different numbers of batches (one ends at batch {n}); B's batches must be A's images")
        yield a, b


@torch.no_grad()
def batch_features(
    sides: tuple[tuple[Classifier, str], tuple[Classifier, str]], batches: Batches, batches_b: Batches | None = None, *,
    runtime: Runtime, desc: str = "features", cache_dir: Path | None = None,
) -> tuple[FeatureSet, FeatureSet]:  # fmt: skip
    """Both nets' features at their layers over one pass of the caller's batches (x or (x, y, ...)); labels -1 when absent.

    One pass pairs A's and B's features by image even when a loader shuffles; with B's own
    batches (`batches_b`), both loaders must keep their order. Nothing is cached: the batches
    carry no identity to key a cache by (the onnxruntime exports of the trunks, keyed by their graphs and weights, are kept
    under `cache_dir`).
    """
    trunks = [inference_trunk(split_model(clf.model, layer, clf.meta.preprocess.input_size)[0], runtime) for clf, layer in sides]
    runs: list = [None, None]
    exports = exports_dir(cache_dir)
    batches_n = len(batches) if hasattr(batches, "__len__") else None
    feats: tuple[list, list] = ([], [])
    labels = []
    for n, pair in enumerate(bar(paired(batches, batches_b), desc=desc, unit="batch", leave=False), 1):
        xs = [images_of(batch, what) for batch, what in zip(pair, ("data", "data_b"))]
        if len(xs[0]) != len(xs[1]):
            raise DataError(f"batch {n} has {len(xs[0])} images for A but {len(xs[1])} for B; B's batches must be A's images")
        y, y_b = _labels_of(pair[0], len(xs[0])), _labels_of(pair[1], len(xs[1]))
        if (y >= 0).all() and (y_b >= 0).all() and not np.array_equal(y, y_b):
            raise DataError(f"batch {n}: the labels of data and data_b differ, so they are not the same images; B's batches must be A's images, in order")
        labels.append(y)
        for side, (trunk, x, out) in enumerate(zip(trunks, xs, feats)):
            (x,) = runtime.to(x)
            if x.dim() == 4 and runtime.device.type != "mps":
                x = x.contiguous(memory_format=torch.channels_last)
            if runs[side] is None:
                runs[side] = trunk_forward(trunk, x, runtime, exports, f"{'AB'[side]}'s trunk ({desc})", batches_n)
            with runtime.autocast():
                out.append(runs[side](x).float().cpu().numpy())
    if not labels:
        raise DataError(f"cannot extract features of {desc}: the data gave no batches")
    y = np.concatenate(labels)
    return FeatureSet(np.concatenate(feats[0]), y), FeatureSet(np.concatenate(feats[1]), y)


def features_cached(clf: Classifier, layer: str, data: TaskData, split: str, cache_dir: Path | None, runtime: Runtime, dtype: str = "float32") -> bool:
    """Whether classifier_features would read these features from the cache rather than extract them."""
    return (_entry(_classifier_key(clf, layer, data, split), cache_dir, runtime, dtype) / "features.npy").is_file()


def _classifier_key(clf: Classifier, layer: str, data: TaskData, split: str) -> dict[str, object]:
    return {
        "checkpoint": clf.sha256,
        "layer": layer,
        "task": data.task,
        "split": split,
        "classes": data.classes,
        "samples": fingerprint(data.split(split)),
        "preprocess": clf.meta.preprocess.model_dump(),
    }


class _Lazy(nn.Module):
    """Builds the (optimised) trunk on first call only, so a cache hit costs no tracing or folding."""

    def __init__(self, make) -> None:
        super().__init__()
        self._make, self._trunk = make, None

    def forward(self, x: Tensor) -> Tensor:
        if self._trunk is None:
            self._trunk = self._make()
        return self._trunk(x)


def inference_trunk(trunk: nn.Module, runtime: Runtime) -> nn.Module:
    """An eval-mode copy of `trunk` on the device, BatchNorm folded into convs, channels_last.

    Folding (torch.fx's conv-bn fusion) and channels_last are each kept only
    when they apply; the result matches the plain trunk within float tolerance.
    """
    model = copy.deepcopy(trunk).eval()
    try:
        from torch.fx.experimental.optimization import fuse

        model = fuse(model)
    except Exception:  # untraceable or unusual graphs keep their BatchNorm
        pass
    model = model.to(runtime.device)
    if any(isinstance(m, nn.Conv2d) for m in model.modules()):
        model = model.to(memory_format=torch.channels_last)
    return model


def _extract(
    trunk: nn.Module, dataset: Dataset, out: Path, runtime: Runtime, batch_size: int, dtype: str, desc: str,
    rows: range, create: bool, progress: tqdm | None = None,
) -> None:  # fmt: skip
    """Run the trunk over dataset[rows] and write features and labels into out/ (memory maps)."""
    was_training = trunk.training
    trunk.eval()
    loader = DataLoader(
        Subset(dataset, rows), batch_size=batch_size, num_workers=runtime.workers, pin_memory=runtime.pin_memory,
        persistent_workers=False,
    )  # fmt: skip
    feats = labels = run = None
    start = rows.start
    try:
        for x, y in loader if progress is not None else bar(loader, desc=desc, unit="batch", leave=False):
            (x,) = runtime.to(x)
            if x.dim() == 4 and runtime.device.type != "mps":
                x = x.contiguous(memory_format=torch.channels_last)
            run = run if run is not None else trunk_forward(trunk, x, runtime, exports_dir(out.parent), desc, len(loader))  # out: a folder in the cache
            with runtime.autocast():
                f = run(x)
            f = f.float().contiguous().cpu().numpy()
            if feats is None:
                feats, labels = _open(out, len(dataset), f.shape[1:], dtype, create)
            feats[start : start + len(f)] = f
            labels[start : start + len(f)] = y.numpy()
            start += len(f)
            if progress is not None:
                progress.update(len(f))
    finally:
        trunk.train(was_training)
    if feats is None and create:  # an empty shard still needs the files (only when this rank creates them)
        raise DataError(f"cannot extract features of {desc}: the split has no images")
    assert start == rows.stop, "short read"
    if feats is not None:
        feats.flush()
        labels.flush()


def _open(out: Path, n: int, shape: tuple[int, ...], dtype: str, create: bool) -> tuple[np.ndarray, np.ndarray]:
    mode = "w+" if create else "r+"
    feats = np.lib.format.open_memmap(out / "features.npy", mode=mode, dtype=np.dtype(dtype), shape=(n, *shape) if create else None)
    labels = np.lib.format.open_memmap(out / "labels.npy", mode=mode, dtype=np.int64, shape=(n,) if create else None)
    return feats, labels


def _extract_sharded(
    trunk: nn.Module, dataset: Dataset, entry: Path, runtime: Runtime, batch_size: int, dtype: str, desc: str,
    key_parts: dict[str, object], progress: tqdm | None = None,
) -> None:  # fmt: skip
    """Every rank extracts its block of images into one temporary entry; rank 0 renames it into place."""
    with contextlib.ExitStack() as stack:
        tmp = None
        if dist.is_main():
            tmp = stack.enter_context(atomic_dir(entry))
            x0 = dataset[0][0].unsqueeze(0)
            (x0,) = runtime.to(x0)
            trunk.eval()
            with runtime.autocast():
                shape = tuple(trunk(x0).shape[1:])
            _open(tmp, len(dataset), shape, dtype, create=True)
            (tmp / "key.json").write_text(json.dumps(key_parts, indent=2, default=str))
        tmp = Path(dist.broadcast(str(tmp) if tmp else None))
        rows = dist.shard(len(dataset))
        if len(rows):
            _extract(trunk, dataset, tmp, runtime, batch_size, dtype, desc, rows, create=False, progress=progress)
        dist.barrier()  # every block is written before rank 0 publishes the entry
    dist.barrier()  # the entry exists before any rank reads it


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
        yield tuple(_tensor(a[sorted_idx][inverse]) for a in arrays)


def _tensor(a: np.ndarray) -> Tensor:
    """A tensor of a batch; fp16-cached features are widened to float32 for computing."""
    t = torch.from_numpy(np.ascontiguousarray(a))
    return t.float() if t.dtype == torch.float16 else t
