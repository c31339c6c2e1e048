"""Through the CLI: the preprocessing in use is said with its source, g files carry it (and class names) to export and
build --g, --labels-a/--labels-b name a bare state_dict's outputs, and errors name the net and the flag (issue 17)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from refiner.cli import main

CLASSES = ("cat", "deer", "dog", "horse")


@pytest.fixture(scope="module")
def user_nets(tmp_path_factory):
    """A 4-class imagefolder, net A as a refiner checkpoint trained at 20 px, net B as a bare state_dict of one."""
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("user")
    rng = np.random.default_rng(0)
    for c in CLASSES:
        (root / "imgs" / c).mkdir(parents=True)
        for i in range(8):
            Image.fromarray(rng.integers(0, 255, (24, 28, 3), dtype=np.uint8)).save(root / "imgs" / c / f"{i}.png")
    common = ["--arch", "tiny_vgg", "--task", "imagefolder", "--data", str(root / "imgs"), "--epochs", "1", "--img-size", "20"]
    for name, seed in (("a.pt", "0"), ("b-trained.pt", "1")):
        assert main(["train", *common, "--seed", seed, "--out", str(root / name), "--quiet"]) == 0
    torch.save(torch.load(root / "b-trained.pt", weights_only=True)["state_dict"], root / "b.pt")  # what a user's own script saves
    return root


def _fit(root, out: str, *extra: str) -> list[str]:
    return ["fit", "--a", str(root / "a.pt"), "--b", str(root / "b.pt"), "--task", "imagefolder", "--data", str(root / "imgs"),
            "--g-epochs", "1", "--out", str(root / out), "--cache", str(root / "cache"), *extra]  # fmt: skip


def test_train_fit_and_export_say_the_preprocessing_and_where_it_came_from(user_nets, capsys, tmp_path):
    root = user_nets
    assert main(["train", "--arch", "tiny_vgg", "--task", "digits", "--epochs", "1", "--train-per-class", "5", "--out", str(tmp_path / "d.pt"), "--mean", "0.4", "0.4", "0.4"]) == 0
    err = capsys.readouterr().err
    assert "== preprocessing of d.pt (recorded in it): resized to 16x16 (bilinear), mean 0.4,0.4,0.4, std " in err
    assert "from --mean on the command line, over the default of task 'digits'" in err

    assert main(_fit(root, "g.pt", "--img-size", "20", "--labels-b", ",".join(CLASSES), "--json")) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["b"]["class_names"] == list(CLASSES)  # stdout stays one JSON document; the lines go to stderr
    assert "== preprocessing of net A (a.pt): resized to 20x20 (bilinear), mean 0.485,0.456,0.406, std 0.229,0.224,0.225; " in err
    assert "from --img-size on the command line, over the record in a.pt\n" in err
    assert "== preprocessing of net B (b.pt): resized to 20x20 (bilinear), mean 0.485,0.456,0.406, std 0.229,0.224,0.225; from --img-size on the command line, over the default of task 'imagefolder'\n" in err
    assert main(_fit(root, "g-quiet.pt", "--img-size", "20", "--quiet")) == 0
    assert "preprocessing" not in capsys.readouterr().err

    # export takes what g.pt recorded (no --img-size repeated; before, a mismatch was refused), and B's names with it
    models = tmp_path / "models"
    argv = ["export", "--a", str(root / "a.pt"), "--b", str(root / "b.pt"), "--g", str(root / "g.pt"), "--name", "m", "--models", str(models)]
    assert main([*argv, "--task", "imagefolder", "--data", str(root / "imgs"), "--json"]) == 0
    out, err = capsys.readouterr()
    meta = json.loads(out)
    assert meta["class_names"] == list(CLASSES) and meta["preprocess"]["input_size"] == [3, 20, 20]
    assert "preprocessing of net B (b.pt): resized to 20x20 (bilinear), mean 0.485,0.456,0.406, std 0.229,0.224,0.225; from the record in g.pt (from `refiner fit`)\n" in err
    with pytest.warns(UserWarning, match=r"g.pt was fitted on B's images preprocessed with \{'input_size': \(3, 20, 20\)\}, exported with"):
        assert main([*argv, "--img-size", "24", "--quiet"]) == 0  # an override still wins, with a warning


def test_a_bare_state_dict_fed_as_pretrained_weights_is_warned_about(user_nets, tmp_path, capsys):
    from refiner.models.architectures import create_model

    torch.save(create_model("resnet18", 4).state_dict(), tmp_path / "r18.pth")
    argv = ["fit", "--a", str(tmp_path / "r18.pth"), "--b", str(user_nets / "b.pt"), "--task", "imagefolder", "--data", str(user_nets / "imgs"),
            "--layer-a", "no.such.layer", "--out", str(tmp_path / "g.pt")]  # fmt: skip
    with pytest.warns(UserWarning, match=r"net A \(r18.pth\) is a bare state_dict, fed with torchvision's pretrained weights transform of resnet18; .*--img-size, --crop-pct, --mean, --std and --interpolation"):
        assert main(argv) == 2
    assert "224x224 centre crop of a 256 px shorter-side resize (bilinear), mean 0.485,0.456,0.406" in capsys.readouterr().err
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert main([*argv, "--img-size", "64"]) == 2  # the user said how it was trained: no warning
    assert not [w for w in record if "bare state_dict" in str(w.message)]


def test_labels_name_a_bare_state_dict_and_imagefolder_numbering_is_suggested(user_nets, tmp_path, capsys):
    root = user_nets
    assert main(_fit(root, "g-unnamed.pt", "--img-size", "20", "--quiet")) == 0
    capsys.readouterr()
    models = tmp_path / "models"
    argv = ["export", "--a", str(root / "a.pt"), "--b", str(root / "b.pt"), "--g", str(root / "g-unnamed.pt"), "--name", "m",
            "--models", str(models), "--task", "imagefolder", "--data", str(root / "imgs"), "--quiet"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and not models.exists()
    assert "net B (b.pt) has no class names (outputs 0..3); torchvision's ImageFolder would have numbered the 4 sorted class folders" in err
    assert "0=cat, 1=deer, 2=dog, 3=horse: if it was trained that way, pass --labels-b cat,deer,dog,horse" in err

    assert main([*argv, "--labels-b", "cat,dog"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("2 class names given for net B (b.pt), which has 4 outputs") and len(err.splitlines()) == 1 and not models.exists()
    (tmp_path / "names.txt").write_text("\n".join(CLASSES) + "\n")
    assert main([*argv, "--labels-b", str(tmp_path / "names.txt"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["class_names"] == list(CLASSES)

    build = ["build", "--a", str(root / "b.pt"), "--b", str(root / "b.pt"), "--task", "imagefolder", "--data", str(root / "imgs"), "--img-size", "20",
             "--protocol", "paper", "--g-epochs", "1", "--head-epochs", "1", "--seeds", "1", "--no-ablations", "--models", str(models),
             "--cache", str(root / "cache"), "--quiet"]  # fmt: skip
    assert main(build) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "net A (b.pt) has no class names" in err and "pass --labels-a cat,deer,dog,horse" in err
    assert main([*build, "--labels-a", ",".join(CLASSES), "--labels-b", ",".join(CLASSES), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["config"]["protocol"] == "paper" and report["comparison"]["a"]["class_names"] == list(CLASSES)


def test_analyses_take_labels_and_arch_flags(user_nets, tmp_path, capsys):
    argv = ["analyze", "stability", "--models", str(user_nets / "b.pt"), str(user_nets / "b.pt"), "--task", "imagefolder",
            "--data", str(user_nets / "imgs"), "--out", str(tmp_path / "r"), "--labels", "x,y,z"]  # fmt: skip
    assert main(argv) == 2
    assert "3 class names given for net 1 (b.pt), which has 4 outputs" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_an_unknown_architecture_names_the_net_and_its_flag(user_nets, tmp_path, capsys):
    torch.save({"encoder.weight": torch.zeros(3, 3), "head.weight": torch.zeros(2, 3)}, tmp_path / "mine.pt")
    assert main(["fit", "--a", str(user_nets / "a.pt"), "--b", str(tmp_path / "mine.pt"), "--task", "digits", "--out", str(tmp_path / "g.pt")]) == 2
    err = capsys.readouterr().err
    assert "mine.pt' is a state_dict whose keys fit no architecture" in err and "Say which architecture net B is with --arch-b NAME" in err
    assert not (tmp_path / "g.pt").exists()


def test_build_with_g_feeds_the_nets_as_g_was_fitted(user_nets, tmp_path, capsys):
    root = user_nets
    assert main(_fit(root, "g-target.pt", "--on", "target", "--img-size", "20", "--quiet")) == 0
    build = ["build", "--a", str(root / "a.pt"), "--b", str(root / "b.pt"), "--task", "imagefolder", "--data", str(root / "imgs"),
             "--g", str(root / "g-target.pt"), "--head-epochs", "1", "--seeds", "1", "--no-ablations", "--models", str(tmp_path / "models"),
             "--cache", str(root / "cache")]  # fmt: skip
    capsys.readouterr()
    assert main([*build, "--json"]) == 0  # no --img-size repeated: B (a bare state_dict) is fed as g.pt recorded
    out, err = capsys.readouterr()
    assert json.loads(out)["comparison"]["b"]["preprocess"]["input_size"] == [3, 20, 20]
    assert "preprocessing of net B (b.pt): resized to 20x20" in err and "from the record in g-target.pt (from `refiner fit`)" in err
    assert main([*build, "--name", "other", "--img-size", "24"]) == 2  # overriding what g was fitted on is refused, in one line
    err = capsys.readouterr().err.splitlines()
    assert "leave out the preprocessing options (g's are used by default), or refit g" in err[-1] and not (tmp_path / "models" / "other").exists()
