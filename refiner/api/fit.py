"""`refiner.fit`: g between two nets' features from Python, its exact decomposition and Var table; saved as `refiner fit` saves it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from refiner.api.runtime import runtime_config
from refiner.atomic import atomic_file
from refiner.data.tasks import TaskData
from refiner.engine.comparison import CompareConfig, ComparisonReport, compare, measure_split
from refiner.engine.device import Runtime
from refiner.engine.features import Batches, FeatureSet, images_of
from refiner.engine.fitting import FitConfig, FitResult, fit_isomorphism
from refiner.engine.isomorphism import IsomorphismConfig, IsomorphismNet, save_isomorphism
from refiner.engine.metrics import VarianceTable
from refiner.errors import ConfigError
from refiner.models.checkpoints import Classifier
from refiner.models.layers import kept_modes

__all__ = ["Fitted", "fit", "fit_features"]


@dataclass
class Fitted:
    """A fitted g (`.g`, an nn.Module mapping x_A to x_B), how fitting went, and its Var table per split measured.

    Examples:
        >>> import refiner, torch
        >>> x_a = torch.randn(64, 8)
        >>> fitted = refiner.fit_features(x_a, x_a.relu(), steps=200)
        >>> fitted.fit.total_steps, len(fitted.decompose(x_a))  # K = 2: x^(0), x^(1), x^(2)
        (200, 3)
    """

    g: IsomorphismNet
    fit: FitResult  # the fitting curve and how it stopped
    tables: dict[str, VarianceTable]  # split name -> Var(x^(k)), Var(x^Δ), instability, CKA
    report: ComparisonReport | None = field(default=None, repr=False)  # nets, layers and data (None: fitted on features)

    @property
    def variance(self) -> VarianceTable:
        """The Var table of the held-apart data ("test") when measured, else of the data g was fitted on."""
        return self.tables.get("test") or next(iter(self.tables.values()))

    @property
    def instability(self) -> float:
        """Var(x^Δ) / Var(x_B): 0 when A explains B's feature entirely, 1 when not at all."""
        return self.variance.instability

    @property
    def cka(self) -> float:
        """Linear CKA of x_A (resized to B's positions) and x_B, with (image, position) samples."""
        return self.variance.cka

    @property
    def holdout_mse(self) -> float:
        """g's best MSE on the training pairs held out from fitting, in units of Var(x_B)."""
        return float(min(self.fit.holdout_mse)) if self.fit.holdout_mse else float("nan")

    @torch.no_grad()
    def decompose(self, x_a: Tensor) -> list[Tensor]:
        """x^(0), ..., x^(K) of Eq. 3 in B's units: x^(k) passed k non-linearities of g, and their sum is g(x_a).

        g standardises B's feature; the split is of the standardised output, scaled back by B's
        per-channel std, and x^(0) (the linear part) also carries B's per-channel mean.
        """
        g = self.g.eval()
        param = next(g.parameters())
        dec = g.decompose(x_a.to(param.device, param.dtype))
        std, mean = g.std_b.reshape(1, -1, 1, 1), g.mean_b.reshape(1, -1, 1, 1)
        parts = [c * std for c in dec.components]
        parts[0] = parts[0] + mean
        return parts if g.is_map else [p.flatten(1) for p in parts]

    def plot(self):
        """The fitting curve (train and held-out MSE, p^(k), learning rate) as a matplotlib Figure."""
        from refiner.reporting import fit_curve_figure

        return fit_curve_figure(self.fit)

    def save(self, path: str | Path) -> Path:
        """Write g as `refiner fit --out` does: the g file, its report beside it as .json, and the curve as -curve.png.

        A g fitted between two nets is accepted by `refiner build --g` and `refiner export --g` for those nets'
        checkpoints (nets are matched by the hash of their weights).
        """
        from refiner.reporting import save_fit_curve

        path = Path(path)
        record = self.report.model_dump(mode="json") if self.report is not None else None
        info = {"report": record} if record is not None else {"fit": self.fit.model_dump(mode="json"), "tables": {k: t.model_dump() for k, t in self.tables.items()}}
        save_isomorphism(path, self.g, info)
        if self.report is not None:
            with atomic_file(path.with_suffix(".json")) as tmp:
                tmp.write_text(self.report.model_dump_json(indent=2))
        with atomic_file(path.with_name(path.stem + "-curve.png")) as tmp:
            save_fit_curve(tmp, self.fit)
        return path

    def __repr__(self) -> str:
        v = self.variance
        return f"<Fitted g, K = {self.g.config.orders}: instability {v.instability:.4f}, {self.fit.total_steps} steps>"

    def __str__(self) -> str:
        from refiner.reporting import format_fit, format_variance_table

        return f"{format_variance_table(self.tables)}\n{format_fit(self.fit)}"


