"""Results of a build's fine-tuning runs per variant (counted in images), and the paired tests behind its verdict.

One comparison is declared primary before any data are seen: the refined model
against B's own features on target-class test accuracy. It alone decides the
verdict line; every other comparison is secondary, with a Holm-adjusted p.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
from pydantic import BaseModel, computed_field

from refiner.refine.statistics import LEVELS, BootstrapResult, McNemarResult, SeedTTest, bootstrap, holm, mcnemar, seed_t_test
from refiner.engine.finetune import HeadResult

__all__ = [
    "CONTROL", "REFINED", "PRIMARY", "VariantResult", "PairedTest", "NoiseSource", "paired_tests", "noise_budget",
    "headline", "verdict_line", "worse_than_baselines",
]  # fmt: skip

REFINED = "g(x_A)"  # feature source of the refined model
CONTROL = "x_B - shuffled x^Δ"  # feature source of the Delta-shuffle control
PRIMARY = ("x_B", "acc_target")  # the pre-declared comparison that decides the verdict: refined vs x_B, target-class accuracy
PREDICTION_KEY = {"acc_target": "test", "acc": "test:all"}  # where each tested metric's predictions sit in predictions.npz

Verdict = Literal["helps", "hurts", "is within noise"]


def _shares(counts: list[int], images: int) -> list[float]:
    """Accuracies from counts of correctly classified images."""
    return [c / images for c in counts]


class VariantResult(BaseModel):
    """One feature source fine-tuned once per run (g fit x seed); every list holds one figure per run, in run order."""

    name: str
    features: str  # what the upper layers were fed
    head_from: str  # whose upper layers were fine-tuned
    g_fit: list[int]  # which fit of g each run's features came from (0 for features that do not depend on g)
    seed: list[int]  # the fine-tuning seed of each run
    val_images: int
    test_images: int
    best_epoch: list[int]  # chosen on validation accuracy
    val_correct: list[int]  # validation images right, argmax over every output (what chooses the epoch)
    val_correct_target: list[int]  # argmax over the target classes' outputs only
    test_correct: list[int]  # argmax over every output, at the validation-chosen epoch
    test_correct_target: list[int]  # argmax over the target classes' outputs only
    last_correct: list[int]  # every output, after the last epoch
    best_test_correct: list[int] | None  # best over epochs, chosen by test data (the paper's figure): optimistic
    test_ce: list[float]
    test_ce_target: list[float]
    diverged: list[bool]  # the run's loss or validation CE stopped being finite

    @classmethod
    def from_runs(cls, name: str, features: str, head_from: str, runs: Sequence[tuple[int, int, HeadResult]]) -> VariantResult:
        """`runs`: (g fit, seed, result) per run."""
        res = [r for _, _, r in runs]
        best = [r.best_test.correct if r.best_test else None for r in res]
        return cls(
            name=name, features=features, head_from=head_from, g_fit=[g for g, _, _ in runs], seed=[s for _, s, _ in runs],
            val_images=res[0].val.images, test_images=res[0].test.images, best_epoch=[r.best_epoch for r in res],
            val_correct=[r.val.correct for r in res], val_correct_target=[r.val.correct_target for r in res],
            test_correct=[r.test.correct for r in res], test_correct_target=[r.test.correct_target for r in res],
            last_correct=[r.last.correct for r in res], best_test_correct=None if None in best else best,
            test_ce=[r.test.ce for r in res], test_ce_target=[r.test.ce_target for r in res], diverged=[r.diverged for r in res],
        )  # fmt: skip

    @property
    def is_diverged(self) -> bool:
        return any(self.diverged)

    @computed_field
    @property
    def val_acc(self) -> list[float]:
        return _shares(self.val_correct, self.val_images)

    @computed_field
    @property
    def test_acc(self) -> list[float]:
        return _shares(self.test_correct, self.test_images)

    @computed_field
    @property
    def test_acc_target(self) -> list[float]:
        return _shares(self.test_correct_target, self.test_images)

    @computed_field
    @property
    def last_acc(self) -> list[float]:
        return _shares(self.last_correct, self.test_images)

    @computed_field
    @property
    def best_test_acc(self) -> list[float] | None:
        return None if self.best_test_correct is None else _shares(self.best_test_correct, self.test_images)

    def figure(self, metric: str) -> list[float]:
        return {"acc": self.test_acc, "acc_target": self.test_acc_target, "ce": self.test_ce, "ce_target": self.test_ce_target}[metric]


class NoiseSource(BaseModel):
    """How much of the primary difference's spread one noise source gives (bootstrap resampling that level alone)."""

    source: str  # "fine-tuning seeds", "test images", "g fits", or "all together"
    levels: list[str]
    std: float | None  # std of refined − x_B accuracy; None: one draw of this source, so not measured


