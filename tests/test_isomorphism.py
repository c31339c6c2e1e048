"""g (Eq. 1), its exact decomposition (Eq. 3-4) and the paper's sanity cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from refiner.engine.features import iter_batches
from refiner.engine.fitting import FitConfig, fit_isomorphism
from refiner.engine.isomorphism import IsomorphismConfig, IsomorphismNet
from refiner.engine.metrics import measure_isomorphism
from refiner.errors import ConfigError


def _random_g(shape_a, shape_b, **kw) -> IsomorphismNet:
    g = IsomorphismNet(shape_a, shape_b, IsomorphismConfig(**kw))
    with torch.no_grad():
        g.theta.uniform_(-1, 1)
        g.set_standardization(torch.rand(shape_a[0]), 0.5 + torch.rand(shape_a[0]), torch.rand(shape_b[0]), 0.5 + torch.rand(shape_b[0]))
    return g.eval()


@pytest.mark.parametrize(
    "shape_a, shape_b, kw",
    [
        ((6, 8, 8), (6, 8, 8), {}),
        ((6, 8, 8), (5, 4, 4), {"orders": 3}),  # C_A != C_B and H x W differ
        ((4, 5, 5), (7, 10, 10), {"kernel_size": 1, "orders": 1}),
        ((6, 8, 8), (6, 8, 8), {"normalizer": "batch"}),
        ((12,), (9,), {}),  # vectors
        ((6, 8, 8), (6, 8, 8), {"orders": 0}),
    ],
)
def test_components_sum_to_output(shape_a, shape_b, kw):
    g = _random_g(shape_a, shape_b, **kw)
    x_a, x_b = torch.randn(5, *shape_a) * 3, torch.randn(5, *shape_b)
    dec = g.decompose(x_a, x_b)
    out = g.forward_standardized(g.standardize_input(x_a))
    assert len(dec.components) == g.orders + 1
    scale = out.abs().max().item()
    assert (dec.output - out).abs().max().item() <= 1e-5 * scale
    assert torch.allclose(dec.delta, g.standardize_target(x_b) - out, atol=1e-5 * scale)
    # forward() is the same prediction in B's original space and shape.
    assert g(x_a).shape == x_b.shape
    assert torch.allclose(g.standardize_target(g(x_a)).reshape(out.shape), out, atol=1e-4 * scale)


def test_higher_orders_pass_nonlinearities():
    """x^(0) is linear in x_A; higher orders are not (they go through gates)."""
    g = _random_g((4, 6, 6), (4, 6, 6), orders=2)
    g.set_standardization(torch.zeros(4), torch.ones(4), torch.zeros(4), torch.ones(4))
    x = torch.randn(3, 4, 6, 6)
    d1, d2 = g.decompose(x), g.decompose(-x)
    assert torch.allclose(d1.components[0], -d2.components[0], atol=1e-5)
    assert not torch.allclose(d1.components[1], -d2.components[1], atol=1e-3)


def test_p_starts_at_half_and_loss_has_penalty():
    g = IsomorphismNet((3, 4, 4), (3, 4, 4), IsomorphismConfig(orders=2, lam=0.1))
    assert torch.allclose(g.p, torch.full((2,), 0.5))
    total, mse = g.loss(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4))
    assert total.item() == pytest.approx(mse.item() + 0.1 * 2 * 0.25, rel=1e-6)
    assert all(conv.bias is None for conv in g.weights)


def test_bad_shapes_and_normalizer_are_refused():
    with pytest.raises(ConfigError, match="both be vectors"):
        IsomorphismNet((3, 4, 4), (3,))
    with pytest.raises(ConfigError, match="normalizer 'sample' needs spatial"):
        IsomorphismNet((3,), (3,), IsomorphismConfig(normalizer="sample"))
    with pytest.raises(ConfigError, match="kernel_size must be odd"):
        IsomorphismNet((3, 4, 4), (3, 4, 4), IsomorphismConfig(kernel_size=2))


def _toy_features(n: int = 256) -> np.ndarray:
    """Features of a fixed random conv layer on random images (non-negative, correlated)."""
    conv = torch.nn.Conv2d(3, 8, 3, padding=1)
    with torch.no_grad():
        return torch.relu(conv(torch.randn(n, 3, 8, 8))).numpy()


def _table(g, x_a, x_b):
    return measure_isomorphism(g, iter_batches(x_a, x_b, batch_size=64))


def test_permuted_channels_are_explained_by_order_zero():
    """The paper's footnote: B = A with channels permuted; g must find it almost linearly."""
    x_a = _toy_features()
    x_b = np.ascontiguousarray(x_a[:, np.random.default_rng(1).permutation(8)])
    g, result = fit_isomorphism(x_a, x_b, IsomorphismConfig(orders=2), FitConfig(epochs=100, lr_start=2e-2, lr_end=1e-3, batch_size=32))
    table = _table(g, x_a, x_b)
    assert table.instability < 0.05
    assert table.var_orders[0] > 10 * max(table.var_orders[1:])
    assert result.holdout_mse[-1] < 0.05
    assert table.cka > 0.999  # linear CKA is invariant to permutations


def _forward_variances(g: IsomorphismNet, x_a: np.ndarray, x_b: np.ndarray) -> tuple[float, float]:
    """Var(g(x_A)) and Var(x_B - g(x_A)) in B's standardised space, from g's forward pass (not its decomposition)."""
    with torch.no_grad():
        pred = g.standardize_target(g.eval()(torch.from_numpy(x_a))).double()
        delta = g.standardize_target(torch.from_numpy(x_b)).double() - pred
    return pred.var(unbiased=False).item(), delta.var(unbiased=False).item()


def test_independent_features_are_unexplained():
    """g fitted to noise predicts almost nothing, so fresh noise stays all x^Delta, and the table is g's own.

    Var(g(x_A)) is under 2 % of Var(x_B) (fitted: 0.7 %; unfitted weights: 34 %, a random g far more), so
    the instability on fresh noise is 1 + Var(g(x_A)) / Var(x_B), close to 1. The table's Var(g(x_A)) and
    Var(x^Delta) are those of g's forward pass: a decomposition that does not add up to g(x_A) changes both.
    """
    x_a = _toy_features()
    x_b = np.random.default_rng(2).standard_normal(x_a.shape).astype(np.float32)
    g, _ = fit_isomorphism(x_a, x_b, IsomorphismConfig(orders=2), FitConfig(epochs=10, lr_start=1e-2, lr_end=1e-3))
    fresh = np.random.default_rng(3).standard_normal(x_a.shape).astype(np.float32)
    table = _table(g, x_a, fresh)
    var_output, var_delta = _forward_variances(g, x_a, fresh)
    assert table.var_output == pytest.approx(var_output, rel=1e-4) and table.var_delta == pytest.approx(var_delta, rel=1e-4)
    assert table.var_output < 0.02 * table.var_target
    assert table.instability == pytest.approx(1 + table.var_output / table.var_target, abs=0.005)
    assert table.cka < 0.1
