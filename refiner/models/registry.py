"""The architecture registry: names, how to build each, where its classifier and default layer are. No torch.

The built-in names are listed here so that the command line can check and show them
before torch loads; refiner.models.architectures registers their specs (a test keeps
the two lists equal).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from refiner.data.samples import Preprocess
from refiner.errors import ConfigError

if TYPE_CHECKING:
    from torch import nn

__all__ = ["ArchSpec", "BUILTIN_ARCHS", "TIMM_PREFIX", "TORCHVISION_CLASSIFIERS", "register_arch", "list_archs", "check_arch"]

BUILTIN_ARCHS = (
    "alexnet", "vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "resnet18", "resnet34", "resnet50",
    "small_vgg", "cifar_resnet20", "tiny_vgg", "tiny_resnet",
)  # fmt: skip
TIMM_PREFIX = "timm/"  # "timm/convnext_atto": a timm model by its timm name
# torchvision's classification models (torchvision.models.list_models(module=torchvision.models)), named here so that
# a misspelt --arch is refused before torch loads; a test keeps the tuple equal to the installed torchvision's list.
TORCHVISION_CLASSIFIERS = (
    "alexnet", "convnext_base", "convnext_large", "convnext_small", "convnext_tiny", "densenet121", "densenet161",
    "densenet169", "densenet201", "efficientnet_b0", "efficientnet_b1", "efficientnet_b2", "efficientnet_b3",
    "efficientnet_b4", "efficientnet_b5", "efficientnet_b6", "efficientnet_b7", "efficientnet_v2_l", "efficientnet_v2_m",
    "efficientnet_v2_s", "googlenet", "inception_v3", "maxvit_t", "mnasnet0_5", "mnasnet0_75", "mnasnet1_0", "mnasnet1_3",
    "mobilenet_v2", "mobilenet_v3_large", "mobilenet_v3_small", "regnet_x_16gf", "regnet_x_1_6gf", "regnet_x_32gf",
    "regnet_x_3_2gf", "regnet_x_400mf", "regnet_x_800mf", "regnet_x_8gf", "regnet_y_128gf", "regnet_y_16gf",
    "regnet_y_1_6gf", "regnet_y_32gf", "regnet_y_3_2gf", "regnet_y_400mf", "regnet_y_800mf", "regnet_y_8gf", "resnet101",
    "resnet152", "resnet18", "resnet34", "resnet50", "resnext101_32x8d", "resnext101_64x4d", "resnext50_32x4d",
    "shufflenet_v2_x0_5", "shufflenet_v2_x1_0", "shufflenet_v2_x1_5", "shufflenet_v2_x2_0", "squeezenet1_0",
    "squeezenet1_1", "swin_b", "swin_s", "swin_t", "swin_v2_b", "swin_v2_s", "swin_v2_t", "vgg11", "vgg11_bn", "vgg13",
    "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn", "vit_b_16", "vit_b_32", "vit_h_14", "vit_l_16", "vit_l_32",
    "wide_resnet101_2", "wide_resnet50_2",
)  # fmt: skip


@dataclass(frozen=True)
class ArchSpec:
    """How to build an architecture and where its classifier and default layer are (see `register_arch`).

    Examples:
        >>> import refiner
        >>> spec = refiner.ArchSpec("mine", lambda n, c: refiner.create_model("tiny_vgg", n, c), "classifier", "features.4", (3, 16, 16))
        >>> spec.default_layer
        'features.4'
    """

    name: str
    build: Callable[[int, int], nn.Module]  # (num_classes, in_chans) -> model
    classifier: str  # state_dict prefix of the last linear layer, e.g. "fc"
    default_layer: str  # the paper's split point: a conv output before BN/ReLU, or a residual sum before its ReLU
    input_size: tuple[int, int, int]  # natural (C, H, W)
    preprocess: Preprocess | None = None  # what its pretrained weights expect (None: the task's preprocessing)


_REGISTRY: dict[str, ArchSpec] = {}


def register_arch(spec: ArchSpec) -> ArchSpec:
    """Make an architecture a first-class name (`--arch`, checkpoints, refined models); a registered name is replaced.

    Examples:
        >>> import refiner
        >>> from torch import nn
        >>> build = lambda classes, chans: nn.Sequential(nn.Conv2d(chans, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(),
        ...                                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, classes))
        >>> spec = refiner.register_arch(refiner.ArchSpec("my_net", build, classifier="6", default_layer="2", input_size=(3, 16, 16)))
        >>> "my_net" in refiner.list_archs(), refiner.create_model("my_net", 5)[6].out_features
        (True, 5)
    """
    if not isinstance(spec, ArchSpec):
        raise ConfigError(f"register_arch takes an ArchSpec, got {type(spec).__name__}")
    _REGISTRY[spec.name] = spec
    return spec


def list_archs() -> list[str]:
    """The registered names (torchvision's other models and `timm/<name>` register on first use).

    Examples:
        >>> import refiner
        >>> {"tiny_vgg", "resnet18"} <= set(refiner.list_archs())
        True
    """
    return sorted({*BUILTIN_ARCHS, *_REGISTRY})


def check_arch(name: str, flag: str | None = "--arch") -> None:
    """Refuse (before torch loads) a name that is no registered architecture, torchvision classification model or
    timm/<name> (timm's own names are checked when timm loads), in the words `create_model` would use."""
    if name.startswith(TIMM_PREFIX) or name in _REGISTRY or name in BUILTIN_ARCHS or name in TORCHVISION_CLASSIFIERS:
        return
    import difflib

    close = difflib.get_close_matches(name, sorted({*BUILTIN_ARCHS, *_REGISTRY, *TORCHVISION_CLASSIFIERS}), n=5, cutoff=0.6)
    raise ConfigError(
        f"unknown architecture {name!r}{f' ({flag})' if flag else ''}; similar names: {', '.join(close) or 'none'}; valid names: {', '.join(list_archs())}, "
        "any torchvision.models classification model (torchvision.models.list_models()), "
        f"or {TIMM_PREFIX}<name> for any timm model (timm.list_models())"
    )
