"""Split a classifier at a named layer into trunk (input -> layer) and head (layer -> logits).

Layer names are torchvision's graph node names (`get_graph_node_names`); a
module name such as "layer3" stands for the last node inside that module.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.fx import GraphModule
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

from refiner.errors import LayerError

__all__ = ["list_layers", "split_model", "feature_shape"]


def list_layers(model: nn.Module) -> list[str]:
    """Every node name usable as a split point (eval-mode graph)."""
    with warnings.catch_warnings():  # torchvision notes that eval-mode nodes are a subset of train-mode ones: we use eval
        warnings.filterwarnings("ignore", message="NOTE: The nodes obtained by tracing")
        return get_graph_node_names(model)[1]


def _resolve(model: nn.Module, layer: str) -> tuple[str, str]:
    """Check `layer` and return (layer, name of the graph's last node)."""
    nodes = list_layers(model)
    if layer not in nodes and not any(n.startswith(layer + ".") for n in nodes):
        hint = ", ".join(nodes)
        raise LayerError(f"layer {layer!r} is not a node of {type(model).__name__}; valid names: {hint}")
    if layer in (nodes[0], nodes[-1]):
        raise LayerError(f"layer {layer!r} is the model's input or output; choose an intermediate layer")
    return layer, nodes[-1]


def split_model(model: nn.Module, layer: str) -> tuple[GraphModule, GraphModule]:
    """Return (trunk, head) with head(trunk(x)) == model(x); both share model's parameters."""
    layer, last = _resolve(model, layer)
    was_training = model.training
    model.eval()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="NOTE: The nodes obtained by tracing")
            trunk_full = create_feature_extractor(model, {layer: "feat"})
            full = create_feature_extractor(model, {layer: "feat", last: "logits"})
    finally:
        model.train(was_training)
    return _single_output(trunk_full, "feat"), _cut_head(full, layer)


def _single_output(gm: GraphModule, key: str) -> GraphModule:
    """A plain GraphModule returning the tensor of a one-entry feature extractor."""
    graph = gm.graph
    out = next(n for n in graph.nodes if n.op == "output")
    out.args = (out.args[0][key],)
    return GraphModule(gm, graph)


def _cut_head(full: GraphModule, layer: str) -> GraphModule:
    """Turn the full graph into layer -> logits by replacing the layer's node with an input."""
    graph = full.graph
    out = next(n for n in graph.nodes if n.op == "output")
    feat_node, logits_node = out.args[0]["feat"], out.args[0]["logits"]
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    with graph.inserting_before(inputs[0]):
        feat_in = graph.placeholder("feat")
    feat_node.replace_all_uses_with(feat_in)
    out.args = (logits_node,)
    graph.eliminate_dead_code()
    used = [n.name for n in inputs if n.users]
    if used:
        raise LayerError(
            f"layer {layer!r} is not a clean cut point: the layers above it also read the "
            "model's input or earlier activations (e.g. a residual branch); choose the output "
            "of a whole block, such as a stage name like 'layer3'"
        )
    for n in inputs:
        graph.erase_node(n)
    # A plain GraphModule: torchvision's dual train/eval graphs would undo the cut in train mode.
    return GraphModule(full, graph)


@torch.no_grad()
def feature_shape(trunk: nn.Module, input_size: tuple[int, int, int]) -> tuple[int, ...]:
    """Shape of one sample's feature (C,) or (C, H, W) for an input of size (C, H, W)."""
    was_training = trunk.training
    trunk.eval()
    try:
        param = next(trunk.parameters(), None)
        return tuple(trunk(torch.zeros(1, *input_size, device=param.device if param is not None else None)).shape[1:])
    finally:
        trunk.train(was_training)
