"""The `refiner` command line: parses arguments and calls the library."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from refiner.errors import RefinerError

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="refiner",
        description="Compare what two trained networks know and build refined, deployable models from it.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `refiner COMMAND --help` for each command's options and examples.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in (_train_args, _fit_args, _build_args, _export_args, _serve_args, _layers_args, _analyze_args):
        register(sub)
    return parser


def _command(sub, name: str, help: str, examples: str) -> argparse.ArgumentParser:
    p = sub.add_parser(
        name, help=help, description=help, epilog="examples:\n" + examples, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars or stage lines (results, warnings and errors still print)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON document on stdout, and nothing else there")
    return p


def _add_task(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", required=True, help="task name (digits, cifar10, cifar-animal, voc-animal, cub200, mix-cub, mix-dogs, imagefolder)")
    p.add_argument("--data", type=Path, help="dataset folder in the task's standard layout (not needed for digits)")
    p.add_argument("--classes", help="comma-separated class subset (overrides the task's default classes)")
    p.add_argument("--cache", type=Path, help="feature cache folder (default: $REFINER_CACHE or ~/.cache/refiner/features)")
    p.add_argument("--train-per-class", type=int, help="keep at most N training images per class")
    p.add_argument("--skip-bad-images", action="store_true", help="leave out image files that do not decode (counted in a warning) instead of stopping")
    _add_preprocess(p)
    _add_runtime(p)


def _add_preprocess(p: argparse.ArgumentParser) -> None:
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


def _preprocess(args, pre):
    """`pre` with the --img-size/--crop-pct/--mean/--std/--interpolation overrides applied."""
    return pre.with_overrides(
        img_size=args.img_size, crop_pct=args.crop_pct, mean=tuple(args.mean) if args.mean else None,
        std=tuple(args.std) if args.std else None, interpolation=args.interpolation,
    )  # fmt: skip


def _fed_as_asked(args, clf):
    """The loaded net `clf`, to be fed with its preprocessing plus the command line's overrides."""
    clf.meta = clf.meta.model_copy(update={"preprocess": _preprocess(args, clf.meta.preprocess)})
    return clf


def _add_runtime(p: argparse.ArgumentParser) -> None:
    """Where and how the engine computes; shared by train, fit, build and the analyses."""
    group = p.add_argument_group("device and speed (also under torchrun: one process per GPU)")
    group.add_argument("--device", default="auto", help="auto (first CUDA GPU, else CPU), cpu, cuda, cuda:N or mps; under torchrun auto/cuda give each process GPU LOCAL_RANK and cuda:N is refused (default: auto)")
    group.add_argument("--amp", choices=["off", "bf16", "fp16"], default="off", help="mixed precision for trunks, fitting and fine-tuning; fp16 uses a GradScaler (default: off)")
    group.add_argument("--threads", type=int, help="torch CPU threads (default: $OMP_NUM_THREADS, else torch's default: all cores); use 1 when other jobs share the cores")
    group.add_argument("--workers", type=int, help="data-loading worker processes (default: 0 on a CPU with <= 2 cores, else from the core count)")


def _add_pair(p: argparse.ArgumentParser) -> None:
    p.add_argument("--a", required=True, type=Path, help="checkpoint of net A (its features are the input of g), or torchvision/<model> or timm/<model> from the local cache")
    p.add_argument("--b", required=True, type=Path, help="checkpoint of net B (its features are the target of g), or torchvision/<model> or timm/<model> from the local cache")
    p.add_argument("--arch-a", help="architecture of A when --a is a bare state_dict")
    p.add_argument("--arch-b", help="architecture of B when --b is a bare state_dict")
    p.add_argument("--trust-checkpoint", action="store_true", help="allow checkpoints that need arbitrary unpickling (runs code from the file!)")
    p.add_argument("--layer-a", help="layer of A (default: the architecture's default, e.g. VGG-16 conv4-3)")
    p.add_argument("--layer-b", help="layer of B (default: the architecture's default)")
    _add_g(p)
    _add_task(p)


def _add_g(p: argparse.ArgumentParser) -> None:
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


