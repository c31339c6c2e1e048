"""`refiner export`: a refined model (refined.pt, or A + g + B) as a validated ONNX artifact."""

from __future__ import annotations

from pathlib import Path

from refiner.cli import options

__all__ = ["register", "check", "run"]


def register(sub) -> None:
    p = options.command(
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
    options.add_net_names(source, "a", "A")
    options.add_net_names(source, "b", "B (what the model answers)")
    source.add_argument("--trust-checkpoint", action="store_true", help="allow checkpoints that need arbitrary unpickling (runs code from the file!)")
    p.add_argument("--name", required=True, help="model name in the repository")
    p.add_argument("--models", type=Path, default=Path("models"), help="model repository folder (default: models/)")
    p.add_argument("--task", help="task whose validation images check the export and calibrate INT8, and whose test images score it (default: seeded random inputs; needed for --quantize)")
    p.add_argument("--data", type=Path, help="dataset folder of --task")
    p.add_argument("--classes", help="with --a/--b/--g: comma-separated classes of B the model answers (default: all of B's)")
    p.add_argument("--skip-bad-images", action="store_true", help="leave out image files that do not decode (counted in a warning) instead of stopping")
    options.add_val_from(p)
    options.add_preprocess(p)
    options.add_net_preprocess(p, "a", "A")
    options.add_net_preprocess(p, "b", "B")
    options.add_export(p, fp16=True)
    p.set_defaults(run=run, check=check)


def check(args) -> None:
    from refiner.errors import ConfigError

    parts = (args.a, args.b, args.g_file)
    if (args.refined is None) == all(x is None for x in parts) or (args.refined is None and None in parts):
        raise ConfigError("give either --refined FILE, or all of --a, --b and --g")


def run(args) -> None:
    import warnings

    from refiner.api.refine import export
    from refiner.refine.refined import load_refined, refined_from_parts
    from refiner.data.tasks import SplitOptions
    from refiner.engine.comparison import CompareConfig, load_fitted_g
    from refiner.errors import ConfigError

    options_ = options.export_options(args)  # checked before anything is loaded or said
    if args.refined is not None:
        if args.classes or args.labels_a or args.labels_b:
            raise ConfigError("--classes applies to --a/--b/--g (and so do --labels-a/--labels-b); a refined checkpoint answers the classes it was built for")
        model, spec = load_refined(args.refined)
        pre = options.preprocess(args, spec.preprocess)
        options.say_preprocess(args.refined.name, pre, options.preprocess_from(args, f"the record in {args.refined.name}"))
        if pre.input_size != spec.preprocess.input_size:
            warnings.warn(
                f"exporting at {pre.input_size[1]}x{pre.input_size[2]}, but the model was built and fine-tuned at "
                f"{spec.preprocess.input_size[1]}x{spec.preprocess.input_size[2]}: its accuracy there is not measured",
                stacklevel=1,
            )
        spec = spec.model_copy(update={"preprocess": pre})
    else:
        a, b = options.fed_from_g(args, options.load_net(args, args.a, "a", "net A"), options.load_net(args, args.b, "b", "net B"), args.g_file)
        classes = options.classes(args)
        options.check_named(args, b, "b", "net B", classes)
        config, (g, _) = load_fitted_g(
            args.g_file, a, b, CompareConfig(), task=args.task, classes=classes, data_dir=args.data, other_preprocess="warn", other_classes="warn"
        )  # fmt: skip
        model, spec = refined_from_parts(a, b, g, config.layer_a, config.layer_b, classes)
    out = export(model, args.name, spec=spec, models=args.models, options=options_, task=args.task, data=args.data, split=SplitOptions(skip_bad_images=args.skip_bad_images, val_from=args.val_from))
    if args.json:
        print(out.metadata.model_dump_json())
        return
    from refiner.refine.quantize import format_quantization

    c = out.check
    print(f"ONNX ({c.precision}) max |logit diff| {c.max_abs_diff:.2e} (tolerance {c.atol:.1e}), top-1 agreement {c.top1_agreement:.1%} at batch {c.batch_size}")
    if out.quantization:
        print(format_quantization(out.quantization))
    print(f"artifact: {out.folder}")