def _configs(orders: int | None, steps: int | None, seed: int | None, g_config: IsomorphismConfig | None, fit_config: FitConfig | None):
    g = g_config or IsomorphismConfig()
    if orders is not None:
        g = g.model_copy(update={"orders": orders})
    fit = fit_config or FitConfig()
    updates = {k: v for k, v in (("max_steps", steps), ("seed", seed)) if v is not None}
    return IsomorphismConfig.model_validate(g.model_dump()), FitConfig.model_validate({**fit.model_dump(), **updates})


def fit(
    model_a: nn.Module | Classifier,
    model_b: nn.Module | Classifier,
    data: Batches | TaskData,
    layer_a: str | None = None,
    layer_b: str | None = None,
    *,
    data_b: Batches | None = None,
    test: Batches | None = None,
    test_b: Batches | None = None,
    orders: int | None = None,
    steps: int | None = None,
    seed: int | None = None,
    g_config: IsomorphismConfig | None = None,
    fit_config: FitConfig | None = None,
    cache_dtype: Literal["float32", "float16"] = "float32",
    device: str = "auto",
    amp: Literal["off", "bf16", "fp16"] = "off",
    threads: int | None = None,
    workers: int | None = None,
    cache_dir: str | Path | None = None,
    forward: Literal["auto", "torch", "onnxruntime"] = "auto",
) -> Fitted:
    """Fit g so that g(x_A) reconstructs x_B at two layers (paper Section 3), as `refiner fit` does; measure its Var table.

    g is fitted until its held-out error stops improving (at most 20,000 steps; `steps` bounds
    it). The models are not modified (features come from eval-mode copies).

    Args:
        model_a: any nn.Module (or a net from `refiner.load`): g reads its feature.
        model_b: another: g reconstructs its feature.
        data: the images g is fitted on: batches (a DataLoader yielding `x` or `(x, y, ...)`),
            or a task's splits (its train split fits, its test split is measured; features cached).
        layer_a: A's node name (`refiner.layers`); None: its default layer.
        layer_b: B's node name; None: its default layer.
        data_b: B's view of the same images, batch for batch, when B is fed otherwise.
        test: held-apart images the Var table is measured on (else only on `data`).
        test_b: B's view of `test`, as `data_b`.
        orders: K, the highest order of non-linearity (default 2).
        steps: the budget of optimiser steps (default: until converged).
        seed: g's initialisation and batch order.
        g_config: every option of g (`IsomorphismConfig`: the CLI's --kernel, ...).
        fit_config: every option of its fitting (`FitConfig`: --g-lr, ...).
        device: "auto" (the first CUDA GPU, else the CPU), "cpu", "cuda" or "cuda:N".
        amp: autocast for the feature passes.
        threads: CPU threads (default: torch's).
        workers: data-loading processes for a task's images.
        cache_dir: the feature cache of a task's splits, and the onnxruntime exports of the trunks.
        forward: the trunks' forward: torch, onnxruntime (each trunk exported to ONNX once, checked against torch
            on the first batch; torch if it differs), or "auto": onnxruntime where it is measured faster on the first
            batch (on a CPU, for a pass long enough to repay the export).

    Examples:
        >>> import refiner, torch
        >>> a, b = refiner.create_model("tiny_vgg", 4), refiner.create_model("tiny_vgg", 4)
        >>> images = [torch.randn(16, 3, 16, 16) for _ in range(4)]
        >>> fitted = refiner.fit(a, b, images, orders=2, steps=50)
        >>> x_a = refiner.features(a, torch.randn(2, 3, 16, 16))  # A's feature at its default layer
        >>> parts = fitted.decompose(x_a)
        >>> len(parts), torch.allclose(sum(parts), fitted.g(x_a), atol=1e-4)
        (3, True)
        >>> 0 <= fitted.instability
        True
    """
    g, fit_ = _configs(orders, steps, seed, g_config, fit_config)
    config = CompareConfig(layer_a=layer_a, layer_b=layer_b, g=g, fit=fit_, runtime=runtime_config(device, amp, threads, workers, forward), cache_dtype=cache_dtype)
    clf_a, clf_b = Classifier.of(model_a), Classifier.of(model_b)
    cache = Path(cache_dir) if cache_dir is not None else None
    with kept_modes(clf_a.model, clf_b.model):
        if isinstance(data, TaskData):
            if test is not None or data_b is not None:
                raise ConfigError("with task data, the task's own splits are read: drop data_b/test")
            fitted_g, report, _ = compare(clf_a, clf_b, data, config, cache)
        else:
            sources = {"train": (data, data_b), **({"test": (test, test_b)} if test is not None else {})}
            clf_a, clf_b = clf_a.fed_at(_input_size(data)), clf_b.fed_at(_input_size(data_b if data_b is not None else data))
            fitted_g, report, _ = compare(clf_a, clf_b, sources, config, cache, measure=tuple(sources))
    return Fitted(g=fitted_g, fit=report.fit, tables=report.tables, report=report)


