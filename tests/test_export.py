"""Refined checkpoints, `refiner export` (refined.pt or an (A, g, B) triple), fp16 and INT8 artifacts."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from refiner.refine.config import BuildConfig
from refiner.refine.publish import ExportOptions
from refiner.refine.quantize import QuantizationError, check_quantized
from refiner.refine.refined import load_refined
from refiner.cli import main
from refiner.data.datasets import stack_images
from refiner.data.tasks import load_task
from refiner.engine.comparison import CompareConfig
from refiner.engine.finetune import HeadConfig
from refiner.engine.fitting import FitConfig
from refiner.errors import CheckpointError
from refiner.models.layers import split_model
from serving.artifact import read_artifact


def _images(pre, n=12):
    data = load_task("digits", None, target=True)
    return stack_images(data.test, data.classes, pre, n)[0]


def _onnx_logits(folder, x):
    return ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]


def test_refined_checkpoint_rebuilds_the_exported_model_exactly(tiny_build, digit_nets):
    model, spec = load_refined(tiny_build.path / "refined.pt")
    x = _images(spec.preprocess)
    with torch.inference_mode():
        assert torch.equal(model(x), tiny_build.model(x))
    np.testing.assert_allclose(_onnx_logits(tiny_build.path, x), model(x).numpy(), atol=1e-4)
    assert spec.class_names == list("012345") and spec.head == "new" and spec.info["a"]["sha256"] == tiny_build.report.comparison.a.sha256
    with pytest.raises(CheckpointError, match="is not a refined checkpoint written by `refiner build`"):
        load_refined(digit_nets[0].path)  # a base net's checkpoint


def _test_split(pre):
    """Every test image of the build's task and its target-class index (what an INT8 export is scored on)."""
    data = load_task("digits", None, target=True)
    images, labels = stack_images(data.test, data.classes, pre, len(data.test))
    return images, labels.numpy()


def test_export_int8_is_calibrated_scored_recorded_and_servable(tiny_build, tmp_path, capsys):
    """Within --max-int8-drop the INT8 model is written, with figures recomputed here from both ONNX files."""
    argv = ["export", "--refined", str(tiny_build.path / "refined.pt"), "--name", "q", "--models", str(tmp_path), "--task", "digits",
            "--quantize", "int8", "--max-int8-drop", "10"]  # fmt: skip
    assert main(argv) == 0
    assert "INT8 (calibrated on" in capsys.readouterr().out
    folder = tmp_path / "q" / "1"
    meta = json.loads((folder / "metadata.json").read_text())
    q = meta["quantization"]
    assert meta["precision"] == "int8" and q["calibration_images"] > 16 and q["max_drop_points"] == 10
    ops = {n.op_type for n in onnx.load(folder / "model.onnx").graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert read_artifact(tmp_path, "q", 1).meta.input.datatype == "FP32"  # the server accepts it as any other
    x, labels = _test_split(load_refined(folder / "refined.pt")[1].preprocess)
    fp32, int8 = _onnx_logits(tiny_build.path, x).argmax(1), _onnx_logits(folder, x).argmax(1)
    assert q["test_images"] == len(labels) > 100
    assert q["top1_agreement"] == pytest.approx((fp32 == int8).mean(), abs=1e-12) and (fp32 == int8).mean() >= 0.9
    assert q["accuracy_fp32"] == pytest.approx((fp32 == labels).mean(), abs=1e-12)
    assert q["accuracy_int8"] == pytest.approx((int8 == labels).mean(), abs=1e-12)
    assert q["accuracy_drop_points"] == pytest.approx(100 * ((fp32 == labels).mean() - (int8 == labels).mean()), abs=1e-9)


def test_export_int8_gate_refuses_a_larger_drop_and_writes_nothing(tiny_build, tmp_path, monkeypatch, capsys):
    """An "INT8" model that always answers the first class loses a known number of points: past the limit, refused."""
    from refiner.refine.export import export_onnx

    constant = tmp_path / "constant.onnx"
    linear = torch.nn.Linear(3 * 16 * 16, 6)
    with torch.no_grad():
        linear.weight.zero_()
        linear.bias.copy_(torch.tensor([1.0, 0, 0, 0, 0, 0]))
    export_onnx(torch.nn.Sequential(torch.nn.Flatten(), linear), (3, 16, 16), constant)
    monkeypatch.setattr("refiner.refine.publish.quantize_int8", lambda fp32, out, calibration: out.write_bytes(constant.read_bytes()))
    x, labels = _test_split(load_refined(tiny_build.path / "refined.pt")[1].preprocess)
    drop = 100 * ((_onnx_logits(tiny_build.path, x).argmax(1) == labels).mean() - (labels == 0).mean())
    assert drop > 20
    models = tmp_path / "m"
    argv = ["export", "--refined", str(tiny_build.path / "refined.pt"), "--name", "q", "--models", str(models), "--task", "digits", "--quantize", "int8"]
    below, above = math.floor(drop) - 1, math.ceil(drop) + 1
    assert main([*argv, "--max-int8-drop", str(below)]) == 2
    err = capsys.readouterr().err
    assert f"INT8 quantisation loses {drop:.2f} points of test accuracy" in err and f"at most {below} allowed" in err
    assert not models.exists() or not any(models.iterdir())  # no version, no model folder
    assert main([*argv, "--max-int8-drop", str(above), "--quiet"]) == 0
    q = json.loads((models / "q" / "1" / "metadata.json").read_text())["quantization"]
    assert q["accuracy_drop_points"] == pytest.approx(drop) and q["accuracy_int8"] == pytest.approx((labels == 0).mean())
    assert sorted(p.name for p in (models / "q").iterdir()) == ["1", "config.pbtxt", "labels.txt"]


def test_int8_past_the_tolerance_is_refused(tiny_build, tmp_path, digit_nets):
    """check_quantized scores against the labels: a model that disagrees with the fp32 one loses accuracy and is refused."""
    x = _images(digit_nets[0].meta.preprocess, 40).numpy()
    right = _onnx_logits(tiny_build.path, torch.from_numpy(x)).argmax(1)  # labels the fp32 model gets all right
    other = tmp_path / "other.onnx"
    from refiner.refine.export import export_onnx

    torch.manual_seed(5)
    export_onnx(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 6)), (3, 16, 16), other)
    with pytest.raises(QuantizationError, match=r"loses .* points of test accuracy \(100.00 -> .*; at most 1 allowed"):
        check_quantized(tiny_build.path / "model.onnx", other, x, right, calibrated_on=8, max_drop=1.0)
    assert check_quantized(tiny_build.path / "model.onnx", tiny_build.path / "model.onnx", x, right, 8, 1.0).top1_agreement == 1.0


