"""`refiner build`: composition, ONNX parity, artifact layout, atomicity, and bad inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from refiner.refine.config import BuildConfig
from refiner.refine.pipeline import build
from refiner.data.datasets import ImageDataset, stack_images
from refiner.data.tasks import load_task
from refiner.engine.comparison import CompareConfig
from refiner.engine.finetune import HeadConfig
from refiner.engine.fitting import FitConfig
from refiner.errors import CheckpointError, ConfigError, DataError
from refiner.models.checkpoints import file_sha256
from refiner.models.layers import split_model

FAST = dict(compare=CompareConfig(fit=FitConfig(epochs=1)), head=HeadConfig(epochs=1), seeds=1, ablations=False)


def _val_images(clf, n=7):
    data = load_task("digits", None, target=True)
    ds = ImageDataset(data.val[:n], data.classes, clf.meta.preprocess)
    return torch.stack([ds[i][0] for i in range(len(ds))])


def _split_images(clf, split):
    """Every image of a split of the build's task, in split order, with their target-class indices."""
    data = load_task("digits", None, target=True)
    return stack_images(data.split(split), data.classes, clf.meta.preprocess, len(data.split(split)))


def test_refined_model_is_trunk_g_head(tiny_build, digit_nets):
    """The exported model is A's trunk -> the build's g -> the head of the run the build exported, the best on validation.

    Assembled here from A's and B's checkpoints and refined.pt's weights; that g reproduces the report's Var table on
    the test images, and that head reproduces, image by image, the exported run's row of predictions.npz.
    """
    from refiner.refine.predictions import load_predictions
    from refiner.refine.refined import replace_classifier
    from refiner.engine.isomorphism import IsomorphismNet
    from refiner.engine.metrics import measure_isomorphism

    a, b = digit_nets
    model, report = tiny_build.model, tiny_build.report
    saved = torch.load(tiny_build.path / "refined.pt", weights_only=True)["state_dict"]

    def part(prefix):
        return {k.removeprefix(prefix): v for k, v in saved.items() if k.startswith(prefix)}

    trunk, _ = split_model(a.model, report.comparison.a.layer)
    assert trunk.state_dict().keys() == part("trunk.").keys()
    assert all(torch.equal(v, part("trunk.")[k]) for k, v in trunk.state_dict().items())  # A's own trunk, unchanged
    g = IsomorphismNet(tuple(report.comparison.a.feature_shape), tuple(report.comparison.b.feature_shape), report.comparison.g)
    g.load_state_dict(part("g."))
    trunk_b, upper_b = split_model(b.model, report.comparison.b.layer)
    head = replace_classifier(upper_b, b.meta.arch, len(report.classes))
    head.load_state_dict(part("head."))
    (val, _), (test, _) = _split_images(a, "val"), _split_images(a, "test")
    with torch.no_grad():
        assembled = head.eval()(g.eval()(trunk(val)))
        np.testing.assert_allclose(model(val).numpy(), assembled.numpy(), atol=1e-5)
        assert torch.allclose(model.forward_features(val), g(trunk(val)), atol=1e-6)
        table = measure_isomorphism(g, [(trunk(test), trunk_b(_split_images(b, "test")[0]))])
        predicted = {"val": model(val).argmax(1).numpy(), "test": model(test).argmax(1).numpy()}
        fresh = replace_classifier(upper_b, b.meta.arch, len(report.classes)).eval()(g(trunk(val)))
    assert not any(p.requires_grad for p in model.parameters())
    # g is the one the build measured
    built = report.comparison.tables["test"]
    assert table.images == built.images
    for key in ("var_output", "var_delta", "instability"):
        assert getattr(table, key) == pytest.approx(getattr(built, key), rel=1e-4), key
    # the head is the exported run's, and that run has the most validation images right
    refined = next(v for v in report.variants if v.features == "g(x_A)")
    _, predictions = load_predictions(tiny_build.path / "predictions.npz")
    runs = predictions["g(x_A)"]["runs"].tolist()
    exported = runs.index([report.exported_run["g_fit"], report.exported_run["seed"]])
    assert refined.val_correct[exported] == max(refined.val_correct)
    for split, got in predicted.items():
        np.testing.assert_array_equal(got, predictions["g(x_A)"][split][exported], err_msg=split)
    # and the comparison can tell heads apart: another classifier on the same g(x_A) answers otherwise
    assert not torch.allclose(fresh, assembled, atol=1e-2)


