"""refiner atlas: layers captured as produced, the unbiased minibatch CKA against independent estimators, the command end to end."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from torchvision.models.feature_extraction import create_feature_extractor

from refiner.layermap.cka import MinibatchCKA, gram, hsic1
from refiner.layermap.stream import batch_sizes, capture_model, paired_batches, stream_cka, task_batches
from refiner.cli.main import main
from refiner.engine.device import Runtime
from refiner.errors import ConfigError
from refiner.models.architectures import create_model

# ---------------------------------------------------------------- independent estimators (numpy, float64)


def _hsic_quadruples(k: np.ndarray, l: np.ndarray) -> float:
    """HSIC_1 as the U-statistic it estimates: the mean over 4-tuples of distinct images of Song et al.'s kernel h."""
    n = len(k)
    total = 0.0
    for quad in itertools.combinations(range(n), 4):
        h = sum(k[t, u] * (l[t, u] + l[v, w] - 2 * l[t, v]) for t, u, v, w in itertools.permutations(quad))
        total += h / 24
    return total / len(list(itertools.combinations(range(n), 4)))


def _hsic_u_centred(k: np.ndarray, l: np.ndarray) -> float:
    """HSIC_1 through U-centred kernel matrices (Szekely and Rizzo's form)."""

    def u_centre(m):
        n = len(m)
        m = m.copy()
        np.fill_diagonal(m, 0)
        out = m - m.sum(0, keepdims=True) / (n - 2) - m.sum(1, keepdims=True) / (n - 2) + m.sum() / ((n - 1) * (n - 2))
        np.fill_diagonal(out, 0)
        return out

    n = len(k)
    return float((u_centre(k) * u_centre(l)).sum() / (n * (n - 3)))


def _cka_numpy(xs: list[np.ndarray], ys: list[np.ndarray], hsic) -> float:
    """Minibatch CKA from per-batch feature arrays (n, d): mean HSIC over batches, normalised."""
    kx = [x.reshape(len(x), -1) @ x.reshape(len(x), -1).T for x in xs]
    ky = [y.reshape(len(y), -1) @ y.reshape(len(y), -1).T for y in ys]
    xy = np.mean([hsic(a, b) for a, b in zip(kx, ky)])
    xx = np.mean([hsic(a, a) for a in kx])
    yy = np.mean([hsic(b, b) for b in ky])
    return float(xy / np.sqrt(xx * yy))


def _cka(xs: list[torch.Tensor], ys: list[torch.Tensor]) -> float:
    acc = MinibatchCKA()
    for x, y in zip(xs, ys):
        acc.add(gram(x)[None], gram(y)[None])
    return float(acc.value()[0, 0])


# ---------------------------------------------------------------- the estimator


def test_equals_the_u_statistic_on_a_small_case():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 5))
    y = x @ rng.normal(size=(5, 3)) + 0.5 * rng.normal(size=(8, 3)) + 4.0  # related, and not centred
    ours = _cka([torch.from_numpy(x)], [torch.from_numpy(y)])
    assert abs(ours - _cka_numpy([x], [y], _hsic_quadruples)) <= 1e-4
    k, l = x @ x.T, y @ y.T
    assert abs(float(hsic1(torch.from_numpy(k)[None], torch.from_numpy(l)[None])[0, 0]) - _hsic_quadruples(k, l)) <= 1e-9


def test_equals_an_independent_numpy_cka_full_batch_and_minibatch():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(60, 4, 3, 3)).astype(np.float32) + 2.0
    y = np.maximum(x.reshape(60, -1) @ rng.normal(size=(36, 20)), 0).astype(np.float32)
    full = _cka([torch.from_numpy(x)], [torch.from_numpy(y)])
    assert abs(full - _cka_numpy([x.astype(np.float64)], [y.astype(np.float64)], _hsic_u_centred)) <= 1e-4
    halves = _cka([torch.from_numpy(x[:30]), torch.from_numpy(x[30:])], [torch.from_numpy(y[:30]), torch.from_numpy(y[30:])])
    expected = _cka_numpy([x[:30].astype(np.float64), x[30:].astype(np.float64)], [y[:30].astype(np.float64), y[30:].astype(np.float64)], _hsic_u_centred)
    assert abs(halves - expected) <= 1e-4 and abs(halves - full) > 1e-6  # the minibatch estimate is its own estimate