def test_export_fp16_keeps_a_float32_interface(tiny_build, tmp_path):
    assert main(["export", "--refined", str(tiny_build.path / "refined.pt"), "--name", "h", "--models", str(tmp_path), "--fp16", "--quiet"]) == 0
    folder = tmp_path / "h" / "1"
    meta = json.loads((folder / "metadata.json").read_text())
    assert meta["precision"] == "fp16" and meta["export_check"]["precision"] == "fp16"
    graph = onnx.load(folder / "model.onnx").graph
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT == graph.output[0].type.tensor_type.elem_type
    assert any(init.data_type == onnx.TensorProto.FLOAT16 for init in graph.initializer)
    x = _images(load_refined(folder / "refined.pt")[1].preprocess)
    expected = tiny_build.model(x).detach().numpy()
    assert np.abs(_onnx_logits(folder, x) - expected).max() <= 1e-2 * np.abs(expected).max()


def test_export_a_triple_equals_trunk_g_head_and_checks_provenance(digit_nets, tmp_path, capsys):
    a, b = digit_nets
    g_file = tmp_path / "g.pt"
    assert main(["fit", "--a", str(a.path), "--b", str(b.path), "--task", "digits", "--g-epochs", "1", "--out", str(g_file), "--quiet"]) == 0
    argv = ["export", "--a", str(a.path), "--b", str(b.path), "--g", str(g_file), "--name", "t", "--models", str(tmp_path / "m"),
            "--task", "digits", "--classes", "3,1", "--opset", "18", "--json"]  # fmt: skip
    assert main(argv) == 0
    meta = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert meta["class_names"] == ["3", "1"] and meta["precision"] == "fp32" and meta["refined"]["a"]["sha256"] == a.sha256
    assert onnx.load(tmp_path / "m" / "t" / "1" / "model.onnx").opset_import[0].version == 18
    from refiner.engine.isomorphism import load_isomorphism

    g, info = load_isomorphism(g_file)
    layer_a, layer_b = info["report"]["a"]["layer"], info["report"]["b"]["layer"]
    x = _images(a.meta.preprocess)
    trunk, _ = split_model(a.model, layer_a)
    _, head = split_model(b.model, layer_b)
    with torch.inference_mode():
        expected = head(g(trunk(x)))[:, [b.meta.class_names.index("3"), b.meta.class_names.index("1")]].numpy()
    np.testing.assert_allclose(_onnx_logits(tmp_path / "m" / "t" / "1", x), expected, atol=1e-4)
    swapped = ["export", "--a", str(b.path), "--b", str(a.path), "--g", str(g_file), "--name", "t", "--models", str(tmp_path / "m")]
    assert main(swapped) == 2
    assert "was fitted with net A" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "m" / "t").iterdir()) == ["1", "config.pbtxt", "labels.txt"]  # nothing more written


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "give either --refined FILE, or all of --a, --b and --g"),
        (["--refined", "r.pt", "--a", "a.pt"], "give either --refined FILE, or all of --a, --b and --g"),
        (["--refined", "REFINED", "--classes", "1,2"], "--classes applies to --a/--b/--g"),
        (["--refined", "REFINED", "--fp16", "--quantize", "int8", "--task", "digits"], "--fp16 and --quantize int8 are two different precisions"),
        (["--refined", "REFINED", "--quantize", "int8"], "--quantize int8 is scored on test images: give the task"),
        (["--refined", "REFINED", "--opset", "11"], "--opset must be between 18"),
    ],
)
def test_export_refuses_bad_combinations_with_one_line(tiny_build, tmp_path, capsys, extra, message):
    argv = ["export", "--name", "x", "--models", str(tmp_path), *[str(tiny_build.path / "refined.pt") if e == "REFINED" else e for e in extra]]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") <= 3
    assert not (tmp_path / "x").exists()


