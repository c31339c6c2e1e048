"""Progress of long stages: one overall progress per stage in logs, the estimate and advice before long work."""

from __future__ import annotations

import functools
import io
import os
import re
import subprocess
import sys
import time

import pytest
from tqdm import tqdm

from refiner import progress


@pytest.fixture
def bars_on(monkeypatch):
    """Undo conftest's silencing of tqdm, with progress written as plain log lines without delay.

    disable=False explicitly: tqdm reads TQDM_DISABLE when imported, which under pytest-xdist is after conftest set it.
    """
    monkeypatch.setattr(tqdm, "__init__", functools.partialmethod(tqdm.__dict__["__init__"].func, disable=False))
    monkeypatch.setattr(progress, "LOG_INTERVAL_S", 0.0)
    monkeypatch.setattr(progress, "_terminal", lambda: False)


def test_a_build_log_has_one_overall_progress_per_stage_and_ends_with_the_report(tmp_path, digit_nets):
    """Written to a file, a build reports features (images), g (steps) and fine-tuning (runs and epochs) with
    done/total and an ETA, and its last line says where report.html is."""
    a, b = digit_nets
    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"} | {"REFINER_LOG_INTERVAL_S": "0"}
    cmd = [sys.executable, "-m", "refiner", "build", "--a", str(a.path), "--b", str(b.path), "--task", "digits", "--g-steps", "30",
           "--head-epochs", "2", "--seeds", "2", "--no-ablations", "--models", str(tmp_path / "models"), "--cache", str(tmp_path / "c")]  # fmt: skip
    log = tmp_path / "build.log"
    with log.open("wb") as f:
        subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, check=True)
    lines = log.read_text().splitlines()
    assert re.search(r"^features: \d+/\d+ images, .* elapsed, ETA ", "\n".join(lines), re.M)
    assert any(line.startswith("fit g: 30/30 steps") for line in lines)
    runs = [line for line in lines if line.startswith("fine-tuning (")]
    # 4 variants (x_A, x_B, refined, control) x 2 seeds, 2 epochs each: one line per epoch, done/total and an ETA
    assert len(runs) >= 16 and all(re.match(r"fine-tuning \(\d/8 runs done\): \d+/16 epochs, .* ETA ", line) for line in runs)
    assert runs[-1].startswith("fine-tuning (8/8 runs done): 16/16 epochs")
    report = lines[-1].removeprefix("report: ")
    assert lines[-1].startswith("report: ") and report.endswith("report.html") and os.path.isfile(report)
    assert lines[-2].startswith("artifact: ")


def test_a_long_fit_says_how_long_and_what_shortens_it(bars_on, monkeypatch, capsys):
    """Measured over its first steps, a fit expected to exceed LONG_S prints the estimate and the options, once."""
    import numpy as np

    from refiner.engine.fitting import FitConfig, fit_isomorphism

    monkeypatch.setattr(progress, "ESTIMATE_AFTER_S", 0.0)
    monkeypatch.setattr(progress, "LONG_S", 0.0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 4, 3, 3)).astype(np.float32)
    fit_isomorphism(x, 2 * x, config=FitConfig(max_steps=30, eval_every=10, compile="off"))
    err = capsys.readouterr().err
    advice = [line for line in err.splitlines() if "will take about" in line]
    assert len(advice) == 1, err
    assert re.match(r"fit g: 30 steps will take about .* at the rate of the first 1 \(.*\); to shorten it: --g-steps N, "
                    r"--device cuda \(30 is the budget: fitting stops earlier once converged\)", advice[0])  # fmt: skip


def test_short_loops_give_no_advice_and_paused_time_is_not_in_the_eta(bars_on, monkeypatch):
    out = io.StringIO()
    monkeypatch.setattr(progress, "ESTIMATE_AFTER_S", 0.0)
    shown = progress._PlainLines(total=10, desc="fit g", unit="step", file=out, advice="use --g-steps N")
    shown.update(1)  # measured: far below LONG_S
    assert "will take" not in out.getvalue()
    with progress.paused(shown):
        time.sleep(0.3)  # e.g. compiling
    shown.update(1)
    assert shown.format_dict["elapsed"] < 0.3
    shown.close()


def test_units_are_plural_in_plain_lines():
    from refiner.progress import plural

    assert [plural(u) for u in ("batch", "epoch", "pair", "step")] == ["batches", "epochs", "pairs", "steps"]  # not "29 batchs"
