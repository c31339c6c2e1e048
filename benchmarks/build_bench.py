"""Benchmarks of `refiner build` (run by hand; figures go to docs/benchmarks.md).

  python benchmarks/build_bench.py cache   --a A.pt --b B.pt --task cifar-animal --data $CIFAR --epochs 3
      head fine-tuning on cached features vs re-running the frozen trunk (+ g) every epoch
  python benchmarks/build_bench.py latency --a A.pt --b B.pt --task cifar-animal --data $CIFAR
      the refined model in onnxruntime (ENABLE_ALL) vs PyTorch eager, batch 1 and 32
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from refiner.refine.config import BuildConfig
from refiner.refine.pipeline import build
from refiner.refine.refined import replace_classifier
from refiner.data.datasets import ImageDataset
from refiner.data.tasks import SplitOptions, load_task
from refiner.engine.comparison import CompareConfig, compare
from refiner.engine.features import iter_batches
from refiner.engine.finetune import HeadConfig, finetune_head
from refiner.engine.fitting import FitConfig
from refiner.models.checkpoints import load_checkpoint
from refiner.models.layers import split_model


def _cache(args) -> None:
    a, b = load_checkpoint(args.a), load_checkpoint(args.b)
    data = load_task(args.task, args.data, target=True, options=SplitOptions(train_per_class=args.train_per_class))
    config = CompareConfig(fit=FitConfig(epochs=1))
    with tempfile.TemporaryDirectory() as cache:
        t0 = time.perf_counter()
        g, report, pairs = compare(a, b, data, config, Path(cache), measure=("val", "test"))
        extract = time.perf_counter() - t0  # features of A and B (all splits) + 1 epoch of g
        trunk_a, _ = split_model(a.model, report.a.layer)
        _, head_b = split_model(b.model, report.b.layer)
        head_cfg = HeadConfig(epochs=args.epochs)
        n_classes = len(data.classes)

        @torch.no_grad()
        def refined_features(x_a: np.ndarray) -> np.ndarray:
            return np.concatenate([g(xa).numpy() for (xa,) in iter_batches(x_a, batch_size=256)])

        t0 = time.perf_counter()
        feats = {s: refined_features(pairs[s][0].x) for s in ("train", "val", "test")}
        derive = time.perf_counter() - t0
        labels = {s: pairs[s][0].y for s in ("train", "val", "test")}
        cached = lambda s, shuffle=False: lambda: iter_batches(  # noqa: E731
            feats[s], labels[s], indices=np.random.permutation(len(labels[s])) if shuffle else None, batch_size=64
        )
        t0 = time.perf_counter()
        finetune_head(replace_classifier(head_b, b.meta.arch, n_classes), cached("train", True), cached("val"), cached("test"), head_cfg, 0, target=range(n_classes))
        t_cached = time.perf_counter() - t0

        frozen = torch.nn.Sequential(trunk_a, g).eval()

        def rerun(split: str, shuffle: bool = False):
            loader = DataLoader(ImageDataset(data.split(split), data.classes, a.meta.preprocess), batch_size=64, shuffle=shuffle)

            def batches():
                for x, y in loader:
                    with torch.no_grad():
                        f = frozen(x)
                    yield f, y

            return batches

        t0 = time.perf_counter()
        finetune_head(replace_classifier(head_b, b.meta.arch, n_classes), rerun("train", True), rerun("val"), rerun("test"), head_cfg, 0, target=range(n_classes))
        t_rerun = time.perf_counter() - t0
    print(f"task {args.task}: {len(labels['train'])} train / {len(labels['val'])} val / {len(labels['test'])} test images, {args.epochs} epochs")
    print(f"one-time: features of A and B + 1 epoch of g {extract:.1f} s; g(x_A) for all splits {derive:.1f} s")
    print(f"fine-tuning on cached features:       {t_cached:.1f} s")
    print(f"fine-tuning re-running trunk + g:     {t_rerun:.1f} s")
    print(f"ratio (rerun / cached):               {t_rerun / t_cached:.1f}x; including the one-time cost: {t_rerun / (t_cached + extract + derive):.1f}x")


def _latency(args) -> None:
    import onnxruntime as ort

    torch.set_num_threads(args.threads)
    a, b = load_checkpoint(args.a), load_checkpoint(args.b)
    config = BuildConfig(name="latency-bench", compare=CompareConfig(fit=FitConfig(epochs=1)), head=HeadConfig(epochs=1), seeds=1, ablations=False)
    with tempfile.TemporaryDirectory() as tmp:
        split = SplitOptions(train_per_class=args.train_per_class)
        result = build(a, b, args.task, args.data, config, models=Path(tmp) / "models", split=split, cache_dir=Path(tmp) / "cache")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = args.threads
        session = ort.InferenceSession(str(result.path / "model.onnx"), options, providers=["CPUExecutionProvider"])
    model = result.model.eval()
    size = a.meta.preprocess.input_size
    print(f"refined model ({a.meta.arch} trunk -> g -> {b.meta.arch} head), input {size}, {args.threads} threads")
    print(f"{'batch':>5}  {'torch ms':>9}  {'onnx ms':>8}  {'torch img/s':>11}  {'onnx img/s':>10}  {'speed-up':>8}")
    for batch in (1, 32):
        x = torch.randn(batch, *size)
        with torch.inference_mode():
            t_torch = _median_ms(lambda: model(x), args.repeats)
        feed = {"input": x.numpy()}
        t_onnx = _median_ms(lambda: session.run(None, feed), args.repeats)
        print(f"{batch:>5}  {t_torch:>9.2f}  {t_onnx:>8.2f}  {1000 * batch / t_torch:>11.0f}  {1000 * batch / t_onnx:>10.0f}  {t_torch / t_onnx:>7.2f}x")


def _median_ms(fn, repeats: int) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="bench", required=True)
    for name, fn in (("cache", _cache), ("latency", _latency)):
        p = sub.add_parser(name)
        p.add_argument("--a", type=Path, required=True)
        p.add_argument("--b", type=Path, required=True)
        p.add_argument("--task", required=True)
        p.add_argument("--data", type=Path)
        p.add_argument("--epochs", type=int, default=3)
        p.add_argument("--train-per-class", type=int, help="keep at most N training images per class")
        p.add_argument("--threads", type=int, default=2)
        p.add_argument("--repeats", type=int, default=50)
        p.set_defaults(run=fn)
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