def _g_configs(args):
    """(IsomorphismConfig, FitConfig) from the options of `_add_g`."""
    from refiner.engine.fitting import FitConfig
    from refiner.engine.isomorphism import IsomorphismConfig

    return (
        IsomorphismConfig(orders=args.orders, lam=args.lam, kernel_size=args.kernel, normalizer=args.normalizer),
        FitConfig(
            max_steps=args.g_steps, patience=args.g_patience, epochs=args.g_epochs,
            lr_start=args.g_lr[0], lr_end=args.g_lr[1], batch_size=args.g_batch, seed=args.g_seed, compile=args.g_compile,
        ),  # fmt: skip
    )


def _train_args(sub) -> None:
    p = _command(
        sub,
        "train",
        "Train a base classifier from scratch and write a refiner checkpoint.",
        "  refiner train --arch small_vgg --task digits --seed 0 --out a.pt\n"
        "  refiner train --arch small_vgg --task cifar10 --data cifar10/ --seed 1 --subset half-b --out b.pt\n"
        "  refiner train --arch small_vgg --task cifar-animal --data cifar10/ --regime paper --train-per-class 200 --imbalance 4 --out a.pt\n",
    )
    p.add_argument("--arch", required=True, help="architecture name: small_vgg, cifar_resnet20, any torchvision model (resnet18, vgg16, ...) or timm/<name>")
    p.add_argument("--seed", type=int, default=0, help="random seed (A and B: different seeds)")
    p.add_argument("--subset", choices=["half-a", "half-b"], help="train on one of two disjoint halves of the training data")
    p.add_argument(
        "--regime", choices=["default", "paper"], default="default",
        help="paper: no augmentation, train until training CE <= 0.02 or --epochs (default 60), warn if not reached (default: default)",
    )  # fmt: skip
    p.add_argument("--epochs", type=int, help="epoch budget (default: 12; 60 with --regime paper)")
    p.add_argument("--batch-size", type=int, default=128, help="images per SGD step, per process (default: 128)")
    p.add_argument("--lr", type=float, default=0.05, help="peak learning rate of the one-cycle schedule (default: 0.05)")
    p.add_argument("--augment", action="store_true", help="random crop and flip (off by default, as in the paper)")
    p.add_argument(
        "--imbalance", type=float, metavar="R",
        help="keep 1/R of each target class's training images, so the task's other classes are over-represented R times",
    )  # fmt: skip
    p.add_argument("--out", required=True, type=Path, help="checkpoint to write")
    _add_task(p)
    p.set_defaults(run=_run_train)


def _run_train(args) -> None:
    from refiner.data.tasks import SplitOptions
    from refiner.engine import distributed as dist
    from refiner.engine.training import TrainConfig, paper_regime, train_base

    chosen = dict(batch_size=args.batch_size, lr=args.lr, augment=args.augment, seed=args.seed, runtime=_runtime(args))
    if args.epochs is not None:
        chosen["epochs"] = args.epochs
    config = paper_regime(**chosen) if args.regime == "paper" else TrainConfig(**chosen)
    from refiner.data.tasks import get_task

    split = SplitOptions(subset=args.subset, train_per_class=args.train_per_class, imbalance=args.imbalance, skip_bad_images=args.skip_bad_images)
    meta = train_base(args.arch, args.task, args.data, config, args.out, split, _preprocess(args, get_task(args.task).preprocess))
    if not dist.is_main():
        return
    last, final = meta.info["history"][-1], meta.info["train_eval"]
    if args.json:
        print(meta.model_dump_json())
        return
    print(f"{args.out}: {meta.arch} on {args.task} ({meta.num_classes} classes), {meta.info['epochs_run']} epochs: "
          f"train CE {final['loss']:.4f} acc {final['acc']:.3f} (eval mode), val acc {last['val_acc']:.3f}, test acc {meta.info['test_acc']:.3f}")


def _fit_args(sub) -> None:
    p = _command(
        sub,
        "fit",
        "Fit g: x_A -> x_B, print and save the Var table and instability (paper Sections 3, 4.2).",
        "  refiner fit --a a.pt --b b.pt --task digits --out g.pt\n"
        "  refiner fit --a a.pt --b b.pt --task cifar10 --data cifar10/ --layer-a features.19 --layer-b features.19 --orders 3 --out g.pt\n"
        "  refiner fit --a a.safetensors --arch-a timm/convnext_atto --b torchvision/resnet18 --task imagefolder --data photos/ --out g.pt\n",
    )
    _add_pair(p)
    p.add_argument("--on", choices=["base", "target"], default="base", help="fit on the task's base classes or its target classes")
    p.add_argument("--seed", dest="g_seed", type=int, default=0, help="the same as --g-seed: g's initialisation, held-out split and batch order (default: 0)")
    p.add_argument("--test-per-class", type=int, help="measure on the first N test images per class (default: all)")
    p.add_argument("--out", required=True, type=Path, help="g file to write; the report goes beside it as .json")
    p.set_defaults(run=_run_fit)


