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
    p.add_argument("--img-size", type=int, help="input height and width the output shapes are given for (default: the checkpoint's recorded input size, else the architecture's)")
    p.set_defaults(run=run)


def run(args) -> None:
    from refiner.errors import ConfigError

    if args.arch is None and args.checkpoint is None:
        raise ConfigError("give --arch NAME or --checkpoint FILE")
    if args.img_size is not None and args.img_size < 1:
        raise ConfigError(f"--img-size must be a positive number of pixels, got {args.img_size}")
    import json

    import torch

    from refiner.models.architectures import create_model, get_arch
    from refiner.models.checkpoints import load_checkpoint
    from refiner.models.layers import layer_shapes

    if args.checkpoint is not None:
        clf = load_checkpoint(args.checkpoint, arch=args.arch, trust=args.trust_checkpoint)
        arch, model, size = clf.meta.arch, clf.model, clf.meta.preprocess.input_size
    else:
        arch = args.arch
        spec = get_arch(arch)
        size = spec.preprocess.input_size if spec.preprocess is not None else spec.input_size
        with torch.device("meta"):  # shapes only: no weights allocated, nothing computed
            model = create_model(arch, 10)
    if args.img_size is not None:
        size = (size[0], args.img_size, args.img_size)
    default = get_arch(arch).default_layer
    shapes = layer_shapes(model, size, arch)
    layers = list(shapes)[1:-1]  # the input and the output are not split points
    if args.json:
        print(json.dumps({"arch": arch, "default": default, "input_size": list(size), "layers": layers, "shapes": {n: shapes[n] for n in layers}}))
        return
    shown = {n: "x".join(map(str, shapes[n])) if shapes[n] is not None else "-" for n in layers}
    width, shape_width = max(map(len, layers)), max(map(len, shown.values()))
    print(f"output shapes for {size[1]}x{size[2]} inputs (C x H x W; tokens: L x C)")
    for name in layers:
        print(f"{name:<{width}}  {shown[name]:<{shape_width}}  <- default" if name == default else f"{name:<{width}}  {shown[name]}")
