"""Results of a build's fine-tuning runs per variant, and paired comparisons over seeds: is a gain more than seed noise?"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel

from refiner.engine.finetune import HeadResult

__all__ = ["CONTROL", "REFINED", "VariantResult", "PairedTest", "paired_test", "paired_tests", "headline", "verdict_line", "worse_than_baselines"]

REFINED = "g(x_A)"  # feature source of the refined model
CONTROL = "x_B - shuffled x^Δ"  # feature source of the Delta-shuffle control

Verdict = Literal["helps", "hurts", "is within noise", "cannot be judged"]


class VariantResult(BaseModel):
    """One feature source fine-tuned once per seed; every list holds one figure per seed (seed order)."""

    name: str
    features: str  # what the upper layers were fed
    head_from: str  # whose upper layers were fine-tuned
    best_epoch: list[int]  # chosen on validation accuracy
    val_acc: list[float]
    test_acc: list[float]  # argmax over every output, at the validation-chosen epoch
    test_acc_target: list[float]  # argmax over the target classes' outputs only
    test_ce: list[float]
    test_ce_target: list[float]
    last_acc: list[float]  # test accuracy after the last epoch
    best_test_acc: list[float] | None  # best test accuracy over epochs: the paper's figure, optimistic

    @classmethod
    def from_runs(cls, name: str, features: str, head_from: str, runs: Sequence[HeadResult]) -> VariantResult:
        best = [r.best_test_acc for r in runs]
        return cls(
            name=name, features=features, head_from=head_from, best_epoch=[r.best_epoch for r in runs],
            val_acc=[r.val.acc for r in runs], test_acc=[r.test.acc for r in runs],
            test_acc_target=[r.test.acc_target for r in runs], test_ce=[r.test.ce for r in runs],
            test_ce_target=[r.test.ce_target for r in runs], last_acc=[r.last.acc for r in runs],
            best_test_acc=None if None in best else best,
        )  # fmt: skip

    def figure(self, metric: str) -> list[float]:
        return {"acc": self.test_acc, "acc_target": self.test_acc_target, "ce": self.test_ce, "ce_target": self.test_ce_target}[metric]


class PairedTest(BaseModel):
    """refined - baseline per seed (same seed: same initialisation and data order), with a paired t-test."""

    baseline: str  # the baseline variant's feature source, e.g. "x_B"
    metric: str  # e.g. "acc_target"
    diffs: list[float]  # refined - baseline, one per seed
    mean: float
    ci95: tuple[float, float] | None  # t interval of the mean difference; None with one seed
    p_value: float | None  # two-sided paired t-test; None with one seed
    verdict: Verdict


def paired_test(refined: Sequence[float], baseline: Sequence[float], baseline_name: str, metric: str, alpha: float = 0.05) -> PairedTest:
    """Mean difference, its 95% t interval and the paired t-test's p-value; the verdict at level `alpha`.

    When every seed gives the same difference (common with discrete accuracies and
    few seeds) the p-value is the exact two-sided sign test's, 2 * 0.5^n.
    A metric where lower is better (cross-entropy) has its verdict read in reverse.
    """
    from scipy import stats

    if len(refined) != len(baseline):
        raise ValueError(f"paired test needs one figure per seed on both sides, got {len(refined)} and {len(baseline)}")
    diffs = [r - b for r, b in zip(refined, baseline)]
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return PairedTest(baseline=baseline_name, metric=metric, diffs=diffs, mean=mean, ci95=None, p_value=None, verdict="cannot be judged")
    sd = statistics.stdev(diffs)
    if sd == 0:  # the same difference on every seed: the t-test is undefined, an exact sign test is not
        p = 1.0 if mean == 0 else min(1.0, 2 * 0.5 ** len(diffs))
        ci = (mean, mean)
    else:
        half = stats.t.ppf(0.975, len(diffs) - 1) * sd / math.sqrt(len(diffs))
        ci = (mean - half, mean + half)
        p = float(stats.ttest_rel(refined, baseline).pvalue)
    better = -mean if metric.startswith("ce") else mean
    verdict: Verdict = "is within noise" if p >= alpha else ("helps" if better > 0 else "hurts")
    return PairedTest(baseline=baseline_name, metric=metric, diffs=diffs, mean=mean, ci95=ci, p_value=p, verdict=verdict)


def paired_tests(results: Sequence[VariantResult], metrics: Sequence[str]) -> list[PairedTest]:
    """The refined model against every other variant, for each metric."""
    refined = next(r for r in results if r.features == REFINED)
    return [
        paired_test(refined.figure(m), r.figure(m), r.features, m)
        for r in results
        if r is not refined
        for m in metrics
    ]


def headline(results: Sequence[VariantResult], tests: Sequence[PairedTest], seeds: int) -> str:
    """The verdict on B's own features (what Δ removal changes), then the gap to the best baseline; target-restricted test accuracy."""
    main = next(t for t in tests if t.baseline == "x_B" and t.metric == "acc_target")
    baselines = [r for r in results if r.features != REFINED]
    best = max(baselines, key=lambda r: statistics.fmean(r.test_acc_target))
    gap = next(t for t in tests if t.baseline == best.features and t.metric == "acc_target")
    noise = {"helps": "beyond seed noise", "hurts": "beyond seed noise", "is within noise": "within seed noise", "cannot be judged": "one seed: no noise estimate"}
    first = verdict_line(main, "B's features", seeds)
    return (
        f"{first}. Best baseline: {best.features} at "
        f"{100 * statistics.fmean(best.test_acc_target):.2f} %; refined - best = {100 * gap.mean:+.2f} points ({noise[gap.verdict]})"
    )


def worse_than_baselines(tests: Sequence[PairedTest]) -> list[PairedTest]:
    """Baselines the refined model is worse than beyond seed noise (target-restricted test accuracy)."""
    return [t for t in tests if t.metric == "acc_target" and t.verdict == "hurts"]


def verdict_line(test: PairedTest, what: str, seeds: int) -> str:
    """One sentence: 'Δ removal helps here: ...' with the figures behind it (accuracy in points)."""
    scale, unit = (1.0, "") if test.metric.startswith("ce") else (100.0, " points")
    if test.ci95 is None:
        return f"Δ removal cannot be judged here: one seed gives no spread (refined - {what}: {scale * test.mean:+.2f}{unit})"
    lo, hi = (scale * v for v in test.ci95)
    return (
        f"Δ removal {test.verdict} here: refined - {what} = {scale * test.mean:+.2f}{unit} "
        f"(95% CI {lo:+.2f} to {hi:+.2f}, p = {test.p_value:.3g}, {seeds} seeds, {test.metric})"
    )
