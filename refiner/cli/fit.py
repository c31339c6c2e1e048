"""`refiner fit`: g between two nets' features, its Var table and fit curve."""

from __future__ import annotations

from pathlib import Path

from refiner.cli import options

__all__ = ["register", "run"]


def register(sub) -> None:
    p = options.command(
        sub,
        "fit",
        "Fit g: x_A -> x_B, print and save the Var table and instability (paper Sections 3, 4.2).",
        "  refiner fit --a a.pt --b b.pt --task digits --out g.pt\n"
        "  refiner fit --a a.pt --b b.pt --task cifar10 --data cifar10/ --layer-a features.19 --layer-b features.19 --orders 3 --out g.pt\n"
        "  refiner fit --a a.safetensors --arch-a timm/convnext_atto --b torchvision/resnet18 --task imagefolder --data photos/ --out g.pt\n",
    )
    options.add_pair(p)
    p.add_argument("--on", choices=["base", "target"], default="base", help="fit on the task's base classes or its target classes")
    p.add_argument("--seed", dest="g_seed", type=int, default=0, help="the same as --g-seed: g's initialisation, held-out split and batch order (default: 0)")
    p.add_argument("--test-per-class", type=int, help="measure on the first N test images per class (default: all)")
    p.add_argument("--out", required=True, type=Path, help="g file to write; the report goes beside it as .json")
    p.set_defaults(run=run)


def run(args) -> None:
    from refiner.atomic import atomic_file
    from refiner.data.tasks import load_task
    from refiner.engine import distributed as dist
    from refiner.engine.comparison import compare
    from refiner.engine.isomorphism import save_isomorphism
    from refiner.reporting import format_fit, format_variance_table, save_fit_curve

    classes = options.classes(args)  # checked before the nets are loaded and their preprocessing said
    a, b = options.load_pair(args, args.task)
    data = load_task(args.task, args.data, target=args.on == "target", classes=classes, options=options.split(args))
    g, report, _ = compare(a, b, data, options.compare_config(args), args.cache)
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