def test_invariant_to_an_orthogonal_transform_and_isotropic_scaling():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 40, 12, generator=gen, dtype=torch.float64)  # three batches of 40 images, 12 features
    y = torch.tanh(x @ torch.randn(12, 7, generator=gen, dtype=torch.float64)) + 0.3 * torch.randn(3, 40, 7, generator=gen, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(12, 12, generator=gen, dtype=torch.float64))
    base = _cka(list(x), list(y))
    assert 0.2 < base < 0.99
    assert abs(_cka(list(x @ q), list(y)) - base) <= 1e-6
    assert abs(_cka(list(x), list(7.5 * y)) - base) <= 1e-6
    assert abs(_cka(list(x @ q * 0.01), list(y * 300)) - base) <= 1e-6


def test_too_few_images_are_refused_in_one_line_never_nan():
    for call in (lambda: batch_sizes(3, 64), lambda: batch_sizes(100, 3), lambda: hsic1(torch.eye(3)[None], torch.eye(3)[None])):
        with pytest.raises(ConfigError, match=r"at least 4") as e:
            call()
        assert "\n" not in str(e.value)
    assert batch_sizes(9, 8) == [5, 4] and batch_sizes(1000, 64) == [63] * 8 + [62] * 8  # no batch below 4
    assert min(batch_sizes(7, 4)) >= 4


# ---------------------------------------------------------------- the streamed pass


@pytest.mark.parametrize(
    ("arch", "layers", "pre_activation"),
    [("vgg11", ["features.0", "features.3"], "features.0"), ("resnet18", ["layer1.0.bn1", "layer1.0.add", "layer1.0"], "layer1.0.bn1")],
)
def test_every_layer_is_captured_as_it_was_produced(arch, layers, pre_activation):
    """A multi-layer pass returns what each layer produced, not what a later ReLU(inplace=True) left of it."""
    model = create_model(arch, 4).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        together = create_feature_extractor(model, {n: n for n in layers})(x)
        assert (together[pre_activation] >= 0).all()  # the trap: torchvision's extractor hands back post-ReLU values
        captured = capture_model(model, layers, Runtime.resolve())(x)
        for name in layers:
            alone = create_feature_extractor(model, {name: "f"})(x)["f"]
            assert torch.allclose(captured[name], alone, atol=1e-4), name
    assert (captured[pre_activation] < 0).float().mean() > 0.3
    assert all(p.device.type == "cpu" and p.is_contiguous() for p in model.parameters())  # the caller's net untouched


def test_layers_are_checked_and_a_module_name_stands_for_its_last_node():
    from refiner.layermap.stream import choose_layers, probe_layers
    from refiner.errors import LayerError

    infos = probe_layers(create_model("resnet18", 4), (3, 64, 64))
    chosen = choose_layers(infos, ["layer1.0", "layer3.1.add"], None)
    assert [c.name for c in chosen] == ["layer1.0", "layer3.1.add"] and chosen[0].shape == (64, 16, 16) and chosen[0].clean_cut
    auto = choose_layers(infos, None, "layer3.1.add", max_layers=5)
    assert len(auto) == 5 and "layer3.1.add" in [c.name for c in auto] and all(c.clean_cut for c in auto)
    with pytest.raises(LayerError, match=r"'layer9' are not split points .* valid names: conv1"):
        choose_layers(infos, ["layer9"], None)


def test_a_net_runs_only_up_to_its_deepest_chosen_layer():
    captured = capture_model(create_model("vgg11", 4), ["features.3"])
    targets = [str(n.target) for n in captured.graph.nodes if n.op == "call_module"]
    assert targets[-1] == "features.3" and not any(t.startswith("classifier") for t in targets)


