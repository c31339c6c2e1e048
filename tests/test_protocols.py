"""The build's two protocols, its Delta-shuffle control, finer scores and paired tests over seeds."""

from __future__ import annotations

import json
import re
from html import escape as html_escape

import numpy as np
import pytest
import torch
from torch import nn

from refiner.refine.config import BuildConfig, default_head
from refiner.refine.pipeline import _shuffled_delta, build, derangement
from refiner.engine.comparison import CompareConfig
from refiner.engine.device import Runtime
from refiner.engine.finetune import HeadConfig, score_head
from refiner.engine.fitting import FitConfig
from refiner.errors import CheckpointError, ConfigError
from refiner.models.checkpoints import Classifier
from refiner.models.layers import split_model

FAST = dict(compare=CompareConfig(fit=FitConfig(epochs=1)), seeds=2, ablations=False)


@pytest.fixture(scope="module")
def paper_build(tmp_path_factory, digit_nets):
    config = BuildConfig(name="paper", protocol="paper", head=HeadConfig(epochs=2, lr=1e-4, lr_end=1e-6), **FAST)
    return build(*digit_nets, "digits", None, config, models=tmp_path_factory.mktemp("models"), cache_dir=tmp_path_factory.mktemp("cache"))


def _reordered(clf: Classifier, order: list[int]) -> Classifier:
    """The same net with its outputs in another order: output j answers class_names[order[j]]."""
    import copy

    from refiner.models.architectures import get_arch

    model = copy.deepcopy(clf.model)
    last = model.get_submodule(get_arch(clf.meta.arch).classifier)
    with torch.no_grad():
        last.weight.copy_(last.weight[order])
        last.bias.copy_(last.bias[order])
    names = [clf.meta.class_names[i] for i in order]
    return Classifier(model=model, meta=clf.meta.model_copy(update={"class_names": names}), path=clf.path, sha256=clf.sha256)


@pytest.fixture(scope="module")
def reordered_nets(digit_nets):
    """A and B answering in two different orders, so that no class name is its output index."""
    a, b = digit_nets
    return _reordered(a, [9, 0, 8, 1, 7, 2, 6, 3, 5, 4]), _reordered(b, [4, 7, 1, 9, 3, 0, 8, 5, 2, 6])


@pytest.fixture(scope="module")
def reordered_paper_build(tmp_path_factory, reordered_nets):
    config = BuildConfig(name="paper", protocol="paper", head=HeadConfig(epochs=2, lr=1e-4, lr_end=1e-6), **FAST)
    return build(*reordered_nets, "digits", None, config, models=tmp_path_factory.mktemp("models"), cache_dir=tmp_path_factory.mktemp("cache"))


def _accuracy_by_name(logits: torch.Tensor, names: list[str], labels: list[str]) -> float:
    """Share of images whose highest-scoring class name, among the labels' classes, is their label."""
    classes = sorted(set(labels))
    picked = logits[:, [names.index(c) for c in classes]].argmax(1)
    return float(np.mean([classes[i] == label for i, label in zip(picked.tolist(), labels)]))


def test_paper_protocol_keeps_b_classifier_and_exports_target_outputs(reordered_paper_build, reordered_nets):
    """The refined head is B's whole upper part (10 base outputs) with the 6 target columns picked by name.

    A and B answer in two different orders, so a mapping by output index picks other classes' columns.
    """
    from refiner.data.datasets import stack_images
    from refiner.data.tasks import load_task

    a, b = reordered_nets
    model = reordered_paper_build.model
    base_head, select = model.head[0], model.head[1]
    target = [b.meta.class_names.index(c) for c in "012345"]
    assert target != list(range(6)) and select.indices.tolist() == target
    # the kept classifier is B's, fine-tuned from its weights (not a fresh layer): same shape, moved only a little
    _, b_head = split_model(b.model, reordered_paper_build.report.comparison.b.layer)
    old, new = b_head.state_dict()["classifier.4.weight"], base_head.state_dict()["classifier.4.weight"]
    assert old.shape == new.shape and (new - old).abs().max() < 0.05
    # scored by name on the test images: the kept head on B's own features is as right as B itself
    data = load_task("digits", None, target=True)
    images, labels = stack_images(data.test, data.classes, b.meta.preprocess, len(data.test))
    names = [data.classes[i] for i in labels.tolist()]
    b_trunk, _ = split_model(b.model, reordered_paper_build.report.comparison.b.layer)
    with torch.no_grad():
        own_b = _accuracy_by_name(b.model(images), b.meta.class_names, names)
        kept = _accuracy_by_name(model.head(b_trunk(images)), list("012345"), names)
        exported = _accuracy_by_name(model(images), list("012345"), names)
        own_a = _accuracy_by_name(a.model(stack_images(data.test, data.classes, a.meta.preprocess, len(data.test))[0]), a.meta.class_names, names)
    assert own_b > 0.8 and kept >= own_b - 0.05
    # the report's figures were scored with labels mapped by name too, and the exported head is one of its runs
    variants = {v.features: v for v in reordered_paper_build.report.variants}
    assert np.mean(variants["x_B"].test_acc_target) >= own_b - 0.05 and np.mean(variants["x_A"].test_acc_target) >= own_a - 0.1
    assert exported > 0.5 and any(exported == pytest.approx(acc, abs=1e-9) for acc in variants["g(x_A)"].test_acc_target)


