"""The across-pairs protocol table (benchmarks/protocols_table.py): per-pair cells, and a pooled test that counts the pairs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import protocols_table  # noqa: E402

from refiner.refine.predictions import save_predictions  # noqa: E402

ROW = ("balanced", "pre-BN", "converged", "sound")
N, SEEDS = 600, 3


def _build(results: Path, k: int, gain: int, rng: np.random.Generator) -> None:
    """Pair k: x_B right on a random half of the images; the refined model right on those and `gain` more (or fewer)."""
    y = rng.integers(0, 6, N)
    base = np.where(rng.random(N) < 0.5, y, (y + 1) % 6)
    refined = base.copy()
    wrong, right = np.flatnonzero(base != y), np.flatnonzero(base == y)
    if gain >= 0:
        refined[wrong[:gain]] = y[wrong[:gain]]
    else:
        refined[right[:-gain]] = (y[right[:-gain]] + 1) % 6
    runs = lambda p: {"test": np.tile(p, (SEEDS, 1)), "test:all": np.tile(p, (SEEDS, 1)), "runs": np.zeros((SEEDS, 2))}  # noqa: E731
    folder = results / f"{'-'.join(ROW)}-p{k}"
    folder.mkdir(parents=True)
    save_predictions(folder / "predictions.npz", {"test": y}, {"g(x_A)": runs(refined), "x_B": runs(base), "x_B - shuffled x^Δ": runs(base)})
    mean = gain / N
    paired = [{"baseline": "x_B", "metric": "acc_target", "mean": mean, "p_holm": None, "verdict": "-", "bootstrap": {"ci95": [mean - 0.01, mean + 0.01], "p": 0.5}}]
    (folder / "report.json").write_text(json.dumps({"paired": paired}))


def _pooled_cell(results: Path) -> str:
    line = protocols_table.table(results, [ROW], 3).splitlines()[2]
    return line.split(" | ")[-2]  # the pooled refined − x_B


def test_a_gain_on_every_pair_is_found_and_a_sign_flip_between_pairs_is_not(tmp_path):
    rng = np.random.default_rng(0)
    for k in range(3):
        _build(tmp_path / "same", k, 60, rng)  # +10 points on every pair
        _build(tmp_path / "flip", k, 60 if k != 1 else -60, rng)  # +10, -10, +10: the pair decides the sign
    assert _pooled_cell(tmp_path / "same").endswith("helps")
    assert "+10.0 [" in protocols_table.table(tmp_path / "same", [ROW], 3)  # the pair cells, in points
    assert _pooled_cell(tmp_path / "flip").endswith("is within noise")  # images alone would call +3.3 points significant
