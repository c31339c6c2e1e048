"""Name-based registry of classifier architectures, with each one's default split layer.

The paper's torchvision models with their hand-checked layers, small nets for
32x32 inputs (practical on CPU) and tiny ones for tests are registered here; any
other classification model of torchvision's registry (`torchvision.models.list_models`)
is registered on first use, its classifier found as the last linear layer and its
default layer by family: ResNets' layer3 residual sum, VGG's block-4 conv,
ConvNeXt's stage-3 residual sum, else the residual sum (or conv output) about two
thirds of the way through that is a clean cut. timm models are named
"timm/<name>" (`timm.list_models()`): their classifier is their pretrained
config's, their default layer the residual sum ending the `feature_info` stage
at stride 16 (two thirds of the way through ViTs' blocks). Each torchvision or
timm spec carries the preprocessing its pretrained weights expect (resize,
centre crop, mean, std, interpolation). `create_model(name, num_classes,
in_chans)` builds one; nothing is ever downloaded.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable

import torchvision
from torch import nn

from refiner.data.samples import Preprocess
from refiner.errors import ConfigError, LayerError
from refiner.models.registry import _REGISTRY, TIMM_PREFIX, ArchSpec, check_arch, list_archs, register_arch

__all__ = ["ArchSpec", "TIMM_PREFIX", "register_arch", "create_model", "get_arch", "list_archs", "timm_preprocess", "guess_default_layer"]


def get_arch(name: str) -> ArchSpec:
    if name not in _REGISTRY:
        if name.startswith(TIMM_PREFIX):
            register_arch(_from_timm(name))
        elif name in _torchvision_classifiers():
            register_arch(_from_torchvision(name))
        else:
            check_arch(name, None)  # raises, naming the closest names
    return _REGISTRY[name]


def _torchvision_classifiers() -> list[str]:
    return torchvision.models.list_models(module=torchvision.models)


def _from_torchvision(name: str) -> ArchSpec:
    """An ArchSpec for a torchvision classification model: classifier, default layer and input size found from the model."""
    import torch

    from refiner.models.layers import list_layers

    try:
        with torch.device("meta"):  # the graph only: nothing allocated
            model = torchvision.models.get_model(name, weights=None, num_classes=10)
    except NotImplementedError:  # an initialiser that reads values (RegNet): build it for real
        model = torchvision.models.get_model(name, weights=None, num_classes=10)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ConfigError(f"torchvision's {name!r} has no linear classifier, so refiner cannot replace it")
    classifier = linears[-1]
    nodes = list_layers(model)
    adds = [n for n in nodes if n.endswith(".add") and not n.startswith(classifier)]
    family = name.split("_")[0].rstrip("0123456789")
    if family in ("resnet", "resnext", "wide") and (stage := [n for n in adds if n.startswith("layer3.")]):
        candidates = stage[-1:]
    elif family == "convnext" and (stage := [n for n in adds if n.startswith("features.5.")]):
        candidates = stage[-1:]
    elif family == "vgg":
        depth = name.removeprefix("vgg").removesuffix("_bn")
        candidates = [_vgg_block4_conv({"11": "A", "13": "B", "16": "D", "19": "E"}[depth], name.endswith("_bn"))]
    else:
        candidates = _two_thirds(model, nodes, classifier)
    layer = _first_clean_cut(model, candidates)
    if layer is None:
        raise ConfigError(f"no clean default split layer found in torchvision's {name!r}; pass --layer-a/--layer-b (see `refiner layers --arch {name}`)")
    pre = _torchvision_preprocess(name)
    size = pre.input_size[1] if pre else 224
    return ArchSpec(name, _torchvision(name), classifier, layer, (3, size, size), pre)


def _two_thirds(model: nn.Module, nodes: list[str], classifier: str | None) -> list[str]:
    """Default-layer candidates of a net of no known family: the residual sums (or conv outputs) nearest below two
    thirds of the way, then the backbone's stages."""
    modules = dict(model.named_modules())
    inside = lambda n: classifier is not None and n.startswith(classifier)  # noqa: E731
    adds = [n for n in nodes if n.endswith(".add") and not inside(n)]
    convs = [n for n in nodes if isinstance(modules.get(n), nn.Conv2d)]
    pool = adds or convs
    last = nodes.index(pool[-1]) if pool else 0
    candidates = [n for n in pool if nodes.index(n) <= 2 * last // 3][::-1][:6]
    stages = [n for n, m in modules.items() if isinstance(m, nn.Sequential) and 0 < n.count(".") + 1 <= 2 and not inside(n)]
    return candidates + [n for n in stages[: max(1, 2 * len(stages) // 3)][::-1] if "." in n or n.startswith(("layer", "stage"))][:4]


def _first_clean_cut(model: nn.Module, candidates: list[str]) -> str | None:
    from refiner.models.layers import split_model

    for layer in candidates:
        try:
            split_model(model, layer)
        except LayerError:  # not a clean cut (later layers read earlier activations, as in DenseNet's blocks)
            continue
        return layer
    return None


def guess_default_layer(model: nn.Module) -> str:
    """The default split layer of a module of no registered architecture, chosen as for torchvision's other models."""
    from refiner.models.layers import list_layers

    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    nodes = list_layers(model)
    layer = _first_clean_cut(model, _two_thirds(model, nodes, linears[-1] if linears else None))
    if layer is None:
        inner = nodes[1:-1]
        layer = _first_clean_cut(model, inner[: 2 * len(inner) // 3 + 1][::-1])
    if layer is None:
        raise LayerError(f"no clean split layer found in {type(model).__name__}; name one (refiner.layers(model) lists them)")
    return layer


def _torchvision_preprocess(name: str) -> Preprocess | None:
    """The evaluation transform of the model's default torchvision weights (resize, crop, mean, std, interpolation)."""
    try:
        t = torchvision.models.get_model_weights(name).DEFAULT.transforms()
        crop, resize = int(t.crop_size[0]), int(t.resize_size[0])
        return Preprocess(
            input_size=(3, crop, crop), mean=tuple(t.mean), std=tuple(t.std), resize_size=resize, interpolation=t.interpolation.value
        )
    except (ValueError, AttributeError, IndexError, TypeError):  # no weights, or a transform of another kind
        return None


def _from_timm(arch: str) -> ArchSpec:
    """An ArchSpec for a timm model: classifier and preprocessing from its pretrained config, default layer from feature_info."""
    import timm
    import torch

    from refiner.models.layers import list_layers, split_model

    name = arch.removeprefix(TIMM_PREFIX)
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        raise ConfigError(f"unknown timm model {name!r}; similar timm names: {', '.join(close) or 'none'} (see timm.list_models())")
    try:
        with torch.device("meta"):  # the graph only: nothing allocated
            model = timm.create_model(name, pretrained=False, num_classes=10)
    except NotImplementedError:  # an initialiser that reads values: build it for real
        model = timm.create_model(name, pretrained=False, num_classes=10)
    cfg = model.pretrained_cfg
    classifier = cfg.get("classifier")
    modules = dict(model.named_modules())
    if not isinstance(modules.get(classifier), nn.Linear):
        raise ConfigError(f"timm's {name!r} has no linear classifier at {classifier!r}, so refiner cannot replace it")
    stages = [f for f in model.feature_info if f["module"]] if hasattr(model, "feature_info") else []
    at16 = [f for f in stages if f.get("reduction") == 16]
    pick = at16[(2 * len(at16) - 1) // 3] if at16 else stages[2 * len(stages) // 3] if stages else None
    if pick is None:
        raise ConfigError(f"timm's {name!r} has no feature_info to choose a default layer; pass --layer-a/--layer-b (see `refiner layers --arch {arch}`)")
    stage = pick["module"]
    nodes = list_layers(model)
    sums = [n for n in nodes if n.startswith(stage + ".") and re.search(r"\.add(_\d+)?$", n)]
    layer = sums[-1] if sums else stage
    split_model(model, layer)  # a clean cut, or a LayerError naming the problem
    pre = timm_preprocess(cfg)
    return ArchSpec(arch, _timm(name), classifier, layer, pre.input_size, pre)


def timm_preprocess(cfg: dict) -> Preprocess:
    """The evaluation transform of a timm pretrained config (crop_pct -> resize_size as timm computes it)."""
    size = tuple(int(v) for v in cfg.get("input_size", (3, 224, 224)))
    interpolation = cfg.get("interpolation", "bicubic")
    return Preprocess(
        input_size=size, mean=tuple(cfg.get("mean", (0.485, 0.456, 0.406))), std=tuple(cfg.get("std", (0.229, 0.224, 0.225))),
        resize_size=math.floor(size[1] / cfg.get("crop_pct", 0.875) + 1e-9),
        interpolation=interpolation if interpolation in ("nearest", "bilinear", "bicubic") else "bicubic",
    )  # fmt: skip


def _timm(name: str) -> Callable[[int, int], nn.Module]:
    def build(num_classes: int, in_chans: int) -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans)

    return build


def create_model(name: str, num_classes: int, in_chans: int = 3) -> nn.Module:
    """Build an untrained classifier of the named architecture (`list_archs()`, any torchvision classifier, or `timm/<name>`).

    Examples:
        >>> import refiner, torch
        >>> net = refiner.create_model("tiny_vgg", num_classes=4)
        >>> tuple(net(torch.randn(2, 3, 16, 16)).shape)
        (2, 4)
    """
    spec = get_arch(name)
    if num_classes < 2:
        raise ConfigError(f"num_classes must be at least 2, got {num_classes}")
    return spec.build(num_classes, in_chans)


def _torchvision(name: str) -> Callable[[int, int], nn.Module]:
    def build(num_classes: int, in_chans: int) -> nn.Module:
        if in_chans != 3:
            raise ConfigError(f"{name} takes 3-channel images, got in_chans={in_chans}")
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes)

    return build


def _vgg_block4_conv(cfg: str, batch_norm: bool) -> str:
    """Output of the last conv of VGG's 4th block (conv4-3 for VGG-16), before its BN and ReLU, as the authors take it."""
    index, pools, last_conv = 0, 0, None
    for item in torchvision.models.vgg.cfgs[cfg]:
        if item == "M":
            pools += 1
            if pools == 4:
                return f"features.{last_conv}"
            index += 1
        else:
            last_conv = index
            index += 3 if batch_norm else 2
    raise AssertionError(f"VGG config {cfg} has fewer than 4 blocks")


# --- small architectures for 32x32 inputs --------------------------------------------


class SmallVGG(nn.Module):
    """VGG-style net: `blocks` of `convs` conv-BN-ReLU layers, each block halving H x W."""

    def __init__(self, widths: tuple[int, ...], convs: int, num_classes: int, in_chans: int, hidden: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = in_chans
        for width in widths:
            for _ in range(convs):
                layers += [nn.Conv2d(c, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
                c = width
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(2)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(c * 4, hidden), nn.ReLU(inplace=True), nn.Dropout(0.3), nn.Linear(hidden, num_classes)
        )

    def forward(self, x):
        return self.classifier(self.avgpool(self.features(x)))


class _BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class CifarResNet(nn.Module):
    """ResNet for 32x32 inputs (He et al., 2016, Section 4.2): 3 stages of `depth` blocks."""

    def __init__(self, widths: tuple[int, ...], depth: int, num_classes: int, in_chans: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        c = widths[0]
        for i, width in enumerate(widths):
            blocks = [_BasicBlock(c if j == 0 else width, width, 2 if (i > 0 and j == 0) else 1) for j in range(depth)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            c = width
        self.num_stages = len(widths)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(self.avgpool(x).flatten(1))


def _register_all() -> None:
    # AlexNet's conv5 output, before its ReLU.
    tv = lambda name, classifier, layer: ArchSpec(  # noqa: E731
        name, _torchvision(name), classifier, layer, (3, 224, 224), _torchvision_preprocess(name)
    )
    register_arch(tv("alexnet", "classifier.6", "features.10"))
    for name, cfg in (("vgg11", "A"), ("vgg13", "B"), ("vgg16", "D")):
        for bn in (False, True):
            full = name + ("_bn" if bn else "")
            register_arch(tv(full, "classifier.6", _vgg_block4_conv(cfg, bn)))
    # ResNets: the residual sum of layer3's last block, before its ReLU (the authors' layer3.N.add).
    for name, last in (("resnet18", 1), ("resnet34", 5), ("resnet50", 5)):
        register_arch(tv(name, "fc", f"layer3.{last}.add"))
    # SmallVGG(32, 64, 128) x 2 convs: features.10 is block 2's last conv, before BN (64 x 16 x 16 at 32 px).
    register_arch(
        ArchSpec("small_vgg", lambda n, c: SmallVGG((32, 64, 128), 2, n, c, 256), "classifier.4", "features.10", (3, 32, 32))
    )
    register_arch(
        ArchSpec("cifar_resnet20", lambda n, c: CifarResNet((16, 32, 64), 3, n, c), "fc", "layer2.2.add", (3, 32, 32))
    )
    # Tiny nets for tests: one conv per block, a few channels.
    register_arch(ArchSpec("tiny_vgg", lambda n, c: SmallVGG((8, 16, 16), 1, n, c, 32), "classifier.4", "features.4", (3, 16, 16)))
    register_arch(ArchSpec("tiny_resnet", lambda n, c: CifarResNet((8, 16), 1, n, c), "fc", "layer1.0.add", (3, 16, 16)))


_register_all()
