"""Checkpoints: round trip, bare state_dicts, and refusal of unsafe or mismatched files."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from refiner.data.samples import Preprocess
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
    inferred = load_checkpoint(path)  # exactly one registered architecture has these keys and shapes
    assert inferred.meta.arch == "tiny_resnet" and "inferred from its keys" in inferred.meta.info["loaded_from"][0]
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


# --- the checkpoints people save -------------------------------------------------------------------


def _model_and_input():
    torch.manual_seed(0)
    return create_model("tiny_vgg", 5).eval(), torch.randn(2, 3, 16, 16)


def _same(loaded, model, x) -> None:
    with torch.no_grad():
        assert torch.equal(loaded.model(x), model(x))
    assert loaded.meta.arch == "tiny_vgg" and loaded.meta.num_classes == 5


def test_dataparallel_ddp_and_compiled_prefixes(tmp_path):
    model, x = _model_and_input()
    for prefix in ("module.", "_orig_mod.", "module._orig_mod."):
        path = tmp_path / f"{prefix.replace('.', '_')}.pt"
        torch.save({prefix + k: v for k, v in model.state_dict().items()}, path)
        loaded = load_checkpoint(path, arch="tiny_vgg")
        _same(loaded, model, x)
        assert any("stripped of 'module.'" in f or "stripped of '_orig_mod.'" in f for f in loaded.meta.info["loaded_from"])
    torch.save(torch.nn.DataParallel(model).state_dict(), tmp_path / "dp.pt")  # the real wrapper's keys
    _same(load_checkpoint(tmp_path / "dp.pt"), model, x)


def test_lightning_and_torchvision_reference_containers(tmp_path):
    model, x = _model_and_input()
    lightning = {"epoch": 7, "global_step": 700, "pytorch-lightning_version": "2.4.0",
                 "state_dict": {"model." + k: v for k, v in model.state_dict().items()}, "optimizer_states": [{}], "hyper_parameters": {"lr": 0.1}}  # fmt: skip
    torch.save(lightning, tmp_path / "lightning.ckpt")
    loaded = load_checkpoint(tmp_path / "lightning.ckpt")
    _same(loaded, model, x)
    assert loaded.meta.info["loaded_from"][:2] == [
        "the 'state_dict' entry of a dict with keys ['epoch', 'global_step', 'pytorch-lightning_version', 'state_dict', 'optimizer_states', 'hyper_parameters']",
        "keys stripped of 'model.'",
    ]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 3, "args": {"lr": 0.1}}, tmp_path / "ref.pth")
    _same(load_checkpoint(tmp_path / "ref.pth"), model, x)
    torch.save({"model_state_dict": model.state_dict(), "epoch": 3}, tmp_path / "msd.pt")
    _same(load_checkpoint(tmp_path / "msd.pt", arch="tiny_vgg"), model, x)
    torch.save({"state_dict_ema": model.state_dict(), "metric": 0.5}, tmp_path / "ema.pth.tar")
    _same(load_checkpoint(tmp_path / "ema.pth.tar"), model, x)


def test_safetensors_is_first_class(tmp_path):
    from safetensors.torch import save_file

    model, x = _model_and_input()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "m.safetensors")
    _same(load_checkpoint(tmp_path / "m.safetensors"), model, x)
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(CheckpointError, match="it is truncated or not a safetensors file"):
        load_checkpoint(tmp_path / "bad.safetensors")


def test_whole_pickled_model_takes_its_architecture_from_the_object(tmp_path):
    model, x = _model_and_input()
    torch.save(model, tmp_path / "whole.pt")
    with pytest.raises(UnsafeCheckpointError, match="--trust-checkpoint"):
        load_checkpoint(tmp_path / "whole.pt")
    loaded = load_checkpoint(tmp_path / "whole.pt", trust=True)  # no --arch needed: the object says what it is
    _same(loaded, model, x)
    assert loaded.meta.info["loaded_from"][0] == "a whole pickled SmallVGG"


def test_unusable_files_say_what_they_hold_and_which_flag_fixes_it(tmp_path):
    torch.save({"epoch": 3, "optimizer": {"lr": torch.tensor(0.1)}, "notes": "x"}, tmp_path / "no-weights.pt")
    with pytest.raises(CheckpointError, match=r"holds no weights.*top-level keys \['epoch', 'optimizer', 'notes'\].*--arch-a/--arch-b"):
        load_checkpoint(tmp_path / "no-weights.pt")
    torch.save({"encoder.weight": torch.zeros(3, 3), "head.weight": torch.zeros(2, 3)}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match=r"fit no architecture registered so far; its first parameters: \['encoder.weight', 'head.weight'\]\. Say which architecture the net is with --arch-a/--arch-b NAME"):
        load_checkpoint(tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match=r"Say which architecture net B is with --arch-b NAME"):
        load_checkpoint(tmp_path / "foreign.pt", who="net B", arch_flag="--arch-b")
    model, _ = _model_and_input()
    torch.save({"module." + k: v for k, v in model.state_dict().items()}, tmp_path / "dp.pt")
    with pytest.raises(CheckpointError, match=r"\(keys stripped of 'module.'\) has no 'fc.weight', so it is not a 'tiny_resnet'"):
        load_checkpoint(tmp_path / "dp.pt", arch="tiny_resnet")


def test_torchvision_pretrained_weights_come_from_the_local_cache_only(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(CheckpointError, match=r"no local copy of torchvision's ResNet18_Weights.IMAGENET1K_V1: looked in .*resnet18-f37072fd.pth\. refiner never downloads"):
        load_checkpoint("torchvision/resnet18")
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    weights = create_model("resnet18", 1000).state_dict()
    torch.save(weights, tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth")
    clf = load_checkpoint("torchvision/resnet18")
    assert (clf.meta.arch, clf.meta.num_classes, clf.meta.class_names[0]) == ("resnet18", 1000, "tench")
    assert (clf.meta.preprocess.resize_size, clf.meta.preprocess.input_size) == (256, (3, 224, 224))  # the weights' transform
    assert torch.equal(clf.model.state_dict()["fc.weight"], weights["fc.weight"])


def test_timm_pretrained_weights_come_from_the_hugging_face_cache_only(tmp_path, monkeypatch):
    import huggingface_hub.constants
    import timm
    from safetensors.torch import save_file

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(CheckpointError, match=r"no local copy of timm's 'test_convnext' weights: looked in the Hugging Face cache for timm/test_convnext.r160_in1k"):
        load_checkpoint("timm/test_convnext")
    repo = tmp_path / "hf" / "models--timm--test_convnext.r160_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    weights = timm.create_model("test_convnext").state_dict()
    save_file(weights, repo / "snapshots" / ("0" * 40) / "model.safetensors")
    clf = load_checkpoint("timm/test_convnext")
    assert (clf.meta.arch, clf.meta.num_classes, len(clf.meta.class_names)) == ("timm/test_convnext", 1000, 1000)
    assert (clf.meta.preprocess.resize_size, clf.meta.preprocess.interpolation) == (168, "bicubic")
    assert torch.equal(clf.model.state_dict()["head.fc.weight"], weights["head.fc.weight"])


def test_whole_pickled_timm_model_names_its_architecture(tmp_path):
    model = create_model("timm/test_vit", 3).eval()
    torch.save(model, tmp_path / "vit.pt")
    loaded = load_checkpoint(tmp_path / "vit.pt", trust=True)
    assert (loaded.meta.arch, loaded.meta.num_classes) == ("timm/test_vit", 3)
    assert loaded.meta.preprocess.input_size == (3, 160, 160)  # timm's pretrained config for the architecture
    x = torch.randn(1, 3, 160, 160)
    assert torch.equal(loaded.model(x), model(x))
