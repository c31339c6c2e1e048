"""`refiner build`: fit g, fine-tune the refined model and its baselines, export ONNX."""

from __future__ import annotations

from pathlib import Path

from refiner.cli import options

__all__ = ["register", "check", "run"]


def register(sub) -> None:
    p = options.command(
        sub,
        "build",
        "Fit g, build and fine-tune the refined model, compare with and without Δ removal, export ONNX.",
        "  refiner build --a a.pt --b b.pt --task digits --name digits-refined\n"
        "  refiner build --a a.pt --b b.pt --task cifar-animal --data cifar10/ --seeds 3 --models models/\n"
        "  refiner build --a a.pt --b b.pt --task cifar-animal --data cifar10/ --protocol paper --seeds 5\n",
    )
    options.add_pair(p)
    p.add_argument(
        "--protocol", choices=["sound", "paper"], default="sound",
        help="sound: new target classifier, epoch chosen on validation data; paper: the authors' protocol, B's whole upper "
        "part kept with its base classifier, Adam 1e-5 -> 1e-7 for 100 epochs, best-on-test reported too (default: sound)",
    )  # fmt: skip
    p.add_argument(
        "--seeds", type=int, default=3,
        help="fine-tuning seeds per variant; a seed sets batch order, dropout and (sound protocol) the new classifier's initialisation (default: 3)",
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
    options.add_export(p, fp16=False)
    p.set_defaults(run=run, check=check)


def check(args) -> None:
    from refiner.errors import ConfigError

    if args.head_lr is not None and len(args.head_lr) > 2:
        raise ConfigError(f"--head-lr takes START or START END, got {len(args.head_lr)} values")
    for flag, value, least in (("--seeds", args.seeds, 1), ("--g-seeds", args.g_seeds, 1), ("--resamples", args.resamples, 10_000)):
        if value < least:
            raise ConfigError(f"{flag} must be at least {least:,}, got {value}")
    if args.g_seeds > 1 and args.g_file is not None:
        raise ConfigError(f"--g reuses one fit of g, so --g-seeds {args.g_seeds} cannot refit it; drop one of them")


def run(args) -> None:
    from refiner.refine.config import BuildConfig, default_head
    from refiner.api.refine import build
    from refiner.engine.finetune import HeadConfig

    head = default_head(args.protocol).model_dump()
    if args.head_epochs is not None:
        head["epochs"] = args.head_epochs
    if args.head_lr is not None:
        head.update(lr=args.head_lr[0], lr_end=args.head_lr[1] if len(args.head_lr) == 2 else None)
    a, b = options.load_pair(args, args.task, args.g_file)
    if args.protocol == "paper":  # the base classifiers are kept: target classes are looked up among their outputs
        for clf, side in ((a, "a"), (b, "b")):
            options.check_named(args, clf, side, f"net {side.upper()}", options.classes(args))
    config = BuildConfig(
        compare=options.compare_config(args),
        protocol=args.protocol,
        seeds=args.seeds,
        g_seeds=args.g_seeds,
        resamples=args.resamples,
        head=HeadConfig(**head),
        ablations=not args.no_ablations,
        name=args.name or f"{args.task}-refined",
        export=options.export_options(args),
    )
    result = build(a, b, args.task, args.data, config=config, models=args.models, classes=options.classes(args), split=options.split(args), cache_dir=args.cache, g=args.g_file)
    if result is not None:  # rank 0 (or the only process)
        print(result.report.model_dump_json() if args.json else result.summary())