class PairedTest(BaseModel):
    """refined − baseline on the same test images, run by run (same seed: same initialisation and data order)."""

    baseline: str  # the baseline variant's feature source, e.g. "x_B"
    metric: str  # "acc_target" or "acc"
    primary: bool  # the pre-declared comparison that decides the verdict
    images: int  # test images per run
    diffs: list[int]  # refined − baseline in correctly classified images, per run of the refined model
    mean: float  # mean accuracy difference (a fraction; points = 100 x)
    bootstrap: BootstrapResult  # the primary test: seeds and test images (and g fits) resampled
    p_holm: float | None  # Holm-adjusted bootstrap p among the secondary comparisons; None for the primary
    mcnemar: list[McNemarResult]  # secondary: exact test per run (test images only)
    t_test: SeedTTest  # secondary: t-test over runs (seed noise only)
    verdict: Verdict  # at 0.05: the primary by its bootstrap p, a secondary by p_holm
    noise_budget: list[NoiseSource] | None = None  # the primary only: the spread each noise source gives alone

    @property
    def p(self) -> float:
        """The p-value the verdict reads."""
        return self.bootstrap.p if self.p_holm is None else self.p_holm


def correctness(v: VariantResult, predictions: Mapping[str, np.ndarray], labels: np.ndarray, key: str, seeds: int) -> np.ndarray:
    """Boolean (g fits, seeds, images): did run (g, s) of `v` classify image i right, under prediction key `key`.

    Features that do not depend on g have one fit, which broadcasts against the refined model's fits.
    """
    preds = predictions[key]
    out = np.empty((max(v.g_fit) + 1, seeds, preds.shape[1]), dtype=preds.dtype)
    for row, (g, s) in enumerate(zip(v.g_fit, v.seed)):
        out[g, s] = preds[row]
    return out == labels[None, None, :]


def paired_tests(
    results: Sequence[VariantResult], predictions: Mapping[str, Mapping[str, np.ndarray]], labels: np.ndarray, metrics: Sequence[str],
    seeds: int, resamples: int = 10_000, seed: int = 0,
) -> list[PairedTest]:  # fmt: skip
    """The refined model against every other variant, per metric: bootstrap, McNemar and t over runs; Holm on the secondary.

    Diverged variants get no test. `predictions[features][key]`: (runs, images) target-class indices.
    """
    refined = next(r for r in results if r.features == REFINED)
    if refined.is_diverged:
        return []
    diffs, pairs = {}, {}
    for m in metrics:
        key = PREDICTION_KEY[m]
        r = correctness(refined, predictions[REFINED], labels, key, seeds).astype(np.int64)
        for v in results:
            if v is refined or v.is_diverged:
                continue
            b = correctness(v, predictions[v.features], labels, key, seeds).astype(np.int64)
            name = f"{v.features}|{m}"
            diffs[name], pairs[name] = r - b, (v.features, m)
    if not diffs:
        return []
    boots = bootstrap(diffs, resamples=resamples, seed=seed)
    secondary = [n for n in diffs if pairs[n] != PRIMARY]
    adjusted = dict(zip(secondary, holm([boots[n].p for n in secondary])))
    tests = []
    for name, d in diffs.items():
        baseline, metric = pairs[name]
        per_run = d.sum(axis=2).reshape(-1).tolist()
        boot, p_holm = boots[name], adjusted.get(name)
        p = boot.p if p_holm is None else p_holm
        mean = float(d.mean())
        verdict: Verdict = "is within noise" if p >= 0.05 else ("helps" if mean > 0 else "hurts")
        budget = noise_budget(d, boot, seed) if p_holm is None else None
        tests.append(PairedTest(
            baseline=baseline, metric=metric, primary=p_holm is None, images=d.shape[2], diffs=per_run, mean=mean,
            bootstrap=boot, p_holm=p_holm, mcnemar=mcnemar(d), t_test=seed_t_test(per_run, d.shape[2]), verdict=verdict,
            noise_budget=budget,
        ))  # fmt: skip
    return tests


