"""torchrun with 2 CPU processes (gloo): DDP fitting and training, sharded features, split build jobs, rank-0 writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from refiner.cli import main
from refiner.models.checkpoints import load_checkpoint


def _torchrun(*args: str, cwd: Path, script: Path | None = None) -> str:
    """Run `refiner ARGS` (or `python SCRIPT ARGS`) in 2 processes; its stdout, after checking it succeeded."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    target = [str(script)] if script else ["-m", "refiner"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *target, *args]
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


# Each rank fits g on vector features (the batch normaliser) with the held-out schedule and writes what it kept.
_FIT_VECTORS = """
import hashlib, json, sys
import numpy as np
from refiner.engine import distributed as dist
from refiner.engine.device import Runtime, RuntimeConfig
from refiner.engine.fitting import FitConfig, fit_isomorphism

dist.init_from_env("cpu")
rng = np.random.default_rng(0)
z = rng.standard_normal((320, 12)).astype(np.float32)
x_a, x_b = np.maximum(z, 0) + 0.3 * z, np.tanh(z @ rng.standard_normal((12, 8))).astype(np.float32)
config = FitConfig(max_steps=300, eval_every=10, patience=6, plateau=2, batch_size=16, compile="off")
g, fit = fit_isomorphism(x_a, x_b, config=config, runtime=Runtime.resolve(RuntimeConfig(device="cpu")))
assert g.normalizer == "batch"
digest = hashlib.sha256(b"".join(v.numpy().tobytes() for v in g.state_dict().values())).hexdigest()
record = {"sha256": digest, "fit": fit.model_dump(exclude={"seconds", "samples_per_s"})}
open(f"{sys.argv[1]}/rank{dist.rank()}.json", "w").write(json.dumps(record))
"""


def test_two_processes_keep_the_same_g_with_the_batch_normaliser(tmp_path):
    """Vector features: every rank takes the same lr cuts and stop, and keeps bit-identical weights and normaliser."""
    script = tmp_path / "fit_vectors.py"
    script.write_text(_FIT_VECTORS)
    _torchrun(str(tmp_path), cwd=tmp_path, script=script)
    zero, one = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert zero["fit"]["holdout_mse"] == one["fit"]["holdout_mse"] and zero["fit"]["lr"] == one["fit"]["lr"]
    assert zero["fit"]["best_step"] == one["fit"]["best_step"] and zero["fit"]["stop"] == one["fit"]["stop"]
    assert zero["sha256"] == one["sha256"]


def _pair(digit_nets) -> list[str]:
    a, b = digit_nets
    return ["--a", str(a.path), "--b", str(b.path), "--task", "digits", "--device", "cpu"]


def test_two_processes_fit_the_same_g_as_one(tmp_path, digit_nets):
    """2 ranks at batch 32 take the same steps as 1 process at batch 64; the cache entry is the same."""
    assert main(["fit", *_pair(digit_nets), "--g-epochs", "3", "--g-batch", "64", "--cache", str(tmp_path / "c1"), "--out", str(tmp_path / "g1.pt")]) == 0
    out = _torchrun("fit", *_pair(digit_nets), "--g-epochs", "3", "--g-batch", "32", "--cache", str(tmp_path / "c2"), "--out", str(tmp_path / "g2.pt"), cwd=tmp_path)
    assert out.count("wrote ") == 1  # rank 0 alone reports and writes
    one, two = (json.loads((tmp_path / f"g{i}.json").read_text()) for i in (1, 2))
    assert one["fit"]["steps"] == two["fit"]["steps"]
    np.testing.assert_allclose(one["fit"]["holdout_mse"], two["fit"]["holdout_mse"], rtol=1e-3)
    assert two["tables"]["test"]["instability"] == pytest.approx(one["tables"]["test"]["instability"], rel=1e-3)
    entries = sorted(p.name for p in (tmp_path / "c1").iterdir())
    assert entries == sorted(p.name for p in (tmp_path / "c2").iterdir()) and len(entries) == 4
    for name in entries:  # features extracted in two shards fill the same entry as one process
        np.testing.assert_allclose(np.load(tmp_path / "c2" / name / "features.npy"), np.load(tmp_path / "c1" / name / "features.npy"), rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(np.load(tmp_path / "c2" / name / "labels.npy"), np.load(tmp_path / "c1" / name / "labels.npy"))
    assert not list((tmp_path / "c2").glob(".*"))  # no temporary folder left behind


def test_two_process_build_splits_jobs_and_writes_once(tmp_path, digit_nets):
    common = [*_pair(digit_nets), "--g-epochs", "2", "--head-epochs", "1", "--seeds", "2", "--no-ablations", "--name", "m"]
    assert main(["build", *common, "--models", str(tmp_path / "m1"), "--cache", str(tmp_path / "c1")]) == 0
    _torchrun("build", *common, "--models", str(tmp_path / "m2"), "--cache", str(tmp_path / "c2"), cwd=tmp_path)
    assert sorted(p.name for p in (tmp_path / "m2" / "m").iterdir()) == ["1", "config.pbtxt", "labels.txt"]  # one artifact, by rank 0
    one, two = (json.loads((tmp_path / m / "m" / "1" / "report.json").read_text()) for m in ("m1", "m2"))
    assert two["runtime"]["processes"] == 2 and one["runtime"]["processes"] == 1
    for v1, v2 in zip(one["variants"], two["variants"]):
        assert v1["name"] == v2["name"] and len(v2["test_acc"]) == 2
        if v1["features"] in ("x_A", "x_B"):  # jobs that do not depend on g give the same figures on any rank
            assert v1["test_acc"] == pytest.approx(v2["test_acc"], abs=1e-9)


def test_two_process_analysis_writes_one_report(tmp_path, digit_nets):
    """Rank 0 alone writes the report folder (the other ranks keep their pruned nets in a private folder) and prints."""
    a, _ = digit_nets
    argv = ["analyze", "compression", "--model", str(a.path), "--sparsity", "0,0.5", "--finetune-epochs", "1", "--images", "2", "--task", "digits",
            "--device", "cpu", "--g-epochs", "1", "--train-per-class", "20", "--test-per-class", "5", "--out", "report"]  # fmt: skip
    out = _torchrun(*argv, cwd=tmp_path)
    assert out.count("wrote ") == 1
    report = tmp_path / "report"
    assert {"report.json", "report.html", "discarded-0.50.png"} <= {p.name for p in report.iterdir()}
    assert sorted(p.name for p in (report / "nets").iterdir()) == ["pruned-0.00.pt", "pruned-0.50.pt"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "cache") == ["report"]  # no temporary folder left behind


def test_two_process_training(tmp_path):
    _torchrun("train", "--arch", "tiny_vgg", "--task", "digits", "--seed", "0", "--epochs", "2", "--train-per-class", "20", "--device", "cpu", "--out", "a.pt", cwd=tmp_path)
    clf = load_checkpoint(tmp_path / "a.pt")
    info = clf.meta.info
    assert len(info["history"]) == 2 and info["runtime"]["device"] == "cpu"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
