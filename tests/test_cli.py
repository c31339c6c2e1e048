"""The command line: help with examples, end-to-end train + fit on digits, clear errors."""

from __future__ import annotations

import argparse
import json

import pytest

from refiner.cli import main

COMMANDS = ["train", "fit", "build", "serve", "layers", "analyze diagnose", "analyze stability", "analyze compression", "analyze distillation"]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_has_examples_and_every_option_is_explained(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command.split(), "--help"])
    assert exit_info.value.code == 0
    assert "examples:" in capsys.readouterr().out
    from refiner.cli.main import parser as _parser

    parser = _parser()
    for word in command.split():
        parser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[word]
    unexplained = [a.option_strings[0] for a in parser._actions if a.option_strings and not a.help]
    assert not unexplained, f"options without help text: {unexplained}"


def test_layers_lists_split_points_with_the_default(capsys, digit_nets):
    assert main(["layers", "--arch", "resnet18"]) == 0
    out = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    assert ["layer3.1.add", "256x14x14", "<-", "default"] in out and not any(row[0] in ("x", "fc") for row in out)
    assert main(["layers", "--checkpoint", str(digit_nets[0].path)]) == 0
    assert ["features.4", "16x8x8", "<-", "default"] in [line.split() for line in capsys.readouterr().out.splitlines()]


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
    argv = ["fit", "--a", str(tmp_path / "a.pt"), "--b", str(tmp_path / "b.pt"), "--task", "digits", "--g-epochs", "1", "--out", str(tmp_path / "g2.pt"), "--json"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)  # stdout is one JSON document
    assert report["a"]["layer"] == "features.4" and set(report["tables"]) == {"train", "test"}


def test_errors_exit_2_with_message(tmp_path, capsys):
    code = main(["fit", "--a", str(tmp_path / "missing.pt"), "--b", str(tmp_path / "b.pt"), "--task", "digits", "--out", str(tmp_path / "g.pt")])
    assert code == 2
    assert "missing.pt' does not exist" in capsys.readouterr().err
    assert main(["train", "--arch", "nope", "--task", "digits", "--out", str(tmp_path / "x.pt")]) == 2
    assert "unknown architecture 'nope'" in capsys.readouterr().err
    assert main(["train", "--arch", "tiny_vgg", "--task", "digits", "--epochs", "0", "--out", str(tmp_path / "x.pt")]) == 2
    assert "epochs" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()


def test_build_log_in_a_file_is_plain_text(tmp_path, digit_nets):
    """Written to a file (not a terminal) a build's output has stage lines and no carriage returns or escape codes."""
    import os
    import subprocess
    import sys

    a, b = digit_nets
    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}
    cmd = [sys.executable, "-m", "refiner", "build", "--a", str(a.path), "--b", str(b.path), "--task", "digits", "--g-epochs", "1",
           "--head-epochs", "1", "--seeds", "1", "--no-ablations", "--models", str(tmp_path / "models"), "--cache", str(tmp_path / "c")]  # fmt: skip
    for quiet in (False, True):
        log = tmp_path / f"build-{quiet}.log"
        with log.open("wb") as f:
            subprocess.run(cmd + (["--quiet"] if quiet else []), stdout=f, stderr=subprocess.STDOUT, env=env, check=True)
        text = log.read_bytes()
        assert b"\x1b" not in text and b"\r" not in text, text[:500]
        assert (b"== fine-tuning 4 variants x 1 seeds" in text) != quiet and b"artifact:" in text


def test_plain_progress_lines(monkeypatch):
    import io

    from refiner import progress

    monkeypatch.setattr(progress, "LOG_INTERVAL_S", 0.0)
    out = io.StringIO()
    for _ in progress._PlainLines(range(3), desc="fit g", unit="step", file=out, disable=False):
        pass
    lines = out.getvalue().splitlines()
    assert lines and all(line.startswith("fit g: ") and "/3 steps" in line and "elapsed" in line for line in lines)
    monkeypatch.setattr(progress, "LOG_INTERVAL_S", 3600.0)  # refreshes (postfix, tqdm's monitor) within the interval write nothing
    quiet = io.StringIO()
    shown = progress._PlainLines(total=1000, desc="fit g", unit="step", file=quiet, disable=False)
    for _ in range(1000):
        shown.update(1)
        shown.set_postfix(loss="0.1")
    shown.close()
    assert quiet.getvalue() == ""


