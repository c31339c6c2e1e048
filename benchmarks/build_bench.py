"""Benchmarks of `refiner build` (run by hand; figures go to docs/benchmarks.md).

  python benchmarks/build_bench.py cache   --a A.pt --b B.pt --task cifar-animal --data $CIFAR --epochs 3
      head fine-tuning on cached features vs re-running the frozen trunk (+ g) every epoch
  python benchmarks/build_bench.py latency --a A.pt --b B.pt --task cifar-animal --data $CIFAR
      the refined model in onnxruntime (ENABLE_ALL) vs PyTorch eager, batch 1 and 32
  python benchmarks/build_bench.py features --task cifar10 --data $CIFAR --train-per-class 50 --test-per-class 50 --reps 3
      the build's feature stage (A's and B's trunks over train, val and test, into a fresh feature cache) with
      --forward torch, onnxruntime and auto; two untrained torchvision resnet18 (seeds 0, 1) at 224 px unless
      --a/--b are given; each run in a fresh process, alternating; onnxruntime "cold" exports its trunks first,
      "warm" finds them cached (the feature cache is emptied either way)
"""

from __future__ import annotations

import argparse
import os
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


# One feature stage in a fresh interpreter: prints {"seconds": ..., "digest": [...]} (a checksum of each split's features).
_FEATURES_CHILD = r"""
import json, sys, time
a, b, task, data, train_pc, test_pc, cache, forward, threads = sys.argv[1:10]
import numpy as np, torch
from refiner.data.tasks import SplitOptions, load_task
from refiner.engine.device import Runtime, RuntimeConfig
from refiner.engine.features import classifier_features
from refiner.models.checkpoints import load_checkpoint
from refiner.engine.comparison import default_layer
runtime = Runtime.resolve(RuntimeConfig(device="cpu", threads=int(threads), forward=forward))
nets = [load_checkpoint(p, arch="resnet18" if p.endswith("-untrained.pt") else None) for p in (a, b)]
options = SplitOptions(train_per_class=int(train_pc), test_per_class=int(test_pc))
split_data = load_task(task, data, target=True, options=options)
t0 = time.perf_counter()
digest = []
for split in ("train", "val", "test"):
    for clf in nets:
        f = classifier_features(clf, default_layer(clf), split_data, split, cache, runtime=runtime)
        digest.append(float(np.asarray(f.x, dtype=np.float64).sum()))
print(json.dumps({"seconds": time.perf_counter() - t0, "digest": digest, "images": sum(len(split_data.split(s)) for s in ("train", "val", "test"))}))
"""


def _features(args) -> None:
    import json
    import shutil
    import subprocess
    import sys

    from refiner.models.architectures import create_model

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        nets = [args.a, args.b]
        if args.a is None:
            for i, name in enumerate(("a-untrained.pt", "b-untrained.pt")):
                torch.manual_seed(i)
                torch.save(create_model("resnet18", 1000).state_dict(), tmp / name)
            nets = [tmp / "a-untrained.pt", tmp / "b-untrained.pt"]
        cache = tmp / "cache"

        def run(forward: str) -> dict:
            for entry in cache.glob("*"):
                if entry.name != "onnx":
                    shutil.rmtree(entry)  # a fresh feature cache; the exports stay (cold: removed before the call)
            cmd = [sys.executable, "-c", _FEATURES_CHILD, *map(str, nets), args.task, str(args.data), str(args.train_per_class),
                   str(args.test_per_class), str(cache), forward, str(args.threads)]  # fmt: skip
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ, "TQDM_DISABLE": "1"})
            return json.loads(out.stdout.strip().splitlines()[-1])

        shutil.rmtree(cache / "onnx", ignore_errors=True)
        cold = run("onnxruntime")
        times: dict[str, list[float]] = {"torch": [], "onnxruntime": [], "auto": []}
        digests = {}
        for rep in range(args.reps):
            for forward in (list(times) if rep % 2 == 0 else list(times)[::-1]):
                result = run(forward)
                times[forward].append(result["seconds"])
                digests[forward] = result["digest"]
    images = cold["images"]
    print(f"feature stage of a build: {images} images of {args.task} (train, val, test) through A's and B's trunks, {args.threads} threads, {args.reps} reps")
    print(f"onnxruntime, cold (exports its trunks first): {cold['seconds']:.1f} s")
    for forward, values in times.items():
        print(f"{forward:>12}: min {min(values):.1f} s, median {statistics.median(values):.1f} s")
    print(f"torch / onnxruntime (min): {min(times['torch']) / min(times['onnxruntime']):.2f}x; torch / auto: {min(times['torch']) / min(times['auto']):.2f}x; "
          f"torch / cold onnxruntime: {min(times['torch']) / cold['seconds']:.2f}x")  # fmt: skip
    gap = max(abs(x - y) / max(abs(y), 1.0) for x, y in zip(digests["onnxruntime"], digests["torch"]))
    print(f"largest relative difference of a split's feature sum (onnxruntime vs torch): {gap:.1e}")


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
    for name, fn in (("cache", _cache), ("latency", _latency), ("features", _features)):
        p = sub.add_parser(name)
        p.add_argument("--a", type=Path, required=name != "features")
        p.add_argument("--b", type=Path, required=name != "features")
        p.add_argument("--task", required=True)
        p.add_argument("--data", type=Path)
        p.add_argument("--epochs", type=int, default=3)
        p.add_argument("--train-per-class", type=int, help="keep at most N training images per class")
        p.add_argument("--threads", type=int, default=2)
        p.add_argument("--repeats", type=int, default=50)
        p.add_argument("--test-per-class", type=int, default=50, help="features: test images per class")
        p.add_argument("--reps", type=int, default=3, help="features: alternating repetitions")
        p.set_defaults(run=fn)
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
