"""Engine throughput per device and AMP mode (run by hand; figures go to docs/benchmarks.md).

  python benchmarks/engine_bench.py --data $CIFAR [--device cpu cuda] [--amp off bf16] [--threads 1]
      train one epoch, extract features, fit g, build: images/s or samples/s per (device, AMP)
  python benchmarks/engine_bench.py --data $CIFAR --only fit-loop
      refiner's fitting loop against a minimal plain PyTorch loop of the same g on the same tensors

Nets are untrained small_vgg (throughput does not depend on the weights); the
data are CIFAR-10 JPEGs. Every figure is printed with the device's name.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset

from refiner.data.datasets import ImageDataset
from refiner.data.tasks import SplitOptions, load_task
from refiner.engine.device import Runtime, RuntimeConfig
from refiner.engine.features import cached_features, inference_trunk
from refiner.engine.fitting import FitConfig, fit_isomorphism
from refiner.engine.training import train_one_epoch
from refiner.models.architectures import create_model
from refiner.models.layers import split_model


def _train_epoch(rt: Runtime, dataset, images: int) -> float:
    model = create_model("small_vgg", 10).to(rt.device)
    loader = DataLoader(Subset(dataset, range(images)), batch_size=128, shuffle=True, num_workers=rt.workers, pin_memory=rt.pin_memory)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    t0 = time.perf_counter()
    train_one_epoch(model, loader, opt, runtime=rt)
    _sync(rt)
    return images / (time.perf_counter() - t0)


def _features(rt: Runtime, dataset, images: int, layer: str, optimised: bool) -> float:
    trunk, _ = split_model(create_model("small_vgg", 10).eval(), layer)
    trunk = inference_trunk(trunk, rt) if optimised else trunk.to(rt.device)
    with tempfile.TemporaryDirectory() as cache:
        t0 = time.perf_counter()
        cached_features(trunk, Subset(dataset, range(images)), {"bench": layer, "opt": optimised}, Path(cache), runtime=rt)
        _sync(rt)
        return images / (time.perf_counter() - t0)


def _fit_data(dataset, images: int, layer: str) -> tuple[np.ndarray, np.ndarray]:
    rt = Runtime.resolve(RuntimeConfig(device="cpu"))
    feats = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        trunk, _ = split_model(create_model("small_vgg", 10).eval(), layer)
        with tempfile.TemporaryDirectory() as cache:
            feats.append(np.array(cached_features(trunk, Subset(dataset, range(images)), {"s": seed}, Path(cache), runtime=rt).x))
    return feats[0], feats[1]


def _fit(rt: Runtime, x_a: np.ndarray, x_b: np.ndarray, steps: int, compile_: str = "off") -> float:
    """Samples/s of refiner's fitting loop, compiling (when on) included."""
    config = FitConfig(max_steps=steps, eval_every=steps, holdout=0.1, compile=compile_)
    _, fit = fit_isomorphism(x_a, x_b, config=config, runtime=rt)
    return fit.samples_per_s


class _PlainG(nn.Module):
    """The minimal g of the engine issue: 3 bias-free 3x3 convs, per-sample std, sigmoid gates."""

    def __init__(self, c_a: int, c_b: int) -> None:
        super().__init__()
        self.w = nn.ModuleList(nn.Conv2d(c_a, c_b if i == 0 else c_a, 3, padding=1, bias=False) for i in range(3))
        self.theta = nn.Parameter(torch.zeros(2))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        p = torch.sigmoid(self.theta)
        h = self.w[2](z)
        for k in (1, 0):
            h = self.w[k](z + p[k] * F.relu(h / torch.sqrt(h.var(dim=(2, 3), keepdim=True, unbiased=False) + 1e-5)))
        return h