def test_onnx_matches_pytorch(tiny_build, digit_nets):
    import onnxruntime as ort

    x = _val_images(digit_nets[0], 9)  # export used batch 2: this exercises the dynamic axis
    session = ort.InferenceSession(str(tiny_build.path / "model.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"input": x.numpy()})
    with torch.no_grad():
        expected = tiny_build.model(x).numpy()
    assert np.abs(got - expected).max() < 1e-4
    assert (got.argmax(1) == expected.argmax(1)).all()


def test_artifact_layout_and_metadata(tiny_build, digit_nets):
    folder = tiny_build.path
    model_dir = folder.parent
    assert folder.name == "1"
    assert sorted(p.name for p in folder.iterdir()) == [
        "accuracy.png", "fit.png", "metadata.json", "model.onnx", "predictions.npz", "refined.pt", "report.html", "report.json", "variance.png",
    ]  # fmt: skip
    assert sorted(p.name for p in model_dir.iterdir()) == ["1", "config.pbtxt", "labels.txt"]
    meta = json.loads((folder / "metadata.json").read_text())
    a, b = digit_nets
    assert meta["onnx_sha256"] == file_sha256(folder / "model.onnx")
    assert meta["class_names"] == list("012345")
    assert meta["input"] == {"name": "input", "datatype": "FP32", "shape": [3, 16, 16]}
    assert meta["output"]["shape"] == [6]
    assert meta["preprocess"]["mean"] == list(a.meta.preprocess.mean)
    assert meta["refined"]["a"]["sha256"] == a.sha256 and meta["refined"]["b"]["sha256"] == b.sha256
    assert meta["refined"]["orders"] == 2 and meta["refined"]["lambda"] == 0.1
    report = json.loads((folder / "report.json").read_text())
    names = [v["name"] for v in report["variants"]]
    assert names[:3] == ["features from A", "features from B (no Δ removal)", "refined: g(x_A) (x^Δ removed)"]
    assert names[3:] == ["control: x_B minus another image's x^Δ", "ablation: x^(0)", "ablation: x^(0) + x^(1)"]
    test_table = report["comparison"]["tables"]["test"]
    assert len(test_table["var_orders"]) == 3 and 0 <= test_table["instability"]
    assert set(report["comparison"]["tables"]) == {"val", "test"}
    assert report["runtime"]["device"] == "cpu" and report["runtime"]["amp"] == "off" and report["runtime"]["name"]
    assert report["comparison"]["fit"]["stop"] == "epochs" and len(report["comparison"]["fit"]["steps"]) == 3
    assert report["comparison"]["fit"]["seed"] == report["g_fits"][0]["seed"] == 0
    assert report["seed_varies"].startswith("the new target classifier's initialisation")  # sound protocol: a new classifier
    page = (folder / "report.html").read_text()
    assert "<table>" in page and "fit.png" in page
    assert report["comparison"]["val_from"] == "train"  # digits carve validation from train/, which the base nets saw
    assert "Validation: carved from the training data, which base nets trained on this task have seen" in page and "--val-from test" in page
    assert (model_dir / "labels.txt").read_text().split() == list("012345")


def test_each_validation_source_says_whether_base_nets_saw_it():
    from refiner.data.tasks import SplitOptions, load_task

    lines = {v: load_task("digits", target=True, options=SplitOptions(val_from=v)).validation_line() for v in ("train", "test")}
    assert lines["train"].startswith("validation: carved from the training data, which base nets trained on this task have seen")
    assert "--val-from test" in lines["train"]
    assert lines["test"] == "validation: a seeded half of the test split (unseen by the base nets; the other half is scored)"


def test_config_pbtxt_is_a_valid_triton_config(tiny_build):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    config = text_format.Parse((tiny_build.path.parent / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert config.name == "digits-tiny" and config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 32
    assert [i.name for i in config.input] == ["input"] and list(config.input[0].dims) == [3, 16, 16]
    assert config.input[0].data_type == model_config_pb2.TYPE_FP32
    assert [o.name for o in config.output] == ["logits"] and list(config.output[0].dims) == [6]
    assert config.dynamic_batching.max_queue_delay_microseconds > 0


def test_versions_increase_and_failures_leave_nothing(tmp_path, digit_nets, monkeypatch):
    models = tmp_path / "models"
    first = build(*digit_nets, "digits", None, BuildConfig(name="m", **FAST), models=models)
    assert first.path.name == "1"

    def broken(*args, **kwargs):
        raise RuntimeError("injected failure during export validation")

    monkeypatch.setattr("refiner.refine.publish.validate_onnx", broken)
    with pytest.raises(RuntimeError, match="injected"):
        build(*digit_nets, "digits", None, BuildConfig(name="m", **FAST), models=models)
    assert sorted(p.name for p in (models / "m").iterdir()) == ["1", "config.pbtxt", "labels.txt"]
    monkeypatch.undo()
    second = build(*digit_nets, "digits", None, BuildConfig(name="m", **FAST), models=models)
    assert second.path.name == "2"


def test_bad_inputs(tmp_path, digit_nets):
    a, b = digit_nets
    config = BuildConfig(name="m", **FAST)
    with pytest.raises(ConfigError, match="unknown task 'digitz'"):
        build(a, b, "digitz", None, config, models=tmp_path / "models")
    with pytest.raises(DataError, match=r"classes \['11'\] are not in"):
        build(a, b, "digits", None, config, models=tmp_path / "models", classes=["1", "11"])
    with pytest.raises(CheckpointError, match="was trained on task 'digits'"):
        build(a, b, "cifar10", None, config, models=tmp_path / "models")
    vector = BuildConfig(name="m", **{**FAST, "compare": CompareConfig(layer_a="classifier.1", fit=FitConfig(epochs=1))})
    with pytest.raises(ConfigError, match="both must be feature maps or both vectors"):
        build(a, b, "digits", None, vector, models=tmp_path / "models")
    with pytest.raises(ConfigError, match="model name"):
        build(a, b, "digits", None, BuildConfig(name="../evil", **FAST), models=tmp_path / "models")
    assert not (tmp_path / "models").exists()


def test_one_decomposition_pass_gives_the_order_sums_and_the_var_table(tmp_path):
    """The build derives x^(0..m) sums and the Var table in one pass; both equal the separate computations."""
    from refiner.refine.pipeline import _derive
    from refiner.engine.features import FeatureSet, iter_batches
    from refiner.engine.fitting import fit_isomorphism
    from refiner.engine.metrics import measure_isomorphism

    rng = np.random.default_rng(0)
    x_a = rng.standard_normal((300, 4, 5, 5)).astype(np.float32)
    x_b = np.tanh(x_a[:, ::-1] * 2).astype(np.float32)
    fa, fb = FeatureSet(x_a, np.zeros(300, dtype=np.int64)), FeatureSet(x_b, np.zeros(300, dtype=np.int64))
    g, _ = fit_isomorphism(x_a, x_b, config=FitConfig(epochs=2))
    sums, table = _derive(g, fa, fb, [0, 1, 2], tmp_path / "all", measure=True)
    separate = measure_isomorphism(g, iter_batches(x_a, x_b, batch_size=64)).model_dump()
    for key, value in table.model_dump().items():
        assert value == pytest.approx(separate[key], rel=1e-6), key
    with torch.no_grad():
        comps = g.decompose(torch.from_numpy(x_a)).components
        np.testing.assert_allclose(sums[0], g.unstandardize(comps[0]).numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(sums[1], g.unstandardize(comps[0] + comps[1]).numpy(), rtol=1e-4, atol=1e-5)
        full = g(torch.from_numpy(x_a)).numpy()
    np.testing.assert_allclose(sums[2], full, rtol=1e-4, atol=1e-5)
    plain, none = _derive(g, fa, fb, [2], tmp_path / "plain", measure=False)  # --no-ablations on train: forward only
    assert none is None
    np.testing.assert_allclose(plain[2], full, rtol=1e-4, atol=1e-5)
