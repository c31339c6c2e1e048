"""Feature cache: reuse, safety against partial writes, batch iteration."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import TensorDataset

from refiner.atomic import atomic_dir
from refiner.data.samples import ArraySample, fingerprint
from refiner.data.tasks import load_task
from refiner.engine.comparison import CompareConfig, compare
from refiner.engine.device import Runtime, RuntimeConfig
from refiner.engine.features import cached_features, iter_batches
from refiner.engine.fitting import FitConfig


class _Counting(torch.nn.Module):
    def __init__(self, fail_after: int | None = None):
        super().__init__()
        self.calls, self.fail_after = 0, fail_after

    def forward(self, x):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise KeyboardInterrupt
        return x * 2


def _dataset(n=10):
    return TensorDataset(torch.arange(n * 4, dtype=torch.float32).reshape(n, 4), torch.arange(n) % 3)


TORCH = Runtime(config=RuntimeConfig(device="cpu", forward="torch"), device=torch.device("cpu"), workers=0)  # one call a batch ("auto" probes once more)


def test_cache_is_reused(tmp_path):
    trunk = _Counting()
    first = cached_features(trunk, _dataset(), {"k": 1}, tmp_path, batch_size=4, runtime=TORCH)
    calls = trunk.calls
    second = cached_features(trunk, _dataset(), {"k": 1}, tmp_path, batch_size=4, runtime=TORCH)
    assert trunk.calls == calls == 3
    assert isinstance(second.x, np.memmap)
    np.testing.assert_array_equal(first.x, np.arange(40, dtype=np.float32).reshape(10, 4) * 2)
    np.testing.assert_array_equal(second.y, np.arange(10) % 3)
    cached_features(trunk, _dataset(), {"k": 2}, tmp_path, batch_size=4, runtime=TORCH)
    assert trunk.calls == 6  # another key computes anew


def test_interrupted_extraction_leaves_no_entry(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        cached_features(_Counting(fail_after=1), _dataset(), {"k": 1}, tmp_path, batch_size=4)
    assert list(tmp_path.iterdir()) == []
    full = cached_features(_Counting(), _dataset(), {"k": 1}, tmp_path, batch_size=4)
    assert len(full) == 10


def test_atomic_dir_never_overwrites(tmp_path):
    target = tmp_path / "v1"
    with atomic_dir(target) as tmp:
        (tmp / "f").write_text("x")
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        with atomic_dir(target) as tmp:
            (tmp / "f").write_text("y")
    assert (target / "f").read_text() == "x"
    assert [p.name for p in tmp_path.iterdir()] == ["v1"]


def test_iter_batches_keeps_requested_order():
    a = np.arange(20).reshape(10, 2)
    b = np.arange(10)
    order = np.array([7, 2, 9, 0, 5])
    xs, ys = zip(*iter_batches(a, b, indices=order, batch_size=3))
    np.testing.assert_array_equal(torch.cat(ys).numpy(), order)
    np.testing.assert_array_equal(torch.cat(xs).numpy(), a[order])


def test_fp16_cache_halves_storage_and_reads_back_as_float32(tmp_path):
    full = cached_features(_Counting(), _dataset(), {"k": 1}, tmp_path, batch_size=4)
    half = cached_features(_Counting(), _dataset(), {"k": 1}, tmp_path, batch_size=4, dtype="float16")
    assert half.x.dtype == np.float16 and half.x.nbytes * 2 == full.x.nbytes
    assert len(list(tmp_path.iterdir())) == 2  # the storage type is part of the cache key
    (batch, _), *_ = iter_batches(half.x, half.y, batch_size=4)
    assert batch.dtype == torch.float32
    np.testing.assert_allclose(batch.numpy(), full.x[:4], rtol=1e-3)


def test_atomic_writes_get_the_usual_permissions(tmp_path):
    from refiner.atomic import atomic_file

    with atomic_file(tmp_path / "f.json") as tmp:
        tmp.write_text("{}")
    with atomic_dir(tmp_path / "d") as tmp:
        (tmp / "x").write_text("x")
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "f.json").stat().st_mode & 0o777 == 0o666 & ~mask
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o777 & ~mask


def _imagefolder(root, seed, n=10):
    rng = np.random.default_rng(seed)
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / c / f"{i}.png")


def test_folders_with_the_same_names_do_not_share_cached_features(tmp_path, digit_nets):
    """One cache, two imagefolders with the same class and file names but other pixels: other features and Var tables; an edited file too."""
    for name, seed in (("x", 0), ("y", 1)):
        _imagefolder(tmp_path / name, seed)
    config, cache = CompareConfig(fit=FitConfig(epochs=2)), tmp_path / "cache"

    def run(root):
        data = load_task("imagefolder", root, target=False)
        _, report, pairs = compare(*digit_nets, data, config, cache, measure=("test",))
        return np.array(pairs["train"][0].x), report.tables["test"]

    def entries():
        return sorted(str(p.relative_to(cache)) for p in cache.rglob("*") if p.is_file())

    x_features, x_table = run(tmp_path / "x")
    x_entries = entries()
    y_features, y_table = run(tmp_path / "y")
    assert not np.allclose(x_features, y_features) and x_table != y_table
    assert len(entries()) == 2 * len(x_entries) > 0  # y got entries of its own
    before_rerun = entries()
    assert np.array_equal(run(tmp_path / "x")[0], x_features)
    assert entries() == before_rerun  # the same folder hits its entries: nothing extracted or written again
    edited = load_task("imagefolder", tmp_path / "x", target=False).train[0].path
    before = edited.stat()
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(edited)
    os.utime(edited, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))  # a later mtime even where timestamps are coarse
    assert not np.allclose(run(tmp_path / "x")[0], x_features)
    assert len(entries()) > len(before_rerun)  # the edited folder is a new entry


def test_in_memory_images_with_the_same_bytes_but_another_shape_are_other_samples():
    pixels = np.arange(64, dtype=np.uint8)
    assert fingerprint([ArraySample(pixels.reshape(8, 8), "0")]) != fingerprint([ArraySample(pixels.reshape(4, 16), "0")])