def _load_pair(args, data_task: str):
    from refiner.data.tasks import get_task
    from refiner.models.checkpoints import load_checkpoint

    pre = get_task(data_task).preprocess
    a = load_checkpoint(args.a, arch=args.arch_a, preprocess=pre, trust=args.trust_checkpoint)
    b = load_checkpoint(args.b, arch=args.arch_b, preprocess=pre, trust=args.trust_checkpoint)
    return _fed_as_asked(args, a), _fed_as_asked(args, b)


def _compare_config(args):
    from refiner.engine.comparison import CompareConfig

    g, fit = _g_configs(args)
    return CompareConfig(
        layer_a=args.layer_a, layer_b=args.layer_b, g=g, fit=fit, runtime=_runtime(args), cache_dtype="float16" if args.cache_fp16 else "float32"
    )


def _runtime(args):
    from refiner.engine.device import RuntimeConfig

    return RuntimeConfig(device=args.device, amp=args.amp, threads=args.threads, workers=args.workers)


def _split(args):
    from refiner.data.tasks import SplitOptions

    return SplitOptions(train_per_class=args.train_per_class, test_per_class=getattr(args, "test_per_class", None), skip_bad_images=args.skip_bad_images)


def _classes(args) -> list[str] | None:
    from refiner.errors import ConfigError

    if args.classes is None:
        return None
    classes = [c.strip() for c in args.classes.split(",")]
    if "" in classes:
        raise ConfigError(f"--classes {args.classes!r} has an empty entry; give comma-separated class names, e.g. cat,dog")
    if len(set(classes)) < len(classes):
        raise ConfigError(f"--classes names {sorted({c for c in classes if classes.count(c) > 1})} more than once")
    return classes


def _run_fit(args) -> None:
    from refiner.atomic import atomic_file
    from refiner.data.tasks import load_task
    from refiner.engine import distributed as dist
    from refiner.engine.comparison import compare
    from refiner.engine.isomorphism import save_isomorphism
    from refiner.reporting import format_fit, format_variance_table, save_fit_curve

    a, b = _load_pair(args, args.task)
    data = load_task(args.task, args.data, target=args.on == "target", classes=_classes(args), options=_split(args))
    g, report, _ = compare(a, b, data, _compare_config(args), args.cache)
    if not dist.is_main():
        return
    curve = args.out.with_name(args.out.stem + "-curve.png")
    save_isomorphism(args.out, g, {"report": report.model_dump(mode="json")})
    with atomic_file(args.out.with_suffix(".json")) as tmp:
        tmp.write_text(report.model_dump_json(indent=2))
    with atomic_file(curve) as tmp:
        save_fit_curve(tmp, report.fit)
    if args.json:
        print(report.model_dump_json())
        return
    print(format_variance_table(report.tables))
    print(format_fit(report.fit))
    print(f"on {report.runtime['device']} ({report.runtime['name']}), AMP {report.runtime['amp']}")
    print(f"wrote {args.out}, {args.out.with_suffix('.json')} and {curve}")