def _digits(n: int):
    from refiner.data.tasks import load_task

    data = load_task("digits", None, target=False)
    return data.test[:n], data.preprocess


def test_a_against_itself_has_a_unit_diagonal_and_a_symmetric_grid():
    samples, pre = _digits(40)
    model = create_model("small_vgg", 10).eval()
    layers = ["features.2", "features.6", "features.10", "features.16", "classifier.1"]
    runtime = Runtime.resolve()
    result = stream_cka(capture_model(model, layers, runtime), capture_model(model, layers, runtime), layers, layers, paired_batches(task_batches(samples, pre, pre, runtime, 16)[0]), runtime)
    assert result.images == 40 and result.batches == 3
    assert np.abs(1 - np.diag(result.cka)).max() <= 1e-5
    assert np.abs(result.cka - result.cka.T).max() <= 1e-6
    assert all(abs(1 - result.position_cka[i, i]) <= 1e-5 for i in range(len(layers)))


# ---------------------------------------------------------------- the command


def _bare(tmp_path, name: str, arch: str, seed: int, classes: int = 10) -> str:
    torch.manual_seed(seed)
    torch.save(create_model(arch, classes).state_dict(), tmp_path / name)
    return str(tmp_path / name)


def test_help_has_examples_and_says_the_bounded_g_budget(capsys):
    with pytest.raises(SystemExit) as e:
        main(["atlas", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "examples:" in text and "refiner atlas --a" in text and "2000)" in text and "--layer-a" not in text


def test_atlas_of_two_architectures_end_to_end(tmp_path, capsys):
    a, b = _bare(tmp_path, "a.pt", "small_vgg", 0), _bare(tmp_path, "b.pt", "cifar_resnet20", 1)
    out = tmp_path / "atlas"
    argv = ["atlas", "--a", a, "--arch-a", "small_vgg", "--b", b, "--arch-b", "cifar_resnet20", "--task", "digits",
            "--images", "40", "--batch-size", "20", "--max-layers", "4", "--consistency", "matched", "--g-steps", "20",
            "--train-per-class", "10", "--test-per-class", "4", "--threads", "1", "--quiet", "--json", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    report = json.loads((out / "atlas.json").read_text())
    assert printed == report
    assert {"layers_a", "layers_b", "cka", "images", "method", "seed", "consistency"} <= set(report)
    assert len(report["cka"]) == len(report["layers_a"]) == 4 and all(len(r) == 4 for r in report["cka"])
    assert report["images"] == 40 and "HSIC_1" in report["method"]
    assert all(v is None or -0.2 <= v <= 1.0 + 1e-6 for row in report["cka"] for v in row)
    rows = report["consistency"]
    assert [r["layer_a"] for r in rows[:4]] == report["layers_a"]
    assert any(r["default"] for r in rows) and all(r["flags"].startswith("--layer-a ") for r in rows)
    fitted = [r for r in rows if r["skipped"] is None]
    assert fitted and all(0 <= r["instability"] and r["holdout_mse"] > 0 and r["steps"] <= 20 for r in fitted)
    page = (out / "report.html").read_text()
    assert "cka.png" in page and "Glossary" in page and "minibatch CKA" in page and (out / "cka.png").stat().st_size > 1000

    assert main([*argv[:-1], str(tmp_path / "few"), "--images", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert "at least 4" in err and "\n" not in err and not (tmp_path / "few").exists()


@pytest.mark.parametrize("arch_a, arch_b", [("timm/test_vit", "small_vgg"), ("resnet18", "timm/convnext_atto")])
def test_atlas_across_families(tmp_path, capsys, arch_a, arch_b):
    """A ViT against a CNN (token layers enter flattened; build refuses that pair), and a torchvision net against a timm one."""
    from test_cli import _tiny_imagefolder

    data = _tiny_imagefolder(tmp_path / "imgs")
    a, b = _bare(tmp_path, "a.pt", arch_a, 0, 2), _bare(tmp_path, "b.pt", arch_b, 1, 2)
    size = [] if arch_a.endswith("vit") else ["--img-size", "64"]
    argv = ["atlas", "--a", a, "--arch-a", arch_a, "--b", b, "--arch-b", arch_b, "--task", "imagefolder", "--data", str(data),
            "--classes", "cat,dog", "--split", "train", "--images", "8", "--batch-size", "4", "--max-layers", "3", *size,
            "--consistency", "none", "--threads", "1", "--quiet", "--json", "--out", str(tmp_path / "atlas")]  # fmt: skip
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    if arch_a.endswith("vit"):
        assert report["shapes_a"][1][0] == 101  # tokens (cls + 10 x 10 patches) x channels
    cka = np.array(report["cka"], dtype=float)
    assert report["images"] == 8 and cka.shape == (len(report["layers_a"]), len(report["layers_b"])) and np.isfinite(cka).all()
    assert ((cka > -0.2) & (cka < 1 + 1e-5)).all()


@pytest.mark.needs_cuda
def test_atlas_command_on_a_gpu_matches_the_cpu(tmp_path, capsys):
    """`refiner atlas --device cuda` end to end, g fits included (features from the host, g on the device)."""
    a, b = _bare(tmp_path, "a.pt", "small_vgg", 0), _bare(tmp_path, "b.pt", "cifar_resnet20", 1)
    reports = []
    for device in ("cpu", "cuda"):
        argv = ["atlas", "--a", a, "--arch-a", "small_vgg", "--b", b, "--arch-b", "cifar_resnet20", "--task", "digits", "--device", device,
                "--images", "40", "--batch-size", "20", "--max-layers", "3", "--consistency", "matched", "--g-steps", "20",
                "--train-per-class", "10", "--test-per-class", "4", "--quiet", "--json", "--out", str(tmp_path / device)]  # fmt: skip
        assert main(argv) == 0
        reports.append(json.loads(capsys.readouterr().out))
    assert np.abs(np.array(reports[1]["cka"], dtype=float) - np.array(reports[0]["cka"], dtype=float)).max() <= 1e-4
    assert [r["skipped"] for r in reports[1]["consistency"]] == [r["skipped"] for r in reports[0]["consistency"]]
    assert all(r["instability"] >= 0 for r in reports[1]["consistency"] if r["skipped"] is None)


@pytest.mark.needs_cuda
def test_atlas_on_a_gpu_matches_the_cpu():
    samples, pre = _digits(32)
    model = create_model("small_vgg", 10).eval()
    layers = ["features.2", "features.10", "classifier.1"]
    grids = []
    for device, amp in (("cpu", "off"), ("cuda", "off"), ("cuda", "bf16")):
        from refiner.engine.device import RuntimeConfig

        runtime = Runtime.resolve(RuntimeConfig(device=device, amp=amp, threads=1))
        net = capture_model(model, layers, runtime)
        grids.append(stream_cka(net, net, layers, layers, paired_batches(task_batches(samples, pre, pre, runtime, 16)[0]), runtime).cka)
    assert np.abs(grids[1] - grids[0]).max() <= 1e-4
    assert np.abs(grids[2] - grids[0]).max() <= 2e-2


def test_two_processes_shard_the_images_and_sum_the_same_grid(tmp_path, capsys):
    """Under torchrun each process takes half the images and the HSIC sums are added: the grid of one process, one folder."""
    from test_distributed import _torchrun

    a, b = _bare(tmp_path, "a.pt", "small_vgg", 0), _bare(tmp_path, "b.pt", "cifar_resnet20", 1)
    argv = ["atlas", "--a", a, "--arch-a", "small_vgg", "--b", b, "--arch-b", "cifar_resnet20", "--task", "digits", "--device", "cpu",
            "--images", "40", "--batch-size", "10", "--max-layers", "3", "--consistency", "none", "--quiet", "--json"]  # fmt: skip
    assert main([*argv, "--out", str(tmp_path / "one")]) == 0
    one = json.loads(capsys.readouterr().out)
    printed = _torchrun(*argv, "--out", str(tmp_path / "two"), cwd=tmp_path)
    two = json.loads((tmp_path / "two" / "atlas.json").read_text())
    assert len(printed.strip().splitlines()) == 1  # rank 0 alone prints
    assert two["images"] == 40 and two["batches"] == 4 and one["batches"] == 4
    assert np.abs(np.array(two["cka"], dtype=float) - np.array(one["cka"], dtype=float)).max() <= 1e-6
    pos_one, pos_two = (np.array(r["cka_positions"], dtype=float) for r in (one, two))
    assert np.isfinite(pos_two).any() and np.allclose(pos_one, pos_two, atol=1e-6, equal_nan=True)


# ---------------------------------------------------------------- a long atlas: kept, resumed, shown


def _long_argv(tmp_path, out) -> list[str]:
    a, b = _bare(tmp_path, "a.pt", "small_vgg", 0), _bare(tmp_path, "b.pt", "small_vgg", 1)
    return ["atlas", "--a", a, "--arch-a", "small_vgg", "--b", b, "--arch-b", "small_vgg", "--task", "digits", "--images", "40",
            "--batch-size", "10", "--max-layers", "3", "--consistency", "matched", "--g-steps", "15", "--train-per-class", "8",
            "--test-per-class", "4", "--threads", "1", "--quiet", "--out", str(out)]  # fmt: skip


def test_an_interrupted_atlas_keeps_the_grid_and_the_pairs_done_and_resumes_to_the_same_atlas(tmp_path, capsys, monkeypatch):
    import refiner.layermap.pipeline as pipeline

    whole = tmp_path / "whole"
    assert main(_long_argv(tmp_path, whole)) == 0
    expected = json.loads((whole / "atlas.json").read_text())
    real, calls = pipeline.compare, []

    def interrupted_at_the_second_pair(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "compare", interrupted_at_the_second_pair)
    out = tmp_path / "stopped"
    capsys.readouterr()
    assert main(_long_argv(tmp_path, out)) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        f"refiner atlas: interrupted; kept in {str(out)!r}: the CKA grid (cka.png) and 1 of {expected['pairs_total']} pairs "
        "(atlas.json, marked partial); the same command resumes from there"
    )
    partial = json.loads((out / "atlas.json").read_text())
    assert partial["complete"] is False and len(partial["consistency"]) == 1 and partial["cka"] == expected["cka"]
    assert (out / "cka.png").stat().st_size > 1000 and "partial" in (out / "report.html").read_text()

    monkeypatch.setattr(pipeline, "compare", real)
    calls.clear()
    assert main(_long_argv(tmp_path, out)) == 0  # the same command: resumes
    resumed = json.loads((out / "atlas.json").read_text())
    assert resumed["complete"] is True
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(resumed["consistency"]) == strip(expected["consistency"])  # the pairs fitted after the resume, as in one run
    assert main(_long_argv(tmp_path, out)) == 2
    assert "already holds a complete atlas" in capsys.readouterr().err


def test_a_partial_atlas_of_other_arguments_is_not_resumed(tmp_path, capsys, monkeypatch):
    import refiner.layermap.pipeline as pipeline

    monkeypatch.setattr(pipeline, "compare", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    out = tmp_path / "stopped"
    assert main(_long_argv(tmp_path, out)) == 130
    monkeypatch.undo()
    argv = _long_argv(tmp_path, out)
    argv[argv.index("--g-steps") + 1] = "16"
    capsys.readouterr()
    assert main(argv) == 2
    assert "holds a partial atlas of other nets, data, layers or settings" in capsys.readouterr().err
    assert json.loads((out / "atlas.json").read_text())["complete"] is False  # left as it was


def test_the_overall_progress_and_the_estimate_appear_in_a_logged_run(tmp_path, capsys, monkeypatch):
    import functools

    from tqdm import tqdm

    import refiner.progress as progress

    monkeypatch.setattr(tqdm, "__init__", functools.partialmethod(tqdm.__dict__["__init__"].func, disable=False))  # conftest's off
    monkeypatch.setattr(progress, "LOG_INTERVAL_S", 0.0)  # a plain line at every step
    monkeypatch.setattr(progress, "ESTIMATE_AFTER_S", 0.0)  # estimate after the first pair
    monkeypatch.setattr(progress, "LONG_S", 0.0)  # and call it long
    argv = [a for a in _long_argv(tmp_path, tmp_path / "logged") if a != "--quiet"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "g fits: 1/" in err and "pairs, " in err and "ETA" in err, err
    assert "g fits: " in err and "will take about" in err and "--consistency none" in err and "the same command resumes" in err


def test_cka_intervals_cover_the_value_and_narrow_with_more_images():
    from refiner.layermap.cka import bootstrap_interval

    samples, pre = _digits(240)
    a, b = create_model("small_vgg", 10).eval(), create_model("cifar_resnet20", 10).eval()
    runtime = Runtime.resolve()
    widths = []
    for n in (60, 240):
        batches = task_batches(samples[:n], pre, pre, runtime, 20)
        result = stream_cka(capture_model(a, ["features.6"], runtime), capture_model(b, ["layer2"], runtime), ["features.6"], ["layer2"],
                            paired_batches(batches[0]), runtime, positions=False)  # fmt: skip
        low, high = result.cka_interval
        assert low[0, 0] <= result.cka[0, 0] <= high[0, 0]
        widths.append(high[0, 0] - low[0, 0])
    assert widths[1] < widths[0]  # four times the images: a narrower interval
    one = [(np.ones((1, 1)), np.ones(1), np.ones(1))] * 5
    assert bootstrap_interval(one)[0][0, 0] == bootstrap_interval(one)[1][0, 0] == 1.0  # identical batches: no spread


class _InPlace(torch.nn.Module):
    """A captured conv written in place three ways later: F.relu(x, True), a view's relu_(), and nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2, self.conv3 = (torch.nn.Conv2d(3 if i == 0 else 4, 4, 3, padding=1) for i in range(3))

    def forward(self, x):
        b = torch.nn.functional.relu(self.conv1(x), True)
        c = self.conv2(b)
        return self.conv3(c.view(c.shape).relu_())


def test_only_layers_written_in_place_later_are_copied():
    from refiner.layermap.stream import _kept

    model, layers = _InPlace().eval(), ["conv1", "conv2", "conv3"]
    x = torch.randn(2, 3, 8, 8)
    captured = capture_model(model, layers, None)
    copies = [n for n in captured.graph.nodes if n.op == "call_function" and n.target is _kept]
    assert [n.args[0].name for n in copies] == ["conv1", "conv2"]  # conv3: nothing writes it, no copy
    with torch.no_grad():
        got = captured(x)
        for name in layers:
            alone = create_feature_extractor(model, {name: "f"})(x)["f"]
            assert torch.allclose(got[name], alone, atol=1e-5), name
    assert (got["conv1"] < 0).any() and (got["conv2"] < 0).any()  # as produced, before the in-place ReLUs


def test_auto_position_cka_is_kept_when_cheap_and_left_out_with_its_line_when_not(monkeypatch, caplog):
    import logging

    import refiner.layermap.stream as stream

    samples, pre = _digits(40)
    model = create_model("small_vgg", 10).eval()
    layers = ["features.2", "features.6"]
    runtime = Runtime.resolve()

    def run():
        batches = task_batches(samples, pre, pre, runtime, 10)[0]
        net = capture_model(model, layers, runtime)
        return stream_cka(net, net, layers, layers, paired_batches(batches), runtime, positions="auto", total=4)

    assert run().position_cka  # tiny maps: cheap, kept
    monkeypatch.setattr(stream, "POSITIONS_FREE_S", 0.0)
    monkeypatch.setattr(stream, "POSITIONS_CHEAP", 0.0)  # now nothing is cheap enough
    with caplog.at_level(logging.INFO, logger="refiner"):
        result = run()
    assert result.position_cka == {} and result.images == 40  # the grid itself is whole
    assert any(r.getMessage().startswith("position CKA left out: it would add about") and "--position-cka on" in r.getMessage() for r in caplog.records)
