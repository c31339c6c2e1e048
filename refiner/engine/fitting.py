"""Fit g on cached features until the held-out reconstruction error stops improving.

Default: Adam over a budget of optimiser steps that does not depend on the
dataset size; every `eval_every` steps the held-out MSE is checked, the
learning rate is cut after `plateau` checks without improvement, and fitting
stops after `patience` such checks (the best held-out weights are kept).
`epochs` switches to the old fixed budget (log-spaced lr, no early stop).
Under torchrun the batches are split across ranks and gradients all-reduced (DDP);
the batch normaliser's running variance and the held-out MSE are averaged over
ranks too, so every rank takes the same decisions and keeps the same g.
Fits whose measured steps repay compiling run g's loss under torch.compile
(eager when compiling fails); the compile is left out of the ETA.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
import warnings
from collections.abc import Iterator
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from refiner.engine import distributed as dist
from refiner.engine.device import Runtime
from refiner.engine.features import iter_batches
from refiner.engine.isomorphism import IsomorphismConfig, IsomorphismNet
from refiner.errors import DataError
from refiner.progress import bar, note, paused

__all__ = ["FitConfig", "FitResult", "fit_isomorphism", "channel_stats"]

# compile="auto" (see _Steps): seconds torch.compile takes per graph of g's training step, by device type. Measured
# on 2 shared CPU cores (torch 2.14, docs/benchmarks.md): 69-70 s per graph at 256x4x4 and 64x16x16; CUDA not measured.
COMPILE_S = {"cpu": 90.0, "cuda": 60.0}
COMPILE_SAVES = 0.1  # share of an eager step's time a compiled step saves (measured on CPU: 6 % at 256x4x4, 21 % at 64x16x16)
PROBE_STEPS = 20  # eager steps timed (after one warm-up step) before "auto" decides
CONVERGED_STEPS = 5_000  # steps "auto" expects of a fit that stops at convergence (CIFAR layers: 3,800-7,000)


class FitConfig(BaseModel):
    """Optimisation of g (Eq. 2). The reference code trains g for 800-1000 epochs; here it runs to convergence.

    Examples:
        >>> import refiner
        >>> refiner.FitConfig(max_steps=500).patience  # checks without improvement before it stops
        10
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_steps: int = Field(20_000, ge=1)  # optimiser-step budget, independent of the dataset size
    eval_every: int = Field(100, ge=1)  # steps between held-out checks
    patience: int = Field(10, ge=1)  # checks without improvement before fitting stops
    plateau: int = Field(3, ge=1)  # checks without improvement before the learning rate is cut
    lr_decay: float = Field(0.3, gt=0, lt=1)  # factor of each cut
    rel_tol: float = Field(1e-3, ge=0, lt=1)  # an improvement (for patience) must beat the last one by this fraction ...
    abs_tol: float = Field(1e-4, ge=0)  # ... and by this much (MSE is in units of Var(x_B) = 1)
    lr_start: float = Field(1e-2, gt=0)  # initial learning rate
    lr_end: float = Field(1e-5, gt=0)  # floor of the cuts; with `epochs`, the last epoch's rate
    epochs: int | None = Field(None, ge=1)  # override: a fixed number of epochs, lr log-spaced, no early stop
    batch_size: int = Field(64, ge=1)  # per process
    holdout: float = Field(0.1, ge=0.0, lt=0.5)  # share of pairs held out; 0: the training MSE is watched
    seed: int = 0
    preload_gib: float = Field(2.0, ge=0)  # features up to this size are held on the device, larger ones stream
    compile: Literal["auto", "on", "off"] = "auto"  # torch.compile g's loss; auto: when its measured steps repay compiling