def noise_budget(diff: np.ndarray, overall: BootstrapResult, seed: int = 0) -> list[NoiseSource]:
    """Spread of a (g fits, seeds, images) difference from each source alone, and from all together (`overall`, its bootstrap)."""
    draws = dict(zip(LEVELS, diff.shape))
    out = []
    for source, level in (("g fits", "g"), ("fine-tuning seeds", "seed"), ("test images", "image")):
        if draws[level] < 2:  # one draw of this source: its spread is not measured, not zero
            out.append(NoiseSource(source=source, levels=[level], std=None))
            continue
        alone = bootstrap({"d": diff}, resamples=overall.resamples, seed=seed, levels=[level])["d"]
        out.append(NoiseSource(source=source, levels=[level], std=alone.std))
    return [*out, NoiseSource(source="all together", levels=overall.levels, std=overall.std)]


def _significance(test: PairedTest) -> str:
    what = "bootstrap p" if test.primary else "Holm-adjusted p"
    return f"{what} = {test.p:.2g}: {'beyond noise' if test.verdict in ('helps', 'hurts') else 'within noise'}"


def headline(results: Sequence[VariantResult], tests: Sequence[PairedTest], seeds: int, g_fits: int) -> str:
    """The primary verdict (refined vs B's features), then the gap to the better of x_A and x_B chosen on validation data."""
    refined = next(r for r in results if r.features == REFINED)
    if refined.is_diverged:
        return "Δ removal cannot be judged here: the refined model's fine-tuning diverged (non-finite loss); see the accuracy table"
    main = next((t for t in tests if (t.baseline, t.metric) == PRIMARY), None)
    if main is None:
        return "Δ removal cannot be judged here: fine-tuning on B's features diverged (non-finite loss); see the accuracy table"
    noise = f"{seeds} seeds{f' x {g_fits} g fits' if g_fits > 1 else ''} x {main.images} test images"
    first = verdict_line(main, "B's features", noise)
    candidates = [r for r in results if r.features in ("x_A", "x_B") and not r.is_diverged]
    best = max(candidates, key=lambda r: (statistics.fmean(r.val_correct_target) / r.val_images, r.features == "x_B"))
    gap = next(t for t in tests if (t.baseline, t.metric) == (best.features, "acc_target"))
    return (
        f"{first}. Best baseline on validation data: {best.features}, {100 * statistics.fmean(best.test_acc_target):.2f} % on test; "
        f"refined − it = {100 * gap.mean:+.2f} points ({_significance(gap)}). "
        "Conditional on these A and B: other base-net pairs can differ"
    )


def worse_than_baselines(tests: Sequence[PairedTest]) -> list[PairedTest]:
    """Baselines the refined model is worse than beyond noise (target-class accuracy; Holm-adjusted for the secondary)."""
    return [t for t in tests if t.metric == "acc_target" and t.verdict == "hurts"]


def verdict_line(test: PairedTest, what: str, noise: str) -> str:
    """One sentence: 'Δ removal helps here: ...' with the figures behind it (accuracy in points)."""
    lo, hi = (100 * v for v in test.bootstrap.ci95)
    return (
        f"Δ removal {test.verdict} here: refined − {what} = {100 * test.mean:+.2f} points "
        f"(95% CI {lo:+.2f} to {hi:+.2f}, bootstrap p = {test.bootstrap.p:.2g} over {noise}; target-class accuracy)"
    )
