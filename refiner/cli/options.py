"""Options shared by several commands, and the helpers that turn them into the library's typed configs."""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["command", "add_task", "add_preprocess", "add_net_preprocess", "preprocess", "fed_as_asked", "labels", "load_net", "say_preprocess", "preprocess_from", "check_named", "add_net_names", "fed_from_g", "load_fed", "add_val_from", "add_runtime", "add_pair", "add_g", "g_configs", "load_pair", "compare_config", "runtime", "split", "classes", "add_export", "check", "export_options"]


def command(sub, name: str, help: str, examples: str) -> argparse.ArgumentParser:
    p = sub.add_parser(
        name, help=help, description=help, epilog="examples:\n" + examples, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars or stage lines (results, warnings and errors still print)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON document on stdout, and nothing else there")
    return p


def task_names() -> str:
    """The registered tasks, for --help (the registry is read without importing torch)."""
    from refiner.data.tasks import list_tasks

    return ", ".join(list_tasks())


def arch_names() -> str:
    """The registered architectures and the families named on first use, for --help (no torch)."""
    from refiner.models.registry import TIMM_PREFIX, list_archs

    return f"{', '.join(list_archs())}, any torchvision classification model, or {TIMM_PREFIX}<name> for a timm model"


def add_task(p: argparse.ArgumentParser, forward: bool = True) -> None:
    p.add_argument("--task", required=True, help=f"a registered task: {task_names()}")
    p.add_argument("--data", type=Path, help="dataset folder in the task's standard layout (not needed for digits)")
    p.add_argument("--classes", help="comma-separated class subset (overrides the task's default classes)")
    p.add_argument("--cache", type=Path, help="feature cache folder (default: $REFINER_CACHE or ~/.cache/refiner/features)")
    p.add_argument("--train-per-class", type=int, help="keep at most N training images per class")
    p.add_argument("--skip-bad-images", action="store_true", help="leave out image files that do not decode (counted in a warning) instead of stopping")
    add_preprocess(p)
    add_runtime(p, forward)


def add_preprocess(p: argparse.ArgumentParser) -> None:
    """Overrides of the preprocessing a net is fed with (train: recorded in its checkpoint)."""
    group = p.add_argument_group(
        "preprocessing (default: train, the task's; other commands, what each checkpoint records, or for a bare "
        "state_dict its architecture's pretrained transform from torchvision or timm)"
    )
    group.add_argument("--img-size", type=int, help="input height and width (the crop); keeps the resize-to-crop ratio unless --crop-pct is given")
    group.add_argument("--crop-pct", type=float, help="crop over resize size: the shorter side is resized to floor(img-size / crop-pct), then centre-cropped (timm's crop_pct; 1.0 for no margin)")
    group.add_argument("--mean", type=float, nargs=3, metavar=("R", "G", "B"), help="per-channel mean of [0, 1] pixels")
    group.add_argument("--std", type=float, nargs=3, metavar=("R", "G", "B"), help="per-channel standard deviation of [0, 1] pixels")
    group.add_argument("--interpolation", choices=["bilinear", "bicubic", "nearest"], help="resize filter")


_PREPROCESS = ("img_size", "crop_pct", "mean", "std", "interpolation")


def add_net_preprocess(p: argparse.ArgumentParser, suffix: str, which: str) -> None:
    """--img-size-SUFFIX, --crop-pct-SUFFIX, ...: one net's preprocessing, over the plain flags (which set every net's)."""
    group = p.add_argument_group(f"preprocessing of {which} alone (over the plain flags, which set both nets)")
    group.add_argument(_flag("img-size", suffix), type=int, metavar="N", help=f"{which}'s input height and width")
    group.add_argument(_flag("crop-pct", suffix), type=float, metavar="PCT", help=f"{which}'s crop over resize size")
    group.add_argument(_flag("mean", suffix), type=float, nargs=3, metavar=("R", "G", "B"), help=f"{which}'s per-channel mean")
    group.add_argument(_flag("std", suffix), type=float, nargs=3, metavar=("R", "G", "B"), help=f"{which}'s per-channel std")
    group.add_argument(_flag("interpolation", suffix), choices=["bilinear", "bicubic", "nearest"], help=f"{which}'s resize filter")


def _preprocess_flag(args, field: str, suffix: str) -> tuple[str, object]:
    """The flag that sets `field` for the net of `suffix` (its own, else the plain one) and its value (None: not given)."""
    own = getattr(args, f"{field}_{suffix}", None) if suffix else None
    if own is not None:
        return f"--{field.replace('_', '-')}-{suffix}", own
    return f"--{field.replace('_', '-')}", getattr(args, field, None)


def preprocess(args, pre, suffix: str = ""):
    """`pre` with the --img-size/--crop-pct/--mean/--std/--interpolation overrides applied (a net's own -SUFFIX ones first)."""
    from refiner.data.samples import with_overrides

    v = {field: _preprocess_flag(args, field, suffix)[1] for field in _PREPROCESS}
    return with_overrides(
        pre, img_size=v["img_size"], crop_pct=v["crop_pct"], mean=tuple(v["mean"]) if v["mean"] else None,
        std=tuple(v["std"]) if v["std"] else None, interpolation=v["interpolation"],
    )  # fmt: skip


def preprocess_from(args, source: str, suffix: str = "") -> str:
    """Where the preprocessing comes from: `source`, under the preprocessing options given on the command line."""
    given = [flag for flag, value in (_preprocess_flag(args, field, suffix) for field in _PREPROCESS) if value is not None]
    return f"{' '.join(given)} on the command line, over {source}" if given else source


def fed_as_asked(args, clf, who: str, fitted=None, g_name: str = "", suffix: str = ""):
    """The loaded net `clf`, to be fed with its preprocessing plus the command line's overrides; says which and from where.

    `fitted`: the g file's record of this net (NetSide), whose preprocessing replaces the net's own.
    A bare state_dict fed as its architecture's pretrained weights expect, with nothing
    on the command line or in g to confirm it, gets a warning naming the options.
    """
    import warnings

    base, source = clf.meta.preprocess, clf.preprocess_from
    if fitted is not None and fitted.preprocess is not None:
        base, source = fitted.preprocess, f"the record in {g_name} (from `refiner fit`)"
    told = preprocess_from(args, source, suffix)
    if clf.preprocess_guessed and told == clf.preprocess_from:
        warnings.warn(
            f"{who} ({clf.path.name}) is a bare state_dict, fed with {source}; that is right only if it was trained that "
            "way (e.g. fine-tuned from those pretrained weights). If not, give its preprocessing with --img-size, "
            "--crop-pct, --mean, --std and --interpolation",
            stacklevel=2,
        )
    clf.meta = clf.meta.model_copy(update={"preprocess": preprocess(args, base, suffix)})
    say_preprocess(f"{who} ({clf.path.name})", clf.meta.preprocess, told)
    return clf


def say_preprocess(what: str, pre, source: str) -> None:
    """One stage line (stderr; not with --quiet): how `what`'s images are preprocessed and where that came from."""
    from refiner.progress import stage

    _, h, w = pre.input_size
    size = f"{h}x{w} centre crop of a {pre.resize_size} px shorter-side resize" if pre.resize_size else f"resized to {h}x{w}"
    numbers = lambda v: ",".join(f"{x:g}" for x in v)  # noqa: E731
    stage(f"preprocessing of {what}: {size} ({pre.interpolation}), mean {numbers(pre.mean)}, std {numbers(pre.std)}; from {source}")


def labels(value: str | None, flag: str) -> list[str] | None:
    """Class names from --labels-*: a comma-separated list, or a file with one name per line."""
    from refiner.errors import ConfigError

    if value is None:
        return None
    path = Path(value)
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()] if path.is_file() else [c.strip() for c in value.split(",")]
    if not names or "" in names:
        raise ConfigError(f"{flag} {value!r} has an empty entry; give comma-separated class names (e.g. cat,dog) or a file with one name per line")
    if len(set(names)) < len(names):
        raise ConfigError(f"{flag} names {sorted({c for c in names if names.count(c) > 1})} more than once")
    return names


