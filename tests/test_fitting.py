"""Fitting g to convergence with the default settings: the engine issue's acceptance toys and the curve."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from refiner.engine.features import iter_batches
from refiner.engine.fitting import FitConfig, fit_isomorphism
from refiner.engine.metrics import measure_isomorphism
from refiner.errors import DataError


def _toy(n: int = 600, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """x_A = relu(z) + 0.3 z, z ~ N(0, 1), 600 samples of 12x6x6; x_B = 2.5 x_A[:, perm] + 1."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, 12, 6, 6)).astype(np.float32)
    x_a = np.maximum(z, 0) + 0.3 * z
    x_b = (2.5 * x_a[:, rng.permutation(12)] + 1).astype(np.float32)
    return x_a, x_b


def _table(g, x_a, x_b):
    return measure_isomorphism(g, iter_batches(x_a, x_b, batch_size=128))


def test_default_fit_converges_on_permuted_channels():
    """Acceptance (a): with FitConfig() as it is, the permuted, rescaled copy is explained by x^(0)."""
    x_a, x_b = _toy()
    g, fit = fit_isomorphism(x_a, x_b)
    table = _table(g, x_a, x_b)
    assert table.instability < 0.05
    assert table.var_orders[0] > 10 * max(table.var_orders[1:])
    assert fit.stop == "converged" and fit.total_steps < FitConfig().max_steps
    # The curve: one point per check, the kept weights are the best held-out ones.
    n = len(fit.steps)
    assert n == len(fit.train_mse) == len(fit.holdout_mse) == len(fit.lr) == len(fit.p_history) and n >= 10
    assert fit.steps == sorted(fit.steps) and fit.steps[-1] == fit.total_steps
    assert fit.holdout_mse[fit.steps.index(fit.best_step)] == min(fit.holdout_mse)
    assert fit.lr[0] == FitConfig().lr_start and fit.lr[-1] < fit.lr[0]  # the plateau schedule cut the rate
    assert fit.holdout_mse[-1] < 0.01 * fit.holdout_mse[0]


def test_default_fit_leaves_independent_features_unexplained():
    """Acceptance (b): g fitted to independent features predicts almost nothing, so they stay above 0.8 unexplained.

    Var(g(x_A)) is under 2 % of Var(x_B) (converged: 0.7 %; unfitted weights: about 30 %), the instability on
    fresh independent targets is 1 + Var(g(x_A)) / Var(x_B), and the table's Var(g(x_A)) is g's forward pass.
    """
    x_a, _ = _toy()
    rng = np.random.default_rng(5)
    x_b = rng.standard_normal(x_a.shape).astype(np.float32)
    g, fit = fit_isomorphism(x_a, x_b)
    assert fit.stop == "converged"
    assert 0.8 < _table(g, x_a, x_b).instability < 1.0  # g explains a little of its own training noise, never more than all
    fresh = _table(g, x_a, rng.standard_normal(x_a.shape).astype(np.float32))
    assert fresh.var_output < 0.02 * fresh.var_target
    assert fresh.instability == pytest.approx(1 + fresh.var_output / fresh.var_target, abs=0.005)
    with torch.no_grad():
        prediction = g.standardize_target(g(torch.from_numpy(x_a))).double()
    assert fresh.var_output == pytest.approx(prediction.var(unbiased=False).item(), rel=1e-4)


def test_epochs_override_runs_a_fixed_budget():
    x_a, x_b = _toy(n=100)
    config = FitConfig(epochs=3, batch_size=16, lr_start=1e-2, lr_end=1e-3)
    _, fit = fit_isomorphism(x_a, x_b, config=config)
    steps_per_epoch = math.ceil(90 / 16)  # 10 of 100 pairs held out
    assert fit.stop == "epochs" and fit.total_steps == 3 * steps_per_epoch
    assert fit.steps == [steps_per_epoch * (e + 1) for e in range(3)]
    np.testing.assert_allclose(fit.lr, [1e-2, 10**-2.5, 1e-3])


