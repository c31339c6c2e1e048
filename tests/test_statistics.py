"""The build's statistics: integer differences, the hierarchical paired bootstrap, McNemar, t over runs, Holm, the verdict."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy import stats

from refiner.refine.predictions import FILE, load_predictions
from refiner.refine.results import REFINED, VariantResult, headline, paired_tests, worse_than_baselines
from refiner.refine.statistics import bootstrap, holm, mcnemar, seed_t_test
from refiner.engine.device import Runtime
from refiner.engine.finetune import HeadConfig, HeadResult, Predictions, Scores, finetune_head


def _one_image_per_seed(n: int = 1200) -> np.ndarray:
    """refined (610, 603, 607)/1200 against B (609, 602, 606)/1200: one more image on each of 3 seeds."""
    d = np.zeros((1, 3, n), dtype=np.int64)
    d[0, 0, 5] = d[0, 1, 17] = d[0, 2, 100] = 1
    return d


def test_a_one_image_gain_is_not_significant():
    """The issue's case: the old t-test on float accuracies gave p = 2e-27 ("helps")."""
    b = bootstrap({"d": _one_image_per_seed()})["d"]
    assert b.p > 0.2 and b.ci95[0] <= 0 < b.ci95[1]
    # 2 seeds, [0.90, 0.85] against [0.85, 0.80] on 20 images: one image each, p was 7e-16
    d = np.zeros((1, 2, 20), dtype=np.int64)
    d[0, 0, 3] = d[0, 1, 4] = 1
    assert bootstrap({"d": d})["d"].p > 0.2


def test_same_gain_on_every_seed_no_longer_looks_certain():
    """50 builds where each seed gains the same whole number of images (1 to 3 of 600): never p < 1e-3 (the t-test gave < 1e-10)."""
    rng = np.random.default_rng(0)
    smallest = 1.0
    for _ in range(50):  # 50 x 10,000 resamples keeps this fast; the bound on p is exact, not statistical
        k = int(rng.integers(1, 4))
        d = np.zeros((1, 3, 600), dtype=np.int64)
        for s in range(3):
            d[0, s, rng.choice(600, k, replace=False)] = 1
        smallest = min(smallest, bootstrap({"d": d}, seed=int(rng.integers(1 << 30)))["d"].p)
    assert smallest > 1e-3


def test_null_calibration():
    """Exchangeable variants (no true difference): the bootstrap says 'beyond noise' about 5 % of the time, not more."""
    rng = np.random.default_rng(1)
    hits, sims = 0, 120
    for i in range(sims):
        hard = rng.random(400)  # per-image difficulty shared by both variants
        right = lambda: (rng.random((1, 3, 400)) > hard).astype(np.int64)  # noqa: E731
        hits += bootstrap({"d": right() - right()}, resamples=2000, seed=i)["d"].p < 0.05
    assert hits / sims <= 0.1


def test_a_real_difference_is_found_with_exact_tails():
    rng = np.random.default_rng(2)
    d = (rng.random((1, 3, 1200)) < 0.2).astype(np.int64) - (rng.random((1, 3, 1200)) < 0.1).astype(np.int64)
    b = bootstrap({"d": d})["d"]
    assert b.p == pytest.approx(2 / 10_001) and b.ci95[0] > 0.05 and b.ci95[1] < 0.15
    assert b.ci95[0] < d.mean() < b.ci95[1] and b.levels == ["g", "seed", "image"]
    # images alone: the percentile interval is close to the normal-theory one of a mean over images
    per_image = d.mean(axis=(0, 1))
    alone = bootstrap({"d": d}, levels=["image"])["d"]
    half = 1.96 * per_image.std(ddof=1) / np.sqrt(1200)
    assert alone.ci95 == pytest.approx((per_image.mean() - half, per_image.mean() + half), abs=0.004)


def test_identical_predictions_get_a_bound_not_a_zero_width_interval():
    b = bootstrap({"d": np.zeros((1, 3, 500), dtype=np.int64)})["d"]
    assert b.widened and b.p == 1.0 and b.ci95[0] < 0 < b.ci95[1]
    assert b.ci95[1] == pytest.approx(1 - 0.025 ** (1 / 500))  # exact 95 % bound with 0 of 500 images seen differing