def test_build_quantize_int8_records_the_check(digit_nets, tmp_path):
    from refiner.refine.pipeline import build

    config = BuildConfig(
        name="q", compare=CompareConfig(fit=FitConfig(epochs=1)), head=HeadConfig(epochs=1), seeds=1, ablations=False,
        export=ExportOptions(quantize="int8", max_int8_drop=100),
    )  # fmt: skip
    result = build(*digit_nets, "digits", None, config, models=tmp_path)
    meta = json.loads((result.path / "metadata.json").read_text())
    assert meta["precision"] == "int8" and result.report.quantization.test_images == meta["quantization"]["test_images"]
    assert "INT8 (calibrated on" in result.summary()


def test_bad_numbers_and_classes_are_one_line_errors(digit_nets, tmp_path, capsys):
    a, b = digit_nets
    fit = ["fit", "--a", str(a.path), "--b", str(b.path), "--task", "digits", "--g-epochs", "1", "--out", str(tmp_path / "g.pt"), "--quiet"]
    for extra, message in (  # --quiet: no line saying the preprocessing (issue 17), only the error
        (["--img-size", "0"], "--img-size must be a positive number of pixels, got 0"),
        (["--std", "0", "1", "1"], "--std must be three finite numbers above 0"),
        (["--mean", "nan", "0", "0"], "--mean must be three finite numbers"),
        (["--img-size", "1"], "SmallVGG cannot take 1x1 inputs"),
        (["--classes", "0,0,1"], "--classes names ['0'] more than once"),
        (["--classes", "0,,1"], "has an empty entry"),
    ):
        assert main([*fit, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "g.pt").exists()


def test_export_checks_opset_drop_and_the_preprocessing_g_was_fitted_with(digit_nets, tiny_build, tmp_path, capsys):
    import onnx as onnx_lib

    refined = ["export", "--refined", str(tiny_build.path / "refined.pt"), "--models", str(tmp_path / "m")]
    newest = onnx_lib.defs.onnx_opset_version()
    for extra, message in (
        (["--name", "o", "--opset", str(newest + 1)], f"--opset must be between 18 (the lowest torch's ONNX exporter writes) and {newest}"),
        (["--name", "d", "--max-int8-drop", "0.5"], "--max-int8-drop applies to --quantize int8 only"),
        (["--name", "d", "--quantize", "int8", "--task", "digits", "--max-int8-drop", "-1"], "--max-int8-drop must be a number of accuracy points >= 0"),
    ):
        assert main([*refined, *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "m").exists() or not any((tmp_path / "m").iterdir())  # no empty model folder either
    a, b = digit_nets
    g = tmp_path / "g.pt"
    assert main(["fit", "--a", str(a.path), "--b", str(b.path), "--task", "digits", "--g-epochs", "1", "--out", str(g), "--quiet", "--mean", "0.1", "0.1", "0.1"]) == 0
    triple = ["export", "--a", str(a.path), "--b", str(b.path), "--g", str(g), "--name", "t", "--models", str(tmp_path / "m")]
    assert main([*triple, "--quiet"]) == 0  # fed as g.pt recorded, without repeating --mean (issue 17)
    assert json.loads((tmp_path / "m" / "t" / "1" / "metadata.json").read_text())["preprocess"]["mean"] == [0.1, 0.1, 0.1]
    with pytest.warns(UserWarning, match=r"g.pt was fitted on A's images preprocessed with \{'mean': \(0.1, 0.1, 0.1\)\}, exported with \{'mean': \(0.3, 0.3, 0.3\)\}"):
        assert main([*triple, "--mean", "0.3", "0.3", "0.3", "--quiet"]) == 0