def _input_size(batches: Batches) -> tuple[int, ...]:
    """(C, H, W) of the first batch (a DataLoader is read again from the start later; a one-pass iterator is refused)."""
    if iter(batches) is batches:
        raise ConfigError("data is a one-pass iterator, but each net's features read it once: pass a DataLoader or a list of batches")
    first = next(iter(batches), None)
    if first is None:
        raise ConfigError("data gave no batches")
    return tuple(images_of(first).shape[1:])


def fit_features(
    x_a: np.ndarray | Tensor,
    x_b: np.ndarray | Tensor,
    *,
    test: tuple[np.ndarray | Tensor, np.ndarray | Tensor] | None = None,
    orders: int | None = None,
    steps: int | None = None,
    seed: int | None = None,
    g_config: IsomorphismConfig | None = None,
    fit_config: FitConfig | None = None,
    device: str = "auto",
    amp: Literal["off", "bf16", "fp16"] = "off",
    threads: int | None = None,
) -> Fitted:
    """Fit g on features already extracted: x_A (N, C, H, W) or (N, C) -> x_B, paired by row, for people with features but no models.

    Examples:
        >>> import refiner, torch
        >>> x_a = torch.randn(64, 8, 4, 4)
        >>> fitted = refiner.fit_features(x_a, 2 * x_a + 1, steps=300)
        >>> fitted.instability < 0.05
        True
    """
    g, fit_ = _configs(orders, steps, seed, g_config, fit_config)
    runtime = Runtime.resolve(runtime_config(device, amp, threads))
    xa, xb = _array(x_a, "x_a"), _array(x_b, "x_b")
    fitted_g, result = fit_isomorphism(xa, xb, g, fit_, runtime=runtime)
    tables = {"train": measure_split(fitted_g, FeatureSet(xa, np.full(len(xa), -1)), FeatureSet(xb, np.full(len(xb), -1)))}
    if test is not None:
        ta, tb = _array(test[0], "test x_a"), _array(test[1], "test x_b")
        tables["test"] = measure_split(fitted_g, FeatureSet(ta, np.full(len(ta), -1)), FeatureSet(tb, np.full(len(tb), -1)))
    return Fitted(g=fitted_g, fit=result, tables=tables)


def _array(x: np.ndarray | Tensor, what: str) -> np.ndarray:
    a = x.detach().cpu().float().numpy() if isinstance(x, Tensor) else np.asarray(x, dtype=np.float32)
    if a.ndim not in (2, 4):
        raise ConfigError(f"{what} must be features (N, C) or (N, C, H, W), got shape {a.shape}")
    return a
