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
    from refiner.api.fit import fit
    from refiner.data.tasks import load_task
    from refiner.engine import distributed as dist

    classes = options.classes(args)  # checked before the nets are loaded and their preprocessing said
    a, b = options.load_pair(args, args.task)
    data = load_task(args.task, args.data, target=args.on == "target", classes=classes, options=options.split(args))
    g, fit_config = options.g_configs(args)
    runtime = options.runtime(args)
    fitted = fit(
        a, b, data, args.layer_a, args.layer_b, g_config=g, fit_config=fit_config, cache_dtype="float16" if args.cache_fp16 else "float32",
        device=runtime.device, amp=runtime.amp, threads=runtime.threads, workers=runtime.workers, cache_dir=args.cache,
    )  # fmt: skip
    if not dist.is_main():
        return
    fitted.save(args.out)
    report = fitted.report
    if args.json:
        print(report.model_dump_json())
        return
    print(fitted)
    print(f"on {report.runtime['device']} ({report.runtime['name']}), AMP {report.runtime['amp']}")
    print(f"wrote {args.out}, {args.out.with_suffix('.json')} and {args.out.with_name(args.out.stem + '-curve.png')}")
