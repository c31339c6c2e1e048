"""Checkpoints: round trip, bare state_dicts, and refusal of unsafe or mismatched files."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from refiner.data.datasets import Preprocess
from refiner.errors import CheckpointError, UnsafeCheckpointError
from refiner.models.architectures import create_model
from refiner.models.checkpoints import CheckpointMeta, load_checkpoint, save_checkpoint


def _meta(n: int = 4) -> CheckpointMeta:
    return CheckpointMeta(arch="tiny_vgg", num_classes=n, class_names=list("abcd")[:n], preprocess=Preprocess(input_size=(3, 16, 16)))


def test_round_trip(tmp_path):
    model = create_model("tiny_vgg", 4).eval()
    save_checkpoint(tmp_path / "m.pt", model, _meta())
    loaded = load_checkpoint(tmp_path / "m.pt")
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(loaded.model(x), model(x))
    assert loaded.meta.class_names == ["a", "b", "c", "d"]
    assert len(loaded.sha256) == 64


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_malicious_pickle_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": _Evil()}, path)
    with pytest.raises(UnsafeCheckpointError, match="arbitrary unpickling.*--trust-checkpoint"):
        load_checkpoint(path)
    raw = tmp_path / "raw.pkl"
    raw.write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(UnsafeCheckpointError):
        load_checkpoint(raw)


def test_pickled_module_needs_opt_in(tmp_path):
    model = create_model("tiny_vgg", 3).eval()
    path = tmp_path / "module.pt"
    torch.save(model, path)
    with pytest.raises(UnsafeCheckpointError, match="refusing to load"):
        load_checkpoint(path, arch="tiny_vgg")
    loaded = load_checkpoint(path, arch="tiny_vgg", trust=True)
    x = torch.randn(1, 3, 16, 16)
    assert torch.equal(loaded.model(x), model(x))


def test_bare_state_dict(tmp_path):
    model = create_model("tiny_resnet", 7)
    path = tmp_path / "sd.pt"
    torch.save(model.state_dict(), path)
    with pytest.raises(CheckpointError, match="pass --arch"):
        load_checkpoint(path)
    loaded = load_checkpoint(path, arch="tiny_resnet")
    assert loaded.meta.num_classes == 7  # read from fc.weight
    with pytest.raises(CheckpointError, match="has no 'classifier.4.weight'"):
        load_checkpoint(path, arch="tiny_vgg")


def test_wrong_architecture_and_missing_keys(tmp_path):
    model = create_model("tiny_vgg", 4)
    state = model.state_dict()
    del state["features.0.weight"]
    torch.save(state, tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match=r"missing keys \['features.0.weight'\]"):
        load_checkpoint(tmp_path / "missing.pt", arch="tiny_vgg")
    save_checkpoint(tmp_path / "m.pt", model, _meta())
    with pytest.raises(CheckpointError, match="holds a 'tiny_vgg', not the requested 'small_vgg'"):
        load_checkpoint(tmp_path / "m.pt", arch="small_vgg")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="safe loader cannot read it"):
        load_checkpoint(tmp_path / "junk.pt")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(tmp_path / "junk.pt", trust=True)
