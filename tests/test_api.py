"""The public Python API, used as a user would: plain torchvision modules, DataLoaders made here, tensors."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision
from torch.utils.data import DataLoader, TensorDataset

import refiner
from refiner.cli.main import main


def _loader(n: int = 48, size: int = 32, batch: int = 16, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 3, size, size, generator=g), torch.randint(0, 4, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch)


def _hsic_u(k: np.ndarray, l: np.ndarray) -> float:
    """Unbiased HSIC through U-centred Gram matrices (Szekely and Rizzo), float64."""

    def u(m):
        n = len(m)
        m = m.copy()
        np.fill_diagonal(m, 0)
        out = m - m.sum(0, keepdims=True) / (n - 2) - m.sum(1, keepdims=True) / (n - 2) + m.sum() / ((n - 1) * (n - 2))
        np.fill_diagonal(out, 0)
        return out

    return float((u(k) * u(l)).sum() / (len(k) * (len(k) - 3)))


def _reference_cka(model_a, model_b, loader, layers_a, layers_b) -> np.ndarray:
    """Minibatch CKA computed independently: torchvision's feature extractor on eval copies, numpy float64 per batch."""
    from torchvision.models.feature_extraction import create_feature_extractor

    import copy

    copies = [copy.deepcopy(m).eval() for m in (model_a, model_b)]
    for m in (m for c in copies for m in c.modules()):
        if hasattr(m, "inplace"):
            m.inplace = False  # so that each feature is the layer's own output, not a later in-place ReLU's
    fa = create_feature_extractor(copies[0], {n: n for n in layers_a})
    fb = create_feature_extractor(copies[1], {n: n for n in layers_b})
    grams_a, grams_b = {n: [] for n in layers_a}, {n: [] for n in layers_b}
    with torch.no_grad():
        for x, _ in loader:
            for grams, extractor in ((grams_a, fa), (grams_b, fb)):
                out = extractor(x.clone())
                for n in grams:
                    f = out[n].double().flatten(1).numpy()
                    grams[n].append(f @ f.T)
    grid = np.zeros((len(layers_a), len(layers_b)))
    for i, na in enumerate(layers_a):
        for j, nb in enumerate(layers_b):
            xy = np.mean([_hsic_u(k, l) for k, l in zip(grams_a[na], grams_b[nb])])
            xx = np.mean([_hsic_u(k, k) for k in grams_a[na]])
            yy = np.mean([_hsic_u(l, l) for l in grams_b[nb]])
            grid[i, j] = xy / np.sqrt(xx * yy)
    return grid


def test_atlas_equals_an_independent_minibatch_cka_on_the_loaders_batches():
    torch.manual_seed(0)
    a, b = torchvision.models.resnet18(num_classes=4), torchvision.models.vgg11(num_classes=4)
    layers_a, layers_b = ["layer1.0.conv1", "layer2", "layer3.1.add"], ["features.0", "features.3", "features.8"]  # in-place ReLUs follow features.0 and .3
    loader = _loader()
    result = refiner.atlas(a, b, loader, layers_a, layers_b)
    assert result.cka.shape == (3, 3) and result.layers_a == layers_a and result.layers_b == layers_b
    assert result.report.batches == 3 and result.report.images == 48
    reference = _reference_cka(a, b, loader, ["layer1.0.conv1", "layer2.1.relu_1", "layer3.1.add"], layers_b)
    assert np.abs(result.cka - reference).max() <= 1e-4
    same = refiner.atlas(a, a, loader, layers_a, layers_a)
    assert np.abs(np.diag(same.cka) - 1).max() <= 1e-5


def test_atlas_default_layers_match_the_command_line_and_the_result_shows_and_saves(tmp_path):
    a = torchvision.models.resnet18(num_classes=4)
    result = refiner.atlas(a, torchvision.models.resnet18(num_classes=4), _loader(32, batch=8), max_layers=5)
    assert len(result.layers_a) == 5 and "layer3.1.add" in result.layers_a  # the build's default is kept
    assert result.report.default_pair == ["layer3.1.add", "layer3.1.add"]
    png = result._repr_png_()
    assert png.startswith(b"\x89PNG")
    out = result.save(tmp_path / "atlas")
    assert {p.name for p in out.iterdir()} >= {"atlas.json", "cka.png", "report.html"}
    assert result.best_match("layer3.1.add")[0] in result.layers_b