def test_paper_refined_checkpoint_rebuilds_the_kept_head(paper_build):
    from refiner.refine.refined import load_refined

    model, spec = load_refined(paper_build.path / "refined.pt")
    assert spec.head == "kept" and spec.indices == paper_build.model.head[1].indices.tolist()
    x = torch.randn(3, *spec.preprocess.input_size)
    with torch.no_grad():
        assert torch.equal(model(x), paper_build.model(x))


def test_paper_report_has_optimistic_and_last_epoch_figures(paper_build):
    report = json.loads((paper_build.path / "report.json").read_text())
    assert report["config"]["protocol"] == "paper"
    assert report["config"]["head"] == {"epochs": 2, "lr": 1e-4, "lr_end": 1e-6, "weight_decay": 1e-4, "batch_size": 64}
    for v in report["variants"]:
        assert len(v["best_test_acc"]) == 2 and len(v["last_acc"]) == 2
        # the best test accuracy over epochs can only be at least the validation-chosen epoch's
        assert all(best >= chosen - 1e-12 for best, chosen in zip(v["best_test_acc"], v["test_acc"]))
        # restricting the argmax to the target columns can only help: the label is one of them
        assert all(t >= f - 1e-12 for t, f in zip(v["test_acc_target"], v["test_acc"]))
    metrics = {(p["baseline"], p["metric"]) for p in report["paired"]}
    assert metrics == {(v, m) for v in ("x_A", "x_B", "x_B - shuffled x^Δ") for m in ("acc", "acc_target")}
    assert [p["primary"] for p in report["paired"] if p["primary"]] == [True]
    assert all(p["bootstrap"]["resamples"] >= 10_000 and "ci95" in p["bootstrap"] for p in report["paired"])
    html = (paper_build.path / "report.html").read_text()
    assert "best on test (optimistic)" in html and "test acc, all outputs" in html
    assert report["verdict"].startswith("Δ removal ") and "B's features" in report["verdict"]
    assert re.search(r"Best baseline on validation data: (x_A|x_B), \d+\.\d+ % on test; refined − it = [+-]\d+\.\d+ points", report["verdict"])
    assert "instability = Var(x^Δ) / Var(x_B)" in html and "linear CKA" in html  # the glossary


def test_sound_protocol_scores_coincide_and_report_verdict(tiny_build):
    """With a new target classifier, target-restricted and full-label figures are the same numbers."""
    report = tiny_build.report
    assert report.config.protocol == "sound" and report.config.head == HeadConfig(epochs=2)
    for v in report.variants:
        assert v.test_acc == v.test_acc_target and v.test_ce == pytest.approx(v.test_ce_target)
        assert v.best_test_acc is None and all(ce > 0 for ce in v.test_ce)
    assert {p.metric for p in report.paired} == {"acc_target"}
    assert {p.baseline for p in report.paired} == {"x_A", "x_B", "x_B - shuffled x^Δ", "x^(0)", "x^(0) + x^(1)"}
    html = (tiny_build.path / "report.html").read_text()
    assert html_escape(report.verdict) in html and "Paired tests" in html and "Noise budget" in html
    assert "new target classifier's initialisation" in html  # what a seed varies, said for this protocol
    assert report.verdict in tiny_build.summary()


