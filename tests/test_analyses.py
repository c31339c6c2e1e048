"""`refiner analyze`: each analysis end to end on tiny nets, known directions, and clear errors."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from refiner.analyses.compression import CompressionConfig, magnitude_prune, zero_fraction
from refiner.analyses.diagnose import DiagnoseConfig, diagnose
from refiner.analyses.distillation import DistillationConfig, distillation, kd_loss
from refiner.analyses.figures import picture_rows
from refiner.analyses.measure import AnalysisConfig, load_analysis_data, measure_pair
from refiner.analyses.stability import StabilityConfig, stability
from refiner.cli import main
from refiner.engine.fitting import FitConfig
from refiner.engine.training import TrainConfig
from refiner.errors import ConfigError

# g fitted well enough on 400 digit images that an identical net leaves Var(x^Delta) near 0.
TIGHT = ["--g-epochs", "10", "--g-lr", "3e-2", "3e-3", "--g-batch", "16", "--train-per-class", "40", "--test-per-class", "10"]
TIGHT_CONFIG = AnalysisConfig(fit=FitConfig(epochs=10, lr_start=3e-2, lr_end=3e-3, batch_size=16), train_per_class=40, test_per_class=10)
QUICK_CONFIG = AnalysisConfig(fit=FitConfig(epochs=2, lr_start=1e-2, lr_end=1e-3), train_per_class=40, test_per_class=10)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors gain nothing from threads, and OpenMP spinning slows down badly on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _files(folder) -> set[str]:
    return {p.name for p in folder.iterdir()}


@pytest.mark.parametrize("analysis", ["diagnose", "stability", "compression", "distillation"])
def test_help_has_examples(analysis, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["analyze", analysis, "--help"])
    assert exit_info.value.code == 0
    assert "examples:" in capsys.readouterr().out


def test_stability_cli_report(digit_nets, tmp_path, capsys):
    a, b = digit_nets
    out = tmp_path / "stability"
    argv = ["analyze", "stability", "--models", str(a.path), str(b.path), "--layers", "features.2", "features.5", "--task", "digits"]
    assert main([*argv, *TIGHT, "--out", str(out)]) == 0
    assert "features.5: instability" in capsys.readouterr().out
    assert {"report.json", "report.html", "instability.png", "orders.png"} <= _files(out)
    report = json.loads((out / "report.json").read_text())
    assert report["runtime"]["device"] == "cpu" and report["runtime"]["amp"] == "off" and report["runtime"]["name"]
    assert [s["layer"] for s in report["layers"]] == ["features.2", "features.5"]
    assert len(report["pairs"]) == 4  # 2 ordered pairs x 2 layers
    for s in report["layers"]:
        assert s["pairs"] == 2 and len(s["var_orders"]) == 3
        assert 0 < s["instability"] and 0 < s["cka"] <= 1
    assert "linear CKA" in (out / "report.html").read_text()
    assert main([*argv, *TIGHT, "--out", str(out)]) == 2  # never overwrites a report
    assert "already exists" in capsys.readouterr().err


def test_identical_copy_is_stable(digit_nets, tmp_path):
    a, b = digit_nets
    same = stability([a, a], "digits", tmp_path / "same", config=StabilityConfig(analysis=TIGHT_CONFIG)).layers[0]
    other = stability([a, b], "digits", tmp_path / "other", config=StabilityConfig(analysis=TIGHT_CONFIG)).layers[0]
    assert same.instability < 0.03 and same.cka > 0.999
    assert other.instability > 3 * same.instability


def test_stability_needs_two_models(digit_nets, tmp_path, capsys):
    assert main(["analyze", "stability", "--models", str(digit_nets[0].path), "--task", "digits", "--out", str(tmp_path / "r")]) == 2
    assert "at least 2 models, got 1" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_compression_discards_more_when_pruned_harder(digit_nets, tmp_path, capsys):
    a, _ = digit_nets
    out = tmp_path / "compression"
    argv = ["analyze", "compression", "--model", str(a.path), "--sparsity", "0.9,0", "--finetune-epochs", "1", "--batch-size", "32"]
    assert main([*argv, *TIGHT, "--images", "2", "--task", "digits", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    none, most = report["pruned"]  # sorted by sparsity
    assert (none["sparsity"], most["sparsity"]) == (0.0, 0.9)
    assert none["zero_fraction"] < 0.01 and most["zero_fraction"] == pytest.approx(0.9, abs=0.01)
    assert none["accuracy_drop"] == 0.0 and none["finetune"] == []
    discarded = [r["comparison"]["tables"]["test"]["var_delta"] for r in (none, most)]
    assert discarded[0] < 0.03 and discarded[1] > 2 * discarded[0]
    assert {"discarded.png", "drop-vs-discarded.png", "discarded-0.00.png", "discarded-0.90.png", "report.html"} <= _files(out)
    assert len(report["pictured_images"]) == 2
    assert {p.name for p in (out / "nets").iterdir()} == {"pruned-0.00.pt", "pruned-0.90.pt"}
    assert "sparsity 0.90" in capsys.readouterr().out


def test_magnitude_prune_zeroes_the_smallest_weights(digit_nets):
    model = digit_nets[0].model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruned = magnitude_prune(model, 0.6)
    assert zero_fraction(pruned) == pytest.approx(0.6, abs=0.01)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the original is untouched
    assert zero_fraction(magnitude_prune(model, 0.0)) == zero_fraction(model)


@pytest.mark.parametrize(
    "sparsity, message",
    [("0.5,1", "outside \\[0, 1\\)"), ("-0.1", "outside \\[0, 1\\)"), ("0.5,x", "comma-separated numbers"), ("0.5,,0.9", "'0.5,,0.9' has an empty entry")],
)
def test_compression_rejects_bad_sparsity(digit_nets, tmp_path, capsys, sparsity, message):
    argv = ["analyze", "compression", "--model", str(digit_nets[0].path), "--sparsity", sparsity, "--task", "digits", "--out", str(tmp_path / "r")]
    assert main(argv) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "r").exists()


def test_compression_config_validates_sparsities():
    assert CompressionConfig(sparsities=(0.8, 0.0, 0.8)).sparsities == (0.0, 0.8)
    with pytest.raises(ValidationError, match="sparsity 1.5 is outside"):
        CompressionConfig(sparsities=(1.5,))
    with pytest.raises(ValidationError, match="at least one sparsity"):
        CompressionConfig(sparsities=())


def test_diagnose_ranks_channels_and_pictures_them(digit_nets, tmp_path):
    weak, strong = digit_nets
    out = tmp_path / "diagnose"
    report = diagnose(weak, strong, "digits", out, config=DiagnoseConfig(analysis=QUICK_CONFIG, images=3))
    for d in (report.unreliable, report.blind_spots):
        shares = [c.share for c in d.channels if c.share is not None]
        assert len(d.channels) == 16 and shares == sorted(shares, reverse=True)
        assert d.pictured_channel == d.channels[0].channel and len(d.pictured_images) == 3
    assert report.unreliable.comparison.b.path == weak.path.name  # unreliable: the weak net's feature is reconstructed
    assert report.blind_spots.comparison.b.path == strong.path.name
    assert {"unreliable-features.png", "blind-spots.png", "report.json", "report.html"} <= _files(out)
    assert set(report.test_acc) == {"weak", "strong"}
    with pytest.raises(ConfigError, match="--channel 99 does not exist"):
        diagnose(weak, strong, "digits", tmp_path / "bad", config=DiagnoseConfig(analysis=QUICK_CONFIG, channel=99))
    assert not (tmp_path / "bad").exists()


def test_pictured_feature_is_isomorphic_plus_delta(digit_nets):
    """Each row pictures its own test image: x_c is B's feature of it, g(x_A)_c is g's forward pass on A's feature of it.

    Both are recomputed here from the images through the nets' trunks (not from the cached features or g's
    decomposition), in B's standardised space; x^Delta_c is their difference.
    """
    from refiner.data.datasets import ImageDataset
    from refiner.models.layers import split_model

    a, b = digit_nets
    data = load_analysis_data("digits", None, a.meta.class_names, QUICK_CONFIG)
    m = measure_pair(a, b, data, None, None, QUICK_CONFIG, None)
    indices, channel = [7, 2], 3
    rows = picture_rows(m.g, m.test, data.test, b.meta.preprocess, channel=channel, indices=indices)
    assert [r.image.shape for r in rows] == [(16, 16, 3)] * 2
    assert [r.caption for r in rows] == [f"test image {i} ({data.test[i].label})" for i in indices]

    def images(clf):
        dataset = ImageDataset([data.test[i] for i in indices], data.classes, clf.meta.preprocess)
        return torch.stack([dataset[j][0] for j in range(len(dataset))])

    trunk_a, _ = split_model(a.model, m.report.a.layer)
    trunk_b, _ = split_model(b.model, m.report.b.layer)
    with torch.no_grad():
        feature = m.g.standardize_target(trunk_b(images(b)))[:, channel]
        isomorphic = m.g.standardize_target(m.g(trunk_a(images(a))))[:, channel]
    for r, f, iso in zip(rows, feature, isomorphic):
        assert r.feature.shape == r.delta.shape == (8, 8)
        np.testing.assert_allclose(r.feature, f.numpy(), atol=1e-4)
        np.testing.assert_allclose(r.isomorphic, iso.numpy(), atol=1e-4)
        np.testing.assert_allclose(r.delta, (f - iso).numpy(), atol=1e-4)
    assert not np.allclose(rows[0].feature, rows[1].feature)  # two different images


def test_distillation_generations_and_blind_spots(digit_nets, tmp_path):
    a, _ = digit_nets
    config = DistillationConfig(analysis=QUICK_CONFIG, generations=2, train=TrainConfig(epochs=2, batch_size=32, lr=0.05))
    report = distillation(a, "digits", tmp_path / "bans", config=config)
    assert [g.generation for g in report.generations] == [0, 1, 2]
    assert [g.blind_spots is None for g in report.generations] == [False, False, True]
    assert all(g.blind_spots.b.path == "generation-2.pt" for g in report.generations[:2])
    assert report.generations[0].test_acc > 0.5 and len(report.generations[1].history) == 2
    assert {"blind-spots.png", "report.json", "report.html", "nets"} <= _files(tmp_path / "bans")


def test_kd_loss_is_cross_entropy_plus_kl():
    logits, labels = torch.randn(5, 4), torch.tensor([0, 1, 2, 3, 0])
    ce = torch.nn.functional.cross_entropy(logits, labels)
    assert torch.allclose(kd_loss(logits, logits, labels, 0.5, 1.0), ce, atol=1e-6)  # same teacher: KL = 0
    assert kd_loss(logits, torch.randn(5, 4), labels, 0.5, 1.0) > ce
