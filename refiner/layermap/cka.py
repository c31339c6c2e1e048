"""Streamed CKA estimators of the atlas: minibatch unbiased linear CKA, and refiner's (image, position) CKA.

Minibatch CKA (Nguyen, Raghu and Kornblith, 2021) averages the unbiased HSIC
estimator HSIC_1 (Song et al., 2012) over minibatches of images, each image's
feature flattened into one vector; only each batch's n x n Gram matrices and
running sums over batches are kept, so memory does not grow with the image count.
Position CKA treats each (image, position) as a sample and channels as features
(refiner's `LinearCKA`), for pairs of layers with the same positions.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import Tensor

from refiner.errors import ConfigError

__all__ = ["MIN_BATCH", "gram", "hsic1", "MinibatchCKA", "bootstrap_interval", "position_key", "PositionCKA"]

MIN_BATCH = 4  # HSIC_1 divides by n (n - 3): it needs at least 4 images per batch


def gram(x: Tensor) -> Tensor:
    """The linear Gram matrix (n, n) of a batch, each image's feature flattened, in float32.

    Features are centred by the batch mean first: HSIC_1 is exactly invariant to a shift
    of the features, and centring keeps the float32 products away from cancellation.
    """
    flat = x.reshape(x.shape[0], -1).float()
    flat = flat - flat.mean(0, keepdim=True)
    return flat @ flat.T


def hsic1(grams_a: Tensor, grams_b: Tensor) -> Tensor:
    """HSIC_1 of every pair: grams (La, n, n) and (Lb, n, n) -> (La, Lb), in float64.

    HSIC_1(K, L) = [tr(K~ L~) + 1'K~1 1'L~1 / ((n-1)(n-2)) - 2/(n-2) 1'K~L~1] / (n(n-3)),
    with K~ = K with its diagonal set to zero (Song et al., 2012, Eq. 5).
    """
    n = grams_a.shape[-1]
    if n < MIN_BATCH:
        raise ConfigError(f"a batch of {n} images is too small for the unbiased HSIC estimator: it needs at least {MIN_BATCH}")
    ka, kb = _off_diagonal(grams_a), _off_diagonal(grams_b)
    trace = ka.reshape(len(ka), -1) @ kb.reshape(len(kb), -1).T
    rows_a, rows_b = ka.sum(-1), kb.sum(-1)
    totals = torch.outer(rows_a.sum(-1), rows_b.sum(-1))
    return (trace + totals / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * (rows_a @ rows_b.T)) / (n * (n - 3))


def _off_diagonal(grams: Tensor) -> Tensor:
    g = _f64(grams).clone()
    g.diagonal(dim1=-2, dim2=-1).zero_()
    return g


def _f64(x: Tensor) -> Tensor:
    """x in float64 on its device (on the CPU for Apple MPS, which has no float64)."""
    return (x.cpu() if x.device.type == "mps" else x).double()


class MinibatchCKA:
    """Running sums of HSIC_1 over batches for A's layers x B's layers, and for each layer with itself."""

    def __init__(self) -> None:
        self.sums: dict[str, Tensor] = {}  # "ab" (La, Lb), "aa" (La,), "bb" (Lb,), "count" (batches, images)
        self.per_batch: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # each batch's (ab, aa, bb), for the bootstrap

    def add(self, grams_a: Tensor, grams_b: Tensor) -> None:
        """One batch: the stacked Gram matrices (La, n, n) of A's layers and (Lb, n, n) of B's, of the same images."""
        parts = {
            "ab": hsic1(grams_a, grams_b),
            "aa": torch.stack([hsic1(g[None], g[None])[0, 0] for g in grams_a]),
            "bb": torch.stack([hsic1(g[None], g[None])[0, 0] for g in grams_b]),
        }
        self.per_batch.append(tuple(parts[k].double().cpu().numpy() for k in ("ab", "aa", "bb")))
        parts["count"] = torch.tensor([1.0, grams_a.shape[-1]], dtype=torch.float64, device=parts["ab"].device)
        for key, value in parts.items():
            self.sums[key] = self.sums[key] + value if key in self.sums else value

    @property
    def batches(self) -> int:
        return int(self.sums["count"][0]) if self.sums else 0

    @property
    def images(self) -> int:
        return int(self.sums["count"][1]) if self.sums else 0

    def state(self) -> list[Tensor]:
        """The tensors to sum over processes (torchrun), the batch and image counts included."""
        return [self.sums[k] for k in ("ab", "aa", "bb", "count")]

    def value(self) -> Tensor:
        """CKA (La, Lb) = mean HSIC_1(K, L) / sqrt(mean HSIC_1(K, K) mean HSIC_1(L, L)); NaN where a layer is constant."""
        if not self.batches:
            raise ConfigError("minibatch CKA of no batches: there were no images")
        s = self.sums
        denom = torch.sqrt(torch.outer(s["aa"].clamp_min(0), s["bb"].clamp_min(0)))
        return torch.where(denom > 0, s["ab"] / denom, torch.full_like(denom, float("nan"))).cpu()


def bootstrap_interval(
    per_batch: list[tuple[np.ndarray, np.ndarray, np.ndarray]], resamples: int = 1000, level: float = 0.95, seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Percentile interval of each cell of the minibatch CKA, resampling the batches with replacement.

    The batches are the estimator's units (its HSIC terms are sums over batches), so this is a cluster
    bootstrap over the images, batch by batch: it covers which images were measured, not the nets' seeds
    nor the batching itself. Pointwise: each cell's own interval, not simultaneous over the grid.
    """
    ab, aa, bb = (np.stack([b[k] for b in per_batch]) for k in range(3))  # (batches, La, Lb), (batches, La), (batches, Lb)
    weights = np.random.default_rng(seed).multinomial(len(per_batch), np.full(len(per_batch), 1 / len(per_batch)), size=resamples)
    s_ab = np.einsum("rn,nij->rij", weights, ab)
    s_aa, s_bb = weights @ aa, weights @ bb
    denom = np.sqrt(np.clip(s_aa, 0, None)[:, :, None] * np.clip(s_bb, 0, None)[:, None, :])
    with np.errstate(invalid="ignore", divide="ignore"):
        values = np.where(denom > 0, s_ab / denom, np.nan)
    tail = (1 - level) / 2 * 100
    with warnings.catch_warnings():  # a constant layer's cells are NaN in every resample
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanpercentile(values, tail, axis=0), np.nanpercentile(values, 100 - tail, axis=0)


def position_key(x: Tensor) -> tuple | None:
    """What a position is for a batch of features: (H, W) of a map, ("tokens", L) of (N, L, C), () of a vector; None: other."""
    if x.dim() == 4:
        return tuple(x.shape[2:])
    if x.dim() == 3:
        return ("tokens", x.shape[1])
    if x.dim() == 2:
        return ()
    return None


def _position_rows(x: Tensor) -> Tensor:
    """Samples (image, position) x channels, in float64."""
    if x.dim() == 4:
        x = x.permute(0, 2, 3, 1)
    return _f64(x.reshape(-1, x.shape[-1]))


class PositionCKA:
    """refiner's linear CKA over (image, position) samples for the pairs of layers with the same positions.

    Per layer only its channel sums and C x C second moments are kept (computed once per
    layer, not per pair), per pair its Ca x Cb cross moments, all in float64.
    """

    def __init__(self, pairs: list[tuple[int, int]]) -> None:
        self.pairs = pairs
        self.positions: dict[int, int] = {}  # A's layer -> positions per image
        self.a: dict[int, list[Tensor]] = {}
        self.b: dict[int, list[Tensor]] = {}
        self.ab: dict[tuple[int, int], Tensor] = {}

    def add(self, feats_a: list[Tensor], feats_b: list[Tensor]) -> None:
        """One batch: A's and B's features (in layer order) of the same images."""
        rows_a = {i: _position_rows(feats_a[i]) for i in {i for i, _ in self.pairs}}
        rows_b = {j: _position_rows(feats_b[j]) for j in {j for _, j in self.pairs}}
        for side, rows in ((self.a, rows_a), (self.b, rows_b)):
            for i, r in rows.items():
                parts = [r.sum(0), r.T @ r]
                side[i] = [s + p for s, p in zip(side[i], parts)] if i in side else parts
        for i, j in self.pairs:
            cross = rows_a[i].T @ rows_b[j]
            self.ab[i, j] = self.ab[i, j] + cross if (i, j) in self.ab else cross
        for i, r in rows_a.items():
            self.positions[i] = r.shape[0] // feats_a[i].shape[0]

    def state(self) -> list[Tensor]:
        """The tensors to sum over processes (torchrun)."""
        tensors = [t for side in (self.a, self.b) for i in sorted(side) for t in side[i]]
        return tensors + [self.ab[p] for p in self.pairs]

    def value(self, images: int) -> dict[tuple[int, int], float]:
        """CKA of each pair, from the sums over `images` images (all processes)."""
        out = {}
        for i, j in self.pairs:
            rows = images * self.positions[i]
            (sa, qa), (sb, qb) = self.a[i], self.b[j]
            ma, mb = sa / rows, sb / rows
            cov_ab = self.ab[i, j] - rows * torch.outer(ma, mb)
            cov_aa = qa - rows * torch.outer(ma, ma)
            cov_bb = qb - rows * torch.outer(mb, mb)
            denom = float(torch.linalg.norm(cov_aa) * torch.linalg.norm(cov_bb))
            out[i, j] = float(torch.linalg.norm(cov_ab) ** 2) / denom if denom > 0 else float("nan")
        return out
