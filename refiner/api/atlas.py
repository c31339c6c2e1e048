"""`refiner.atlas`: where two nets agree, layer by layer, from Python; the result shows itself and saves as the CLI's folder."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from torch import nn

from refiner.api.runtime import runtime_config
from refiner.data.tasks import TaskData
from refiner.engine.features import Batches
from refiner.engine.fitting import FitConfig
from refiner.engine.isomorphism import IsomorphismConfig
from refiner.errors import ConfigError, Interrupted, LayerError
from refiner.layermap.pipeline import AtlasConfig, AtlasReport, ConsistencyRow, run_atlas
from refiner.layermap.report import format_atlas, heatmap_figure, read_atlas, update_atlas, write_atlas
from refiner.models.checkpoints import Classifier
from refiner.models.layers import kept_modes

__all__ = ["Atlas", "atlas"]


@dataclass
class Atlas:
    """The layer x layer CKA map of two nets (`.cka`, rows = A's layers), its consistency rows, and everything measured.

    A notebook shows it as its heatmap; `str()` gives the command line's table.

    Examples:
        >>> import refiner, torch
        >>> a = refiner.create_model("tiny_vgg", 4)
        >>> result = refiner.atlas(a, a, [torch.randn(8, 3, 16, 16) for _ in range(2)], ["features.0", "features.4"], ["features.4"])
        >>> layer, cka = result.best_match("features.4")
        >>> layer, round(cka, 4)
        ('features.4', 1.0)
    """

    report: AtlasReport  # atlas.json: provenance, both grids, timings, the consistency rows

    @property
    def cka(self) -> np.ndarray:
        """Minibatch unbiased CKA, `len(layers_a) x len(layers_b)` (nan for a constant layer)."""
        return np.array([[np.nan if v is None else v for v in row] for row in self.report.cka], dtype=float)

    @property
    def layers_a(self) -> list[str]:
        return self.report.layers_a

    @property
    def layers_b(self) -> list[str]:
        return self.report.layers_b

    @property
    def consistency(self) -> list[ConsistencyRow]:
        """A g per matched pair: instability, Var(x^(k)), held-out MSE (empty without `train`)."""
        return self.report.consistency

    def best_match(self, layer_a: str) -> tuple[str, float]:
        """B's layer most similar to `layer_a`, and their CKA."""
        if layer_a not in self.layers_a:
            raise LayerError(f"layer {layer_a!r} is not a row of this atlas; its rows: {', '.join(self.layers_a)}")
        row = self.cka[self.layers_a.index(layer_a)]
        j = int(np.nanargmax(row))
        return self.layers_b[j], float(row[j])

    def plot(self, positions: bool = False):
        """The heatmap as a matplotlib Figure (`positions`: refiner's (image, position) CKA instead)."""
        grid = self.report.cka_positions if positions else self.report.cka
        if grid is None:
            raise ValueError("this atlas has no position CKA (measured with positions=False, or left out by 'auto' as costly)")
        r = self.report
        marks = [(r.layers_a.index(c.layer_a), r.layers_b.index(c.layer_b)) for c in r.consistency]
        what = "position CKA (equal positions only)" if positions else f"minibatch CKA, {r.images} images"
        return heatmap_figure(grid, r.layers_a, r.layers_b, f"{what}\nA = {r.a['file']} ({r.a['arch']}), B = {r.b['file']} ({r.b['arch']})", marks)

    def save(self, out: str | Path) -> Path:
        """Write the CLI's report folder `out` (atlas.json, cka.png, report.html); it must not exist yet."""
        return write_atlas(Path(out), self.report)

    def _repr_png_(self) -> bytes:
        import matplotlib.pyplot as plt

        fig = self.plot()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=110)
        plt.close(fig)
        return buffer.getvalue()

    def __str__(self) -> str:
        return format_atlas(self.report)

    def __repr__(self) -> str:
        r = self.report
        rows = f", {len(r.consistency)} consistency rows" if r.consistency else ""
        return f"<Atlas {len(r.layers_a)} x {len(r.layers_b)} layers of {r.a.get('arch', 'A')} and {r.b.get('arch', 'B')}, {r.images} images{rows}>"


