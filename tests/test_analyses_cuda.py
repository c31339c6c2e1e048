"""`refiner analyze` on a CUDA GPU (cached features on the host, g on the device), and the host/device rule checked on any machine."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

import refiner.analyses
from refiner.cli import main

QUICK = ["--task", "digits", "--device", "cuda", "--g-epochs", "1", "--train-per-class", "20", "--test-per-class", "5", "--quiet"]


def _args(analysis: str, a: Path, b: Path) -> list[str]:
    return {
        "diagnose": ["--weak", str(a), "--strong", str(b), "--images", "2"],
        "stability": ["--models", str(a), str(b)],
        "compression": ["--model", str(a), "--sparsity", "0,0.5", "--finetune-epochs", "1", "--images", "2"],
        "distillation": ["--model", str(a), "--generations", "1", "--epochs", "1"],
    }[analysis]


@pytest.mark.needs_cuda
@pytest.mark.parametrize("analysis", ["diagnose", "stability", "compression", "distillation"])
def test_analysis_runs_on_the_gpu(analysis, digit_nets, tmp_path):
    a, b = digit_nets
    out = tmp_path / analysis
    assert main(["analyze", analysis, *_args(analysis, a.path, b.path), *QUICK, "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["runtime"]["device"] == "cuda:0"
    if analysis in ("diagnose", "compression"):  # the pictures: g on the GPU, features read from the host cache
        assert list(out.glob("*.png"))


def test_analyses_move_tensors_only_through_the_runtime():
    """`.numpy()`, `.cpu()` and `.cuda()` in refiner/analyses would bypass Runtime.to / Runtime.to_host (and fail on a GPU tensor)."""
    found = []
    for path in sorted(Path(refiner.analyses.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("numpy", "cpu", "cuda"):
                found.append(f"{path.name}:{node.lineno} .{node.func.attr}()")
    assert found == []