def _flag(kind: str, suffix: str) -> str:
    return f"--{kind}-{suffix}" if suffix else f"--{kind}"


def add_net_names(p, suffix: str, which: str) -> None:
    """--arch-SUFFIX and --labels-SUFFIX (--arch, --labels without a suffix) for a net given as a bare state_dict."""
    p.add_argument(_flag("arch", suffix), help=f"architecture of {which} when it is a bare state_dict whose keys do not say it: {arch_names()}")
    p.add_argument(
        _flag("labels", suffix), metavar="NAMES",
        help=f"class names of {which}'s outputs in order: comma-separated, or a file with one name per line (a bare state_dict has none: 0, 1, ...)",
    )  # fmt: skip


def load_net(args, path: Path, suffix: str, who: str, default_pre=None, default_from: str = ""):
    """Load the net at `path` with its --arch-SUFFIX and --labels-SUFFIX (without its preprocessing said or overridden)."""
    from refiner.api.nets import load

    arch, names = (_flag(kind, suffix) for kind in ("arch", "labels"))
    return load(
        path, arch=getattr(args, arch[2:].replace("-", "_")), fallback_preprocess=default_pre, fallback_from=default_from,
        labels=labels(getattr(args, names[2:].replace("-", "_")), names), trust=args.trust_checkpoint, who=who, arch_flag=arch,
    )  # fmt: skip