def test_models_handed_in_come_back_unchanged():
    a, b = torchvision.models.resnet18(num_classes=4), torchvision.models.resnet18(num_classes=4)
    a.train()
    before = {k: v.clone() for k, v in a.state_dict().items()}
    grads = [p.requires_grad for p in a.parameters()]
    loader = _loader(32, batch=8)
    refiner.atlas(a, b, loader, ["layer1", "layer2"], ["layer1", "layer2"])
    fitted = refiner.fit(a, b, loader, "layer2", "layer2", steps=5)
    refiner.refined_model(a, fitted, b)
    assert a.training and all(m.training for m in a.modules())
    assert all(torch.equal(before[k], v) for k, v in a.state_dict().items())
    assert [p.requires_grad for p in a.parameters()] == grads and next(a.parameters()).device.type == "cpu"


def test_the_decomposition_sums_to_g_and_the_table_is_measured_on_test():
    a, b = torchvision.models.resnet18(num_classes=4), torchvision.models.resnet18(num_classes=4)
    fitted = refiner.fit(a, b, _loader(32, batch=8), "layer2", "layer2", test=_loader(16, batch=8, seed=1), orders=3, steps=30)
    x_a = torch.randn(5, 128, 4, 4)
    parts = fitted.decompose(x_a)
    assert len(parts) == 4 and parts[0].shape == (5, 128, 4, 4)
    whole = fitted.g(x_a)
    assert torch.allclose(torch.stack(parts).sum(0), whole, rtol=1e-4, atol=1e-5 * whole.abs().max().item())
    assert set(fitted.tables) == {"train", "test"} and fitted.variance.images == 16
    assert 0 <= fitted.instability and fitted.holdout_mse > 0 and fitted.fit.total_steps == 30


def test_fit_features_on_tensors_alone():
    x = torch.randn(80, 6, 3, 3)
    fitted = refiner.fit_features(x, -x, test=(x[:16], -x[:16]), steps=400)
    assert fitted.instability < 0.05 and set(fitted.tables) == {"train", "test"}
    parts = fitted.decompose(x[:4])
    assert torch.allclose(sum(parts), fitted.g(x[:4]), atol=1e-4)


def test_a_g_saved_from_python_is_accepted_by_build_and_export(tmp_path, capsys):
    """g fitted on modules and a DataLoader, saved; the modules saved as plain state_dicts; the CLI takes the three."""
    torch.manual_seed(0)
    a, b = refiner.create_model("tiny_vgg", 10), refiner.create_model("tiny_vgg", 10)
    train = refiner.loader("digits", "train", target=True, per_class=20, batch_size=32)
    fitted = refiner.fit(a, b, train, steps=20)
    fitted.save(tmp_path / "g.pt")
    torch.save(a.state_dict(), tmp_path / "a.pt")
    torch.save(b.state_dict(), tmp_path / "b.pt")
    argv = ["build", "--a", str(tmp_path / "a.pt"), "--b", str(tmp_path / "b.pt"), "--g", str(tmp_path / "g.pt"), "--task", "digits",
            "--train-per-class", "20", "--seeds", "1", "--head-epochs", "1", "--no-ablations", "--quiet", "--models", str(tmp_path / "models")]  # fmt: skip
    with pytest.warns(UserWarning, match="fitted from Python"):
        assert main(argv) == 0
    assert "artifact:" in capsys.readouterr().out
    export = ["export", "--a", str(tmp_path / "a.pt"), "--b", str(tmp_path / "b.pt"), "--g", str(tmp_path / "g.pt"), "--name", "x", "--quiet",
              "--models", str(tmp_path / "models")]  # fmt: skip
    assert main(export) == 0
    other = refiner.create_model("tiny_vgg", 10)
    torch.save(other.state_dict(), tmp_path / "other.pt")
    export[2] = str(tmp_path / "other.pt")
    assert main(export) == 2
    assert "was fitted with net A" in capsys.readouterr().err


