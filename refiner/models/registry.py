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

__all__ = ["ArchSpec", "BUILTIN_ARCHS", "TIMM_PREFIX", "register_arch", "list_archs"]

BUILTIN_ARCHS = (
    "alexnet", "vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "resnet18", "resnet34", "resnet50",
    "small_vgg", "cifar_resnet20", "tiny_vgg", "tiny_resnet",
)  # fmt: skip
TIMM_PREFIX = "timm/"  # "timm/convnext_atto": a timm model by its timm name


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