def test_fit_torchvision_efficientnet_on_a_tiny_imagefolder(tmp_path, capsys):
    """A torchvision architecture outside the hand-kept list, from bare state_dicts, on user images."""
    import numpy as np
    import torch
    from PIL import Image

    from refiner.models.architectures import create_model

    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(8):
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(tmp_path / "imgs" / c / f"{i}.jpg")
    for name, seed in (("a.pt", 0), ("b.pt", 1)):
        torch.manual_seed(seed)
        torch.save(create_model("efficientnet_b0", 2).state_dict(), tmp_path / name)
    argv = ["fit", "--a", str(tmp_path / "a.pt"), "--b", str(tmp_path / "b.pt"), "--task", "imagefolder", "--data", str(tmp_path / "imgs"),
            "--classes", "cat,dog", "--g-epochs", "1", "--out", str(tmp_path / "g.pt"), "--cache", str(tmp_path / "c"), "--json",
            "--arch-a", "efficientnet_b0", "--arch-b", "efficientnet_b0"]  # fmt: skip
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["a"]["arch"] == "efficientnet_b0" and report["a"]["layer"] == "features.5.1.add"
    assert report["a"]["feature_shape"] == [112, 14, 14] and 0 <= report["tables"]["test"]["instability"]


def _tiny_imagefolder(root, sizes=((40, 48), (64, 30))):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(8):
            h, w = sizes[i % len(sizes)]
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / c / f"{i}.jpg")
    return root


@pytest.mark.parametrize(
    ("arch", "layer", "shape"),
    [
        ("timm/convnext_atto", "stages.2.blocks.5.add", [160, 14, 14]),
        ("timm/test_vit", "blocks.3.add_1", [64, 101, 1]),  # ViT tokens (cls + 10 x 10 patches) as a C x L x 1 map
    ],
)
def test_fit_timm_models_on_a_tiny_imagefolder(tmp_path, capsys, arch, layer, shape):
    """A timm model by its timm name, from bare state_dicts, fed with its pretrained config's resize + crop."""
    import torch

    from refiner.models.architectures import create_model

    data = _tiny_imagefolder(tmp_path / "imgs")
    for name, seed in (("a.pt", 0), ("b.pt", 1)):
        torch.manual_seed(seed)
        torch.save(create_model(arch, 2).state_dict(), tmp_path / name)
    argv = ["fit", "--a", str(tmp_path / "a.pt"), "--b", str(tmp_path / "b.pt"), "--task", "imagefolder", "--data", str(data),
            "--classes", "cat,dog", "--g-epochs", "1", "--out", str(tmp_path / "g.pt"), "--cache", str(tmp_path / "c"), "--json",
            "--arch-a", arch, "--arch-b", arch]  # fmt: skip
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["a"]["arch"] == arch and report["a"]["layer"] == layer
    assert report["a"]["feature_shape"] == shape and 0 <= report["tables"]["test"]["instability"]


def test_train_records_preprocessing_overrides_and_fit_applies_them(tmp_path, capsys):
    from refiner.models.checkpoints import load_checkpoint

    data = _tiny_imagefolder(tmp_path / "imgs")
    common = ["--task", "imagefolder", "--data", str(data), "--classes", "cat,dog", "--epochs", "1", "--quiet"]
    pre = ["--img-size", "20", "--crop-pct", "0.8", "--mean", "0.4", "0.5", "0.6", "--std", "0.2", "0.3", "0.25", "--interpolation", "bicubic"]
    assert main(["train", "--arch", "tiny_vgg", "--out", str(tmp_path / "a.pt"), *common, *pre]) == 0
    meta = load_checkpoint(tmp_path / "a.pt").meta
    assert meta.preprocess.model_dump() == {
        "input_size": (3, 20, 20), "mean": (0.4, 0.5, 0.6), "std": (0.2, 0.3, 0.25), "resize_size": 25, "interpolation": "bicubic",
    }  # fmt: skip
    assert main(["train", "--arch", "tiny_vgg", "--out", str(tmp_path / "b.pt"), "--seed", "1", *common]) == 0
    assert load_checkpoint(tmp_path / "b.pt").meta.preprocess.input_size == (3, 224, 224)  # the task's default
    capsys.readouterr()
    fit = ["fit", "--a", str(tmp_path / "a.pt"), "--b", str(tmp_path / "b.pt"), "--task", "imagefolder", "--data", str(data),
           "--classes", "cat,dog", "--g-epochs", "1", "--out", str(tmp_path / "g.pt"), "--json", "--img-size", "24"]  # fmt: skip
    assert main(fit) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["a"]["feature_shape"][1:] == [12, 12] and report["b"]["feature_shape"][1:] == [12, 12]  # both fed 24 x 24
    assert main([*fit[:-2], "--crop-pct", "1.5"]) == 2
    assert "--crop-pct must be in (0, 1], got 1.5" in capsys.readouterr().err


