"""The build's two protocols, its Delta-shuffle control, finer scores and paired tests over seeds."""

from __future__ import annotations

import json
import re
from html import escape as html_escape

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from refiner.build.config import BuildConfig, default_head
from refiner.build.pipeline import _shuffled_delta, build, derangement
from refiner.build.results import paired_test, verdict_line
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


def test_paper_protocol_keeps_b_classifier_and_exports_target_outputs(paper_build, digit_nets):
    """The refined head is B's whole upper part (10 base outputs) with the 6 target columns sliced out, by name."""
    _, b = digit_nets
    model = paper_build.model
    base_head, select = model.head[0], model.head[1]
    target = [b.meta.class_names.index(c) for c in "012345"]
    assert select.indices.tolist() == target
    x = torch.randn(5, *paper_build.report.comparison.a.feature_shape)
    with torch.no_grad():
        full = base_head(model.g(x))
        assert full.shape == (5, 10)
        assert torch.equal(model.head(model.g(x)), full[:, target])
    # the kept classifier is B's, fine-tuned from its weights (not a fresh layer): same shape, moved only a little
    _, b_head = split_model(b.model, paper_build.report.comparison.b.layer)
    old, new = b_head.state_dict()["classifier.4.weight"], base_head.state_dict()["classifier.4.weight"]
    assert old.shape == new.shape and (new - old).abs().max() < 0.05


def test_paper_refined_checkpoint_rebuilds_the_kept_head(paper_build):
    from refiner.build.refined import load_refined

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
    assert {("x_A", "acc"), ("x_B", "acc_target"), ("x_B - shuffled x^Δ", "ce")} <= metrics
    html = (paper_build.path / "report.html").read_text()
    assert "best on test (optimistic)" in html and "test acc, all outputs" in html
    assert report["verdict"].startswith("Δ removal ") and "B's features" in report["verdict"]
    assert re.search(r"Best baseline: (x_A|x_B|x_B - shuffled x\^Δ) at \d+\.\d+ %; refined - best = [+-]\d+\.\d+ points", report["verdict"])
    assert "instability = Var(x^Δ) / Var(x_B)" in html and "linear CKA" in html  # the glossary


def test_sound_protocol_scores_coincide_and_report_verdict(tiny_build):
    """With a new target classifier, target-restricted and full-label figures are the same numbers."""
    report = tiny_build.report
    assert report.config.protocol == "sound" and report.config.head == HeadConfig(epochs=2)
    for v in report.variants:
        assert v.test_acc == v.test_acc_target and v.test_ce == pytest.approx(v.test_ce_target)
        assert v.best_test_acc is None and all(ce > 0 for ce in v.test_ce)
    assert {p.metric for p in report.paired} == {"acc_target", "ce_target"}
    assert {p.baseline for p in report.paired} == {"x_A", "x_B", "x_B - shuffled x^Δ", "x^(0)", "x^(0) + x^(1)"}
    html = (tiny_build.path / "report.html").read_text()
    assert html_escape(report.verdict) in html and "Paired tests over seeds" in html
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
    s = score_head(head, [(x, y)], target=[0, 1], runtime=Runtime.resolve())
    assert s.acc == 0.5 and s.acc_target == 1.0
    assert s.ce == pytest.approx(torch.nn.functional.cross_entropy(x, y).item())
    assert s.ce_target == pytest.approx(torch.nn.functional.cross_entropy(x[:, :2], y).item())


def test_paired_test_matches_scipy_and_verdicts():
    r, b = [0.80, 0.82, 0.81, 0.83], [0.78, 0.79, 0.80, 0.80]
    t = paired_test(r, b, "x_B", "acc_target")
    d = np.subtract(r, b)
    assert t.mean == pytest.approx(d.mean()) and t.p_value == pytest.approx(stats.ttest_rel(r, b).pvalue)
    half = stats.t.ppf(0.975, 3) * d.std(ddof=1) / 2
    assert t.ci95 == pytest.approx((d.mean() - half, d.mean() + half))
    assert t.verdict == "helps" and "helps here: refined - B's features = +2.25 points" in verdict_line(t, "B's features", 4)
    assert paired_test(b, r, "x_B", "acc_target").verdict == "hurts"
    assert paired_test([0.5, 0.6, 0.4], [0.52, 0.55, 0.45], "x_B", "acc").verdict == "is within noise"
    assert paired_test([0.3, 0.31], [0.5, 0.52], "x_B", "ce_target").verdict == "helps"  # lower CE is better
    # the same difference on every seed: an exact sign test, so 3 seeds cannot reach 0.05 but 6 can
    assert paired_test([0.5] * 3, [0.4] * 3, "x_B", "acc").p_value == 0.25
    assert paired_test([0.5] * 6, [0.4] * 6, "x_B", "acc").verdict == "helps"
    assert paired_test([0.5] * 3, [0.5] * 3, "x_B", "acc").p_value == 1.0
    from refiner.build.results import worse_than_baselines

    hurts = paired_test(b, r, "x_A", "acc_target")
    assert worse_than_baselines([hurts, t, paired_test(b, r, "x_A", "acc")]) == [hurts]  # target accuracy decides
    one = paired_test([0.5], [0.4], "x_B", "acc")
    assert one.verdict == "cannot be judged" and one.p_value is None and "one seed" in verdict_line(one, "B's features", 1)


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