class FitResult(BaseModel):
    """The fitting curve (one point per check) and how fitting ended."""

    steps: list[int] = []  # optimiser steps at each check
    train_mse: list[float] = []  # mean training MSE since the previous check (B's standardised space)
    holdout_mse: list[float] = []  # held-out MSE at each check (nan without a held-out split)
    lr: list[float] = []  # learning rate in use before each check
    p_history: list[list[float]] = []  # p^(1..K) at each check
    p: list[float] = []  # final p^(1..K) (of the weights kept)
    best_step: int = 0  # step of the weights kept
    total_steps: int = 0
    stop: str = ""  # "converged" (patience ran out), "budget" (max_steps) or "epochs" (fixed budget)
    seconds: float = 0.0
    samples_per_s: float = 0.0  # training pairs per second, all processes together (compiling included)
    compiled: bool = False  # whether the steps ran under torch.compile
    compile_seconds: float = 0.0  # time of the steps that compiled (left out of the ETA, included in `seconds`)
    seed: int | None = None  # the fit's seed (None in records written before it was kept)


def channel_stats(x: np.ndarray, indices: np.ndarray, transform=None, batch_size: int = 256) -> tuple[Tensor, Tensor]:
    """Per-channel mean and std over samples (and positions) of x[indices], streamed in float64."""
    total = total_sq = None
    count = 0
    for (batch,) in iter_batches(x, indices=indices, batch_size=batch_size):
        b = transform(batch) if transform else batch
        b = b.double().reshape(b.shape[0], b.shape[1], -1)
        s, sq = b.sum((0, 2)), b.pow(2).sum((0, 2))
        total = s if total is None else total + s
        total_sq = sq if total_sq is None else total_sq + sq
        count += b.shape[0] * b.shape[2]
    mean = total / count
    std = (total_sq / count - mean**2).clamp_min(0).sqrt().clamp_min(1e-6)
    return mean.float(), std.float()


