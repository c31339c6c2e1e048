"""`build --g` and `export --g` check the data a g was fitted on: another dataset or other classes are refused, another folder warns."""

from __future__ import annotations

import shutil
import warnings

import numpy as np
import pytest
from PIL import Image

from refiner.cli import main
from refiner.data.tasks import load_task
from refiner.engine.comparison import CompareConfig, compare, load_fitted_g
from refiner.engine.fitting import FitConfig
from refiner.engine.isomorphism import load_isomorphism, save_isomorphism


@pytest.fixture(scope="module")
def digits_g(tmp_path_factory, digit_nets):
    """A g fitted by `refiner fit` on digits' base classes 0-9 (the default --on base)."""
    a, b = digit_nets
    path = tmp_path_factory.mktemp("g") / "g.pt"
    assert main(["fit", "--a", str(a.path), "--b", str(b.path), "--task", "digits", "--g-epochs", "1", "--out", str(path), "--quiet"]) == 0
    return path


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_build_refuses_a_g_fitted_on_other_classes(digits_g, digit_nets, tmp_path, capsys):
    a, b = digit_nets
    argv = ["build", "--a", str(a.path), "--b", str(b.path), "--task", "digits", "--g", str(digits_g), "--seeds", "1", "--models", str(tmp_path / "m"), "--quiet"]
    assert main(argv) == 2
    err = _error_line(capsys)
    assert "g.pt was fitted on the classes 0,1,2,3,4,5,6,7,8,9 of 'digits', not on 0,1,2,3,4,5" in err and "--on target" in err
    assert not (tmp_path / "m").exists()


def test_a_fitted_g_records_its_seed(digits_g, digit_nets):
    _, (_, fit) = load_fitted_g(digits_g, *digit_nets, CompareConfig(), task="digits")
    assert fit.seed == 0  # `refiner fit`'s default --g-seed; a build with --g reports it in g_fits


def test_export_refuses_a_g_fitted_on_another_dataset(digits_g, digit_nets, tmp_path, capsys):
    a, b = digit_nets
    for c in "0123456789":  # an imagefolder of the nets' classes: the folder passes the early checks
        (tmp_path / "photos" / c).mkdir(parents=True)
    names = ",".join("0123456789")
    argv = ["export", "--a", str(a.path), "--b", str(b.path), "--g", str(digits_g), "--name", "t", "--models", str(tmp_path / "m"),
            "--task", "imagefolder", "--data", str(tmp_path / "photos"), "--labels-a", names, "--labels-b", names, "--quiet"]  # fmt: skip
    assert main(argv) == 2
    err = _error_line(capsys)
    assert "g.pt was fitted on task 'digits', another dataset than task 'imagefolder'; pass --task digits" in err
    assert not (tmp_path / "m").exists()


def test_another_folder_of_the_same_dataset_warns_and_old_files_still_load(digit_nets, tmp_path):
    a, b = digit_nets
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (tmp_path / "x" / c).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "x" / c / f"{i}.png")
    shutil.copytree(tmp_path / "x", tmp_path / "copy")
    data = load_task("imagefolder", tmp_path / "x", target=False)
    g, report, _ = compare(a, b, data, CompareConfig(fit=FitConfig(epochs=1)), tmp_path / "cache", measure=())
    assert report.data_root == str((tmp_path / "x").resolve())
    path = save_isomorphism(tmp_path / "g.pt", g, {"report": report.model_dump(mode="json")})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the folder it was fitted on: silent
        load_fitted_g(path, a, b, CompareConfig(), task="imagefolder", classes=["dog", "cat"], data_dir=tmp_path / "x")
    with pytest.warns(UserWarning, match=r"was fitted on the data in '.*x', this run reads '.*copy': fine for a copy"):
        load_fitted_g(path, a, b, CompareConfig(), task="imagefolder", data_dir=tmp_path / "copy")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an export of classes g was fitted on (a subset too): silent
        load_fitted_g(path, a, b, CompareConfig(), task="imagefolder", classes=["dog"], data_dir=tmp_path / "x", other_classes="warn")
    with pytest.warns(UserWarning, match="fitted on the classes cat,dog of 'imagefolder', without bird: the export answers them"):
        load_fitted_g(path, a, b, CompareConfig(), task="imagefolder", classes=["dog", "bird"], data_dir=tmp_path / "x", other_classes="warn")
    _, info = load_isomorphism(path)
    del info["report"]["data_root"]  # as written before the folder was recorded
    old = save_isomorphism(tmp_path / "old.pt", g, info)
    with pytest.warns(UserWarning, match="does not record its data folder"):
        load_fitted_g(old, a, b, CompareConfig(), task="imagefolder", data_dir=tmp_path / "x")