def load_fed(args, path: Path, suffix: str, who: str):
    """A net loaded as the command line asks (--arch/--labels, the task's default for a bare state_dict, overrides); its preprocessing said."""
    from refiner.data.tasks import get_task

    clf = load_net(args, path, suffix, who, get_task(args.task).preprocess, f"the default of task {args.task!r}")
    return fed_as_asked(args, clf, who, suffix=suffix)


def _unnamed(clf) -> bool:
    return clf.meta.class_names == [str(i) for i in range(clf.meta.num_classes)]


def check_named(args, clf, suffix: str, who: str, wanted: list[str] | None) -> None:
    """Refuse, before any work, a net without class names (0, 1, ...) where the command needs names it lacks.

    `wanted`: the class names the command looks up among the net's outputs (None: an
    imagefolder's class folders). When the folders are as many as the outputs, the
    error gives the --labels-* value torchvision's ImageFolder numbering would mean.
    """
    from refiner.errors import ConfigError

    folders = _class_folders(args)
    wanted = wanted or folders
    if not _unnamed(clf) or not wanted or all(c in clf.meta.class_names for c in wanted):
        return
    n, flag = clf.meta.num_classes, f"--labels-{suffix}"
    if folders and len(folders) == n:
        raise ConfigError(
            f"{who} ({clf.path.name}) has no class names (outputs 0..{n - 1}); torchvision's ImageFolder would have numbered the "
            f"{n} sorted class folders of {args.data} {', '.join(f'{i}={c}' for i, c in enumerate(folders))}: if it was trained "
            f"that way, pass {flag} {','.join(folders)}"
        )
    raise ConfigError(
        f"{who} ({clf.path.name}) has no class names (outputs 0..{n - 1}), and {wanted} are looked up among them; "
        f"name its {n} outputs in order with {flag} NAME,NAME,... (or a file with one name per line)"
    )


def _class_folders(args) -> list[str]:
    """The sorted class folders of an imagefolder task's training data (as torchvision's ImageFolder numbers them); else []."""
    if getattr(args, "task", None) != "imagefolder" or args.data is None:
        return []
    root = args.data / "train" if (args.data / "train").is_dir() else args.data
    return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def add_val_from(p: argparse.ArgumentParser) -> None:
    """--val-from: where the validation split (epoch choice, INT8 calibration) comes from."""
    p.add_argument(
        "--val-from", choices=["train", "val", "test"],
        help="validation images: train (carved from the training data, which base nets trained on all of it have seen), val "
        "(the dataset's val/ folder, e.g. imagefolder DIR/val/<class>/) or test (a seeded half of each class's test images; the "
        "other half is then the test split everywhere) (default: val/ when the dataset has one, else train)",
    )  # fmt: skip


def add_runtime(p: argparse.ArgumentParser, forward: bool = True) -> None:
    """Where and how the engine computes; shared by train, fit, build, atlas and the analyses (`forward`: the frozen
    nets' forward, for the commands that run them)."""
    group = p.add_argument_group("device and speed (also under torchrun: one process per GPU)")
    group.add_argument("--device", default="auto", help="auto (first CUDA GPU, else CPU), cpu, cuda, cuda:N or mps; under torchrun auto/cuda give each process GPU LOCAL_RANK and cuda:N is refused (default: auto)")
    group.add_argument("--amp", choices=["off", "bf16", "fp16"], default="off", help="mixed precision for trunks, fitting and fine-tuning; fp16 uses a GradScaler (default: off)")
    group.add_argument("--threads", type=int, help="torch CPU threads (default: $OMP_NUM_THREADS, else torch's default: all cores); use 1 when other jobs share the cores")
    group.add_argument("--workers", type=int, help="data-loading worker processes (default: 0 on a CPU with <= 2 cores, else from the core count)")
    if forward:
        group.add_argument(
            "--forward", choices=["auto", "torch", "onnxruntime"], default="auto",
            help="the frozen nets' forward (feature extraction, the atlas's pass): torch, onnxruntime (each trunk exported to "
            "ONNX once, cached beside the features, checked against torch on the first batch, torch if it differs), or auto: "
            "onnxruntime where measured faster on the first batch, for a pass long enough to repay the export (default: auto)",
        )  # fmt: skip


