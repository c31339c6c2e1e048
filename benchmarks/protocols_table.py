"""The protocol table across base-net pairs: each pair's own test, the spread between pairs, and a pooled bootstrap.

Read from the kept results (report.json + predictions.npz per build), so the
table is recomputed from per-image predictions whenever a build is added.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np
from scipy.stats import t as student_t

from refiner.refine.predictions import load_predictions
from refiner.refine.results import REFINED
from refiner.refine.statistics import bootstrap, holm

__all__ = ["table"]

BASELINE, CONTROL = "x_B", "x_B - shuffled x^Δ"
SCORES = {  # name -> (label, what is counted per image and run)
    "acc_target": ("target classes", lambda runs, y: runs["test"] == y),
    "acc": ("all outputs (paper's score)", lambda runs, y: runs["test:all"] == y),
    "shift": ("share of images whose argmax is a non-target class", lambda runs, y: runs["test:all"] == -1),
}


def _pp(x: float) -> str:
    return f"{100 * x:+.1f}"


Predictions = tuple[dict[str, np.ndarray], dict[str, dict[str, np.ndarray]]]  # load_predictions: labels, runs per variant


def _diff(predictions: Predictions, score: str, baseline: str = BASELINE) -> np.ndarray:
    """Refined − baseline per run and image, (seeds, images) in {-1, 0, 1}."""
    labels, runs = predictions
    count = SCORES[score][1]
    return count(runs[REFINED], labels["test"]).astype(np.int64) - count(runs[baseline], labels["test"]).astype(np.int64)


def _words(score: str, lo: float, hi: float) -> str:
    if lo <= 0 <= hi:
        return "is within noise"
    if score == "shift":
        return "lower" if hi < 0 else "higher"
    return "helps" if lo > 0 else "hurts"


def _pair_cell(predictions: Predictions, report: dict, score: str) -> tuple[float, str]:
    """One pair: the build's own test (Holm p for its secondary comparisons); the shift, which builds do not test, tested here."""
    if score == "shift":
        d = _diff(predictions, score)
        b = bootstrap({"d": d[None]}, levels=("seed", "image"))["d"]
        mean, (lo, hi), p = float(d.mean()), b.ci95, b.p
        verdict = _words(score, lo, hi)
    else:  # the build's own verdict: Holm-adjusted for its secondary comparisons
        test = next(x for x in report["paired"] if (x["baseline"], x["metric"]) == (BASELINE, score))
        mean, (lo, hi), verdict = test["mean"], test["bootstrap"]["ci95"], test["verdict"]
        p = test["bootstrap"]["p"] if test.get("p_holm") is None else test["p_holm"]
    return mean, f"{_pp(mean)} [{_pp(lo)}, {_pp(hi)}] p {p:.2g} {verdict}"


def _between(means: list[float]) -> str:
    """Mean ± sample sd over pairs, and the 95 % t-interval over pairs (base-net pairs, g and seeds; the test images are shared)."""
    if len(means) < 2:
        return "—"
    m, sd = statistics.fmean(means), statistics.stdev(means)
    half = student_t.ppf(0.975, len(means) - 1) * sd / len(means) ** 0.5
    return f"{_pp(m)} ± {100 * sd:.1f} [{_pp(m - half)}, {_pp(m + half)}]"


def _pooled_cell(result, score: str, p_holm: dict[int, float]) -> str:
    """A pooled test as 'CI, p, Holm p: verdict' in points; `p_holm` by id() of each pooled result."""
    if result is None:
        return "—"
    (lo, hi), adjusted = result.ci95, p_holm[id(result)]
    return f"{_pp(lo)} to {_pp(hi)}, p {result.p:.2g}, Holm {adjusted:.2g}: {_words(score, lo, hi) if adjusted < 0.05 else 'is within noise'}"


def table(results: Path, grid: list[tuple[str, ...]], pairs: int) -> str:
    """Per row and score: refined − x_B on each pair, between pairs, and pooled; Holm over every pooled test of the table.

    Pooled: a hierarchical bootstrap that resamples pairs, then seeds within
    each, then test images (the same images for every pair: they share the
    test split), so its interval covers base nets, seeds and images at once.
    With 3 pairs the pair level is coarse: read it beside the t-interval.
    """
    rows, pooled = [], []
    for row in grid:
        builds = [results / f"{'-'.join(row)}-p{k}" for k in range(pairs)]
        found = {b: json.loads((b / "report.json").read_text()) for b in builds if (b / "report.json").exists()}
        preds = {b: load_predictions(b / "predictions.npz") for b in found}
        for score in ["acc_target", *(["acc", "shift"] if row[3] == "paper" else [])]:
            cells = [_pair_cell(preds[b], found[b], score) if b in found else (None, "—") for b in builds]
            means = [m for m, _ in cells if m is not None]
            control = [_pp(float(_diff(preds[b], score, CONTROL).mean())) if b in found and score != "shift" else "—" for b in builds]
            tested = {"x_B": BASELINE, "control": CONTROL} if score != "shift" else {"x_B": BASELINE}
            result = bootstrap({k: np.stack([_diff(p, score, v) for p in preds.values()]) for k, v in tested.items()}) if len(found) > 1 else {}
            pooled += result.values()
            rows.append((row, score, [c for _, c in cells], _between(means), result, control))
    adjusted = dict(zip(map(id, pooled), holm([r.p for r in pooled])))
    lines = [
        "| base data | layer | g | protocol | score | " + " | ".join(f"pair {k}: refined − x_B" for k in range(pairs))
        + " | mean ± sd over pairs [95% t-interval over pairs] | pooled over pairs, seeds, images: 95% CI, p, Holm p"
        + " | refined − control: per pair; pooled |",
        "|---|---|---|---|---|" + "---|" * pairs + "---:|---|---|",
    ]  # fmt: skip

    for row, score, cells, between, result, control in rows:
        lines.append(
            f"| {' | '.join(row[:3])} | {row[3]} | {SCORES[score][0]} | " + " | ".join(cells)
            + f" | {between} | {_pooled_cell(result.get('x_B'), score, adjusted)} | " + "; ".join(control)
            + ("" if score == "shift" else f"; pooled {_pooled_cell(result.get('control'), score, adjusted)}") + " |"
        )  # fmt: skip
    return "\n".join(lines) + "\n"
