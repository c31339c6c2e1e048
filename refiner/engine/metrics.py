"""Streamed statistics of the decomposition (paper Section 4.2) and linear CKA.

Everything accumulates batch by batch in float64, so a dataset's features are
never held in memory at once.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from pydantic import BaseModel
from torch import Tensor

from refiner.engine.isomorphism import Decomposition, IsomorphismNet

__all__ = ["RunningVariance", "LinearCKA", "VarianceTable", "VarianceAccumulator", "measure_isomorphism"]


class RunningVariance:
    """Variance over all units and images of a stream of tensors."""

    def __init__(self) -> None:
        self.count = 0
        self.total = 0.0
        self.total_sq = 0.0

    def add(self, x: Tensor) -> None:
        x = _f64(x)
        self.count += x.numel()
        self.total += x.sum().item()
        self.total_sq += x.pow(2).sum().item()

    @property
    def value(self) -> float:
        if self.count == 0:
            return float("nan")
        mean = self.total / self.count
        return max(self.total_sq / self.count - mean * mean, 0.0)


class LinearCKA:
    """Linear CKA (Kornblith et al., 2019) between two feature maps of equal H x W.

    Samples are (image, position) pairs and features are channels, so only
    C x C cross-products are kept; for vectors this is the usual linear CKA.
    """

    def __init__(self) -> None:
        self.n = 0
        self._sums: dict[str, Tensor] = {}

    def add(self, x_a: Tensor, x_b: Tensor) -> None:
        a, b = _rows(x_a), _rows(x_b)
        if a.shape[0] != b.shape[0]:
            raise ValueError(f"CKA needs paired samples, got {a.shape[0]} and {b.shape[0]} rows")
        parts = {"a": a.sum(0), "b": b.sum(0), "aa": a.T @ a, "bb": b.T @ b, "ab": a.T @ b}
        for key, value in parts.items():
            self._sums[key] = self._sums[key] + value if key in self._sums else value
        self.n += a.shape[0]

    @property
    def value(self) -> float:
        if self.n == 0:
            return float("nan")
        s, n = self._sums, self.n
        mu_a, mu_b = s["a"] / n, s["b"] / n
        cov_ab = s["ab"] - n * torch.outer(mu_a, mu_b)
        cov_aa = s["aa"] - n * torch.outer(mu_a, mu_a)
        cov_bb = s["bb"] - n * torch.outer(mu_b, mu_b)
        denom = torch.linalg.norm(cov_aa) * torch.linalg.norm(cov_bb)
        return float(torch.linalg.norm(cov_ab) ** 2 / denom) if denom > 0 else float("nan")


def _f64(x: Tensor) -> Tensor:
    """x in float64, on its own device (on the CPU for Apple MPS, which has no float64)."""
    x = x.detach()
    return (x.cpu() if x.device.type == "mps" else x).double()


def _rows(x: Tensor) -> Tensor:
    x = _f64(x)
    if x.dim() == 2:
        return x
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


class VarianceTable(BaseModel):
    """Var(x^(k)), Var(x^Delta), Var(x_B) and instability, in B's standardised space."""

    var_orders: list[float]  # Var(x^(k)), k = 0..K
    var_delta: float  # Var(x^Delta): what A cannot explain
    var_target: float  # Var(x_B)
    var_output: float  # Var(g(x_A))
    instability: float  # Var(x^Delta) / Var(x_B)
    cka: float  # linear CKA between x_A (resized to B's H x W) and x_B
    images: int  # number of images measured


class VarianceAccumulator:
    """The Var table of g, accumulated over batches whose decomposition the caller already has."""

    def __init__(self, g: IsomorphismNet) -> None:
        self.g = g
        self.orders = [RunningVariance() for _ in range(g.orders + 1)]
        self.delta, self.target, self.output, self.cka = RunningVariance(), RunningVariance(), RunningVariance(), LinearCKA()
        self.images = 0

    def add(self, x_a: Tensor, x_b: Tensor, dec: Decomposition) -> None:
        """One batch: its features and `g.decompose(x_a, x_b)`."""
        for acc, comp in zip(self.orders, dec.components):
            acc.add(comp)
        self.delta.add(dec.delta)
        self.target.add(self.g.standardize_target(x_b))
        self.output.add(dec.output)
        self.cka.add(self.g.resize(x_a), x_b if self.g.is_map else x_b.flatten(1))
        self.images += x_a.shape[0]

    def table(self) -> VarianceTable:
        delta, target = self.delta.value, self.target.value
        return VarianceTable(
            var_orders=[acc.value for acc in self.orders],
            var_delta=delta,
            var_target=target,
            var_output=self.output.value,
            instability=delta / target if target > 0 else float("nan"),
            cka=self.cka.value,
            images=self.images,
        )


@torch.no_grad()
def measure_isomorphism(g: IsomorphismNet, pairs: Iterable[tuple[Tensor, Tensor]]) -> VarianceTable:
    """Stream (x_A, x_B) batches through g's decomposition and collect the Var table."""
    g.eval()
    acc = VarianceAccumulator(g)
    device = next(g.parameters()).device
    for x_a, x_b in pairs:
        x_a, x_b = x_a.to(device), x_b.to(device)
        acc.add(x_a, x_b, g.decompose(x_a, x_b))
    return acc.table()