def add_pair(p: argparse.ArgumentParser, layers: bool = True) -> None:
    """--a/--b and how to read them, the task, g's options and (with `layers`) --layer-a/--layer-b."""
    p.add_argument("--a", required=True, type=Path, help="checkpoint of net A (its features are the input of g), or torchvision/<model> or timm/<model> from the local cache")
    p.add_argument("--b", required=True, type=Path, help="checkpoint of net B (its features are the target of g), or torchvision/<model> or timm/<model> from the local cache")
    add_net_names(p, "a", "A")
    add_net_names(p, "b", "B")
    add_net_preprocess(p, "a", "A")
    add_net_preprocess(p, "b", "B")
    p.add_argument("--trust-checkpoint", action="store_true", help="allow checkpoints that need arbitrary unpickling (runs code from the file!)")
    if layers:
        p.add_argument("--layer-a", help="layer of A (default: the architecture's default, e.g. VGG-16 conv4-3)")
        p.add_argument("--layer-b", help="layer of B (default: the architecture's default)")
    add_g(p)
    add_task(p)
    add_val_from(p)


def add_g(p: argparse.ArgumentParser) -> None:
    """Options of g and of its fitting, shared by fit, build and the analyses."""
    group = p.add_argument_group("g and its fitting")
    group.add_argument("--orders", type=int, default=2, help="K, the highest order of non-linearity in g (default: 2)")
    group.add_argument("--lambda", dest="lam", type=float, default=0.1, help="weight of the penalty on p^(k) (default: 0.1)")
    group.add_argument("--kernel", type=int, default=3, help="kernel size of g's convolutions (default: 3)")
    group.add_argument("--normalizer", choices=["auto", "sample", "batch"], default="auto", help="Sigma in Eq. 1 (default: auto)")
    group.add_argument("--g-steps", type=int, default=20_000, help="budget of optimiser steps; fitting stops earlier once the held-out MSE stops improving (default: 20000)")
    group.add_argument("--g-patience", type=int, default=10, help="held-out checks (every 100 steps) without improvement before fitting stops (default: 10)")
    group.add_argument("--g-epochs", type=int, help="override: fit for exactly this many epochs with a log-spaced lr and no early stop")
    group.add_argument("--g-lr", type=float, nargs=2, default=(1e-2, 1e-5), metavar=("START", "END"), help="initial lr and the floor of its cuts (with --g-epochs: log-spaced from START to END) (default: 1e-2 1e-5)")
    group.add_argument("--g-batch", type=int, default=64, help="batch size to fit g, per process (default: 64)")
    group.add_argument("--g-seed", type=int, default=0, help="seed of g's initialisation, held-out split and batch order (default: 0)")
    group.add_argument(
        "--g-compile", choices=["auto", "on", "off"], default="auto",
        help="torch.compile g's training step; auto: when the first eager steps, timed, show that compiling repays its time over the budget; eager when compiling fails (default: auto)",
    )  # fmt: skip
    group.add_argument("--cache-fp16", action="store_true", help="store cached features as float16 (half the disk; values rounded to fp16)")


def g_configs(args):
    """(IsomorphismConfig, FitConfig) from the options of `add_g`."""
    from refiner.engine.fitting import FitConfig
    from refiner.engine.isomorphism import IsomorphismConfig

    return (
        IsomorphismConfig(orders=args.orders, lam=args.lam, kernel_size=args.kernel, normalizer=args.normalizer),
        FitConfig(
            max_steps=args.g_steps, patience=args.g_patience, epochs=args.g_epochs,
            lr_start=args.g_lr[0], lr_end=args.g_lr[1], batch_size=args.g_batch, seed=args.g_seed, compile=args.g_compile,
        ),  # fmt: skip
    )


def load_pair(args, data_task: str, g_file: Path | None = None):
    """Nets A and B as the command line asks; with `g_file`, fed as recorded there unless the options override it."""
    from refiner.data.tasks import get_task

    pre, where = get_task(data_task).preprocess, f"the default of task {data_task!r}"
    return fed_from_g(args, load_net(args, args.a, "a", "net A", pre, where), load_net(args, args.b, "b", "net B", pre, where), g_file)