def _build_args(sub) -> None:
    p = _command(
        sub,
        "build",
        "Fit g, build and fine-tune the refined model, compare with and without Δ removal, export ONNX.",
        "  refiner build --a a.pt --b b.pt --task digits --name digits-refined\n"
        "  refiner build --a a.pt --b b.pt --task cifar-animal --data cifar10/ --seeds 3 --models models/\n"
        "  refiner build --a a.pt --b b.pt --task cifar-animal --data cifar10/ --protocol paper --seeds 5\n",
    )
    _add_pair(p)
    p.add_argument(
        "--protocol", choices=["sound", "paper"], default="sound",
        help="sound: new target classifier, epoch chosen on validation data; paper: the authors' protocol, B's whole upper "
        "part kept with its base classifier, Adam 1e-5 -> 1e-7 for 100 epochs, best-on-test reported too (default: sound)",
    )  # fmt: skip
    p.add_argument(
        "--seeds", type=int, default=3,
        help="fine-tuning seeds per variant; a seed sets the new classifier's initialisation, batch order and dropout (default: 3)",
    )  # fmt: skip
    p.add_argument("--g-seeds", type=int, default=1, help="fit g this many times (seeds --g-seed, +1, ...) so g's own noise enters the paired tests (default: 1)")
    p.add_argument("--resamples", type=int, default=10_000, help="bootstrap resamples of the paired tests, at least 10000 (default: 10000)")
    p.add_argument("--head-epochs", type=int, help="fine-tuning epochs of the upper layers (default: 20 sound, 100 paper)")
    p.add_argument(
        "--head-lr", type=float, nargs="+", metavar=("START", "END"),
        help="Adam learning rate of the upper layers; with END, log-spaced per epoch from START to END, else cosine to 0 "
        "(default: 1e-3 sound, 1e-5 1e-7 paper)",
    )  # fmt: skip
    p.add_argument("--no-ablations", action="store_true", help="skip the order ablations x^(0), x^(0)+x^(1), ...")
    p.add_argument("--test-per-class", type=int, help="score on the first N test images per class (default: all)")
    p.add_argument("--g", type=Path, dest="g_file", help="reuse a g written by `refiner fit --on target` for the same A, B, layers, task and classes instead of fitting one (another data folder of the task only warns)")
    p.add_argument("--name", help="model name in the repository (default: <task>-refined)")
    p.add_argument("--models", type=Path, default=Path("models"), help="model repository folder (default: models/)")
    _add_export(p, fp16=False)
    p.set_defaults(run=_run_build)


def _add_export(p: argparse.ArgumentParser, fp16: bool) -> None:
    """How the refined model becomes ONNX; shared by build and export."""
    group = p.add_argument_group("ONNX export")
    group.add_argument("--opset", type=int, help="ONNX opset, 18 or above (default: the exporter's)")
    if fp16:
        group.add_argument("--fp16", action="store_true", help="float16 weights and activations behind a float32 input and output (checked at 1%% of the logits' scale)")
    group.add_argument("--quantize", choices=["int8"], help="onnxruntime static INT8 (QDQ, per-channel), calibrated on validation images and scored on test images")
    group.add_argument("--max-int8-drop", type=float, help="test accuracy points INT8 may lose before the artifact is refused (default: 1)")


def _export_options(args):
    from refiner.build.publish import ExportOptions
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


def _run_build(args) -> None:
    from refiner.build.config import BuildConfig, default_head
    from refiner.build.pipeline import build
    from refiner.engine.finetune import HeadConfig
    from refiner.errors import ConfigError

    head = default_head(args.protocol).model_dump()
    if args.head_epochs is not None:
        head["epochs"] = args.head_epochs
    if args.head_lr is not None:
        if len(args.head_lr) > 2:
            raise ConfigError(f"--head-lr takes START or START END, got {len(args.head_lr)} values")
        head.update(lr=args.head_lr[0], lr_end=args.head_lr[1] if len(args.head_lr) == 2 else None)
    a, b = _load_pair(args, args.task)
    config = BuildConfig(
        compare=_compare_config(args),
        protocol=args.protocol,
        seeds=args.seeds,
        g_seeds=args.g_seeds,
        resamples=args.resamples,
        head=HeadConfig(**head),
        ablations=not args.no_ablations,
        name=args.name or f"{args.task}-refined",
        export=_export_options(args),
    )
    result = build(a, b, args.task, args.data, config, models=args.models, classes=_classes(args), split=_split(args), cache_dir=args.cache, g_file=args.g_file)
    if result is not None:  # rank 0 (or the only process)
        print(result.report.model_dump_json() if args.json else result.summary())


