"""Base-net training: the paper's over-fitted regime, its stop rule, and the figures a checkpoint records."""

from __future__ import annotations

import warnings

import pytest

from refiner.cli import main
from refiner.data.tasks import SplitOptions
from refiner.engine.training import TrainConfig, paper_regime, train_base
from refiner.errors import ConfigError
from refiner.models.checkpoints import load_checkpoint

SPLIT = SplitOptions(train_per_class=20)


def test_checkpoint_records_final_eval_mode_training_figures(tmp_path):
    meta = train_base("tiny_vgg", "digits", None, TrainConfig(epochs=2, batch_size=32), tmp_path / "a.pt", SPLIT)
    final = meta.info["train_eval"]
    assert meta.info["epochs_run"] == 2 and 0 < final["loss"] and 0 <= final["acc"] <= 1
    assert load_checkpoint(tmp_path / "a.pt").meta.info["train_eval"] == final


def test_paper_regime_stops_at_the_loss_and_warns_when_not_overfitted(tmp_path):
    assert paper_regime().stop_loss == 0.02 and paper_regime().epochs == 60 and not paper_regime().augment
    with pytest.raises(ConfigError, match="without augmentation"):
        paper_regime(augment=True)
    # a loss bar every epoch clears: training stops after the first epoch
    meta = train_base("tiny_vgg", "digits", None, TrainConfig(epochs=5, batch_size=32, stop_loss=10.0), tmp_path / "s.pt", SPLIT)
    assert meta.info["epochs_run"] == 1 and len(meta.info["history"]) == 1
    with pytest.warns(UserWarning, match=r"p.pt is not over-fitted as the paper's regime asks: eval-mode training CE \d\.\d+ > 0.02 after 1 epochs"):
        train_base("tiny_vgg", "digits", None, paper_regime(epochs=1, batch_size=32), tmp_path / "p.pt", SPLIT)


def test_train_cli_paper_regime_and_imbalance(tmp_path, capsys):
    out = tmp_path / "a.pt"
    with warnings.catch_warnings(record=True):
        argv = ["train", "--arch", "tiny_vgg", "--task", "digits", "--regime", "paper", "--epochs", "1", "--train-per-class", "20", "--imbalance", "4", "--out", str(out)]
        assert main(argv) == 0
    meta = load_checkpoint(out).meta
    assert meta.info["train"]["stop_loss"] == 0.02 and meta.info["split"]["imbalance"] == 4
    assert meta.info["images"]["train"] == 4 * 20 + 6 * 5  # 4 non-target digits keep 20, the 6 target digits 5
    assert "train CE" in capsys.readouterr().out
