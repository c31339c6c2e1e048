"""The refined model: A's trunk -> frozen g -> B's upper layers (the "Delta removal"), and its checkpoint.

A refined checkpoint (`refined.pt`, beside every build's ONNX) holds what is
needed to rebuild the module without any base-net file: both architectures,
the split layers, g's shape and config, how the head answers (a new target
classifier, or B's kept one sliced to the target classes), preprocessing,
class names, and the weights. It is read with `weights_only=True`.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import Tensor, nn

from refiner.atomic import atomic_file
from refiner.data.samples import Preprocess
from refiner.engine.isomorphism import IsomorphismConfig, IsomorphismNet
from refiner.errors import CheckpointError, ConfigError
from refiner.models.architectures import create_model, get_arch
from refiner.models.checkpoints import Classifier, read_untrusted
from refiner.models.layers import MapToTokens, split_model

__all__ = [
    "RefinedModel", "OutputSlice", "NetCut", "RefinedSpec", "replace_classifier", "rebuild_refined", "refined_from_parts",
    "save_refined", "load_refined",
]  # fmt: skip

REFINED_FORMAT = "refiner-refined/1"


class RefinedModel(nn.Module):
    """forward = head(g(trunk(x))), read the way timm's models read.

    trunk: A's layers up to its split layer; g: fitted and frozen; head: B's
    upper layers with a classifier for the target classes.
    """

    def __init__(self, trunk: nn.Module, g: IsomorphismNet, head: nn.Module) -> None:
        super().__init__()
        self.trunk = trunk
        self.g = g
        self.head = head

    def forward_features(self, x: Tensor) -> Tensor:
        """g(x_A): A's knowledge expressed in B's feature space, without x^Delta."""
        return self.g(self.trunk(x))

    def forward_head(self, features: Tensor) -> Tensor:
        return self.head(features)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


class OutputSlice(nn.Module):
    """Keep the given output columns, in order: the target classes among a kept base classifier's outputs."""

    def __init__(self, indices: list[int]) -> None:
        super().__init__()
        self.register_buffer("indices", torch.as_tensor(indices, dtype=torch.long))

    def forward(self, logits: Tensor) -> Tensor:
        return logits.index_select(1, self.indices)


class NetCut(BaseModel):
    """One base net as far as the refined model needs it: architecture, outputs, split layer, input size."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    arch: str
    num_classes: int  # outputs of the base net's own classifier
    layer: str
    input_size: tuple[int, int, int]  # the size its trunk was probed at (token layers are detected there)

    @classmethod
    def of(cls, clf: Classifier, layer: str) -> NetCut:
        return cls(arch=clf.meta.arch, num_classes=clf.meta.num_classes, layer=layer, input_size=clf.meta.preprocess.input_size)


class RefinedSpec(BaseModel):
    """How to rebuild a refined model, stored with its weights."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    a: NetCut
    b: NetCut
    g: IsomorphismConfig
    shape_a: list[int]
    shape_b: list[int]
    head: Literal["new", "kept"]  # new: a classifier for class_names; kept: B's classifier, sliced to `indices`
    indices: list[int] | None = None  # kept: B's output index of each class in class_names
    class_names: list[str]  # what the model answers, in output order
    preprocess: Preprocess  # A's: the refined model reads images as A does
    info: dict[str, Any] = {}  # provenance: source hashes, g's fit, build


def replace_classifier(head: nn.Module, arch: str, num_classes: int) -> nn.Module:
    """A copy of `head` whose last linear layer is new, with `num_classes` outputs."""
    head = copy.deepcopy(head)
    name = get_arch(arch).classifier
    parent_name, _, child = name.rpartition(".")
    graph = head.head if isinstance(head, MapToTokens) else head  # a token layer's head holds the graph inside
    parent = graph.get_submodule(parent_name) if parent_name else graph
    old = getattr(parent, child)
    assert isinstance(old, nn.Linear), f"{arch}'s classifier {name} is not nn.Linear"
    setattr(parent, child, nn.Linear(old.in_features, num_classes))
    return head


def rebuild_refined(spec: RefinedSpec) -> RefinedModel:
    """An untrained module of the spec's structure (weights are loaded by `load_refined`)."""
    trunk, _ = split_model(create_model(spec.a.arch, spec.a.num_classes), spec.a.layer, spec.a.input_size)
    _, head = split_model(create_model(spec.b.arch, spec.b.num_classes), spec.b.layer, spec.b.input_size)
    if spec.head == "new":
        head = replace_classifier(head, spec.b.arch, len(spec.class_names))
    else:
        head = nn.Sequential(head, OutputSlice(spec.indices or []))
    g = IsomorphismNet(tuple(spec.shape_a), tuple(spec.shape_b), spec.g)
    return RefinedModel(trunk, g, head).eval()


def refined_from_parts(
    clf_a: Classifier, clf_b: Classifier, g: IsomorphismNet, layer_a: str, layer_b: str, classes: list[str] | None = None
) -> tuple[RefinedModel, RefinedSpec]:  # fmt: skip
    """A's trunk -> g -> B's upper layers with B's own classifier, answering `classes` (default: all of B's), unfitted."""
    classes = classes or list(clf_b.meta.class_names)
    missing = [c for c in classes if c not in clf_b.meta.class_names]
    if missing:
        raise ConfigError(f"classes {missing} are not among B's {len(clf_b.meta.class_names)} outputs ({', '.join(clf_b.meta.class_names)})")
    spec = RefinedSpec(
        a=NetCut.of(clf_a, layer_a), b=NetCut.of(clf_b, layer_b), g=g.config, shape_a=list(g.shape_a), shape_b=list(g.shape_b), head="kept",
        indices=[clf_b.meta.class_names.index(c) for c in classes], class_names=classes, preprocess=clf_a.meta.preprocess,
        info={side: {"file": clf.path.name, "sha256": clf.sha256, "arch": clf.meta.arch} for side, clf in (("a", clf_a), ("b", clf_b))},
    )  # fmt: skip
    trunk, _ = split_model(clf_a.model, layer_a, spec.a.input_size)
    _, head = split_model(clf_b.model, layer_b, spec.b.input_size)
    model = RefinedModel(trunk, g.cpu(), nn.Sequential(head, OutputSlice(spec.indices))).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, spec


def save_refined(path: Path | str, model: RefinedModel, spec: RefinedSpec) -> Path:
    """Write a refined checkpoint atomically (weights on the CPU)."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    with atomic_file(path) as tmp:
        torch.save({"format": REFINED_FORMAT, "spec": spec.model_dump(mode="json"), "state_dict": state}, tmp)
    return Path(path)


def load_refined(path: Path | str) -> tuple[RefinedModel, RefinedSpec]:
    """Read a refined checkpoint (weights_only) and rebuild its module, frozen and in eval mode."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"refined checkpoint {str(path)!r} does not exist (a build writes models/<name>/<version>/refined.pt)")
    obj = read_untrusted(path, trust=False)
    if not isinstance(obj, dict) or obj.get("format") != REFINED_FORMAT:
        raise CheckpointError(f"{str(path)!r} is not a refined checkpoint written by `refiner build` (format {REFINED_FORMAT})")
    try:
        spec = RefinedSpec.model_validate(obj["spec"])
    except ValidationError as e:
        raise CheckpointError(f"refined checkpoint {str(path)!r} has malformed metadata: {e}") from e
    model = rebuild_refined(spec)
    try:
        model.load_state_dict(obj["state_dict"])
    except RuntimeError as e:
        raise CheckpointError(f"refined checkpoint {str(path)!r} does not fit the structure it describes: {e}") from e
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval(), spec
