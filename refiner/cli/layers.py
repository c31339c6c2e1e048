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
    p.add_argument("--arch", help=f"an architecture: {options.arch_names()}; with --checkpoint, what a bare state_dict holds")
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

    from refiner.api.nets import layers, load

    if args.checkpoint is not None:
        source = load(args.checkpoint, arch=args.arch, trust=args.trust_checkpoint, who="the checkpoint", arch_flag="--arch")
        size, arch = source.preprocess.input_size, source.arch
    else:
        from refiner.models.architectures import get_arch

        source, arch = args.arch, args.arch
        spec = get_arch(arch)
        size = spec.preprocess.input_size if spec.preprocess is not None else spec.input_size
    if args.img_size is not None:
        size = (size[0], args.img_size, args.img_size)
    listed = layers(source, size)
    default = next((layer.name for layer in listed if layer.default), None)
    if args.json:
        print(json.dumps({"arch": arch, "default": default, "input_size": list(size), "layers": [x.name for x in listed], "shapes": {x.name: x.shape for x in listed}}))
        return
    shown = _shapes(listed)
    width, shape_width = max(map(len, shown)), max(map(len, shown.values()))
    print(f"output shapes for {size[1]}x{size[2]} inputs (C x H x W, or H x W x C where marked; tokens: L x C)")
    for name in shown:
        print(f"{name:<{width}}  {shown[name]:<{shape_width}}  <- default" if name == default else f"{name:<{width}}  {shown[name]}")


def _shapes(listed) -> dict[str, str]:
    """Each layer's shape as text. Outputs permuted to channels-last (inside a ConvNeXt block, from the permute that
    moves the last C x H x W map's channels last until the one that moves them back) are marked H x W x C."""
    out, last, permuted = {}, None, False
    for x in listed:
        if x.shape is None:
            out[x.name] = "-"
            continue
        shape, text = tuple(x.shape), "x".join(map(str, x.shape))
        if len(shape) == 3:
            if last is not None and shape[1:] != last[1:] and shape[:2] == last[1:] and (permuted or shape[2] == last[0]):
                permuted, text = True, text + " (H x W x C)"
            else:
                permuted, last = False, shape
        out[x.name] = text
    return out