def test_mcnemar_t_test_and_holm_match_references():
    d = np.zeros((1, 2, 50), dtype=np.int64)
    d[0, 0, :9], d[0, 0, 9:11] = 1, -1
    m = mcnemar(d)
    assert (m[0].gained, m[0].lost) == (9, 2) and m[0].p == pytest.approx(stats.binomtest(9, 11).pvalue)
    assert m[1].p == 1.0  # no image differs
    t = seed_t_test([3, 5, 4, 6], 100)
    ref = stats.ttest_rel([0.53, 0.55, 0.54, 0.56], [0.5] * 4)
    assert t.p == pytest.approx(ref.pvalue)
    assert seed_t_test([1, 1, 1], 100).p is None and "same difference" in seed_t_test([1, 1, 1], 100).note
    assert seed_t_test([2], 100).ci95 is None
    assert holm([0.01, 0.04, 0.03, 0.2]) == pytest.approx([0.04, 0.09, 0.09, 0.2])


def _variant(features: str, val: list[int], test: list[int], g_fit: list[int] | None = None, diverged: bool = False) -> VariantResult:
    n = len(test)
    return VariantResult(
        name=features, features=features, head_from="B", g_fit=g_fit or [0] * n, seed=list(range(n)) if g_fit is None else [i % (n // 2) for i in range(n)],
        val_images=100, test_images=100, best_epoch=[1] * n, val_correct=val, val_correct_target=val, test_correct=test,
        test_correct_target=test, last_correct=test, best_test_correct=None, test_ce=[1.0] * n, test_ce_target=[1.0] * n,
        diverged=[diverged] * n,
    )  # fmt: skip


def _predictions(labels: np.ndarray, correct: list[int], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """(runs, images) predictions with `correct[i]` right in run i (wrong ones shifted by one class)."""
    rows = []
    for c in correct:
        p = (labels + 1) % 6
        right = rng.choice(len(labels), c, replace=False)
        p[right] = labels[right]
        rows.append(p)
    return {"test": np.stack(rows), "test:all": np.stack(rows)}


def test_headline_baseline_is_chosen_on_validation_and_only_among_x_a_and_x_b():
    """x_A is best on test but worse on validation; the control is best on test too: the headline names x_B."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 6, 100)
    specs = {"x_A": ([50] * 3, [80] * 3), "x_B": ([60] * 3, [60] * 3), REFINED: ([55] * 3, [61] * 3), "x_B - shuffled x^Δ": ([70] * 3, [90] * 3)}
    results = [_variant(f, *v) for f, v in specs.items()]
    preds = {f: _predictions(labels, v[1], rng) for f, v in specs.items()}
    tests = paired_tests(results, preds, labels, ["acc_target"], seeds=3)
    primary = [t for t in tests if t.primary]
    assert [(t.baseline, t.metric) for t in primary] == [("x_B", "acc_target")] and primary[0].p_holm is None
    assert all(t.p_holm is not None for t in tests if not t.primary)
    assert primary[0].diffs == [1, 1, 1] and primary[0].verdict == "is within noise"
    line = headline(results, tests, seeds=3, g_fits=1)
    assert "Best baseline on validation data: x_B" in line and "Conditional on these A and B" in line
    # refined is far below x_A and the control: both are "worse" after Holm, x_B (within noise) is not
    assert {t.baseline for t in worse_than_baselines(tests)} == {"x_A", "x_B - shuffled x^Δ"}


def test_secondary_verdicts_and_warnings_read_holm_adjusted_p():
    """Find a gain of x_A over refined whose raw bootstrap p is below 0.05 but Holm's (5 secondaries) is not."""
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 6, 300)
    for gap in range(2, 40):
        specs = {"x_B": [150] * 3, REFINED: [150] * 3, "x_A": [150 + gap] * 3, "x^(0)": [150] * 3, "x^(0) + x^(1)": [150] * 3}
        results = [_variant(f, [60] * 3, v) for f, v in specs.items()]
        results = [r.model_copy(update={"val_images": 300, "test_images": 300}) for r in results]
        preds = {f: _predictions(labels, v, rng) for f, v in specs.items()}
        tests = paired_tests(results, preds, labels, ["acc_target"], seeds=3)
        secondary = [t for t in tests if not t.primary]
        assert [t.p_holm for t in secondary] == pytest.approx(holm([t.bootstrap.p for t in secondary]))
        a = next(t for t in tests if t.baseline == "x_A")
        if a.bootstrap.p < 0.05 <= a.p_holm:
            assert a.verdict == "is within noise" and a not in worse_than_baselines(tests)
            return
    pytest.fail("no gap gave a raw p below 0.05 with a Holm-adjusted p above it")


def test_g_fits_enter_the_bootstrap_and_diverged_variants_are_left_out():
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 6, 100)
    results = [
        _variant("x_B", [60] * 3, [60] * 3),
        _variant(REFINED, [60] * 6, [60, 61, 62, 70, 71, 72], g_fit=[0, 0, 0, 1, 1, 1]),
        _variant("x_A", [60] * 3, [60] * 3, diverged=True),
    ]
    preds = {r.features: _predictions(labels, r.test_correct, rng) for r in results}
    tests = paired_tests(results, preds, labels, ["acc_target"], seeds=3)
    assert [t.baseline for t in tests] == ["x_B"]
    (t,) = tests
    assert len(t.diffs) == 6 and t.diffs == [0, 1, 2, 10, 11, 12]
    budget = {n.source: n.std for n in t.noise_budget}
    assert budget["g fits"] > budget["fine-tuning seeds"] > 0 and budget["test images"] > 0
    assert "diverged" not in headline(results, tests, 3, 2) and "x 2 g fits" in headline(results, tests, 3, 2)
    one_fit = [_variant("x_B", [60] * 3, [60] * 3), _variant(REFINED, [60] * 3, [60, 61, 62])]
    preds = {r.features: _predictions(labels, r.test_correct, rng) for r in one_fit}
    (t,) = paired_tests(one_fit, preds, labels, ["acc_target"], seeds=3)
    assert {n.source: n.std for n in t.noise_budget}["g fits"] is None  # one fit: not measured, not zero


def test_a_diverging_head_is_marked_and_does_not_crash():
    x = torch.randn(32, 8)
    x[0, 0] = float("inf")  # a non-finite feature: the loss goes non-finite at once
    y = torch.randint(0, 3, (32,))
    batches = lambda: [(x, y)]  # noqa: E731
    head, res = finetune_head(torch.nn.Linear(8, 3), batches, batches, batches, HeadConfig(epochs=3), 0, target=[0, 1, 2], runtime=Runtime.resolve())
    assert res.diverged and len(res.history) == 1 and res.predictions["test"].target.shape == (32,)
    finite = lambda: [(x.nan_to_num(posinf=0.0), y)]  # noqa: E731
    assert not finetune_head(torch.nn.Linear(8, 3), finite, finite, finite, HeadConfig(epochs=2), 0, target=[0, 1, 2])[1].diverged


def test_tracking_test_reuses_the_last_epochs_score_unchanged():
    """Under track_test the last epoch's test pass is the `last` score: the same counts and predictions as a run without it."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(48, 8, generator=g), torch.randint(0, 3, (48,), generator=g)
    batches = lambda: [(x[:24], y[:24]), (x[24:], y[24:])]  # noqa: E731
    runs = [finetune_head(torch.nn.Linear(8, 3), batches, batches, batches, HeadConfig(epochs=3), 0, target=[0, 1, 2], track_test=t)[1] for t in (True, False)]
    tracked, plain = runs
    assert tracked.last == plain.last and tracked.history[-1]["test_acc"] == tracked.last.acc
    assert (tracked.predictions["test@last"].target == plain.predictions["test@last"].target).all()


def _run(correct: int, diverged: bool = False) -> HeadResult:
    s = Scores(images=10, correct=correct, correct_target=correct, ce=1.0, ce_target=1.0)
    p = Predictions(target=np.zeros(10, dtype=np.int64), full=np.zeros(10, dtype=np.int64))
    return HeadResult(best_epoch=1, val=s, test=s, last=s, best_test=None, diverged=diverged, history=[], predictions={"val": p, "test": p})


def test_accuracy_table_marks_diverged_variants_and_uses_the_sample_std():
    from refiner.refine.report import format_accuracy_table

    ok = VariantResult.from_runs("x_B", "x_B", "B", [(0, 0, _run(5)), (0, 1, _run(7))])
    bad = VariantResult.from_runs("x_A", "x_A", "A", [(0, 0, _run(5)), (0, 1, _run(5, diverged=True))])
    table = format_accuracy_table([ok, bad], "sound")
    assert "60.00 ± 14.14" in table  # sample std of (50, 70): 14.14; the population std would be 10.00
    assert "diverged" in next(line for line in table.splitlines() if line.startswith("x_A"))
    assert "sample std, n − 1" in table.splitlines()[-1]  # the ± is labelled in plain text too


@pytest.mark.parametrize("which", ["tiny", "paper"])
def test_every_accuracy_in_report_json_is_recomputed_from_predictions(which, tiny_build, request):
    result = tiny_build if which == "tiny" else request.getfixturevalue("paper_protocol_build")
    report = json.loads((result.path / "report.json").read_text())
    labels, preds = load_predictions(result.path / FILE)
    assert set(labels) == {"val", "test"} and labels["test"].dtype.kind == "i"
    for v in report["variants"]:
        p = preds[v["features"]]
        assert p["test"].shape == (len(v["seed"]), len(labels["test"])) and p["runs"].tolist() == list(map(list, zip(v["g_fit"], v["seed"])))
        count = lambda key, split="test": (p[key] == labels[split]).sum(axis=1).tolist()  # noqa: E731
        assert count("test") == v["test_correct_target"] and count("test:all") == v["test_correct"]
        assert count("val", "val") == v["val_correct_target"] and count("val:all", "val") == v["val_correct"]
        assert count("test@last:all") == v["last_correct"]
        if v["best_test_correct"] is not None:
            assert count("test@best:all") == v["best_test_correct"]
        assert v["test_acc_target"] == [c / v["test_images"] for c in v["test_correct_target"]]
    for t in report["paired"]:  # differences recomputed in integers from the same file
        key = "test" if t["metric"] == "acc_target" else "test:all"
        r = (preds[REFINED][key] == labels["test"]).sum(axis=1)
        b = dict(zip(map(tuple, preds[t["baseline"]]["runs"].tolist()), (preds[t["baseline"]][key] == labels["test"]).sum(axis=1)))
        paired_b = [b.get((g, s), b.get((0, s))) for g, s in preds[REFINED]["runs"].tolist()]  # same seed; x_B has one fit
        assert t["diffs"] == (r - np.asarray(paired_b)).tolist()


@pytest.fixture(scope="module")
def paper_protocol_build(tmp_path_factory, digit_nets):
    """A paper-protocol build with 2 fits of g that exports a run of the second fit (its best on validation)."""
    from refiner.refine import pipeline
    from refiner.refine.config import BuildConfig
    from refiner.engine.comparison import CompareConfig
    from refiner.engine.fitting import FitConfig

    def second_fit(jobs, runs):
        return max((i for i, (v, g_fit, _) in enumerate(jobs) if v.features == REFINED and g_fit == 1), key=lambda i: runs[i].val.correct)

    config = BuildConfig(
        name="paper", protocol="paper", head=HeadConfig(epochs=2, lr=1e-4, lr_end=1e-6), compare=CompareConfig(fit=FitConfig(epochs=1)),
        seeds=2, ablations=False, g_seeds=2,
    )  # fmt: skip
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipeline, "_exported", second_fit)
        return pipeline.build(*digit_nets, "digits", None, config, models=tmp_path_factory.mktemp("models"), cache_dir=tmp_path_factory.mktemp("cache"))


def test_g_seeds_refit_g_and_each_refined_run_knows_its_fit(paper_protocol_build):
    r = paper_protocol_build.report
    refined = next(v for v in r.variants if v.features == REFINED)
    x_b = next(v for v in r.variants if v.features == "x_B")
    assert refined.g_fit == [0, 0, 1, 1] and refined.seed == [0, 1, 0, 1] and x_b.g_fit == [0, 0]
    assert [f.seed for f in r.g_fits] == [0, 1] and r.g_fits[0].holdout_mse != r.g_fits[1].holdout_mse
    primary = next(t for t in r.paired if t.primary)
    assert primary.bootstrap.levels == ["g", "seed", "image"] and len(primary.diffs) == 4
    assert next(n for n in primary.noise_budget if n.source == "g fits").std is not None
    assert r.exported_run["g_fit"] == 1
    assert "initialisation" not in r.seed_varies and "B's weights" in r.seed_varies  # paper protocol: the classifier is kept


def test_the_report_describes_the_g_the_model_exports(paper_protocol_build, digit_nets):
    """With several fits of g, the report's Var table, fit record and spec are those of the exported model's g."""
    from refiner.data.tasks import load_task
    from refiner.data.datasets import stack_images
    from refiner.engine.metrics import measure_isomorphism
    from refiner.models.layers import split_model

    r, model = paper_protocol_build.report, paper_protocol_build.model
    data = load_task("digits", None, target=True)
    (x_a, _), (x_b, _) = (stack_images(data.test, data.classes, clf.meta.preprocess, len(data.test)) for clf in digit_nets)
    trunk_b, _ = split_model(digit_nets[1].model, r.comparison.b.layer)
    with torch.no_grad():
        table = measure_isomorphism(model.g, [(model.trunk(x_a), trunk_b(x_b))])
    exported = r.g_fits[r.exported_run["g_fit"]]
    assert table.instability == pytest.approx(r.comparison.tables["test"].instability, rel=1e-4)
    assert r.comparison.tables["test"].instability == exported.instability_test != r.g_fits[0].instability_test
    assert r.comparison.fit.seed == exported.seed == 1 and min(r.comparison.fit.holdout_mse) == exported.holdout_mse
    spec = torch.load(paper_protocol_build.path / "refined.pt", weights_only=True)["spec"]
    assert spec["info"]["instability_test"] == exported.instability_test
