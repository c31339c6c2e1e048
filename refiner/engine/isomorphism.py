"""The network g that reconstructs B's feature from A's, and its exact decomposition.

Implements Section 3 of "Knowledge Consistency between Neural Networks and
Beyond" (Liang et al., ICLR 2020): Eq. 1 (the recursive blocks), Eq. 2 (the
loss) and Eq. 3-4 (the split of g(x_A) into k-order isomorphic components).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from refiner.atomic import atomic_file
from refiner.errors import CheckpointError, ConfigError
from refiner.models.checkpoints import read_untrusted

__all__ = ["IsomorphismConfig", "IsomorphismNet", "Decomposition", "save_isomorphism", "load_isomorphism"]


class IsomorphismConfig(BaseModel):
    """Shape of g; see Eq. 1 and Eq. 2.

    Examples:
        >>> import refiner
        >>> refiner.IsomorphismConfig(orders=3, lam=0.05).kernel_size
        3
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    orders: int = Field(2, ge=0, le=8)  # K: the highest order of non-linearity
    kernel_size: int = Field(3, ge=1)  # W^(k) kernel for feature maps (odd); vectors use 1
    normalizer: Literal["auto", "sample", "batch"] = "auto"  # Sigma: per-sample spatial std, or running batch std
    lam: float = Field(0.1, ge=0.0)  # lambda of Eq. 2
    eps: float = Field(1e-5, gt=0.0)  # added to variances before the square root


@dataclass
class Decomposition:
    """g(x_A) split into orders (Eq. 3), in B's standardised space.

    components[k] passed k non-linearities; sum(components) == g(x_A) to float
    precision. delta = x_B - g(x_A) (Eq. 4) when x_B was given.
    """

    components: list[Tensor]
    delta: Tensor | None = None

    @property
    def output(self) -> Tensor:
        return torch.stack(self.components).sum(0)