def test_bad_input_raises_typed_errors_naming_what_was_wrong():
    a = refiner.create_model("tiny_vgg", 4)
    batches = [torch.randn(8, 3, 16, 16) for _ in range(3)]
    with pytest.raises(refiner.LayerError, match=r"'features\.99'.*valid names: .*features\.0"):
        refiner.atlas(a, a, batches, ["features.99"], ["features.0"])
    with pytest.raises(refiner.ConfigError, match=r"batch 3 of data has 2 image\(s\).*at least 4.*drop_last=True"):
        refiner.atlas(a, a, [*batches[:2], torch.randn(2, 3, 16, 16)], ["features.0"], ["features.0"])
    with pytest.raises(refiner.ConfigError, match=r"different numbers of batches: data has 1 more after batch 2"):
        refiner.atlas(a, a, batches, ["features.0"], ["features.0"], data_b=batches[:2])
    with pytest.raises(refiner.ConfigError, match=r"batch 1 has 8 images in data but 4 in data_b"):
        refiner.atlas(a, a, batches, ["features.0"], ["features.0"], data_b=[b[:4] for b in batches])
    with pytest.raises(refiner.DataError, match=r"float image batches"):
        refiner.atlas(a, a, [torch.zeros(8, 3, 16, 16, dtype=torch.uint8)], ["features.0"], ["features.0"])
    with pytest.raises(refiner.LayerError, match="valid names"):
        refiner.fit(a, a, batches, "nope", "features.4", steps=2)
    with pytest.raises(refiner.CheckpointError, match="does not exist"):
        refiner.load("missing.pt")
    assert issubclass(refiner.ConfigError, refiner.RefinerError) and issubclass(refiner.ConfigError, ValueError)


def test_the_public_surface_is_listed_cheap_and_documented():
    code = "import sys, refiner; assert 'torch' not in sys.modules, 'import refiner pulled in torch'; print(len(refiner.__all__))"
    assert int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout) >= 30
    for name in refiner.__all__[1:]:
        obj = getattr(refiner, name)
        assert obj.__doc__, f"refiner.{name} has no docstring"
    for name in ("atlas", "fit", "fit_features", "load", "layers", "refined_model", "export", "loader", "register_arch", "register_task"):
        assert ">>> " in getattr(refiner, name).__doc__, f"refiner.{name}'s docstring has no example"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        refiner.nope  # noqa: B018


def test_the_library_logs_and_never_prints(capsys, caplog):
    import logging

    a = refiner.create_model("tiny_vgg", 4)
    with caplog.at_level(logging.INFO, logger="refiner"):
        refiner.atlas(a, a, [torch.randn(8, 3, 16, 16) for _ in range(2)], ["features.0"], ["features.0"])
    out = capsys.readouterr()
    assert out.out == "" and "==" not in out.err
    assert any("CKA of 1 x 1 layers" in r.getMessage() for r in caplog.records)


def test_a_shuffling_loader_still_pairs_each_image_with_itself():
    """fit reads both nets in one pass, so B's feature of an image meets A's of the same image even when the loader shuffles:
    B = A gives an instability near 0, where two passes in two orders would give pairs of unrelated images (about 1)."""
    a = refiner.create_model("tiny_vgg", 4)
    x = torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    shuffled = DataLoader(TensorDataset(x, torch.zeros(64, dtype=torch.long)), batch_size=16, shuffle=True)
    fitted = refiner.fit(a, a, shuffled, orders=1, steps=300, seed=0)
    assert fitted.instability < 0.1
    with pytest.raises(refiner.ConfigError, match="data_b is a shuffling DataLoader.*shuffle=False"):
        refiner.fit(a, a, _loader(size=16), data_b=shuffled, steps=10)


def test_plain_modules_need_their_preprocessing_to_be_exported_and_build_feeds_them_as_the_task(tmp_path, caplog):
    a, b = refiner.create_model("tiny_vgg", 4), refiner.create_model("tiny_vgg", 4)
    fitted = refiner.fit(a, b, [torch.randn(16, 3, 16, 16) for _ in range(2)], steps=10)
    with pytest.raises(refiner.ConfigError, match="record no preprocessing.*input size \\(3, 16, 16\\).*preprocess="):
        refiner.export(refiner.refined_model(a, fitted, b), "tiny", models=tmp_path)
    pre = refiner.Preprocess(input_size=(3, 16, 16), mean=(0.3,) * 3, std=(0.37,) * 3)
    out = refiner.export(refiner.refined_model(a, fitted, b), "tiny", models=tmp_path, preprocess=pre)
    assert out.metadata.preprocess == pre
    known = refiner.refined_model(refiner.net(a, preprocess=pre), fitted, b)
    assert refiner.export(known, "tiny", models=tmp_path).metadata.preprocess == pre
    import logging

    config = refiner.BuildConfig(name="tiny", seeds=1, ablations=False, head={"epochs": 1}, compare={"fit": {"max_steps": 10}})
    with caplog.at_level(logging.INFO, logger="refiner"):
        built = refiner.build(refiner.create_model("tiny_vgg", 10), refiner.create_model("tiny_vgg", 10), "digits", config=config, models=tmp_path)
    assert "plain module with no recorded preprocessing: fed as task 'digits' preprocesses (16x16" in caplog.text
    assert built.model.spec.preprocess.input_size == (3, 16, 16) and built.verdict == built.report.verdict
