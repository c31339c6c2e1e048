"""`refiner train`: a base classifier from scratch, written as a refiner checkpoint."""

from __future__ import annotations

from pathlib import Path

from refiner.cli import options

__all__ = ["register", "run"]


def register(sub) -> None:
    p = options.command(
        sub,
        "train",
        "Train a base classifier from scratch and write a refiner checkpoint.",
        "  refiner train --arch small_vgg --task digits --seed 0 --out a.pt\n"
        "  refiner train --arch small_vgg --task cifar10 --data cifar10/ --seed 1 --subset half-b --out b.pt\n"
        "  refiner train --arch small_vgg --task cifar-animal --data cifar10/ --regime paper --train-per-class 200 --imbalance 4 --out a.pt\n",
    )
    p.add_argument("--arch", required=True, help=f"architecture: {options.arch_names()}")
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
    options.add_task(p, forward=False)  # training runs torch (onnxruntime has no backward)
    options.add_val_from(p)
    p.set_defaults(run=run)


def run(args) -> None:
    from refiner.data.tasks import SplitOptions
    from refiner.engine import distributed as dist
    from refiner.engine.training import TrainConfig, paper_regime, train_base

    chosen = dict(batch_size=args.batch_size, lr=args.lr, augment=args.augment, seed=args.seed, runtime=options.runtime(args))
    if args.epochs is not None:
        chosen["epochs"] = args.epochs
    config = paper_regime(**chosen) if args.regime == "paper" else TrainConfig(**chosen)
    from refiner.data.tasks import get_task

    split = SplitOptions(subset=args.subset, train_per_class=args.train_per_class, imbalance=args.imbalance, skip_bad_images=args.skip_bad_images, val_from=args.val_from)
    pre = options.preprocess(args, get_task(args.task).preprocess)
    options.say_preprocess(f"{args.out.name} (recorded in it)", pre, options.preprocess_from(args, f"the default of task {args.task!r}"))
    meta = train_base(args.arch, args.task, args.data, config, args.out, split, pre)
    if not dist.is_main():
        return
    last, final = meta.info["history"][-1], meta.info["train_eval"]
    if args.json:
        print(meta.model_dump_json())
        return
    print(f"{args.out}: {meta.arch} on {args.task} ({meta.num_classes} classes), {meta.info['epochs_run']} epochs: "
          f"train CE {final['loss']:.4f} acc {final['acc']:.3f} (eval mode), val acc {last['val_acc']:.3f}, test acc {meta.info['test_acc']:.3f}")
