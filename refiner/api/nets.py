"""Loading and inspecting nets from Python: `load` a checkpoint as the command line does, list a net's `layers`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from refiner.data.samples import Preprocess
from refiner.errors import ConfigError, RefinerError
from refiner.layermap.stream import _clean_cuts
from refiner.models.architectures import ArchSpec, create_model, get_arch, list_archs
from refiner.models.checkpoints import Classifier, load_checkpoint
from refiner.models.layers import kept_modes, layer_shapes, split_model

__all__ = ["Layer", "features", "load", "layers", "net"]


def load(
    path: str | Path, *, arch: str | None = None, labels: list[str] | str | Path | None = None, preprocess: Preprocess | None = None,
    fallback_preprocess: Preprocess | None = None, fallback_from: str = "the fallback preprocessing", trust: bool = False,
    who: str = "the net", arch_flag: str = "arch=",
) -> Classifier:  # fmt: skip
    """Load any checkpoint the command line accepts, as a `Classifier`: `.model` (a plain nn.Module), `.class_names`, `.preprocess`.

    Reads refiner checkpoints, bare state_dicts (`.pt`, `.pth`, `.ckpt`, `.safetensors`), the
    containers of Lightning, timm and torchvision's scripts, and `torchvision/<model>` or
    `timm/<model>` from the local caches, always with `weights_only=True` (`trust=True` allows a
    whole pickled module, which runs code from the file).

    Args:
        path: the file, or a pretrained name such as "torchvision/resnet18".
        arch: the architecture of a bare state_dict whose keys do not say it (`--arch-a`).
        labels: names of the outputs in order, a list or a file with one per line (`--labels-a`).
        preprocess: replaces the recorded (or guessed) preprocessing (`--img-size`, `--mean`, ...).
        fallback_preprocess: for a bare state_dict of an architecture with no pretrained transform.
        trust: allow arbitrary unpickling (`--trust-checkpoint`).
        fallback_from: how messages name where `fallback_preprocess` comes from.
        who: how errors name the net ("net A").
        arch_flag: how errors name the option that says its architecture.

    Examples:
        >>> import refiner, torch, tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "net.pt")
        >>> torch.save(refiner.create_model("tiny_vgg", 4).state_dict(), path)
        >>> net = refiner.load(path, labels=["cat", "dog", "frog", "owl"])
        >>> net.arch, net.class_names[:2], net.preprocess.input_size
        ('tiny_vgg', ['cat', 'dog'], (3, 16, 16))
    """
    names = _labels(labels)
    clf = load_checkpoint(
        path, arch=arch, preprocess=fallback_preprocess, preprocess_from=fallback_from, class_names=names, trust=trust, who=who,
        arch_flag=arch_flag,
    )  # fmt: skip
    if preprocess is not None:
        clf.meta = clf.meta.model_copy(update={"preprocess": preprocess})
        clf.preprocess_from, clf.preprocess_guessed = "the caller", False
    return clf


def _labels(labels: list[str] | str | Path | None) -> list[str] | None:
    if labels is None or isinstance(labels, list):
        return labels
    path = Path(labels)
    if not path.is_file():
        raise ConfigError(f"labels {str(labels)!r} is not a file; give a list of class names or a file with one name per line")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def net(model: nn.Module | Classifier, *, class_names: list[str] | None = None, preprocess: Preprocess | None = None, arch: str | None = None) -> Classifier:
    """Any nn.Module as a `Classifier` (not copied), for the functions that need class names or preprocessing (build, analyses).

    Its architecture is recognised when a registered one fits its weights (else it is named by its class).

    Examples:
        >>> import refiner, torchvision
        >>> refiner.net(torchvision.models.resnet18(num_classes=3), class_names=["a", "b", "c"]).arch
        'resnet18'
    """
    return Classifier.of(model, class_names=class_names, preprocess=preprocess, arch=arch)


@dataclass(frozen=True)
class Layer:
    """A split point of a net: its node name, one image's output shape (None: not one tensor), and two flags.

    Examples:
        >>> import refiner
        >>> refiner.layers("tiny_vgg")[0]
        Layer(name='features.0', shape=(8, 16, 16), clean_cut=True, default=False)
    """

    name: str
    shape: tuple[int, ...] | None
    clean_cut: bool  # nothing above it reads an earlier activation: `refiner build` can split here
    default: bool  # the layer `refiner build` and `fit` use unless told


def layers(model: str | nn.Module | Classifier, input_size: tuple[int, int, int] | None = None) -> list[Layer]:
    """The split points of an architecture name, a module or a loaded net, with output shapes, as `refiner layers` lists them.

    `input_size` (C, H, W): default the net's recorded preprocessing, else the architecture's, else 3x224x224.

    Examples:
        >>> import refiner
        >>> [(l.name, l.shape) for l in refiner.layers("tiny_vgg") if l.default]
        [('features.4', (16, 8, 8))]
    """
    if isinstance(model, str):
        spec = get_arch(model)
        size = input_size or _natural_size(spec)
        with torch.device("meta"):  # shapes only: no weights allocated, nothing computed
            module = create_model(model, 10)
        arch, default = model, spec.default_layer
    else:
        clf = Classifier.of(model)
        module, arch = clf.model, clf.arch
        recorded = isinstance(model, Classifier) and clf.preprocess_known
        natural = _natural_size(get_arch(arch)) if arch in list_archs() else (3, 224, 224)
        size = input_size or (clf.preprocess.input_size if recorded else natural)
        try:
            default = clf.default_layer
        except RefinerError:  # no clean cut found: the layers are listed all the same
            default = None
    shapes = layer_shapes(module, tuple(size), arch)
    _, clean = _clean_cuts(module)
    names = list(shapes)[1:-1]  # the input and the output are not split points
    return [Layer(n, shapes[n], n in clean, n == default) for n in names]


def features(model: nn.Module | Classifier, x: Tensor, layer: str | None = None) -> Tensor:
    """A net's feature at `layer` (default: its default layer) for the image batch `x`, as `fit` and g read it.

    The net runs up to that layer only, in eval mode, without gradients; its mode is restored after.

    Examples:
        >>> import refiner, torch
        >>> a = refiner.create_model("tiny_vgg", 4)
        >>> tuple(refiner.features(a, torch.randn(2, 3, 16, 16), "features.4").shape)
        (2, 16, 8, 8)
    """
    clf = Classifier.of(model)
    if not isinstance(x, Tensor) or x.dim() != 4:
        raise ConfigError(f"x must be an image batch (N, C, H, W), got {tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    device = next(iter(clf.model.parameters()), x).device
    with kept_modes(clf.model), torch.no_grad():
        trunk = split_model(clf.model, layer or clf.default_layer, tuple(x.shape[1:]))[0].eval()
        return trunk(x.to(device))


def _natural_size(spec: ArchSpec) -> tuple[int, int, int]:
    """The input size an architecture is fed at: its pretrained transform's, else its own natural size."""
    return tuple(spec.preprocess.input_size if spec.preprocess is not None else spec.input_size)
