"""`refiner analyze`: the paper's other applications (diagnose, stability, compression, distillation)."""

from __future__ import annotations

import argparse
from pathlib import Path

from refiner.cli import options

__all__ = ["register"]


def register(sub) -> None:
    p = options.command(
        sub,
        "analyze",
        "The paper's other applications as reports: diagnose, stability, compression, distillation.",
        "  refiner analyze stability --models a.pt b.pt c.pt --task digits --out reports/stability\n"
        "  refiner analyze diagnose --weak a.pt --strong b.pt --task digits --out reports/diagnose\n",
    )
    sub = p.add_subparsers(dest="analysis", required=True, metavar="ANALYSIS")

    p = options.command(
        sub,
        "diagnose",
        "Unreliable features and blind spots of a weak net against a strong one (paper Section 4.1, Fig. 3).",
        "  refiner analyze diagnose --weak small.pt --strong full.pt --task digits --out reports/diagnose\n"
        "  refiner analyze diagnose --weak small.pt --strong full.pt --task cifar10 --data cifar/ \\\n"
        "      --layer-weak features.12 --layer-strong features.12 --images 6 --out reports/diagnose\n",
    )
    p.add_argument("--weak", required=True, type=Path, help="checkpoint of the weak net (e.g. trained on less data)")
    p.add_argument("--strong", required=True, type=Path, help="checkpoint of the strong net")
    p.add_argument("--layer-weak", help="layer of the weak net (default: the architecture's default layer)")
    p.add_argument("--layer-strong", help="layer of the strong net (default: the architecture's default layer)")
    p.add_argument("--channel", type=int, help="channel to picture (default: the one with the largest Δ share)")
    options.add_net_names(p, "weak", "the weak net")
    options.add_net_names(p, "strong", "the strong net")
    options.add_net_preprocess(p, "weak", "the weak net")
    options.add_net_preprocess(p, "strong", "the strong net")
    _add_images(p)
    _add_common(p)
    p.set_defaults(run=_run_diagnose)

    p = options.command(
        sub,
        "stability",
        "Instability Var(x^Δ)/Var(x) over all ordered pairs of nets, per layer (paper Section 4.2, Tables 1-2).",
        "  refiner analyze stability --models s0.pt s1.pt s2.pt --task digits --out reports/stability\n"
        "  refiner analyze stability --models s0.pt s1.pt s2.pt --task cifar10 --data cifar/ --layers features.5 features.12 \\\n"
        "      --train-per-class 100 --test-per-class 100 --g-epochs 20 --g-lr 3e-2 3e-4 --g-batch 32 --out reports/stability\n"
        "  # disjoint halves: refiner train ... --subset half-a --out a.pt; ... --subset half-b --out b.pt\n"
        "  refiner analyze stability --models a.pt b.pt --task cifar10 --data cifar/ --out reports/halves\n",
    )
    p.add_argument("--models", required=True, nargs="+", type=Path, help="checkpoints of nets trained the same way (at least 2)")
    p.add_argument("--layers", nargs="+", help="layers to compare (default: the architecture's default layer)")
    options.add_net_names(p, "", "every net")
    _add_common(p)
    p.set_defaults(run=_run_stability)

    p = options.command(
        sub,
        "compression",
        "Knowledge discarded by magnitude pruning against accuracy drop (paper Section 4.4, Fig. 4 left).",
        "  refiner analyze compression --model a.pt --task digits --sparsity 0,0.5,0.9 --out reports/compression\n"
        "  refiner analyze compression --model a.pt --task cifar10 --data cifar/ --sparsity 0,0.5,0.8,0.93 --finetune-epochs 2 \\\n"
        "      --train-per-class 100 --test-per-class 100 --g-epochs 20 --g-lr 3e-2 3e-4 --g-batch 32 --out reports/compression\n"
        "  # sparsity 0 is the unpruned net: its Var(x^Δ) is g's fitting error, the floor of the other rows\n",
    )
    p.add_argument("--model", required=True, type=Path, help="checkpoint of the net to prune")
    p.add_argument("--sparsity", default="0.5,0.8,0.93", help="comma-separated shares of weights set to zero, each in [0, 1) (default: 0.5,0.8,0.93)")
    p.add_argument("--layer", help="layer compared (default: the architecture's default layer)")
    p.add_argument("--finetune-epochs", type=int, default=3, help="fine-tuning epochs after pruning (default: 3)")
    p.add_argument("--finetune-lr", type=float, default=0.01, help="peak SGD learning rate of the fine-tuning (default: 0.01)")
    p.add_argument("--batch-size", type=int, default=128, help="fine-tuning batch size (default: 128)")
    options.add_net_names(p, "", "the net")
    _add_images(p)
    _add_common(p)
    p.set_defaults(run=_run_compression, check=_sparsities)

    p = options.command(
        sub,
        "distillation",
        "Blind spots of born-again generations w.r.t. the newest (paper Section 4.5, Fig. 4 right).",
        "  refiner analyze distillation --model a.pt --task digits --generations 4 --out reports/distillation\n"
        "  refiner analyze distillation --model a.pt --task cifar10 --data cifar/ --generations 4 --epochs 12 --out reports/bans\n",
    )
    p.add_argument("--model", required=True, type=Path, help="checkpoint of generation 0 (the first teacher)")
    p.add_argument("--generations", type=int, default=4, help="students trained one after another (default: 4)")
    p.add_argument("--layer", help="layer compared (default: the architecture's default layer)")
    p.add_argument("--epochs", type=int, default=12, help="training epochs of each student (default: 12)")
    p.add_argument("--lr", type=float, default=0.05, help="peak SGD learning rate of each student (default: 0.05)")
    p.add_argument("--batch-size", type=int, default=128, help="students' batch size (default: 128)")
    p.add_argument("--kd-weight", type=float, default=0.5, help="loss = CE + W * KD (default: 0.5)")
    p.add_argument("--temperature", type=float, default=1.0, help="KD temperature τ (default: 1)")
    p.add_argument("--seed", type=int, default=0, help="students' seeds are SEED + generation (default: 0)")
    options.add_net_names(p, "", "generation 0")
    _add_common(p)
    p.set_defaults(run=_run_distillation)


