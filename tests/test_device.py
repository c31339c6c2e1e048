"""Devices, AMP and the inference-optimised trunk: CPU results match, errors are clear, CUDA where present."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from refiner.engine.device import Runtime, RuntimeConfig, default_workers, resolve_device
from refiner.engine.features import inference_trunk
from refiner.engine.fitting import FitConfig, fit_isomorphism
from refiner.engine.isomorphism import IsomorphismNet
from refiner.errors import ConfigError
from refiner.models.architectures import create_model
from refiner.models.layers import split_model


def _toy(n: int = 120) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    z = rng.standard_normal((n, 6, 5, 5)).astype(np.float32)
    x_a = np.maximum(z, 0) + 0.3 * z
    return x_a, (2 * x_a[:, rng.permutation(6)] - 1).astype(np.float32)


def test_auto_resolves_to_cpu_without_a_gpu_and_records_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.warns(UserWarning, match="bf16 on the CPU.*AMP pays off on GPUs"):
        record = Runtime.resolve(RuntimeConfig(amp="bf16")).record()
    assert record["device"] == "cpu" and record["amp"] == "bf16" and record["name"]
    assert default_workers(torch.device("cpu")) >= 0


@pytest.mark.parametrize(
    "spec, message",
    [("cuda", "sees no CUDA GPU"), ("cuda:3", "sees no CUDA GPU"), ("tpu", "unknown device 'tpu'"), ("meta", "unsupported device 'meta'")],
)
def test_bad_devices_are_refused_with_the_reason(spec, message, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=message):
        resolve_device(spec)


def test_cli_reports_a_missing_gpu_in_one_line(tmp_path, capsys, monkeypatch):
    from refiner.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code = main(["train", "--arch", "tiny_vgg", "--task", "digits", "--device", "cuda", "--out", str(tmp_path / "a.pt")])
    assert code == 2 and "sees no CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "a.pt").exists()


def test_a_fixed_gpu_is_refused_under_torchrun(tmp_path, capsys, monkeypatch):
    """--device cuda:1 would put every torchrun process on GPU 1: one line, before joining the group, nothing written."""
    from refiner.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    code = main(["train", "--arch", "tiny_vgg", "--task", "digits", "--device", "cuda:1", "--out", str(tmp_path / "a.pt")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "--device cuda:1 under torchrun would put all 2 processes on one GPU; pass --device cuda" in err
    assert list(tmp_path.iterdir()) == []


def test_threads_option_sets_torch_threads():
    before = torch.get_num_threads()
    try:
        Runtime.resolve(RuntimeConfig(device="cpu", threads=1))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.needs_cuda)])
def test_runtime_of_a_module_moves_its_inputs_there_and_results_back(device):
    """Runtime.of(g) is where g computes (no settings touched); to_host brings a result back as NumPy from any device."""
    g = IsomorphismNet((4,), (3,)).eval().to(device)
    runtime = Runtime.of(g)
    assert runtime.device.type == device and runtime.workers == 0
    x = torch.randn(5, 4)
    (moved,) = runtime.to(x)
    (y,) = runtime.to_host(g(moved))
    assert isinstance(y, np.ndarray) and y.shape == (5, 3)
    np.testing.assert_allclose(y, g.cpu()(x).detach().numpy(), rtol=1e-5, atol=1e-6)
    assert Runtime.of(torch.nn.ReLU()).device == torch.device("cpu")  # nothing to ask: the host


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_fitting_runs_and_stays_close_to_fp32(amp):
    """bf16 autocast, and fp16 with a GradScaler, give a g close to the fp32 one on the CPU."""
    x_a, x_b = _toy()
    config = FitConfig(epochs=20, batch_size=16, lr_start=1e-2, lr_end=1e-3)
    _, ref = fit_isomorphism(x_a, x_b, config=config, runtime=Runtime.resolve(RuntimeConfig(device="cpu")))
    _, low = fit_isomorphism(x_a, x_b, config=config, runtime=Runtime.resolve(RuntimeConfig(device="cpu", amp=amp)))
    assert np.isfinite(low.holdout_mse).all()
    assert low.holdout_mse[-1] < 0.3 * low.holdout_mse[0]
    assert abs(low.holdout_mse[-1] - ref.holdout_mse[-1]) < 0.05


@pytest.mark.parametrize("arch", ["tiny_vgg", "tiny_resnet"])
def test_inference_trunk_matches_the_plain_trunk(arch):
    """BatchNorm folded into the convs and channels_last: same features within float tolerance."""
    torch.manual_seed(0)
    model = create_model(arch, 10)
    for m in model.modules():  # non-trivial BatchNorm statistics, so folding has something to fold
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    model.eval()
    trunk, _ = split_model(model, "layer1" if arch == "tiny_resnet" else "features.5")
    fast = inference_trunk(trunk, Runtime.resolve(RuntimeConfig(device="cpu")))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())  # folded
    x = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(fast(x.contiguous(memory_format=torch.channels_last)), trunk(x), rtol=1e-4, atol=1e-5)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in trunk.modules())  # the original is untouched


@pytest.mark.needs_cuda
def test_cuda_fit_matches_cpu():
    x_a, x_b = _toy()
    config = FitConfig(epochs=5, batch_size=16)
    _, cpu = fit_isomorphism(x_a, x_b, config=config, runtime=Runtime.resolve(RuntimeConfig(device="cpu")))
    g, gpu = fit_isomorphism(x_a, x_b, config=config, runtime=Runtime.resolve(RuntimeConfig(device="cuda")))
    assert next(g.parameters()).is_cuda
    np.testing.assert_allclose(gpu.holdout_mse, cpu.holdout_mse, rtol=1e-3)


@pytest.mark.needs_cuda
def test_cuda_training_and_features(tmp_path, digit_nets):
    from refiner.cli import main

    a, b = digit_nets
    code = main(["fit", "--a", str(a.path), "--b", str(b.path), "--task", "digits", "--device", "cuda", "--amp", "bf16", "--g-epochs", "2", "--out", str(tmp_path / "g.pt")])
    assert code == 0
    import json

    report = json.loads((tmp_path / "g.json").read_text())
    assert report["runtime"]["device"].startswith("cuda") and report["runtime"]["amp"] == "bf16"
