"""Streamed statistics of the decomposition (paper Section 4.2) and linear CKA.

Everything accumulates batch by batch in float64, so a dataset's features are
never held in memory at once.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from pydantic import BaseModel
from torch import Tensor

from refiner.engine.isomorphism import IsomorphismNet

__all__ = ["RunningVariance", "LinearCKA", "VarianceTable", "measure_isomorphism"]


class RunningVariance:
    """Variance over all units and images of a stream of tensors."""

    def __init__(self) -> None:
        self.count = 0
        self.total = 0.0
        self.total_sq = 0.0

    def add(self, x: Tensor) -> None:
        x = x.detach().double()
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


def _rows(x: Tensor) -> Tensor:
    x = x.detach().double()
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


@torch.no_grad()
def measure_isomorphism(g: IsomorphismNet, pairs: Iterable[tuple[Tensor, Tensor]]) -> VarianceTable:
    """Stream (x_A, x_B) batches through g's decomposition and collect the Var table."""
    g.eval()
    orders = [RunningVariance() for _ in range(g.orders + 1)]
    delta, target, output, cka = RunningVariance(), RunningVariance(), RunningVariance(), LinearCKA()
    images = 0
    for x_a, x_b in pairs:
        dec = g.decompose(x_a, x_b)
        for acc, comp in zip(orders, dec.components):
            acc.add(comp)
        delta.add(dec.delta)
        target.add(g.standardize_target(x_b))
        output.add(dec.output)
        cka.add(g.resize(x_a), x_b if g.is_map else x_b.flatten(1))
        images += x_a.shape[0]
    return VarianceTable(
        var_orders=[acc.value for acc in orders],
        var_delta=delta.value,
        var_target=target.value,
        var_output=output.value,
        instability=delta.value / target.value if target.value > 0 else float("nan"),
        cka=cka.value,
        images=images,
    )
