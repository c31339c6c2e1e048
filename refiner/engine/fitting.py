"""Fit g on cached features: Adam with a log-spaced learning-rate decay, a held-out split."""

from __future__ import annotations

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from refiner.engine.features import iter_batches
from refiner.engine.isomorphism import IsomorphismConfig, IsomorphismNet
from refiner.errors import DataError

__all__ = ["FitConfig", "FitResult", "fit_isomorphism", "channel_stats", "reconstruction_mse"]


class FitConfig(BaseModel):
    """Optimisation of g (reference: Adam, lr 1e-4 decayed log-linearly to 1e-6)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    epochs: int = Field(30, ge=1)
    batch_size: int = Field(64, ge=1)
    lr_start: float = Field(1e-3, gt=0)  # first epoch's learning rate
    lr_end: float = Field(1e-5, gt=0)  # last epoch's learning rate (log-spaced in between)
    holdout: float = Field(0.1, ge=0.0, lt=0.5)  # share of training pairs kept out to watch over-fitting
    seed: int = 0


class FitResult(BaseModel):
    """Per-epoch reconstruction error (MSE in B's standardised space) and final p^(k)."""

    train_mse: list[float]
    holdout_mse: list[float]
    p: list[float]


def channel_stats(x: np.ndarray, indices: np.ndarray, transform=None, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std over samples (and positions) of x[indices], streamed."""
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


def fit_isomorphism(
    x_a: np.ndarray,
    x_b: np.ndarray,
    g_config: IsomorphismConfig | None = None,
    config: FitConfig | None = None,
    *,
    desc: str = "fit g",
) -> tuple[IsomorphismNet, FitResult]:
    """Fit g: x_A -> x_B on paired features (N, ...) and return it in eval mode."""
    config = config or FitConfig()
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
    optimizer = torch.optim.Adam(g.parameters(), lr=config.lr_start)
    lrs = np.logspace(np.log10(config.lr_start), np.log10(config.lr_end), config.epochs)
    result = FitResult(train_mse=[], holdout_mse=[], p=[])
    bar = tqdm(lrs, desc=desc, unit="epoch")
    for lr in bar:
        for group in optimizer.param_groups:
            group["lr"] = float(lr)
        g.train()
        mse_sum = 0.0
        for xa, xb in iter_batches(x_a, x_b, indices=rng.permutation(train_idx), batch_size=config.batch_size):
            loss, mse = g.loss(xa, xb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            mse_sum += mse.item() * len(xa)
        result.train_mse.append(mse_sum / len(train_idx))
        result.holdout_mse.append(reconstruction_mse(g, x_a, x_b, hold_idx) if n_hold else float("nan"))
        bar.set_postfix(train=f"{result.train_mse[-1]:.4f}", holdout=f"{result.holdout_mse[-1]:.4f}")
    g.eval()
    result.p = g.p.tolist()
    return g, result


@torch.no_grad()
def reconstruction_mse(g: IsomorphismNet, x_a: np.ndarray, x_b: np.ndarray, indices: np.ndarray | None = None) -> float:
    """Mean squared error of g(x_A) against x_B in B's standardised space."""
    g.eval()
    total, count = 0.0, 0
    for xa, xb in iter_batches(x_a, x_b, indices=indices, batch_size=256):
        err = g.forward_standardized(g.standardize_input(xa)) - g.standardize_target(xb)
        total += err.double().pow(2).sum().item()
        count += err.numel()
    return total / max(count, 1)
