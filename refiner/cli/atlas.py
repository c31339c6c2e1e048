"""`refiner atlas`: where two nets agree, layer by layer (CKA grid in one streamed pass), and g on the matched pairs."""

from __future__ import annotations

from pathlib import Path

from refiner.cli import options

__all__ = ["register", "run"]


def register(sub) -> None:
    p = options.command(
        sub,
        "atlas",
        "Map two nets layer by layer: minibatch CKA between every chosen layer of A and of B in one streamed pass, "
        "then knowledge consistency (g, instability, Var(x^(k))) on each A layer's best match; report.html, heatmaps, atlas.json.",
        "  refiner atlas --a a.pt --b b.pt --task digits --out reports/atlas\n"
        "  refiner atlas --a torchvision/resnet18 --b timm/vit_small_patch16_224 --task imagefolder --data photos/ \\\n"
        "      --consistency none --images 2000 --out reports/resnet-vs-vit\n"
        "  refiner atlas --a a.pt --b b.pt --task cifar10 --data cifar10/ --layers-a layer1,layer2,layer3 --layers-b auto \\\n"
        "      --consistency matched --g-steps 1000 --train-per-class 200 --out reports/atlas\n",
    )
    options.add_pair(p, layers=False)
    p.set_defaults(g_steps=2000)
    next(a for a in p._actions if a.dest == "g_steps").help = "budget of optimiser steps per g; fitting stops earlier once the held-out MSE stops improving (default here: 2000)"
    group = p.add_argument_group("atlas")
    group.add_argument("--layers-a", default="auto", help="auto (the clean split points of `refiner layers`, thinned evenly by depth to --max-layers, the default layer kept) or comma-separated layer names (default: auto)")
    group.add_argument("--layers-b", default="auto", help="the same for B (default: auto)")
    group.add_argument("--max-layers", type=int, default=16, help="at most this many layers per net with auto (default: 16)")
    group.add_argument("--images", type=int, default=1000, help="images of the split to measure on, a seeded random subset when it has more; at least 4 (default: 1000)")
    group.add_argument("--split", choices=["train", "val", "test"], default="test", help="split the CKA is measured on (default: test)")
    group.add_argument("--batch-size", type=int, default=64, help="images per minibatch of the CKA estimator, at least 4; memory grows with it, the CKA changes little (default: 64)")
    group.add_argument("--seed", type=int, default=0, help="draws the image subset and seeds g (default: 0)")
    group.add_argument(
        "--position-cka", choices=["auto", "on", "off"], default="auto",
        help="also refiner's (image, position) CKA for pairs with equal positions; auto: only if the first batch says it adds at "
        "most a quarter of the forward time or under 5 s in all (on two resnet18 at 224 px it would add 70 %% of the pass) (default: auto)",
    )  # fmt: skip
    group.add_argument(
        "--consistency", choices=["none", "matched", "diagonal"], default="matched",
        help="fit g on no pair, on each A layer and its best-matching B layer, or on layer i of A and layer i of B; each fit "
        "caches both layers' training features, then takes up to --g-steps steps (about 1 minute per pair on digits "
        "on 2 CPU cores, longer on large maps) (default: matched)",
    )  # fmt: skip
    p.add_argument("--test-per-class", type=int, help="with --consistency, measure each g on the first N images per class of --split (default: all)")
    p.add_argument("--out", required=True, type=Path, help="report folder (atlas.json, cka.png, report.html), written after the CKA pass and after each pair; a partial atlas there of the same arguments is resumed")
    p.set_defaults(run=run)


def run(args) -> None:
    import numpy as np

    from refiner.api.atlas import atlas
    from refiner.data.tasks import load_task
    from refiner.engine import distributed as dist
    from refiner.engine.device import Runtime
    from refiner.layermap.stream import task_batches

    layers_a, layers_b = _layers(args.layers_a), _layers(args.layers_b)
    g, fit = options.g_configs(args)
    a, b = options.load_pair(args, args.task)
    data = load_task(args.task, args.data, target=False, classes=options.classes(args), options=options.split(args))
    samples = data.split(args.split)
    if len(samples) > args.images:  # a seeded subset, in the split's order
        samples = [samples[i] for i in np.sort(np.random.default_rng(args.seed).choice(len(samples), args.images, replace=False))]
    runtime = options.runtime(args)
    batches_a, batches_b = task_batches(samples, a.preprocess, b.preprocess, Runtime.resolve(runtime), args.batch_size)
    result = atlas(
        a, b, batches_a, layers_a, layers_b, data_b=batches_b, train=data if args.consistency != "none" else None,
        consistency=args.consistency, max_layers=args.max_layers, positions={"on": True, "off": False}.get(args.position_cka, "auto"), seed=args.seed,
        g_config=g, fit_config=fit, split=args.split, task=args.task, device=runtime.device, amp=runtime.amp,
        threads=runtime.threads, workers=runtime.workers, cache_dir=args.cache, out=args.out, forward=runtime.forward,
    )  # fmt: skip
    if not dist.is_main():
        return
    if args.json:
        print(result.report.model_dump_json())
        return
    print(result)
    print(f"wrote {args.out}/atlas.json, cka.png and report.html ({result.report.seconds['total']:.0f} s)")


def _layers(value: str) -> list[str] | None:
    from refiner.errors import ConfigError

    if value == "auto":
        return None
    names = [n.strip() for n in value.split(",")]
    if "" in names:
        raise ConfigError(f"layer list {value!r} has an empty entry; give auto or comma-separated names (see `refiner layers`)")
    return names