class _Pairs:
    """Training pairs (x_A, x_B) drawn as batches: from device memory when they fit, else from the memory map."""

    def __init__(self, x_a: np.ndarray, x_b: np.ndarray, indices: np.ndarray, runtime: Runtime, preload_gib: float) -> None:
        self.indices, self.runtime = indices, runtime
        self.x_a, self.x_b = x_a, x_b
        self.on_device = len(indices) * (x_a[0].nbytes + x_b[0].nbytes) <= preload_gib * 2**30
        if self.on_device:
            self.rows = np.sort(indices)  # dataset index of each preloaded row
            self.a, self.b = runtime.to(*(torch.from_numpy(np.ascontiguousarray(x[self.rows])) for x in (x_a, x_b)))

    def batches(self, order: np.ndarray, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        """Batches of the pairs with dataset indices `order`, on the device."""
        if self.on_device:
            rows = torch.from_numpy(np.searchsorted(self.rows, order)).to(self.a.device)
            for start in range(0, len(rows), batch_size):
                idx = rows[start : start + batch_size]
                yield self.a[idx], self.b[idx]
            return
        for xa, xb in iter_batches(self.x_a, self.x_b, indices=order, batch_size=batch_size):
            if self.runtime.pin_memory:
                xa, xb = xa.pin_memory(), xb.pin_memory()
            yield tuple(self.runtime.to(xa, xb))


class _Plateau:
    """The default schedule: lr cut after `plateau` checks without improvement, stop after `patience`; keeps the best weights."""

    def __init__(self, config: FitConfig) -> None:
        self.config, self.lr = config, config.lr_start
        self.best_mse, self.best_state, self.best_step = math.inf, None, 0  # the lowest MSE seen: its weights are kept
        self.reference, self.since = math.inf, 0  # the last MSE that counted as an improvement, and checks since

    def check(self, mse: float, g: IsomorphismNet, step: int) -> bool:
        """Record one check of the watched MSE; True when fitting should stop."""
        c = self.config
        if mse < self.best_mse:
            self.best_mse, self.best_state, self.best_step = mse, copy.deepcopy(g.state_dict()), step
        if not math.isfinite(self.reference) or mse < self.reference - max(c.rel_tol * self.reference, c.abs_tol):
            self.reference, self.since = mse, 0
            return False
        self.since += 1
        if self.since % c.plateau == 0:
            self.lr = max(self.lr * c.lr_decay, c.lr_end)
        return self.since >= c.patience


def _local_order(order: np.ndarray, batch_size: int, rank: int, world: int) -> np.ndarray:
    """This rank's share of an epoch: its 1/world of every global batch of batch_size * world pairs.

    Every rank draws the same permutation, so N processes at batch B take the
    same gradient steps as one process at batch N * B (up to summation order).
    """
    if world == 1:
        return order
    size = batch_size * world
    chunks = [order[i : i + size] for i in range(0, len(order), size)]
    if len(chunks[-1]) < world:  # a last global batch too small to give every rank a pair
        chunks.pop()
    return np.concatenate([c[rank::world] for c in chunks])


class _Compiled:
    """A module under torch.compile that falls back to eager, with a warning, when compiling fails."""

    def __init__(self, module: nn.Module, device: torch.device) -> None:
        if device.type == "cpu":
            _hide_cuda_home_warning()
        self.eager, self.fn, self.compiled = module, torch.compile(module), True

    def __call__(self, *args: Tensor):
        if self.compiled:
            try:
                return self.fn(*args)
            except Exception as e:  # no C++ toolchain, an operator or backend torch.compile does not support
                warnings.warn(f"torch.compile failed ({type(e).__name__}: {str(e)[:160]}); fitting g eagerly", stacklevel=2)
                self.fn, self.compiled = self.eager, False
        return self.fn(*args)


class _NoCudaHome(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No CUDA runtime is found")


def _hide_cuda_home_warning() -> None:
    """Drop "No CUDA runtime is found, using CUDA_HOME=..." that torch's C++ extension module logs when inductor
    loads it on a machine with a CUDA toolkit but no GPU: irrelevant to a fit on the CPU."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    if not any(isinstance(f, _NoCudaHome) for f in logger.filters):
        logger.addFilter(_NoCudaHome())


class _Steps:
    """g's loss for each training step: eager, or under torch.compile as FitConfig.compile says.

    "auto" runs the first steps eagerly and times steps 2..PROBE_STEPS+1 (the
    first warms up; held-out checks are not timed): t_eager seconds per step,
    averaged over ranks so all decide alike. It then compiles when the time
    compiled steps would save over the steps left, `remaining x t_eager x
    COMPILE_SAVES`, exceeds the estimated compile time, `COMPILE_S[device] x
    graphs` (graphs: 2 when an epoch ends with a smaller batch, which
    torch.compile compiles again, else 1). The steps expected, `expected`,
    are the budget, or at most CONVERGED_STEPS when fitting stops at
    convergence; the constants are measured on the CPU (docs/benchmarks.md). Every
    step that compiles a graph prints "compiling g's step (about N s)" and is
    left out of the bar's elapsed time and ETA.
    """

    clock = staticmethod(time.perf_counter)  # what steps are timed with

    def __init__(self, model: nn.Module, config: FitConfig, runtime: Runtime, expected: int, ragged: bool, shown) -> None:
        self.model, self.runtime, self.expected, self.ragged, self.shown = model, runtime, expected, ragged, shown
        self.fn = _Compiled(model, runtime.device) if config.compile == "on" else model
        self.probing = config.compile == "auto"
        self.probe_s, self.probed = 0.0, 0  # eager seconds and steps timed so far
        self.sizes: set[int] = set()  # batch sizes compiled for
        self.compile_seconds = 0.0

    @property
    def compiled(self) -> bool:
        return getattr(self.fn, "compiled", False)

    def __call__(self, x_a: Tensor, x_b: Tensor) -> tuple[Tensor, Tensor]:
        return self.fn(x_a, x_b)

    @contextlib.contextmanager
    def step(self, step: int, batch: int) -> Iterator[None]:
        """Wraps one whole training step (forward, backward, optimiser): `step` of the budget, `batch` pairs."""
        if self.compiled and batch not in self.sizes:
            self.sizes.add(batch)
            estimate = COMPILE_S.get(self.runtime.device.type, COMPILE_S["cpu"])
            again = " again for an epoch's smaller last batch" if len(self.sizes) > 1 else ""
            note(f"compiling g's step{again} (about {estimate:.0f} s)")
            t0 = self.clock()
            with paused(self.shown):
                yield
            self.compile_seconds += self.clock() - t0
            return
        timed = self.probing and step >= 1
        if timed:
            self._sync()
            t0 = self.clock()
        yield
        if timed:
            self._sync()
            self.probe_s += self.clock() - t0
            self.probed += 1
            if self.probed == PROBE_STEPS or step + 1 >= self.expected:
                self.probing = False
                if self.pays(dist.mean(self.probe_s, self.probed), self.expected - step - 1):
                    self.fn = _Compiled(self.model, self.runtime.device)

    def pays(self, eager_step_s: float, remaining: int) -> bool:
        """Whether compiling is repaid over `remaining` steps of `eager_step_s` seconds (see the class docstring)."""
        graphs = 2 if self.ragged else 1
        return remaining * eager_step_s * COMPILE_SAVES > COMPILE_S.get(self.runtime.device.type, COMPILE_S["cpu"]) * graphs

    def _sync(self) -> None:
        if self.runtime.device.type == "cuda":
            torch.cuda.synchronize(self.runtime.device)


class _Loss(nn.Module):
    """g's loss as a forward pass, so DistributedDataParallel can wrap it."""

    def __init__(self, g: IsomorphismNet) -> None:
        super().__init__()
        self.g = g

    def forward(self, x_a: Tensor, x_b: Tensor) -> tuple[Tensor, Tensor]:
        return self.g.loss(x_a, x_b)


def fit_isomorphism(
    x_a: np.ndarray,
    x_b: np.ndarray,
    g_config: IsomorphismConfig | None = None,
    config: FitConfig | None = None,
    *,
    runtime: Runtime | None = None,
    desc: str = "fit g",
) -> tuple[IsomorphismNet, FitResult]:
    """Fit g: x_A -> x_B on paired features (N, ...) and return it, on the runtime's device, in eval mode."""
    config = config or FitConfig()
    runtime = runtime or Runtime.resolve()
    if len(x_a) != len(x_b):
        raise DataError(f"x_A has {len(x_a)} samples but x_B has {len(x_b)}; they must be paired")
    n = len(x_a)
    rng = np.random.default_rng(config.seed)
    order = rng.permutation(n)
    n_hold = int(round(n * config.holdout))
    hold_idx, train_idx = order[:n_hold], order[n_hold:]
    if len(train_idx) < 2:
        raise DataError(f"need at least 2 training pairs to fit g, got {len(train_idx)}")
    torch.manual_seed(config.seed)
    g = IsomorphismNet(x_a.shape[1:], x_b.shape[1:], g_config)
    g.set_standardization(*channel_stats(x_a, train_idx, g.resize), *channel_stats(x_b, train_idx))
    g.to(runtime.device)
    model = dist.wrap(_Loss(g), runtime)
    optimizer = torch.optim.Adam(g.parameters(), lr=config.lr_start)
    scaler = runtime.grad_scaler()
    pairs = _Pairs(x_a, x_b, train_idx, runtime, config.preload_gib)
    hold = _Pairs(x_a, x_b, hold_idx, runtime, config.preload_gib) if n_hold else None
    world, rank = dist.world_size(), dist.rank()

    if config.epochs is not None:
        steps_per_epoch = math.ceil(len(train_idx) / (config.batch_size * world))
        budget = config.epochs * steps_per_epoch
        eval_every = steps_per_epoch
        lrs = np.logspace(np.log10(config.lr_start), np.log10(config.lr_end), config.epochs)
    else:
        budget, eval_every, lrs = config.max_steps, config.eval_every, None

    result = FitResult(seed=config.seed)
    plateau = _Plateau(config) if lrs is None else None
    lr = config.lr_start
    step, mse_sum, mse_count, epoch = 0, torch.zeros((), dtype=torch.float64, device=runtime.device), 0, 0
    start = time.perf_counter()
    shorter = "--g-steps N" + (", --device cuda" if runtime.device.type == "cpu" else "")
    bound = f" ({budget} is the budget: fitting stops earlier once converged)" if lrs is None else ""
    shown = bar(total=budget, desc=desc, unit="step", advice=f"to shorten it: {shorter}{bound}")
    local = len(_local_order(train_idx, config.batch_size, rank, world))
    expected = budget if lrs is not None else min(budget, CONVERGED_STEPS)
    step_fn = _Steps(model, config, runtime, expected, ragged=local % config.batch_size != 0 and local > config.batch_size, shown=shown)
    g.train()
    while step < budget and result.stop == "":
        epoch_order = _local_order(rng.permutation(train_idx), config.batch_size, rank, world)
        if lrs is not None:
            lr = float(lrs[min(epoch, len(lrs) - 1)])
        epoch += 1
        for xa, xb in pairs.batches(epoch_order, config.batch_size):
            for group in optimizer.param_groups:
                group["lr"] = lr
            with step_fn.step(step, len(xa)):
                with runtime.autocast():
                    loss, mse = step_fn(xa, xb)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            if g.normalizer == "batch":  # each rank updated it from its own batch
                dist.average_(g.running_var)
            mse_sum += mse.detach().double() * len(xa)
            mse_count += len(xa)
            step += 1
            shown.update(1)
            if step % eval_every == 0 or step == budget:
                train_mse = dist.mean(mse_sum.item(), mse_count)
                mse_sum.zero_()
                mse_count = 0
                hold_mse = _holdout_mse(g, hold) if hold is not None else float("nan")
                if not math.isfinite(train_mse) or (hold is not None and not math.isfinite(hold_mse)):
                    raise DataError(
                        f"fitting g diverged at step {step} (train MSE {train_mse}, held-out {hold_mse}) with lr {lr:g}: "
                        "lower the learning rate (--g-lr) or check the features for inf/nan"
                    )
                g.train()
                result.steps.append(step)
                result.train_mse.append(train_mse)
                result.holdout_mse.append(hold_mse)
                result.lr.append(lr)
                result.p_history.append(g.p.tolist())
                shown.set_postfix(train=f"{train_mse:.4f}", holdout=f"{hold_mse:.4f}", lr=f"{lr:.1e}")
                if plateau is not None:
                    if plateau.check(hold_mse if hold is not None else train_mse, g, step):
                        result.stop = "converged"
                    lr = plateau.lr
            if step >= budget or result.stop:
                break
    shown.close()
    if plateau is None:
        result.stop, result.best_step = "epochs", step
    else:
        result.stop = result.stop or "budget"
        g.load_state_dict(plateau.best_state)
        result.best_step = plateau.best_step
    result.total_steps = step
    result.seconds = time.perf_counter() - start
    result.samples_per_s = step * config.batch_size * world / max(result.seconds, 1e-9)
    result.p = g.p.tolist()
    result.compiled = step_fn.compiled
    result.compile_seconds = step_fn.compile_seconds
    g.eval()
    return g, result


@torch.no_grad()
def _holdout_mse(g: IsomorphismNet, pairs: _Pairs) -> float:
    """Mean squared error of g(x_A) against x_B in B's standardised space (float64 sum).

    Under torchrun each rank scores its share of the pairs, and every rank gets the same mean.
    """
    g.eval()
    total = torch.zeros((), dtype=torch.float64, device=pairs.runtime.device)
    count = 0
    mine = dist.shard(len(pairs.indices))
    for xa, xb in pairs.batches(pairs.indices[mine.start : mine.stop], 256):
        err = g.forward_standardized(g.standardize_input(xa)) - g.standardize_target(xb)
        total += err.double().pow(2).sum()
        count += err.numel()
    return dist.mean(total.item(), count)
