"""The command line: help with examples, end-to-end train + fit on digits, clear errors."""

from __future__ import annotations

import json

import pytest

from refiner.cli import main


@pytest.mark.parametrize("command", ["train", "fit", "build", "serve"])
def test_help_has_examples(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "examples:" in capsys.readouterr().out


def test_train_then_fit(tmp_path, capsys):
    for name, seed in (("a.pt", "0"), ("b.pt", "1")):
        assert main(["train", "--arch", "tiny_vgg", "--task", "digits", "--seed", seed, "--epochs", "1", "--train-per-class", "20", "--out", str(tmp_path / name)]) == 0
    code = main(["fit", "--a", str(tmp_path / "a.pt"), "--b", str(tmp_path / "b.pt"), "--task", "digits", "--g-epochs", "2", "--out", str(tmp_path / "g.pt")])
    assert code == 0
    out = capsys.readouterr().out
    assert "instability" in out and "Var(x^(2))" in out
    report = json.loads((tmp_path / "g.json").read_text())
    assert set(report["tables"]) == {"train", "test"}
    assert len(report["fit"]["holdout_mse"]) == 2

    from refiner.engine.isomorphism import load_isomorphism

    g, info = load_isomorphism(tmp_path / "g.pt")
    assert g.orders == 2 and info["report"]["a"]["layer"] == "features.4"


def test_errors_exit_2_with_message(tmp_path, capsys):
    code = main(["fit", "--a", str(tmp_path / "missing.pt"), "--b", str(tmp_path / "b.pt"), "--task", "digits", "--out", str(tmp_path / "g.pt")])
    assert code == 2
    assert "missing.pt' does not exist" in capsys.readouterr().err
    assert main(["train", "--arch", "nope", "--task", "digits", "--out", str(tmp_path / "x.pt")]) == 2
    assert "unknown architecture 'nope'" in capsys.readouterr().err
    assert main(["train", "--arch", "tiny_vgg", "--task", "digits", "--epochs", "0", "--out", str(tmp_path / "x.pt")]) == 2
    assert "epochs" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()