def fed_from_g(args, a, b, g_file: Path | None):
    """A and B fed as asked; with `g_file`, as its `refiner fit` recorded (preprocessing, and names for nets without any)."""
    report = None
    if g_file is not None:
        from refiner.engine.comparison import fitted_report

        report = fitted_report(g_file)
    for clf, side, who in ((a, "a", "net A"), (b, "b", "net B")):
        fitted = getattr(report, side) if report is not None else None
        if fitted is not None and fitted.class_names and getattr(args, f"labels_{side}") is None and _unnamed(clf):
            if len(fitted.class_names) == clf.meta.num_classes:
                clf.meta = clf.meta.model_copy(update={"class_names": fitted.class_names})
        fed_as_asked(args, clf, who, fitted, g_file.name if g_file is not None else "", side)
    return a, b


def compare_config(args):
    """CompareConfig (layers, g, fitting, device, cache storage) from the options of `add_pair`."""
    from refiner.engine.comparison import CompareConfig

    g, fit = g_configs(args)
    return CompareConfig(
        layer_a=args.layer_a, layer_b=args.layer_b, g=g, fit=fit, runtime=runtime(args), cache_dtype="float16" if args.cache_fp16 else "float32"
    )


def runtime(args):
    from refiner.engine.device import RuntimeConfig

    return RuntimeConfig(device=args.device, amp=args.amp, threads=args.threads, workers=args.workers, forward=getattr(args, "forward", "auto"))


def split(args):
    from refiner.data.tasks import SplitOptions

    return SplitOptions(
        train_per_class=args.train_per_class, test_per_class=getattr(args, "test_per_class", None), skip_bad_images=args.skip_bad_images, val_from=args.val_from
    )


def classes(args) -> list[str] | None:
    from refiner.errors import ConfigError

    if args.classes is None:
        return None
    classes = [c.strip() for c in args.classes.split(",")]
    if "" in classes:
        raise ConfigError(f"--classes {args.classes!r} has an empty entry; give comma-separated class names, e.g. cat,dog")
    if len(set(classes)) < len(classes):
        raise ConfigError(f"--classes names {sorted({c for c in classes if classes.count(c) > 1})} more than once")
    return classes


def add_export(p: argparse.ArgumentParser, fp16: bool) -> None:
    """How the refined model becomes ONNX; shared by build and export."""
    group = p.add_argument_group("ONNX export")
    group.add_argument("--opset", type=int, help="ONNX opset, 18 or above (default: the exporter's)")
    if fp16:
        group.add_argument("--fp16", action="store_true", help="float16 weights and activations behind a float32 input and output (checked at 1%% of the logits' scale)")
    group.add_argument("--quantize", choices=["int8"], help="onnxruntime static INT8 (QDQ, per-channel), calibrated on validation images and scored on test images")
    group.add_argument("--max-int8-drop", type=float, help="test accuracy points INT8 may lose before the artifact is refused (default: 1)")


def check(args) -> None:
    """Refuse argument values that are wrong whatever the data and nets, before torch is imported (then the command's own check)."""
    from refiner.cli import preflight

    if getattr(args, "classes", None) is not None:
        classes(args)
    if hasattr(args, "opset"):
        _check_export(args)
    if hasattr(args, "check"):
        args.check(args)
    preflight.check(args, classes(args) if getattr(args, "classes", None) is not None else None)  # then files, names, folders


def _check_export(args) -> None:
    from refiner.errors import ConfigError

    if args.opset is not None:
        import onnx  # only when asked: onnx costs most of a second to import

        newest = onnx.defs.onnx_opset_version()
        if not 18 <= args.opset <= newest:
            raise ConfigError(f"--opset must be between 18 (the lowest torch's ONNX exporter writes) and {newest} (the newest onnx knows), got {args.opset}")
    if args.max_int8_drop is not None and not args.quantize:
        raise ConfigError("--max-int8-drop applies to --quantize int8 only")
    if args.max_int8_drop is not None and not args.max_int8_drop >= 0:
        raise ConfigError(f"--max-int8-drop must be a number of accuracy points >= 0, got {args.max_int8_drop}")


def export_options(args):
    """ExportOptions from the options of `add_export` (checked by `check`)."""
    from refiner.refine.publish import ExportOptions

    drop = {} if args.max_int8_drop is None else {"max_int8_drop": args.max_int8_drop}
    return ExportOptions(opset=args.opset, fp16=getattr(args, "fp16", False), quantize=args.quantize, **drop)
