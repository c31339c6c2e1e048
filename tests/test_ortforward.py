"""The onnxruntime forward of frozen nets (the atlas's captured graph, a feature trunk): the same features as torch's,
or torch with one line saying why."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from refiner.engine import ortforward
from refiner.engine.device import Runtime, RuntimeConfig
from refiner.engine.ortforward import OrtForward, choose_forward
from refiner.layermap.stream import capture_model
from refiner.models.architectures import create_model

CPU = torch.device("cpu")


def _runtime(forward: str, amp: str = "off") -> Runtime:
    return Runtime(config=RuntimeConfig(device="cpu", forward=forward, amp=amp), device=CPU, workers=0)  # (Runtime.resolve would set torch's threads)


def _choose(model, layers, x, tmp_path, mode="onnxruntime", batches=None):
    captured = capture_model(model, layers, None)
    return captured, choose_forward(captured, layers, x, _runtime(mode), tmp_path, "net A", batches)


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


def _trunk(model, layer, size):
    from refiner.engine.features import inference_trunk
    from refiner.models.layers import split_model

    return inference_trunk(split_model(model, layer, (3, size, size))[0], _runtime("torch"))


@pytest.mark.parametrize(("arch", "layer", "size"), [("resnet18", "layer3", 64), ("vgg11", "features.3", 32), ("timm/test_vit", "blocks.1", 160)])
def test_a_trunks_onnxruntime_features_equal_torchs(arch, layer, size, tmp_path):
    """Feature extraction's forward (fit, build, analyze): a trunk cut at a layer, BN folded, channels_last."""
    torch.manual_seed(0)
    trunk, x = _trunk(create_model(arch, 10).eval(), layer, size), torch.randn(4, 3, size, size)
    run = ortforward.trunk_forward(trunk, x, _runtime("onnxruntime"), tmp_path, "A's trunk")
    assert run is not trunk, "onnxruntime was not used"
    with torch.no_grad():
        want, got = trunk(x[:3]), run(x[:3])
    assert got.shape == want.shape and float((got - want).abs().max()) <= 1e-4 * float(want.abs().max())


def test_two_cuts_with_the_same_weights_are_two_exports(tmp_path):
    """features.1 (BN) and features.2 (its in-place ReLU) hold the same weights: the export key is also the graph's."""
    model, x = create_model("tiny_vgg", 4).eval(), torch.randn(4, 3, 16, 16)
    bn, relu = (ortforward.trunk_forward(_trunk(model, layer, 16), x, _runtime("onnxruntime"), tmp_path, "A") for layer in ("features.1", "features.2"))
    assert len(list(tmp_path.glob("captured-*.onnx"))) == 2
    assert float(bn(x).min()) < 0 and float(relu(x).min()) >= 0


def test_amp_keeps_torch_with_its_line(tmp_path, caplog):
    trunk = _trunk(create_model("tiny_vgg", 4).eval(), "features.4", 16)
    with caplog.at_level(logging.INFO, logger="refiner"):
        assert ortforward.trunk_forward(trunk, torch.randn(4, 3, 16, 16), _runtime("onnxruntime", amp="bf16"), tmp_path, "A's trunk") is trunk
    assert any("torch (--amp bf16 asked for" in r.getMessage() for r in caplog.records)


def test_the_feature_cache_is_the_same_through_either_forward(digit_nets, tmp_path, caplog):
    """A task's cached features (what fit, build and analyze read) through onnxruntime equal torch's; one export serves
    every split of a trunk."""
    from refiner.data.tasks import SplitOptions, load_task
    from refiner.engine.features import classifier_features

    clf, _ = digit_nets
    data = load_task("digits", None, target=False, options=SplitOptions(train_per_class=10))
    with caplog.at_level(logging.INFO, logger="refiner"):
        got = {s: classifier_features(clf, "features.4", data, s, tmp_path / "ort", runtime=_runtime("onnxruntime")) for s in ("train", "test")}
    want = {s: classifier_features(clf, "features.4", data, s, tmp_path / "torch", runtime=_runtime("torch")) for s in ("train", "test")}
    for split in ("train", "test"):
        np.testing.assert_allclose(got[split].x, want[split].x, rtol=0, atol=1e-4 * float(np.abs(want[split].x).max()))
        np.testing.assert_array_equal(got[split].y, want[split].y)
    assert len(list((tmp_path / "ort" / "onnx").glob("captured-*.onnx"))) == 1
    assert sum("forward of a.pt:features.4 train: onnxruntime (as asked" in r.getMessage() for r in caplog.records) == 1
