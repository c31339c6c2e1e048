"""predictions.npz: every build's per-image predictions, from which each accuracy in report.json is recomputed.

Keys (target-class indices, int16):
  labels/<split>                  the label of each image (split: val, test)
  <features>/<split>              (runs, images): argmax over the target classes' outputs
  <features>/<split>:all          (runs, images): argmax over every output, as a target index (-1: a non-target class)
  <features>/test@last[:all]      the same after the last epoch
  <features>/test@best[:all]      at the best test epoch (paper protocol: the optimistic figure)
  <features>/runs                 (runs, 2): the g fit and the seed of each row
Rows follow the run order of the variant in report.json.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from refiner.engine.finetune import HeadResult

__all__ = ["FILE", "stack_runs", "save_predictions", "load_predictions"]

FILE = "predictions.npz"


def stack_runs(runs: Sequence[tuple[int, int, HeadResult]]) -> dict[str, np.ndarray]:
    """One variant's runs as (runs, images) arrays per key, plus its (g fit, seed) rows."""
    out: dict[str, np.ndarray] = {"runs": np.asarray([(g, s) for g, s, _ in runs], dtype=np.int16).reshape(-1, 2)}
    for key in runs[0][2].predictions:
        rows = [r.predictions[key] for _, _, r in runs]
        out[key] = np.stack([p.target for p in rows]).astype(np.int16)
        out[f"{key}:all"] = np.stack([p.full for p in rows]).astype(np.int16)
    return out


def save_predictions(path: Path, labels: Mapping[str, np.ndarray], variants: Mapping[str, Mapping[str, np.ndarray]]) -> None:
    """Write predictions.npz (compressed); `variants[features][key]` as made by stack_runs."""
    arrays = {f"labels/{split}": np.asarray(y, dtype=np.int16) for split, y in labels.items()}
    arrays.update({f"{features}/{key}": a for features, keys in variants.items() for key, a in keys.items()})
    with open(path, "wb") as f:
        np.savez_compressed(f, **arrays)


def load_predictions(path: Path) -> tuple[dict[str, np.ndarray], dict[str, dict[str, np.ndarray]]]:
    """(labels per split, predictions per variant and key) from a predictions.npz."""
    labels: dict[str, np.ndarray] = {}
    variants: dict[str, dict[str, np.ndarray]] = {}
    with np.load(path, allow_pickle=False) as data:
        for name in data.files:
            features, _, key = name.rpartition("/")
            if features == "labels":
                labels[key] = data[name]
            else:
                variants.setdefault(features, {})[key] = data[name]
    return labels, variants