def atlas(
    model_a: nn.Module | Classifier,
    model_b: nn.Module | Classifier,
    data: Batches,
    layers_a: list[str] | None = None,
    layers_b: list[str] | None = None,
    *,
    data_b: Batches | None = None,
    train: Batches | TaskData | None = None,
    train_b: Batches | None = None,
    consistency: Literal["matched", "diagonal", "none"] = "matched",
    max_layers: int = 16,
    positions: bool | Literal["auto"] = "auto",
    steps: int | None = None,
    seed: int = 0,
    g_config: IsomorphismConfig | None = None,
    fit_config: FitConfig | None = None,
    split: str = "data",
    task: str | None = None,
    device: str = "auto",
    amp: Literal["off", "bf16", "fp16"] = "off",
    threads: int | None = None,
    workers: int | None = None,
    cache_dir: str | Path | None = None,
    out: str | Path | None = None,
    forward: Literal["auto", "torch", "onnxruntime"] = "auto",
) -> Atlas:
    """Map two nets layer by layer: minibatch CKA between every chosen layer of A and of B, in one pass over `data`.

    Each batch of `data` is one minibatch of the unbiased estimator (at least 4 images), as in
    pytorch-cka. Every layer is captured as it was produced (an in-place ReLU after it cannot
    overwrite it), and each net runs only up to its deepest chosen layer. The models are not
    modified: the pass runs on eval-mode copies.

    Args:
        model_a: any nn.Module (or a net from `refiner.load`).
        model_b: another, compared with `model_a`.
        data: image batches, e.g. a DataLoader yielding `x` or `(x, y, ...)`.
        layers_a: node names of A (`refiner.layers` lists them); None: the clean split points
            thinned evenly by depth to `max_layers`, the default layer kept (as `refiner atlas`).
        layers_b: node names of B, as `layers_a`.
        data_b: B's view of the same images, batch for batch, when B is fed otherwise (another size or normalisation).
        train: images to fit g on for the consistency rows (`train_b` as `data_b`); None: no rows.
        consistency: with `train`, fit g on each A layer and its best match in B ("matched"),
            on layer i of both ("diagonal"), or on none.
        positions: also refiner's (image, position) CKA of the layer pairs with equal positions: True, False, or
            "auto" (the default: kept when the first batch says it adds at most a quarter of the forward time).
        steps: budget of optimiser steps per g (default 2,000, as `refiner atlas --g-steps`).
        g_config: g's shape (`IsomorphismConfig`).
        fit_config: g's fitting (`FitConfig`).
        split: the name `data` is recorded under.
        task: the task `data` belongs to, for the record.
        device: "auto" (the first CUDA GPU, else the CPU), "cpu", "cuda" or "cuda:N".
        amp: autocast for the forward passes.
        threads: CPU threads (default: torch's).
        workers: data-loading processes for a task's images.
        cache_dir: the feature cache of a task's splits (`train` as task data).
        forward: the nets' forward passes (the CKA pass, the consistency rows' features): torch, onnxruntime (each
            net's captured graph exported to ONNX, cached, checked against torch on the first batch; torch if it
            differs), or "auto": onnxruntime where it is measured faster on the first batch (on a CPU, for a pass long
            enough to repay the export).
        out: a report folder written as the run goes (atlas.json marked partial, cka.png, report.html after the CKA
            pass and after each pair) and resumed: a partial atlas there of the same nets, data and settings goes
            on from its last pair. Ctrl-C then raises `refiner.errors.Interrupted` saying what was kept.

    Examples:
        >>> import refiner, torch
        >>> a, b = refiner.create_model("tiny_vgg", 4), refiner.create_model("tiny_resnet", 4)
        >>> images = [torch.randn(8, 3, 16, 16) for _ in range(3)]
        >>> result = refiner.atlas(a, b, images)
        >>> result.cka.shape == (len(result.layers_a), len(result.layers_b))
        True
        >>> same = refiner.atlas(a, a, images, layers_a=["features.0", "features.4"], layers_b=["features.0", "features.4"])
        >>> [round(float(v), 6) for v in same.cka.diagonal()]
        [1.0, 1.0]
    """
    fit = fit_config or FitConfig(max_steps=2000)
    if steps is not None:
        fit = fit.model_copy(update={"max_steps": steps})
    config = AtlasConfig(
        layers_a=layers_a, layers_b=layers_b, max_layers=max_layers, split=split, seed=seed, positions=positions,
        consistency=consistency, g=g_config or IsomorphismConfig(), fit=fit, runtime=runtime_config(device, amp, threads, workers, forward),
    )  # fmt: skip
    train_sources = train if isinstance(train, TaskData) or train is None else {"train": (train, train_b)}
    clf_a, clf_b = Classifier.of(model_a), Classifier.of(model_b)
    resume, kept = _resumable(out), []

    def checkpoint(report: AtlasReport) -> None:
        update_atlas(Path(out), report)
        kept[:] = [report]

    cache = Path(cache_dir) if cache_dir is not None else None
    try:
        with kept_modes(clf_a.model, clf_b.model):
            report = run_atlas(
                clf_a, clf_b, data, config, data_b=data_b, train=train_sources, task=task, cache_dir=cache,
                checkpoint=checkpoint if out is not None else None, resume=resume,
            )  # fmt: skip
    except KeyboardInterrupt:
        if out is None:
            raise
        if not kept:
            raise Interrupted(f"stopped before the CKA pass ended: nothing was written to {str(out)!r}") from None
        r = kept[0]
        raise Interrupted(
            f"kept in {str(out)!r}: the CKA grid (cka.png) and {len(r.consistency)} of {r.pairs_total} pairs (atlas.json, marked "
            "partial); the same command resumes from there"
        ) from None
    except ConfigError as e:
        if resume is not None and "partial atlas to resume" in str(e):
            raise ConfigError(f"{str(out)!r} holds a partial atlas of other nets, data, layers or settings; choose another --out or remove it") from None
        raise
    return Atlas(report)


def _resumable(out: str | Path | None) -> AtlasReport | None:
    """The partial atlas in `out` to go on from; ConfigError if `out` holds a complete one or something else."""
    if out is None:
        return None
    prior = read_atlas(Path(out))
    if prior is None:
        if Path(out).exists():
            raise ConfigError(f"report folder {str(out)!r} already exists and holds no atlas; choose another --out or remove it")
        return None
    if prior.complete:
        raise ConfigError(f"report folder {str(out)!r} already holds a complete atlas; choose another --out or remove it")
    return prior