def _add_images(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images", type=int, default=4, help="test images pictured as heatmaps (default: 4; 0: none)")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, type=Path, help="report folder to write (must not exist): report.json, *.png, report.html")
    p.add_argument("--trust-checkpoint", action="store_true", help="allow checkpoints that need arbitrary unpickling (runs code from the file!)")
    options.add_g(p)
    p.add_argument("--test-per-class", type=int, help="test images per class measured (default: all)")
    options.add_task(p)


def _analysis_config(args):
    from refiner.analyses.measure import AnalysisConfig

    g, fit = options.g_configs(args)
    return AnalysisConfig(
        g=g, fit=fit, train_per_class=args.train_per_class, test_per_class=args.test_per_class, runtime=options.runtime(args),
        cache_dtype="float16" if args.cache_fp16 else "float32",
    )


def _where(args) -> dict:
    """Keyword arguments every analysis takes besides its config (called before the nets load, so --classes is checked first)."""
    return {"task": args.task, "data_dir": args.data, "out": args.out, "classes": options.classes(args), "cache_dir": args.cache}


def _run_diagnose(args) -> None:
    from refiner.analyses.diagnose import DiagnoseConfig, diagnose

    config = DiagnoseConfig(
        analysis=_analysis_config(args), layer_weak=args.layer_weak, layer_strong=args.layer_strong, images=args.images, channel=args.channel
    )
    where = _where(args)
    weak, strong = options.load_fed(args, args.weak, "weak", "the weak net"), options.load_fed(args, args.strong, "strong", "the strong net")
    report = diagnose(weak, strong, config=config, **where)
    if _skip_summary(args, report):
        return
    for d in (report.unreliable, report.blind_spots):
        t = d.comparison.tables["test"]
        top = ", ".join(str(c.channel) for c in d.channels[:5])
        print(f"{d.name}: Var(x^Δ)/Var(x) {t.instability:.4f}, linear CKA {t.cka:.4f}; channels with the largest x^Δ share: {top}")
    print(f"wrote {args.out / 'report.html'}")


def _run_stability(args) -> None:
    from refiner.analyses.stability import StabilityConfig, stability

    config = StabilityConfig(analysis=_analysis_config(args), layers=tuple(args.layers) if args.layers else None)
    where = _where(args)
    report = stability([options.load_fed(args, m, "", f"net {i + 1}") for i, m in enumerate(args.models)], config=config, **where)
    if _skip_summary(args, report):
        return
    for s in report.layers:
        orders = "  ".join(f"Var(x^({k})) {v:.4f}" for k, v in enumerate(s.var_orders))
        print(f"{s.layer}: instability {s.instability:.4f} ± {s.instability_std:.4f}, linear CKA {s.cka:.4f}; {orders}  Var(x^Δ) {s.var_delta:.4f}")
    print(f"wrote {args.out / 'report.html'}")


def _run_compression(args) -> None:
    from refiner.analyses.compression import CompressionConfig, compression
    from refiner.engine.training import TrainConfig

    config = CompressionConfig(
        analysis=_analysis_config(args),
        sparsities=_sparsities(args),
        finetune=TrainConfig(epochs=args.finetune_epochs, lr=args.finetune_lr, batch_size=args.batch_size, runtime=options.runtime(args)),
        layer=args.layer,
        images=args.images,
    )
    where = _where(args)
    report = compression(options.load_fed(args, args.model, "", "the net"), config=config, **where)
    if _skip_summary(args, report):
        return
    print(f"{report.model}: test accuracy {report.original_test_acc:.4f}")
    for r in report.pruned:
        t = r.comparison.tables["test"]
        print(f"sparsity {r.sparsity:.2f}: test acc {r.test_acc:.4f} (drop {r.accuracy_drop:+.4f}), discarded Var(x^Δ) {t.var_delta:.4f}, linear CKA {t.cka:.4f}")
    print(f"wrote {args.out / 'report.html'}")


def _run_distillation(args) -> None:
    from refiner.analyses.distillation import DistillationConfig, distillation
    from refiner.engine.training import TrainConfig

    config = DistillationConfig(
        analysis=_analysis_config(args),
        generations=args.generations,
        train=TrainConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, seed=args.seed, runtime=options.runtime(args)),
        kd_weight=args.kd_weight,
        temperature=args.temperature,
        layer=args.layer,
    )
    where = _where(args)
    report = distillation(options.load_fed(args, args.model, "", "generation 0"), config=config, **where)
    if _skip_summary(args, report):
        return
    for g in report.generations:
        blind = f", blind spots Var(x^Δ) {g.blind_spots.tables['test'].var_delta:.4f}" if g.blind_spots else " (newest)"
        print(f"generation {g.generation}: test acc {g.test_acc:.4f}{blind}")
    print(f"wrote {args.out / 'report.html'}")


def _skip_summary(args, report) -> bool:
    """With --json, print the report as one JSON document; True where no summary lines follow (--json, or not rank 0 under torchrun)."""
    from refiner.engine import distributed as dist

    if not dist.is_main():
        return True
    if args.json:
        print(report.model_dump_json())
    return args.json


def _sparsities(args) -> tuple[float, ...]:
    """--sparsity as numbers; an empty entry is refused as in every other comma-separated option (the range: CompressionConfig)."""
    from refiner.errors import ConfigError

    values = [v.strip() for v in args.sparsity.split(",")]
    if "" in values:
        raise ConfigError(f"--sparsity {args.sparsity!r} has an empty entry; give comma-separated numbers such as 0.5,0.8,0.93")
    try:
        return tuple(float(v) for v in values)
    except ValueError:
        raise ConfigError(f"--sparsity takes comma-separated numbers such as 0.5,0.8,0.93, got {args.sparsity!r}") from None