def _export_args(sub) -> None:
    p = _command(
        sub,
        "export",
        "Export a refined model (a build's refined.pt, or A's trunk + a g from `refiner fit` + B's upper layers) as a validated ONNX artifact.",
        "  refiner export --refined models/cifar-animal-refined/1/refined.pt --name cifar-animal-int8 --task cifar-animal --data cifar10/ --quantize int8\n"
        "  refiner export --refined models/digits-refined/1/refined.pt --name digits-fp16 --fp16\n"
        "  refiner export --a a.pt --b b.pt --g g.pt --name digits-unrefined --task digits --classes 0,1,2,3,4,5\n",
    )
    source = p.add_argument_group("source: --refined, or --a --b --g")
    source.add_argument("--refined", type=Path, help="a refined checkpoint (models/<name>/<version>/refined.pt from `refiner build`)")
    source.add_argument("--a", type=Path, help="checkpoint of net A, whose trunk feeds g")
    source.add_argument("--b", type=Path, help="checkpoint of net B, whose upper layers and own classifier read g's output")
    source.add_argument("--g", type=Path, dest="g_file", help="a g written by `refiner fit` for A and B (its layers are used; --task must read the dataset g was fitted on)")
    source.add_argument("--arch-a", help="architecture of A when --a is a bare state_dict")
    source.add_argument("--arch-b", help="architecture of B when --b is a bare state_dict")
    source.add_argument("--trust-checkpoint", action="store_true", help="allow checkpoints that need arbitrary unpickling (runs code from the file!)")
    p.add_argument("--name", required=True, help="model name in the repository")
    p.add_argument("--models", type=Path, default=Path("models"), help="model repository folder (default: models/)")
    p.add_argument("--task", help="task whose validation images check the export and calibrate INT8, and whose test images score it (default: seeded random inputs; needed for --quantize)")
    p.add_argument("--data", type=Path, help="dataset folder of --task")
    p.add_argument("--classes", help="with --a/--b/--g: comma-separated classes of B the model answers (default: all of B's)")
    p.add_argument("--skip-bad-images", action="store_true", help="leave out image files that do not decode (counted in a warning) instead of stopping")
    _add_preprocess(p)
    _add_export(p, fp16=True)
    p.set_defaults(run=_run_export)


def _run_export(args) -> None:
    import warnings

    from refiner.build.publish import export_artifact
    from refiner.build.refined import load_refined, refined_from_parts
    from refiner.data.tasks import SplitOptions
    from refiner.engine.comparison import CompareConfig, load_fitted_g
    from refiner.errors import ConfigError
    from refiner.models.checkpoints import load_checkpoint

    parts = (args.a, args.b, args.g_file)
    if (args.refined is None) == all(x is None for x in parts) or (args.refined is None and None in parts):
        raise ConfigError("give either --refined FILE, or all of --a, --b and --g")
    if args.refined is not None:
        if args.classes:
            raise ConfigError("--classes applies to --a/--b/--g; a refined checkpoint answers the classes it was built for")
        model, spec = load_refined(args.refined)
        pre = _preprocess(args, spec.preprocess)
        if pre.input_size != spec.preprocess.input_size:
            warnings.warn(
                f"exporting at {pre.input_size[1]}x{pre.input_size[2]}, but the model was built and fine-tuned at "
                f"{spec.preprocess.input_size[1]}x{spec.preprocess.input_size[2]}: its accuracy there is not measured",
                stacklevel=1,
            )
        spec = spec.model_copy(update={"preprocess": pre})
    else:
        a = _fed_as_asked(args, load_checkpoint(args.a, arch=args.arch_a, trust=args.trust_checkpoint))
        b = _fed_as_asked(args, load_checkpoint(args.b, arch=args.arch_b, trust=args.trust_checkpoint))
        config, (g, _) = load_fitted_g(args.g_file, a, b, CompareConfig(), task=args.task, data_dir=args.data)
        model, spec = refined_from_parts(a, b, g, config.layer_a, config.layer_b, _classes(args))
    out = export_artifact(model, spec, args.models, args.name, _export_options(args), args.task, args.data, SplitOptions(skip_bad_images=args.skip_bad_images))
    if args.json:
        print(out.metadata.model_dump_json())
        return
    from refiner.build.quantize import format_quantization

    c = out.check
    print(f"ONNX ({c.precision}) max |logit diff| {c.max_abs_diff:.2e} (tolerance {c.atol:.1e}), top-1 agreement {c.top1_agreement:.1%} at batch {c.batch_size}")
    if out.quantization:
        print(format_quantization(out.quantization))
    print(f"artifact: {out.folder}")