def test_streaming_from_disk_matches_preloading():
    """Features too large for the device are streamed from the memory map: same batches, same g."""
    x_a, x_b = _toy(n=120)
    config = FitConfig(max_steps=40, eval_every=10, batch_size=16)
    g1, fit1 = fit_isomorphism(x_a, x_b, config=config)
    g2, fit2 = fit_isomorphism(x_a, x_b, config=config.model_copy(update={"preload_gib": 0}))
    np.testing.assert_allclose(fit1.holdout_mse, fit2.holdout_mse, rtol=1e-5)
    for p1, p2 in zip(g1.parameters(), g2.parameters()):
        np.testing.assert_allclose(p1.detach().numpy(), p2.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_budget_stop_and_no_holdout():
    x_a, x_b = _toy(n=60)
    _, fit = fit_isomorphism(x_a, x_b, config=FitConfig(max_steps=25, eval_every=10, holdout=0.0))
    assert fit.stop == "budget" and fit.total_steps == 25 and fit.steps == [10, 20, 25]
    assert all(math.isnan(v) for v in fit.holdout_mse)  # the training MSE is watched instead


def test_fit_errors_name_the_problem():
    x_a, x_b = _toy(n=20)
    with pytest.raises(DataError, match="x_A has 20 samples but x_B has 19"):
        fit_isomorphism(x_a, x_b[:19])
    with pytest.raises(DataError, match="at least 2 training pairs"):
        fit_isomorphism(x_a[:2], x_b[:2], config=FitConfig(holdout=0.4))


def test_divergence_is_reported_not_hidden():
    x_a, x_b = _toy(n=60)
    x_b[3, 0, 0, 0] = np.nan
    with pytest.raises(DataError, match="diverged at step 10 .* lower the learning rate"):
        fit_isomorphism(x_a, x_b, config=FitConfig(max_steps=30, eval_every=10))


def test_compiled_fit_matches_eager_and_says_it_compiles(tmp_path, monkeypatch, capfd, caplog):
    """torch.compile'd steps reach the same fit as eager ones; the compile is announced, and on the CPU the
    "No CUDA runtime is found, using CUDA_HOME" that loading inductor logs where a CUDA toolkit exists is not shown."""
    import sys

    monkeypatch.setenv("CUDA_HOME", "/usr/local")  # a "toolkit" folder: torch logs the message when it loads
    fresh = "torch.utils.cpp_extension" not in sys.modules  # it is logged once, at import
    caplog.set_level("INFO", logger="refiner")
    x_a, x_b = _toy(200)
    config = FitConfig(max_steps=30, eval_every=10)
    g_eager, eager = fit_isomorphism(x_a, x_b, config=config.model_copy(update={"compile": "off"}))
    g_comp, comp = fit_isomorphism(x_a, x_b, config=config.model_copy(update={"compile": "on"}))
    assert comp.compiled and not eager.compiled and 0 < comp.compile_seconds < comp.seconds
    np.testing.assert_allclose(comp.holdout_mse, eager.holdout_mse, rtol=1e-4)
    for a, b in zip(g_eager.state_dict().values(), g_comp.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    err, notes = capfd.readouterr().err, caplog.text  # the library's notes go to the refiner logger
    assert "compiling g's step (about 90 s)" in notes  # 180 training pairs: the last batch of an epoch (52) compiles again
    assert "compiling g's step again for an epoch's smaller last batch" in notes
    if fresh:
        assert "No CUDA runtime" not in err and "CUDA_HOME" not in err


class _Clock:
    """A stand-in for time.perf_counter that advances `step_s` per call, so every timed step takes step_s."""

    def __init__(self, step_s: float) -> None:
        self.now, self.step_s = 0.0, step_s

    def __call__(self) -> float:
        self.now += self.step_s
        return self.now


class _EagerCompiled:
    """Stands in for torch.compile'd steps: the same loss, eagerly, reported as compiled."""

    def __init__(self, module, device):
        self.fn, self.compiled = module, True

    def __call__(self, *args):
        return self.fn(*args)


@pytest.mark.parametrize("step_s, compiles", [(1.0, False), (100.0, True)])
def test_auto_compiles_only_when_the_measured_steps_repay_it(monkeypatch, capsys, digit_nets, tmp_path, step_s, compiles):
    """`refiner fit --g-compile auto` times its first eager steps: with 20 steps left after the probe, 1 s steps
    cannot repay compiling (20 x 1 s x 10 % saved < 90 s), 100 s steps can; the choice is in the fit record."""
    from refiner.cli import main
    from refiner.engine import fitting

    monkeypatch.setattr(fitting._Steps, "clock", staticmethod(_Clock(step_s)))
    monkeypatch.setattr(fitting, "_Compiled", _EagerCompiled)
    a, b = digit_nets
    out = tmp_path / "g.pt"
    code = main(["fit", "--a", str(a.path), "--b", str(b.path), "--task", "digits", "--g-steps", "41", "--g-compile", "auto",
                 "--out", str(out), "--json"])  # fmt: skip
    assert code == 0
    captured = capsys.readouterr()
    fit = json.loads(captured.out)["fit"]
    assert fit["compiled"] is compiles and fit["total_steps"] == 41
    assert ("compiling g's step" in captured.err) is compiles


@pytest.mark.parametrize("step_s, compiles", [(0.2, False), (1.0, True)])
def test_auto_expects_a_converging_fit_to_stop_early(monkeypatch, step_s, compiles):
    """With the default 20,000-step budget, "auto" counts CONVERGED_STEPS (5,000) steps, not the budget: 0.2 s
    steps would repay two 90 s graphs over 20,000 steps (400 s saved) but not over 5,000 (100 s); 1 s steps would."""
    from refiner.engine import fitting

    monkeypatch.setattr(fitting._Steps, "clock", staticmethod(_Clock(step_s)))
    monkeypatch.setattr(fitting, "_Compiled", _EagerCompiled)
    x_a, x_b = _toy(200)
    _, fit = fit_isomorphism(x_a, x_b, config=FitConfig(eval_every=30, patience=1, plateau=1))
    assert fit.stop == "converged" and fit.compiled is compiles


def test_auto_weighs_compile_time_against_the_steps_left():
    """The rule itself: remaining x t_eager x COMPILE_SAVES against COMPILE_S per graph (2 when epochs end ragged)."""
    from refiner.engine import fitting
    from refiner.engine.device import Runtime

    def steps(ragged: bool):
        return fitting._Steps(torch.nn.Identity(), FitConfig(), Runtime.resolve(), 20_000, ragged, shown=None)

    seconds = fitting.COMPILE_S["cpu"] / fitting.COMPILE_SAVES  # eager seconds that one graph's compile repays
    assert not steps(False).pays(0.9 * seconds / 1000, 1000) and steps(False).pays(1.1 * seconds / 1000, 1000)
    assert not steps(True).pays(1.9 * seconds / 1000, 1000) and steps(True).pays(2.1 * seconds / 1000, 1000)


def test_a_failing_compilation_falls_back_to_eager(monkeypatch):
    def broken(module, **kwargs):
        def fail(*args):
            raise RuntimeError("no C++ compiler")

        return fail

    monkeypatch.setattr(torch, "compile", broken)
    x_a, x_b = _toy(200)
    config = FitConfig(max_steps=20, eval_every=10)
    _, eager = fit_isomorphism(x_a, x_b, config=config)
    with pytest.warns(UserWarning, match=r"torch.compile failed \(RuntimeError: no C\+\+ compiler\); fitting g eagerly"):
        _, fallback = fit_isomorphism(x_a, x_b, config=config.model_copy(update={"compile": "on"}))
    assert not fallback.compiled and fallback.holdout_mse == eager.holdout_mse
