"""Options shared by several commands, and the helpers that turn them into the library's typed configs."""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["command", "add_task", "add_preprocess", "preprocess", "fed_as_asked", "add_val_from", "add_runtime", "add_pair", "add_g", "g_configs", "load_pair", "compare_config", "runtime", "split", "classes", "add_export", "export_options"]


def command(sub, name: str, help: str, examples: str) -> argparse.ArgumentParser:
    p = sub.add_parser(
        name, help=help, description=help, epilog="examples:\n" + examples, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars or stage lines (results, warnings and errors still print)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON document on stdout, and nothing else there")
    return p


def add_task(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", required=True, help="task name (digits, cifar10, cifar-animal, voc-animal, cub200, mix-cub, mix-dogs, imagefolder)")
    p.add_argument("--data", type=Path, help="dataset folder in the task's standard layout (not needed for digits)")
    p.add_argument("--classes", help="comma-separated class subset (overrides the task's default classes)")
    p.add_argument("--cache", type=Path, help="feature cache folder (default: $REFINER_CACHE or ~/.cache/refiner/features)")
    p.add_argument("--train-per-class", type=int, help="keep at most N training images per class")
    p.add_argument("--skip-bad-images", action="store_true", help="leave out image files that do not decode (counted in a warning) instead of stopping")
    add_preprocess(p)
    add_runtime(p)


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


def preprocess(args, pre):
    """`pre` with the --img-size/--crop-pct/--mean/--std/--interpolation overrides applied."""
    return pre.with_overrides(
        img_size=args.img_size, crop_pct=args.crop_pct, mean=tuple(args.mean) if args.mean else None,
        std=tuple(args.std) if args.std else None, interpolation=args.interpolation,
    )  # fmt: skip


def fed_as_asked(args, clf):
    """The loaded net `clf`, to be fed with its preprocessing plus the command line's overrides."""
    clf.meta = clf.meta.model_copy(update={"preprocess": preprocess(args, clf.meta.preprocess)})
    return clf


def add_val_from(p: argparse.ArgumentParser) -> None:
    """--val-from: where the validation split (epoch choice, INT8 calibration) comes from."""
    p.add_argument(
        "--val-from", choices=["train", "val", "test"],
        help="validation images: train (carved from the training data, which base nets trained on all of it have seen), val "
        "(the dataset's val/ folder, e.g. imagefolder DIR/val/<class>/) or test (a seeded half of each class's test images; the "
        "other half is then the test split everywhere) (default: val/ when the dataset has one, else train)",
    )  # fmt: skip


def add_runtime(p: argparse.ArgumentParser) -> None:
    """Where and how the engine computes; shared by train, fit, build and the analyses."""
    group = p.add_argument_group("device and speed (also under torchrun: one process per GPU)")
    group.add_argument("--device", default="auto", help="auto (first CUDA GPU, else CPU), cpu, cuda, cuda:N or mps; under torchrun auto/cuda give each process GPU LOCAL_RANK and cuda:N is refused (default: auto)")
    group.add_argument("--amp", choices=["off", "bf16", "fp16"], default="off", help="mixed precision for trunks, fitting and fine-tuning; fp16 uses a GradScaler (default: off)")
    group.add_argument("--threads", type=int, help="torch CPU threads (default: $OMP_NUM_THREADS, else torch's default: all cores); use 1 when other jobs share the cores")
    group.add_argument("--workers", type=int, help="data-loading worker processes (default: 0 on a CPU with <= 2 cores, else from the core count)")


def add_pair(p: argparse.ArgumentParser) -> None:
    p.add_argument("--a", required=True, type=Path, help="checkpoint of net A (its features are the input of g), or torchvision/<model> or timm/<model> from the local cache")
    p.add_argument("--b", required=True, type=Path, help="checkpoint of net B (its features are the target of g), or torchvision/<model> or timm/<model> from the local cache")
    p.add_argument("--arch-a", help="architecture of A when --a is a bare state_dict")
    p.add_argument("--arch-b", help="architecture of B when --b is a bare state_dict")
    p.add_argument("--trust-checkpoint", action="store_true", help="allow checkpoints that need arbitrary unpickling (runs code from the file!)")
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
        help="torch.compile g's training step; auto: for large fits (budget x batch x feature size >= 1e10), eager when compiling fails (default: auto)",
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


def load_pair(args, data_task: str):
    from refiner.data.tasks import get_task
    from refiner.models.checkpoints import load_checkpoint

    pre = get_task(data_task).preprocess
    a = load_checkpoint(args.a, arch=args.arch_a, preprocess=pre, trust=args.trust_checkpoint)
    b = load_checkpoint(args.b, arch=args.arch_b, preprocess=pre, trust=args.trust_checkpoint)
    return fed_as_asked(args, a), fed_as_asked(args, b)


def compare_config(args):
    from refiner.engine.comparison import CompareConfig

    g, fit = g_configs(args)
    return CompareConfig(
        layer_a=args.layer_a, layer_b=args.layer_b, g=g, fit=fit, runtime=runtime(args), cache_dtype="float16" if args.cache_fp16 else "float32"
    )


def runtime(args):
    from refiner.engine.device import RuntimeConfig

    return RuntimeConfig(device=args.device, amp=args.amp, threads=args.threads, workers=args.workers)


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


def export_options(args):
    from refiner.refine.publish import ExportOptions
    from refiner.errors import ConfigError

    import onnx

    newest = onnx.defs.onnx_opset_version()
    if args.opset is not None and not 18 <= args.opset <= newest:
        raise ConfigError(f"--opset must be between 18 (the lowest torch's ONNX exporter writes) and {newest} (the newest onnx knows), got {args.opset}")
    if args.max_int8_drop is not None and not args.quantize:
        raise ConfigError("--max-int8-drop applies to --quantize int8 only")
    if args.max_int8_drop is not None and not args.max_int8_drop >= 0:
        raise ConfigError(f"--max-int8-drop must be a number of accuracy points >= 0, got {args.max_int8_drop}")
    drop = {} if args.max_int8_drop is None else {"max_int8_drop": args.max_int8_drop}
    return ExportOptions(opset=args.opset, fp16=getattr(args, "fp16", False), quantize=args.quantize, **drop)