def test_protocol_defaults_and_head_override():
    assert BuildConfig(name="m", protocol="paper").head == HeadConfig(epochs=100, lr=1e-5, lr_end=1e-7, weight_decay=1e-4)
    assert BuildConfig(name="m").head == HeadConfig(epochs=20, lr=1e-3)
    assert BuildConfig(name="m", protocol="paper", head=HeadConfig(epochs=3)).head.epochs == 3
    assert default_head("paper").lr_at(0) == 1e-5 and default_head("paper").lr_at(99) == pytest.approx(1e-7)
    assert default_head("paper").lr_at(50) == pytest.approx(1e-5 * (1e-2) ** (50 / 99))
    assert HeadConfig(epochs=4, lr=1.0).lr_at(2) == pytest.approx(0.5)  # cosine


def _renamed(clf: Classifier, names: list[str]) -> Classifier:
    return Classifier(model=clf.model, meta=clf.meta.model_copy(update={"class_names": names}), path=clf.path, sha256=clf.sha256)


def test_paper_protocol_refuses_label_spaces_before_any_work(tmp_path, digit_nets):
    a, b = digit_nets
    config = BuildConfig(name="m", protocol="paper", **FAST)
    cache = tmp_path / "cache"
    other = _renamed(b, [f"class{i}" for i in range(10)])
    with pytest.raises(ConfigError, match=r"A and B disagree on class names: only in A \['0', '1'.*only in B \['class0'"):
        build(a, other, "digits", None, config, models=tmp_path / "models", cache_dir=cache)
    both = [_renamed(c, ["0", "1", "2", "x3", "x4", "x5", "6", "7", "8", "9"]) for c in (a, b)]
    with pytest.raises(ConfigError, match=r"\['3', '4', '5'\] are not among their 10 classes"):
        build(*both, "digits", None, config, models=tmp_path / "models", cache_dir=cache)
    assert not cache.exists() and not (tmp_path / "models").exists()