def _serve_args(sub) -> None:
    p = _command(
        sub,
        "serve",
        "Serve the model repository over HTTP (KServe v2 + image classification).",
        "  refiner serve --models models/\n  refiner serve --models models/ --host 0.0.0.0 --port 8080 --workers 2\n",
    )
    p.add_argument("--models", type=Path, default=Path("models"), help="model repository folder (default: models/)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on; 0.0.0.0 for every interface (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000)")
    p.add_argument("--workers", type=int, default=1, help="server processes sharing the port, cores split between them (default: 1)")
    p.add_argument("--device", dest="serve_device", choices=["auto", "cpu", "cuda"], default="auto", help="onnxruntime device: auto takes CUDA when onnxruntime-gpu sees a GPU (default: auto)")
    p.epilog += "\nother settings (limits, timeouts, batching) come from REFINER_SERVE_* variables; see serving/settings.py\n"
    p.set_defaults(run=_run_serve)


def _run_serve(args) -> None:
    from refiner.errors import ConfigError

    if not args.models.is_dir():
        raise ConfigError(f"model repository {str(args.models)!r} is not a folder; run `refiner build` first or pass --models DIR")
    from serving.app import serve
    from serving.settings import ServeSettings

    serve(ServeSettings(models=args.models, workers=args.workers, device=args.serve_device), args.host, args.port)


def _layers_args(sub) -> None:
    p = _command(
        sub,
        "layers",
        "List the layer names of an architecture (or a checkpoint's) usable as --layer-a/--layer-b, with the default marked.",
        "  refiner layers --arch resnet18\n  refiner layers --arch timm/vit_small_patch16_224\n  refiner layers --checkpoint a.pt\n",
    )
    p.add_argument("--arch", help="an architecture name: small_vgg, any torchvision model (resnet18, ...) or timm/<name> (timm/convnext_atto, ...); with --checkpoint, what a bare state_dict holds")
    p.add_argument("--checkpoint", type=Path, help="a checkpoint (its architecture is read from it)")
    p.add_argument("--trust-checkpoint", action="store_true", help="allow a checkpoint that needs arbitrary unpickling (runs code from the file!)")
    p.set_defaults(run=_run_layers)


def _run_layers(args) -> None:
    import json

    import torch

    from refiner.errors import ConfigError
    from refiner.models.architectures import create_model, get_arch
    from refiner.models.checkpoints import load_checkpoint
    from refiner.models.layers import list_layers

    if args.arch is None and args.checkpoint is None:
        raise ConfigError("give --arch NAME or --checkpoint FILE")
    if args.checkpoint is not None:
        clf = load_checkpoint(args.checkpoint, arch=args.arch, trust=args.trust_checkpoint)
        arch, model = clf.meta.arch, clf.model
    else:
        arch = args.arch
        with torch.device("meta"):  # names only: no weights allocated
            model = create_model(arch, 10)
    default = get_arch(arch).default_layer
    nodes = list_layers(model)
    if args.json:
        print(json.dumps({"arch": arch, "default": default, "layers": nodes[1:-1]}))
        return
    for name in nodes[1:-1]:  # the input and the output are not split points
        print(f"{name}  <- default" if name == default else name)


def _analyze_args(sub) -> None:
    from refiner.analyses.commands import register

    p = _command(
        sub,
        "analyze",
        "The paper's other applications as reports: diagnose, stability, compression, distillation.",
        "  refiner analyze stability --models a.pt b.pt c.pt --task digits --out reports/stability\n"
        "  refiner analyze diagnose --weak a.pt --strong b.pt --task digits --out reports/diagnose\n",
    )
    register(p.add_subparsers(dest="analysis", required=True, metavar="ANALYSIS"), _command, _add_task, _add_g, _g_configs, _runtime, _fed_as_asked)


def main(argv: list[str] | None = None) -> int:
    from pydantic import ValidationError

    args = _parser().parse_args(argv)
    from refiner.progress import set_quiet

    set_quiet(getattr(args, "quiet", False))
    try:
        if hasattr(args, "device"):
            from refiner.engine.distributed import init_from_env

            args.device = init_from_env(args.device)  # under torchrun: join the group, one GPU per process
        args.run(args)
    except (RefinerError, ValidationError) as e:
        print(f"refiner {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"refiner {args.command}: interrupted; no partial output was written", file=sys.stderr)
        return 130
    except BrokenPipeError:  # stdout closed early (`refiner layers ... | head`): not an error of the command
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the flush at exit does not fail again
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
