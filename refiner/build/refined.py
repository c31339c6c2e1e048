"""The refined model: A's trunk -> frozen g -> B's upper layers (the "Delta removal")."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from refiner.engine.isomorphism import IsomorphismNet
from refiner.models.architectures import get_arch
from refiner.models.layers import MapToTokens

__all__ = ["RefinedModel", "OutputSlice", "replace_classifier"]


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