def _plain_fit(rt: Runtime, x_a: np.ndarray, x_b: np.ndarray, steps: int, compile_: bool) -> float:
    """Samples/s of the plain loop on standardised tensors held on the device (the best case)."""
    a = torch.from_numpy(x_a).to(rt.device)
    b = torch.from_numpy(x_b).to(rt.device)
    a = (a - a.mean((0, 2, 3), keepdim=True)) / a.std((0, 2, 3), keepdim=True)
    b = (b - b.mean((0, 2, 3), keepdim=True)) / b.std((0, 2, 3), keepdim=True)
    g = _PlainG(a.shape[1], b.shape[1]).to(rt.device)
    opt = torch.optim.Adam(g.parameters(), lr=1e-2)

    def step(xa, xb):
        loss = F.mse_loss(g(xa), xb) + 0.1 * torch.sigmoid(g.theta).pow(2).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    run = torch.compile(step) if compile_ else step
    n = len(a)
    gen = torch.Generator().manual_seed(0)
    run(a[:64], b[:64])  # warm-up (compilation)
    _sync(rt)
    t0 = time.perf_counter()
    done = 0
    while done < steps:
        for idx in torch.randperm(n, generator=gen).split(64):
            if done == steps:
                break
            idx = idx.to(rt.device)
            run(a[idx], b[idx])
            done += 1
    _sync(rt)
    return steps * 64 / (time.perf_counter() - t0)


def _sync(rt: Runtime) -> None:
    if rt.device.type == "cuda":
        torch.cuda.synchronize(rt.device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="folder holding cifar10/")
    p.add_argument("--device", nargs="+", default=["auto"])
    p.add_argument("--amp", nargs="+", default=["off", "bf16"])
    p.add_argument("--threads", type=int)
    p.add_argument("--images", type=int, default=2000, help="images for training and extraction")
    p.add_argument("--fit-images", type=int, default=2000)
    p.add_argument("--fit-steps", type=int, default=300)
    p.add_argument("--layer", default="features.12")
    p.add_argument("--only", choices=["all", "fit-loop"], default="all")
    args = p.parse_args()
    data = load_task("cifar10", args.data, target=False, options=SplitOptions(train_per_class=max(args.images, args.fit_images) // 10 + 1))
    dataset = ImageDataset(data.train, data.classes, data.preprocess)
    x_a, x_b = _fit_data(dataset, args.fit_images, args.layer)
    for device in args.device:
        for amp in args.amp if args.only == "all" else ["off"]:
            rt = Runtime.resolve(RuntimeConfig(device=device, amp=amp, threads=args.threads))
            rec = rt.record()
            head = f"{rec['device']} ({rec['name']}), AMP {amp}, {rec['threads']} threads, {rec['workers']} workers"
            if args.only == "all":
                print(f"{head}: train 1 epoch {_train_epoch(rt, dataset, args.images):.0f} img/s")
                plain = _features(rt, dataset, args.images, args.layer, optimised=False)
                fast = _features(rt, dataset, args.images, args.layer, optimised=True)
                print(f"{head}: features {plain:.0f} img/s plain trunk, {fast:.0f} img/s BN folded + channels_last ({fast / plain:.2f}x)")
                print(f"{head}: fit g {_fit(rt, x_a, x_b, args.fit_steps):.0f} samples/s")
            if amp == "off":
                ours = _fit(rt, x_a, x_b, args.fit_steps)
                base = _plain_fit(rt, x_a, x_b, args.fit_steps, compile_=False)
                print(f"{head}: fit loop refiner {ours:.0f} samples/s, plain PyTorch {base:.0f} samples/s, ratio {ours / base:.2f}")
                try:
                    compiled = _plain_fit(rt, x_a, x_b, args.fit_steps, compile_=True)
                    print(f"{head}: plain loop under torch.compile {compiled:.0f} samples/s ({compiled / base:.2f}x eager)")
                    ours_compiled = _fit(rt, x_a, x_b, args.fit_steps, compile_="on")
                    print(f"{head}: refiner's loop under torch.compile {ours_compiled:.0f} samples/s, compiling included ({ours_compiled / ours:.2f}x eager)")
                except Exception as e:  # no compiler toolchain, unsupported backend
                    print(f"{head}: torch.compile unavailable: {type(e).__name__}: {str(e)[:120]}")


if __name__ == "__main__":
    main()
