"""`refiner layers`: the split points of an architecture or checkpoint."""

from __future__ import annotations

from pathlib import Path

from refiner.cli import options

__all__ = ["register", "run"]


def register(sub) -> None:
    p = options.command(
        sub,
        "layers",
        "List the layer names of an architecture (or a checkpoint's) usable as --layer-a/--layer-b, with the default marked.",
        "  refiner layers --arch resnet18\n  refiner layers --arch timm/vit_small_patch16_224\n  refiner layers --checkpoint a.pt\n",
    )
    p.add_argument("--arch", help="an architecture name: small_vgg, any torchvision model (resnet18, ...) or timm/<name> (timm/convnext_atto, ...); with --checkpoint, what a bare state_dict holds")
    p.add_argument("--checkpoint", type=Path, help="a checkpoint (its architecture is read from it)")
    p.add_argument("--trust-checkpoint", action="store_true", help="allow a checkpoint that needs arbitrary unpickling (runs code from the file!)")
    p.set_defaults(run=run)


def run(args) -> None:
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