class IsomorphismNet(nn.Module):
    """g: x_A -> x_B with K+1 bias-free blocks (Eq. 1).

    h^(K) = W^(K) x;  h^(k) = W^(k)[x + p^(k+1) ReLU(Sigma^(-1/2) h^(k+1))];  g(x) = h^(0).
    Inputs and targets are standardised per channel with training-set statistics
    held in buffers; x_A is resized to B's spatial size inside g, so an export of
    g is self-contained. Vectors are handled as 1x1 maps with 1x1 "convolutions".
    """

    def __init__(
        self,
        shape_a: tuple[int, ...],
        shape_b: tuple[int, ...],
        config: IsomorphismConfig | None = None,
    ) -> None:
        super().__init__()
        config = config or IsomorphismConfig()
        if len(shape_a) != len(shape_b) or len(shape_a) not in (1, 3):
            raise ConfigError(
                f"feature shapes {tuple(shape_a)} (A) and {tuple(shape_b)} (B) must both be "
                "vectors (C,) or both be maps (C, H, W)"
            )
        self.config = config
        self.is_map = len(shape_a) == 3
        normalizer = config.normalizer
        if normalizer == "auto":
            normalizer = "sample" if self.is_map and shape_b[1] * shape_b[2] > 1 else "batch"
        if normalizer == "sample" and not (self.is_map and shape_b[1] * shape_b[2] > 1):
            raise ConfigError(
                "normalizer 'sample' needs spatial feature maps (per-sample spatial std); "
                f"B's feature has shape {tuple(shape_b)}: use normalizer 'batch'"
            )
        kernel = config.kernel_size if self.is_map else 1
        if kernel % 2 == 0:
            raise ConfigError(f"kernel_size must be odd to keep HxW, got {kernel}")
        self.normalizer = normalizer
        c_a, c_b = shape_a[0], shape_b[0]
        self.shape_a, self.shape_b = tuple(shape_a), tuple(shape_b)
        self.out_hw = tuple(shape_b[1:]) if self.is_map else (1, 1)
        k = config.orders
        self.weights = nn.ModuleList(
            nn.Conv2d(c_a, c_b if i == 0 else c_a, kernel, padding=kernel // 2, bias=False)
            for i in range(k + 1)
        )
        # p^(k) = sigmoid(theta_k), k = 1..K, starting at 0.5.
        self.theta = nn.Parameter(torch.zeros(k))
        self.register_buffer("running_var", torch.ones(k, c_a))
        self.register_buffer("mean_a", torch.zeros(c_a))
        self.register_buffer("std_a", torch.ones(c_a))
        self.register_buffer("mean_b", torch.zeros(c_b))
        self.register_buffer("std_b", torch.ones(c_b))

    @property
    def orders(self) -> int:
        return len(self.weights) - 1

    @property
    def p(self) -> Tensor:
        """The scalars p^(1..K) of Eq. 1."""
        return torch.sigmoid(self.theta)

    def set_standardization(self, mean_a: Tensor, std_a: Tensor, mean_b: Tensor, std_b: Tensor) -> None:
        """Store per-channel training-set statistics of x_A (resized) and x_B."""
        for name, value in (("mean_a", mean_a), ("std_a", std_a), ("mean_b", mean_b), ("std_b", std_b)):
            getattr(self, name).copy_(value)

    def resize(self, x_a: Tensor) -> Tensor:
        """x_A as 4-D maps at B's spatial size (bilinear, a linear map)."""
        x = x_a.reshape(x_a.shape[0], -1, 1, 1) if not self.is_map else x_a
        if tuple(x.shape[-2:]) != self.out_hw:
            x = F.interpolate(x, size=self.out_hw, mode="bilinear", align_corners=False)
        return x

    def standardize_input(self, x_a: Tensor) -> Tensor:
        return (self.resize(x_a) - _per_channel(self.mean_a)) / _per_channel(self.std_a)

    def standardize_target(self, x_b: Tensor) -> Tensor:
        x = x_b.reshape(x_b.shape[0], -1, 1, 1) if not self.is_map else x_b
        return (x - _per_channel(self.mean_b)) / _per_channel(self.std_b)

    def unstandardize(self, y: Tensor) -> Tensor:
        """Map a standardised prediction back to B's feature space and shape."""
        y = y * _per_channel(self.std_b) + _per_channel(self.mean_b)
        return y if self.is_map else y.flatten(1)

    def forward(self, x_a: Tensor) -> Tensor:
        """g(x_A) in B's original feature space (what B's upper layers consume)."""
        return self.unstandardize(self.forward_standardized(self.standardize_input(x_a)))

    def forward_standardized(self, z: Tensor) -> Tensor:
        """Eq. 1 on a standardised, resized input z."""
        k_max = self.orders
        h = self.weights[k_max](z)
        for k in range(k_max - 1, -1, -1):
            h = self.weights[k](z + self.p[k] * F.relu(h / self._scale(h, k)))
        return h

    def _scale(self, h: Tensor, k: int) -> Tensor:
        """Sigma^(1/2) for the non-linearity that feeds block k (channels of h^(k+1))."""
        eps = self.config.eps
        if self.normalizer == "sample":
            return torch.sqrt(h.var(dim=(2, 3), keepdim=True, unbiased=False) + eps)
        if self.training:
            var = h.pow(2).mean(dim=(0, 2, 3))
            self.running_var[k].mul_(0.9).add_(0.1 * var.detach())
        else:
            var = self.running_var[k]
        return torch.sqrt(_per_channel(var) + eps)

    def penalty(self) -> Tensor:
        """lambda * sum_k (p^(k))^2 of Eq. 2."""
        return self.config.lam * self.p.pow(2).sum()

    def loss(self, x_a: Tensor, x_b: Tensor) -> tuple[Tensor, Tensor]:
        """Eq. 2 in standardised space; returns (total loss, reconstruction MSE)."""
        mse = F.mse_loss(self.forward_standardized(self.standardize_input(x_a)), self.standardize_target(x_b))
        return mse + self.penalty(), mse

    @torch.no_grad()
    def decompose(self, x_a: Tensor, x_b: Tensor | None = None) -> Decomposition:
        """Split g(x_A) into x^(0..K) in one pass, recording gates and normalisers (Eq. 3, 4).

        With the gates D = [h > 0] and scales s recorded, ReLU(h / s) = D * h / s is
        linear in h, so each order's share of h^(k+1) propagates separately.
        """
        z = self.standardize_input(x_a)
        n = z.shape[0]
        k_max = self.orders
        comps = [self.weights[k_max](z)]
        for k in range(k_max - 1, -1, -1):
            h = torch.stack(comps).sum(0)
            factor = self.p[k] * (h > 0).to(h.dtype) / self._scale(h, k)
            stacked = torch.cat([z] + [factor * c for c in comps])  # one conv call per block
            comps = list(self.weights[k](stacked).split(n))
        delta = None if x_b is None else self.standardize_target(x_b) - torch.stack(comps).sum(0)
        return Decomposition(components=comps, delta=delta)


def _per_channel(v: Tensor) -> Tensor:
    return v.reshape(1, -1, 1, 1)


G_FORMAT = "refiner-g/1"


def save_isomorphism(path: Path | str, g: IsomorphismNet, info: dict[str, Any]) -> Path:
    """Write a fitted g (config, feature shapes, weights, provenance) atomically."""
    payload = {
        "format": G_FORMAT,
        "config": g.config.model_dump(),
        "shape_a": list(g.shape_a),
        "shape_b": list(g.shape_b),
        "info": info,
        "state_dict": {k: v.detach().cpu() for k, v in g.state_dict().items()},
    }
    with atomic_file(path) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def load_isomorphism(path: Path | str) -> tuple[IsomorphismNet, dict[str, Any]]:
    """Read a g file written by `save_isomorphism` (weights_only, never arbitrary pickles)."""
    path = Path(path)
    obj = read_untrusted(path, trust=False) if path.is_file() else None
    if not isinstance(obj, dict) or obj.get("format") != G_FORMAT:
        raise CheckpointError(f"{str(path)!r} is not a g file written by `refiner fit` (format {G_FORMAT})")
    g = IsomorphismNet(tuple(obj["shape_a"]), tuple(obj["shape_b"]), IsomorphismConfig(**obj["config"]))
    g.load_state_dict(obj["state_dict"])
    return g.eval(), obj["info"]
