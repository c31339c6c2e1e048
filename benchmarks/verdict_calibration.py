"""How often does a build's verdict say "beyond noise"? The old seed-only t-test against the bootstrap, on simulated builds.

Each simulated build scores the refined model and K baselines on N test images
with S fine-tuning seeds. An image's outcome for a variant is a draw shared by
its seeds (which images a head gets right is mostly fixed by its features),
and each seed flips a few images (fine-tuning noise). Scenarios:

  same-images   both variants have the same per-image outcomes; seeds differ only
  exchangeable  the variants get different images right at the same population
                accuracy: any gap on one test set is test-set sampling, which a
                seed-only interval cannot see
  one-image     every seed of the refined model gains exactly k (1-3) images and loses none
  +2 points     a real gain of 2 points of population accuracy

For each method the table gives the share of builds whose primary comparison
is called "helps" or "hurts" at 0.05, and under a global null (every baseline
exchangeable) the share of builds that warn "worse than a baseline": before,
any of K uncorrected t-tests; now, Holm-adjusted bootstrap p-values.

    python benchmarks/verdict_calibration.py --builds 400
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import numpy as np
from scipy import stats

from refiner.refine.statistics import bootstrap, holm


def old_paired_test(refined: list[float], baseline: list[float]) -> tuple[float, float]:
    """The test refiner used before: a t-test over seed accuracies (floats), a sign test when the float std is exactly 0."""
    diffs = [r - b for r, b in zip(refined, baseline)]
    mean = statistics.fmean(diffs)
    if statistics.stdev(diffs) == 0:
        return mean, 1.0 if mean == 0 else min(1.0, 2 * 0.5 ** len(diffs))
    return mean, float(stats.ttest_rel(refined, baseline).pvalue)


def _runs(outcome: np.ndarray, seeds: int, flip: float, rng: np.random.Generator) -> np.ndarray:
    """(seeds, N) correctness: the variant's per-image outcome with a few images flipped per seed."""
    flips = rng.random((seeds, outcome.size)) < flip
    return np.where(flips, 1 - outcome, outcome)


def _outcomes(n: int, acc: float, agree: float, rng: np.random.Generator, shared: np.ndarray | None = None) -> np.ndarray:
    """Per-image outcomes at population accuracy `acc`; with `shared`, equal to it on a share `agree` of the images."""
    own = (rng.random(n) < acc).astype(np.int64)
    if shared is None:
        return own
    return np.where(rng.random(n) < agree, shared, own)


def simulate(scenario: str, n: int, seeds: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(refined, baseline) correctness, each (seeds, N)."""
    base = _outcomes(n, 0.55, 0.0, rng)
    flip = 0.04
    if scenario == "same-images":
        return _runs(base, seeds, flip, rng), _runs(base, seeds, flip, rng)
    if scenario == "exchangeable":
        return _runs(_outcomes(n, 0.55, 0.8, rng, base), seeds, flip, rng), _runs(base, seeds, flip, rng)
    if scenario == "one-image":
        b = _runs(base, seeds, flip, rng)
        r = b.copy()
        k = int(rng.integers(1, 4))
        for s in range(seeds):
            wrong = np.flatnonzero(r[s] == 0)
            r[s, rng.choice(wrong, k, replace=False)] = 1
        return r, b
    if scenario == "+2 points":
        better = base.copy()
        wrong = np.flatnonzero(base == 0)
        better[rng.choice(wrong, int(0.02 * n), replace=False)] = 1
        return _runs(_outcomes(n, 0.57, 0.8, rng, better), seeds, flip, rng), _runs(base, seeds, flip, rng)
    raise ValueError(scenario)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--builds", type=int, default=400, help="simulated builds per scenario (default: 400)")
    p.add_argument("--images", type=int, default=1200, help="test images per build (default: 1200, the docs' CIFAR table)")
    p.add_argument("--seeds", type=int, default=3, help="fine-tuning seeds (default: 3)")
    p.add_argument("--baselines", type=int, default=5, help="comparisons behind the warning (default: 5: x_A, x_B, control, 2 ablations)")
    p.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples per build (refiner uses 10,000; fewer here for time)")
    args = p.parse_args()
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    print(f"{args.builds} simulated builds per scenario, {args.images} test images, {args.seeds} seeds, {args.resamples} resamples\n")
    print("| scenario | old t-test: beyond noise | old: p < 1e-10 | bootstrap: beyond noise | smallest bootstrap p |")
    print("|---|---:|---:|---:|---:|")
    for scenario in ("same-images", "exchangeable", "one-image", "+2 points"):
        old, tiny, new, smallest = 0, 0, 0, 1.0
        for i in range(args.builds):
            r, b = simulate(scenario, args.images, args.seeds, rng)
            _, p_old = old_paired_test(list(r.mean(1)), list(b.mean(1)))
            old += p_old < 0.05
            tiny += p_old < 1e-10
            p_new = bootstrap({"d": (r - b)[None]}, resamples=args.resamples, seed=i)["d"].p
            new += p_new < 0.05
            smallest = min(smallest, p_new)
        print(f"| {scenario} | {old / args.builds:.1%} | {tiny / args.builds:.1%} | {new / args.builds:.1%} | {smallest:.2g} |")
    warn_old = warn_new = 0
    for i in range(args.builds):
        pairs = [simulate("exchangeable", args.images, args.seeds, rng) for _ in range(args.baselines)]
        olds = [old_paired_test(list(r.mean(1)), list(b.mean(1))) for r, b in pairs]
        warn_old += any(p < 0.05 and m < 0 for m, p in olds)
        boots = bootstrap({str(k): (r - b)[None] for k, (r, b) in enumerate(pairs)}, resamples=args.resamples, seed=i)
        adjusted = holm([boots[str(k)].p for k in range(args.baselines)])
        warn_new += any(p < 0.05 and (r - b).mean() < 0 for p, (r, b) in zip(adjusted, pairs))
    print(f"\nglobal null, {args.baselines} baselines: 'worse than a baseline' warnings: "
          f"old {warn_old / args.builds:.1%}, Holm-adjusted bootstrap {warn_new / args.builds:.1%}")  # fmt: skip
    print(f"({time.perf_counter() - start:.0f} s; binomial standard error at 5 %: {math.sqrt(0.05 * 0.95 / args.builds):.1%})")


if __name__ == "__main__":
    main()
