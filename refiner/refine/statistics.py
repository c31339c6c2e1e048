"""Paired significance of accuracy differences, counted in images: a hierarchical bootstrap, McNemar, t over seeds, Holm.

Every input is a per-image correctness array of shape (g fits, seeds, images),
so differences are integers and no rounding can decide significance. The
bootstrap resamples g fits, then seeds within each, then test images (one
index draw shared by every seed and both variants), as in Efron and Tibshirani
(1993) and the paired bootstrap of Koehn (2004) / Dror et al. (2018).
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel

__all__ = ["LEVELS", "BootstrapResult", "McNemarResult", "SeedTTest", "bootstrap", "mcnemar", "seed_t_test", "holm"]

LEVELS = ("g", "seed", "image")  # what the bootstrap can resample, outermost first
_CHUNK = 500  # resamples drawn at once (bounds memory at chunk x images)


class BootstrapResult(BaseModel):
    """The bootstrap distribution of refined − baseline accuracy, summarised."""

    ci95: tuple[float, float]  # 2.5 and 97.5 percentiles of the difference (accuracy, not points)
    p: float  # two-sided: twice the smaller tail mass at 0, with the +1 correction, at most 1
    std: float  # standard deviation of the resampled differences
    resamples: int
    levels: list[str]  # resampled levels among LEVELS
    widened: bool = False  # the variants agree on every image: ci95 is the exact bound on a disagreement rate instead


class McNemarResult(BaseModel):
    """Exact McNemar test on one run (g fit, seed): images only the refined model gets right vs only the baseline."""

    g_fit: int
    seed: int
    gained: int  # refined right, baseline wrong
    lost: int  # refined wrong, baseline right
    p: float  # two-sided exact binomial test of gained vs lost; 1 when no image differs


class SeedTTest(BaseModel):
    """Paired t-test over runs of the per-run accuracy difference (seed noise only)."""

    runs: int
    ci95: tuple[float, float] | None  # None: fewer than 2 runs, or every run gives the same difference
    p: float | None
    note: str | None = None  # why ci95/p are missing


@dataclass(frozen=True)
class _Draws:
    """Resampling weights shared by every comparison: counts per (g fit, seed) and per image, one row per resample."""

    runs: np.ndarray  # (resamples, G, S) int: how often each (g fit, seed) was drawn
    images: np.ndarray  # (resamples, N) int: how often each image was drawn


def _draws(shape: tuple[int, int, int], resamples: int, levels: Sequence[str], rng: np.random.Generator) -> list[_Draws]:
    """Hierarchical draws in chunks: g fits with replacement, seeds within each drawn fit, then images; fixed levels weigh 1."""
    G, S, N = shape
    out = []
    for start in range(0, resamples, _CHUNK):
        b = min(_CHUNK, resamples - start)
        g = rng.integers(G, size=(b, G)) if "g" in levels else np.broadcast_to(np.arange(G), (b, G))
        s = rng.integers(S, size=(b, G, S)) if "seed" in levels else np.broadcast_to(np.arange(S), (b, G, S))
        runs = np.zeros((b, G, S), dtype=np.int64)
        np.add.at(runs, (np.arange(b)[:, None, None], np.broadcast_to(g[:, :, None], (b, G, S)), s), 1)
        if "image" in levels:  # N draws with replacement per resample, counted per image (a multinomial, 5x faster)
            flat = rng.integers(N, size=(b, N)) + (np.arange(b) * N)[:, None]
            images = np.bincount(flat.ravel(), minlength=b * N).reshape(b, N)
        else:
            images = np.ones((b, N), dtype=np.int64)
        out.append(_Draws(runs, images))
    return out


def bootstrap(
    diffs: Mapping[str, np.ndarray], resamples: int = 10_000, seed: int = 0, levels: Sequence[str] = LEVELS
) -> dict[str, BootstrapResult]:
    """Paired bootstrap of each comparison's accuracy difference, with the same draws for all of them.

    `diffs`: name -> int array (G, S, N) of refined − baseline correctness per
    image (−1, 0, 1). A resample's difference is an integer over G*S*N, so the
    tails are counted exactly.
    """
    shapes = {d.shape for d in diffs.values()}
    if len(shapes) != 1 or len(next(iter(shapes))) != 3:
        raise ValueError(f"every comparison needs one (g fits, seeds, images) array of the same shape, got {sorted(shapes)}")
    shape = next(iter(shapes))
    G, S, N = shape
    draws = _draws(shape, resamples, levels, np.random.default_rng(seed))
    out = {}
    for name, d in diffs.items():
        d = np.asarray(d, dtype=np.int64)
        nums = np.concatenate([np.einsum("bgs,bgs->b", w.runs, np.einsum("gsn,bn->bgs", d, w.images)) for w in draws])
        out[name] = _summarise(nums, G * S * N, N, resamples, levels)
    return out


def _summarise(nums: np.ndarray, denominator: int, images: int, resamples: int, levels: Sequence[str]) -> BootstrapResult:
    """Percentile interval and two-sided p of resampled numerators over a common denominator."""
    lo, hi = np.percentile(nums, [2.5, 97.5]) / denominator
    tail = min(int((nums <= 0).sum()), int((nums >= 0).sum()))
    p = min(1.0, 2 * (tail + 1) / (resamples + 1))
    widened = bool(lo == hi)
    if widened:  # no spread (no image differs): the exact 95% bound on a disagreement rate with 0 of `images` seen
        bound = 1.0 - 0.025 ** (1.0 / images)
        lo, hi = lo - bound, hi + bound
    return BootstrapResult(
        ci95=(float(lo), float(hi)), p=p, std=float(nums.std() / denominator), resamples=resamples, levels=list(levels), widened=widened
    )


def mcnemar(diff: np.ndarray) -> list[McNemarResult]:
    """Exact McNemar test per run of a (G, S, N) refined − baseline correctness array."""
    from scipy.stats import binomtest

    out = []
    for g in range(diff.shape[0]):
        for s in range(diff.shape[1]):
            gained, lost = int((diff[g, s] > 0).sum()), int((diff[g, s] < 0).sum())
            p = binomtest(gained, gained + lost, 0.5).pvalue if gained + lost else 1.0
            out.append(McNemarResult(g_fit=g, seed=s, gained=gained, lost=lost, p=float(p)))
    return out


def seed_t_test(per_run: Sequence[int], images: int) -> SeedTTest:
    """t-test over runs of integer differences in correct images; undefined (None, with a note) rather than zero-width."""
    from scipy import stats

    n = len(per_run)
    if n < 2:
        return SeedTTest(runs=n, ci95=None, p=None, note="one run: no spread over seeds")
    sd = statistics.stdev(per_run)  # exact on integers
    if sd == 0:
        return SeedTTest(runs=n, ci95=None, p=None, note="every run gives the same difference: the t-test is undefined")
    mean = statistics.fmean(per_run)
    half = float(stats.t.ppf(0.975, n - 1)) * sd / n**0.5
    p = float(2 * stats.t.sf(abs(mean) / (sd / n**0.5), n - 1))
    return SeedTTest(runs=n, ci95=((mean - half) / images, (mean + half) / images), p=p)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment (family-wise error), in the input order."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted
