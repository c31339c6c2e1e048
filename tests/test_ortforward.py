"""The CKA pass's onnxruntime forward: the same features as torch's captured graph, or torch with one line saying why."""

from __future__ import annotations

import logging

import pytest
import torch

from refiner.engine import ortforward
from refiner.engine.ortforward import OrtForward, choose_forward
from refiner.layermap.stream import capture_model
from refiner.models.architectures import create_model

CPU = torch.device("cpu")


def _choose(model, layers, x, tmp_path, mode="onnxruntime", batches=None):
    captured = capture_model(model, layers, None)
    return captured, choose_forward(captured, layers, x, CPU, mode, tmp_path, "net A", 1, batches)


@pytest.mark.parametrize(
    ("arch", "layers", "size"),
    [
        ("resnet18", ["layer1.0", "layer2.1", "layer4.1"], 64),
        ("vgg11", ["features.0", "features.3"], 32),  # features.0: a conv whose ReLU after it is in place
        ("timm/test_vit", ["blocks.0", "blocks.1"], 160),
    ],
)
def test_onnxruntime_features_equal_torchs(arch, layers, size, tmp_path):
    torch.manual_seed(0)
    model = create_model(arch, 10).eval()
    x = torch.randn(4, 3, size, size)
    captured, forward = _choose(model, layers, x, tmp_path)
    assert isinstance(forward, OrtForward), "onnxruntime was not used"
    with torch.no_grad():
        want = captured(x)
        got = forward(torch.randn(3, 3, size, size).copy_(x[:3]))  # another batch size than the export's
    for name in layers:
        ref = want[name][:3]
        assert got[name].shape == ref.shape
        assert float((got[name] - ref).abs().max()) <= 1e-4 * float(ref.abs().max()), name
    if arch == "vgg11":  # the conv output as the conv produced it: negative values survive the in-place ReLU after it
        assert float(got["features.0"].min()) < 0


def test_a_forward_that_differs_falls_back_to_torch_with_its_line(tmp_path, monkeypatch, caplog):
    real = OrtForward.__call__
    monkeypatch.setattr(OrtForward, "__call__", lambda self, x: {k: v + 1.0 for k, v in real(self, x).items()})
    with caplog.at_level(logging.INFO, logger="refiner"):
        captured, forward = _choose(create_model("tiny_vgg", 4).eval(), ["features.0"], torch.randn(4, 3, 16, 16), tmp_path)
    assert forward is captured
    assert any(r.getMessage().startswith("forward of net A: torch eager (onnxruntime differs from it by") for r in caplog.records)


def test_an_export_that_fails_falls_back_to_torch_with_its_line(tmp_path, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("no exporter for this graph")

    monkeypatch.setattr(torch.onnx, "export", broken)
    with caplog.at_level(logging.INFO, logger="refiner"):
        captured, forward = _choose(create_model("tiny_vgg", 4).eval(), ["features.0"], torch.randn(4, 3, 16, 16), tmp_path)
    assert forward is captured
    assert any("torch eager (onnxruntime could not run it: RuntimeError: no exporter for this graph)" in r.getMessage() for r in caplog.records)


def test_the_export_is_cached_by_weights_layers_and_size(tmp_path, monkeypatch):
    model, x = create_model("tiny_vgg", 4).eval(), torch.randn(4, 3, 16, 16)
    _choose(model, ["features.0"], x, tmp_path)
    assert len(list(tmp_path.glob("captured-*.onnx"))) == 1
    monkeypatch.setattr(torch.onnx, "export", lambda *a, **k: (_ for _ in ()).throw(AssertionError("exported again")))
    assert isinstance(_choose(model, ["features.0"], x, tmp_path)[1], OrtForward)  # read from the cache
    monkeypatch.undo()
    _choose(model, ["features.4"], x, tmp_path)  # other layers: another export
    assert len(list(tmp_path.glob("captured-*.onnx"))) == 2


def test_auto_keeps_torch_for_a_short_pass(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(ortforward, "EXPORT_WORTH_S", 1e9)
    with caplog.at_level(logging.INFO, logger="refiner"):
        captured, forward = _choose(create_model("tiny_vgg", 4).eval(), ["features.0"], torch.randn(4, 3, 16, 16), tmp_path, "auto", 10)
    assert forward is captured and not list(tmp_path.glob("*.onnx"))
    assert any("exporting for onnxruntime would cost more than it saves" in r.getMessage() for r in caplog.records)