def test_derangement_and_shuffled_delta(tmp_path):
    for n in (2, 3, 17, 1000):
        pi = derangement(n, seed=n)
        assert sorted(pi.tolist()) == list(range(n)) and not (pi == np.arange(n)).any()
    with pytest.raises(ValueError, match="at least 2 images"):
        derangement(1, 0)
    rng = np.random.default_rng(0)
    xb = rng.standard_normal((300, 3, 2, 2)).astype(np.float32)
    gxa = rng.standard_normal((300, 3, 2, 2)).astype(np.float32)
    out = _shuffled_delta(xb, gxa, tmp_path / "c.npy", seed=5, batch=64)
    pi = derangement(300, 5)
    np.testing.assert_allclose(out, xb - (xb[pi] - gxa[pi]), rtol=1e-6)
    # Read back from the output alone: whose Delta each image was given
    delta, given = xb - gxa, xb - out
    whose = ((given[:, None] - delta[None]) ** 2).sum((2, 3, 4)).argmin(1)
    np.testing.assert_allclose(given, delta[whose], atol=1e-5)
    assert sorted(whose.tolist()) == list(range(300))  # every image's Delta is given exactly once ...
    assert not (whose == np.arange(300)).any()  # ... never to itself ...
    assert (whose // 64 != np.arange(300) // 64).mean() > 0.5  # ... drawn from the whole split (not a neighbour's, not the batch's)
    other = _shuffled_delta(xb, gxa, tmp_path / "d.npy", seed=6, batch=64)
    assert (np.abs(other - out).max((1, 2, 3)) > 1e-6).mean() > 0.9  # and the pairing follows the seed


def test_score_head_full_and_target_restricted():
    """Label 1 with logits [0, 1, 5]: wrong over all outputs (argmax 2), right among targets {0, 1}."""
    head = nn.Identity()
    x = torch.tensor([[0.0, 1.0, 5.0], [3.0, 1.0, 0.0]])
    y = torch.tensor([1, 0])
    s, preds = score_head(head, [(x, y)], target=[0, 1], runtime=Runtime.resolve())
    assert (s.images, s.correct, s.correct_target) == (2, 1, 2) and s.acc == 0.5 and s.acc_target == 1.0
    assert preds.target.tolist() == [1, 0] and preds.full.tolist() == [-1, 0]  # output 2 is no target class
    assert s.ce == pytest.approx(torch.nn.functional.cross_entropy(x, y).item())
    assert s.ce_target == pytest.approx(torch.nn.functional.cross_entropy(x[:, :2], y).item())


def test_build_reuses_a_fitted_g_and_refuses_other_nets(tmp_path, digit_nets):
    from refiner.cli import main
    from refiner.engine.isomorphism import load_isomorphism

    a, b = digit_nets
    g_path = tmp_path / "g.pt"
    assert main(["fit", "--a", str(a.path), "--b", str(b.path), "--task", "digits", "--on", "target", "--g-epochs", "2", "--out", str(g_path), "--cache", str(tmp_path / "c")]) == 0
    g, info = load_isomorphism(g_path)
    config = BuildConfig(name="m", head=HeadConfig(epochs=1), **FAST)
    result = build(a, b, "digits", None, config, models=tmp_path / "models", cache_dir=tmp_path / "c", g_file=g_path)
    assert result.report.g_file == "g.pt"
    assert result.report.comparison.fit.model_dump() == info["report"]["fit"]
    for key, value in g.state_dict().items():
        assert torch.equal(result.model.g.state_dict()[key], value)
    with pytest.raises(CheckpointError, match=r"g.pt was fitted with net A .* not with b.pt"):
        build(b, a, "digits", None, config, models=tmp_path / "models", g_file=g_path)
    other_layer = BuildConfig(name="m", **{**FAST, "compare": CompareConfig(layer_a="features.2")})
    with pytest.raises(ConfigError, match="was fitted at layer 'features.4' of A, not 'features.2'"):
        build(a, b, "digits", None, other_layer, models=tmp_path / "models", g_file=g_path)


def test_a_seed_sets_the_new_classifiers_initialisation(digit_nets):
    """Sound protocol: each run draws its new classifier from its seed; the paper protocol starts from B's weights."""
    from refiner.refine.pipeline import _head

    _, b = digit_nets
    _, upper = split_model(b.model, "features.4")
    sound = _head(upper, b, list("012345"), BuildConfig(name="m"))
    weights = []
    for seed in (0, 1, 0):
        torch.manual_seed(seed)
        weights.append(sound.fresh().state_dict()["classifier.4.weight"])
    assert weights[0].shape[0] == 6 and torch.equal(weights[0], weights[2]) and not torch.equal(weights[0], weights[1])
    paper = _head(upper, b, list("012345"), BuildConfig(name="m", protocol="paper"))
    torch.manual_seed(1)
    assert torch.equal(paper.fresh().state_dict()["classifier.4.weight"], upper.state_dict()["classifier.4.weight"])


def test_a_diverged_variant_is_reported_and_the_build_goes_on(tmp_path, digit_nets, monkeypatch):
    """x_A's training features hold an inf: its runs diverge, the table says so, the others are tested and exported."""
    from refiner.refine import pipeline

    real = pipeline._variants

    def poisoned(*args, **kwargs):
        variants, tables = real(*args, **kwargs)
        x = np.array(variants[0].sets[0]["train"])
        x[0].flat[0] = np.inf
        variants[0].sets[0]["train"] = x
        return variants, tables

    monkeypatch.setattr(pipeline, "_variants", poisoned)
    config = BuildConfig(name="m", head=HeadConfig(epochs=2), **FAST)
    with pytest.warns(UserWarning, match=r"fine-tuning on x_A diverged .* in 2 of 2 runs"):
        result = build(*digit_nets, "digits", None, config, models=tmp_path / "models", cache_dir=tmp_path / "c")
    x_a = next(v for v in result.report.variants if v.features == "x_A")
    assert x_a.diverged == [True, True] and "x_A" not in {t.baseline for t in result.report.paired}
    assert any(line.startswith("features from A") and "diverged" in line for line in result.summary().splitlines())
    assert "x_B" in {t.baseline for t in result.report.paired} and (result.path / "model.onnx").exists()


def test_g_seeds_with_a_reused_g_is_refused(tmp_path, digit_nets):
    config = BuildConfig(name="m", g_seeds=2, **FAST)
    with pytest.raises(ConfigError, match="--g reuses one fit of g, so --g-seeds 2 cannot refit it"):
        build(*digit_nets, "digits", None, config, models=tmp_path / "models", g_file=tmp_path / "g.pt")
    assert not (tmp_path / "models").exists()