def test_output_cut_short_by_a_closed_pipe_is_not_a_traceback(tmp_path, monkeypatch):
    """`refiner layers ... | head -1`: the reader goes away, the command ends quietly with 0."""
    import io
    import os
    import sys

    sink = os.open(tmp_path / "sink", os.O_WRONLY | os.O_CREAT)

    class ClosedPipe(io.StringIO):
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def fileno(self):
            return sink

    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    assert main(["layers", "--arch", "tiny_vgg"]) == 0


def test_layers_give_each_output_shape_for_the_input_size(capsys, digit_nets):
    """Issue 17, 7d: shapes for --img-size, else the checkpoint's recorded input size; --json carries them."""
    assert main(["layers", "--arch", "resnet18", "--img-size", "64", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["input_size"] == [3, 64, 64] and out["shapes"]["layer3.1.add"] == [256, 4, 4] and out["shapes"]["avgpool"] == [512, 1, 1]
    assert set(out["shapes"]) == set(out["layers"])
    assert main(["layers", "--checkpoint", str(digit_nets[0].path)]) == 0  # recorded: 16 x 16 digits
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("output shapes for 16x16 inputs") and ["features.0", "8x16x16"] in [line.split() for line in lines]
    assert main(["layers", "--arch", "small_vgg", "--img-size", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "small_vgg cannot take 2x2 inputs" in err[0] and "--img-size" in err[0]


def test_unknown_torchvision_architecture_suggests_close_names(capsys):
    """Issue 17, 7b: `resnet81` names resnet18 among torchvision's and refiner's registered names."""
    assert main(["layers", "--arch", "resnet81"]) == 2
    err = capsys.readouterr().err
    assert "unknown architecture 'resnet81' (--arch); similar names: resnet18" in err and len(err.strip().splitlines()) == 1
    assert main(["layers", "--arch", "smal_vgg"]) == 2
    assert "similar names: small_vgg" in capsys.readouterr().err


def _colour_imagefolder(root, splits=("train", "test")):
    """Red and blue noisy images; in every split but train/ the colours are swapped, so what train/ teaches fails there."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in splits:
        for c, channel in (("red", 0), ("blue", 2)):
            (root / split / c).mkdir(parents=True)
            for i in range(24 if split == "train" else 10):
                image = rng.integers(0, 90, (16, 16, 3), dtype=np.uint8)
                image[..., channel if split == "train" else 2 - channel] += 160
                Image.fromarray(image).save(root / split / c / f"{i}.png")
    return root


def test_validation_overlap_warns_and_val_folder_or_half_of_test_replace_it(tmp_path, capsys):
    """Issue 17, 5: validation carved from train/ that reads far above test is named in a warning with both options;
    a val/ folder is then taken as validation, and --val-from test halves the test split (recorded in the reports)."""
    import shutil
    import warnings

    data = _colour_imagefolder(tmp_path / "imgs")
    nets = [str(tmp_path / n) for n in ("a.pt", "b.pt")]
    for net, seed in zip(nets, "01"):
        train = ["train", "--arch", "tiny_vgg", "--task", "imagefolder", "--data", str(data), "--img-size", "16", "--epochs", "1", "--seed", seed, "--out", net, "--quiet"]
        assert main(train) == 0
    build = ["build", "--a", nets[0], "--b", nets[1], "--task", "imagefolder", "--data", str(data), "--g-epochs", "1", "--head-epochs", "4",
             "--head-lr", "1e-2", "--seeds", "1", "--no-ablations", "--models", str(tmp_path / "models"), "--cache", str(tmp_path / "c"), "--json", "--quiet"]  # fmt: skip
    capsys.readouterr()

    def run(argv):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert main(argv) == 0
        overlap = [str(w.message) for w in caught if "points above its test accuracy" in str(w.message)]
        return json.loads(capsys.readouterr().out), overlap

    report, overlap = run(build)
    assert report["comparison"]["val_from"] == "train"
    assert len(overlap) == 1 and "x_B's mean validation accuracy" in overlap[0], overlap
    assert "carved from the training data" in overlap[0] and "DIR/val/<class>/" in overlap[0] and "--val-from test" in overlap[0]

    _colour_imagefolder(data, splits=("val",))  # validation images the nets never saw, like test/
    report, overlap = run(build)
    assert report["comparison"]["val_from"] == "val" and not overlap
    assert report["variants"][0]["val_images"] == 20 and report["variants"][0]["test_images"] == 20
    shutil.rmtree(data / "val")

    fit = ["fit", "--a", nets[0], "--b", nets[1], "--task", "imagefolder", "--data", str(data), "--on", "target", "--g-epochs", "1",
           "--out", str(tmp_path / "g.pt"), "--cache", str(tmp_path / "c"), "--json", "--quiet", "--val-from", "test"]  # fmt: skip
    assert main(fit) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["val_from"] == "test" and report["tables"]["test"]["images"] == 10  # the scored half of 20 test images
    fit[fit.index("--out") + 1] = str(tmp_path / "g2.pt")
    assert main([*fit[:-2], "--val-from", "val"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "found no validation folder" in err[0] and not (tmp_path / "g2.pt").exists()


def test_help_and_argument_errors_import_no_torch(tmp_path):
    """Issue 17, 7a: --help and a bad argument value answer without importing torch, timm or onnx (so in well under a second)."""
    import subprocess
    import sys

    cases = [
        ["--help"], ["build", "--help"], ["analyze", "stability", "--help"], ["build", "--bogus"], ["layers"],
        ["build", "--a", "a.pt", "--b", "b.pt", "--task", "digits", "--head-lr", "1", "2", "3"],
        ["build", "--a", "a.pt", "--b", "b.pt", "--task", "digits", "--max-int8-drop", "1"],
        ["fit", "--a", "a.pt", "--b", "b.pt", "--task", "digits", "--out", "g.pt", "--classes", "a,,b"],
        ["export", "--name", "x"], ["serve", "--models", str(tmp_path / "nowhere")],
        ["build", "--a", "a.pt", "--b", "b.pt", "--task", "digits", "--g-seeds", "0"],
        ["build", "--a", "a.pt", "--b", "b.pt", "--task", "digits", "--resamples", "100"],
        ["build", "--a", "a.pt", "--b", "b.pt", "--task", "digits", "--g", "g.pt", "--g-seeds", "2"],
        ["analyze", "stability", "--models", "a.pt", "b.pt", "--task", "digits", "--out", "r", "--classes", "a,,b"],
        ["analyze", "compression", "--model", "a.pt", "--task", "digits", "--out", "r", "--sparsity", "0.5,,0.9"],
    ]  # fmt: skip
    script = (
        "import sys\nfrom refiner.cli import main\n"
        f"for argv in {cases!r}:\n"
        "    try:\n        code = main(argv)\n    except SystemExit as e:\n        code = e.code\n"
        "    heavy = sorted(m for m in ('torch', 'torchvision', 'timm', 'onnx', 'onnxruntime') if m in sys.modules)\n"
        "    print('RESULT', code, heavy, argv, file=sys.stderr)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    results = [line.split(" ", 2) for line in out.stderr.splitlines() if line.startswith("RESULT ")]
    assert len(results) == len(cases), out.stderr[-2000:]
    assert [code for _, code, _ in results] == ["0", "0", "0", *["2"] * 12], out.stderr[-2000:]
    for needle in ("--g-seeds must be at least 1, got 0", "--resamples must be at least 10,000, got 100", "--g-seeds 2 cannot refit"):
        assert any(line.endswith(needle) or needle in line for line in out.stderr.splitlines() if line.startswith("refiner build: error:")), needle
    assert "refiner analyze: error: --sparsity '0.5,,0.9' has an empty entry" in out.stderr
    assert all(rest.startswith("[] ") for _, _, rest in results), results
    assert not list(tmp_path.iterdir())  # nothing written


def test_analyze_refuses_an_empty_class_entry_as_every_command_does(tmp_path, capsys):
    """--classes a,,b: exit 2 with fit's message, and the analysis's own run refuses it too (it used to drop the entry)."""
    from refiner.cli.main import parser
    from refiner.errors import ConfigError

    assert main(["fit", "--a", "a.pt", "--b", "b.pt", "--task", "digits", "--out", str(tmp_path / "g.pt"), "--classes", "a,,b"]) == 2
    expected = capsys.readouterr().err.removeprefix("refiner fit: error: ").strip()
    argv = ["analyze", "stability", "--models", "a.pt", "b.pt", "--task", "digits", "--out", str(tmp_path / "r"), "--classes", "a,,b"]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == f"refiner analyze: error: {expected}" and "has an empty entry" in expected
    args = parser().parse_args(argv)
    with pytest.raises(ConfigError) as error:
        args.run(args)  # without main's check first: the run parses --classes as options.classes does
    assert str(error.value) == expected
    assert not list(tmp_path.iterdir())


def test_bad_files_names_folders_and_classes_are_refused_before_torch_and_write_nothing(tmp_path):
    """Issue 26, point 2: each error that needs no tensor answers without importing torch (benchmarks/cli_errors.py times them)."""
    import subprocess
    import sys

    for name in ("a.pt", "b.pt"):  # the files exist: their contents are read after torch loads
        (tmp_path / name).write_bytes(b"weights")
    for split in ("train", "test"):
        for c in ("cat", "dog"):
            (tmp_path / "photos" / split / c).mkdir(parents=True)
    cases = {
        "net A: --a 'nope.pt' does not exist": ["build", "--a", "nope.pt", "--b", "b.pt", "--task", "digits", "--models", "m"],
        "--b 'bb.pt' does not exist (did you mean 'b.pt'": ["fit", "--a", "a.pt", "--b", "bb.pt", "--task", "digits", "--out", "g.pt"],
        "unknown task 'digitz' (did you mean 'digits'?)": ["build", "--a", "a.pt", "--b", "b.pt", "--task", "digitz", "--models", "m"],
        "unknown architecture 'resnet81' (--arch-a); similar names: resnet18": [
            "atlas", "--a", "a.pt", "--arch-a", "resnet81", "--b", "b.pt", "--task", "digits", "--out", "atlas"],
        "expected the CIFAR-10 class folder train/airplane/": ["build", "--a", "a.pt", "--b", "b.pt", "--task", "cifar10", "--data", "photos", "--models", "m"],
        "classes ['dgo'] are not in the 'imagefolder' training data (did you mean": [
            "fit", "--a", "a.pt", "--b", "b.pt", "--task", "imagefolder", "--data", "photos", "--classes", "cat,dgo", "--out", "g.pt"],
        "data folder 'nowhere' does not exist": ["train", "--arch", "tiny_vgg", "--task", "imagefolder", "--data", "nowhere", "--out", "n.pt"],
    }  # fmt: skip
    script = (
        "import sys\nfrom refiner.cli import main\n"
        f"for argv in {list(cases.values())!r}:\n"
        "    code = main(argv)\n"
        "    print('RESULT', code, 'torch' in sys.modules, file=sys.stderr)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    lines = out.stderr.splitlines()
    results = [line.split() for line in lines if line.startswith("RESULT ")]
    assert [r[1:] for r in results] == [["2", "False"]] * len(cases), out.stderr[-3000:]
    errors = [line for line in lines if ": error: " in line]
    for needle, error in zip(cases, errors):
        assert needle in error, (needle, error)
    assert len(errors) == len(cases) and not any(line.startswith("==") for line in lines)  # no preprocessing line before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt", "b.pt", "photos"]  # nothing written


def test_warnings_show_as_one_plain_line_on_the_command_line():
    """Issue 26: `warning: ...`, not Python's `file.py:266: UserWarning:` followed by the source line."""
    import subprocess
    import sys

    code = "import warnings\nfrom refiner.cli.main import _command_line_output\nwith _command_line_output(False):\n    warnings.warn('plain words')\n"
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stderr
    assert err == "warning: plain words\n", err


def test_per_net_preprocessing_flags_reach_their_own_net(digit_nets, tmp_path, capsys):
    """Issue 26, point 4: --mean-b sets B's alone, the plain --img-size both; said in the stage lines and recorded in g."""
    from refiner.engine.comparison import fitted_report

    a, b = digit_nets
    out = tmp_path / "g.pt"
    argv = ["fit", "--a", str(a.path), "--b", str(b.path), "--task", "digits", "--img-size", "20", "--mean-b", "0.5", "0.5", "0.5",
            "--std-a", "0.4", "0.4", "0.4", "--g-steps", "5", "--train-per-class", "8", "--cache", str(tmp_path / "c"), "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    err = capsys.readouterr().err
    line_a = next(x for x in err.splitlines() if x.startswith("== preprocessing of net A"))
    line_b = next(x for x in err.splitlines() if x.startswith("== preprocessing of net B"))
    assert "resized to 20x20" in line_a and "mean 0.3,0.3,0.3, std 0.4,0.4,0.4" in line_a and "from --img-size --std-a on the command line" in line_a
    assert "resized to 20x20" in line_b and "mean 0.5,0.5,0.5, std 0.37,0.37,0.37" in line_b and "from --img-size --mean-b on the command line" in line_b
    report = fitted_report(out)
    assert report.a.preprocess.mean == (0.3, 0.3, 0.3) and report.a.preprocess.std == (0.4, 0.4, 0.4) and report.a.preprocess.input_size == (3, 20, 20)
    assert report.b.preprocess.mean == (0.5, 0.5, 0.5) and report.b.preprocess.std == (0.37, 0.37, 0.37) and report.b.preprocess.input_size == (3, 20, 20)
