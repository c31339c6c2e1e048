"""Split a classifier at a named layer into trunk (input -> layer) and head (layer -> logits).

Layer names are torchvision's graph node names (as `get_graph_node_names` gives them); a
module name such as "layer3" stands for the last node inside that module. timm
models are traced with timm's leaf modules and functions. A layer that outputs
tokens (N, L, C), as a ViT block does, is handed on as a token map (N, C, L, 1)
so that g sees channels and positions as it does for a conv feature; the head
turns it back into tokens.
"""

from __future__ import annotations

import contextlib
import warnings

import torch
from torch import nn
from torch.fx import GraphModule
from torchvision.models.feature_extraction import create_feature_extractor

from refiner.errors import ConfigError, LayerError

__all__ = ["kept_modes", "list_layers", "layer_shapes", "split_model", "feature_shape", "trace_eval", "tracer_kwargs", "TokensToMap", "MapToTokens"]


@contextlib.contextmanager
def kept_modes(*models: nn.Module):
    """Restore every submodule's train/eval flag on exit: trunks and heads cut from a net share its modules, and setting
    their mode would set the caller's."""
    modes = [(m, m.training) for model in models for m in model.modules()]
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def tracer_kwargs(model: nn.Module) -> dict | None:
    """timm's modules and functions that symbolic tracing must not enter (None for other models)."""
    if not type(model).__module__.startswith("timm."):
        return None
    from timm.layers import get_notrace_functions, get_notrace_modules

    return {"leaf_modules": get_notrace_modules(), "autowrap_functions": get_notrace_functions()}


_NOT_ACTIVATIONS = {"getattr", "_assert", "eq", "ne", "size", "dim"}  # shape reads and checks, not tensors to split at


def list_layers(model: nn.Module) -> list[str]:
    """The input, every activation usable as a split point, and the output (eval-mode graph, torchvision's node names).

    Constants (timm's cls_token), optional arguments (attn_mask) and shape reads or checks are left out.
    """
    return list(_split_points(model)[1].values())


@torch.no_grad()
def layer_shapes(model: nn.Module, input_size: tuple[int, int, int], name: str = "the net") -> dict[str, tuple[int, ...] | None]:
    """Each name of `list_layers` -> one sample's output shape for an input of size (C, H, W) (None: not one tensor).

    One forward pass of a batch of one, shapes only on a model on the meta device; an input the
    net cannot take is a ConfigError naming the size.
    """
    graph_module, points = _split_points(model)
    shapes: dict[str, tuple[int, ...] | None] = {}

    class Shapes(torch.fx.Interpreter):
        def run_node(self, node):
            out = super().run_node(node)
            if node in points:
                shapes[points[node]] = tuple(out.shape[1:]) if isinstance(out, torch.Tensor) else None
            return out

    was_training = model.training
    param = next(model.parameters(), None)
    interpreter = Shapes(graph_module.eval())
    interpreter.extra_traceback = False  # the op's own message names the problem
    try:
        interpreter.run(torch.zeros(1, *input_size, device=param.device if param is not None else None))
    except (RuntimeError, AssertionError, ValueError) as e:
        raise _size_error(name, input_size, e) from e
    finally:
        model.train(was_training)
    return shapes


def trace_eval(model: nn.Module):
    """`model`'s eval-mode fx tracer and graph, traced with the node names torchvision's feature extractor uses."""
    from torchvision.models.feature_extraction import NodePathTracer, _set_default_tracer_kwargs

    was_training = model.training
    tracer = NodePathTracer(**_set_default_tracer_kwargs(tracer_kwargs(model)))
    try:
        graph = tracer.trace(model.eval())
    finally:
        model.train(was_training)
    return tracer, graph


def _split_points(model: nn.Module) -> tuple[GraphModule, dict]:
    """`model`'s eval-mode graph (sharing its parameters) and its split-point nodes -> their names, input first, output last."""
    tracer, graph = trace_eval(model)
    first = next(n for n in graph.nodes if n.op == "placeholder")
    shape_only = set()  # nodes computed from shapes alone (x.shape, its items, sizes, checks)
    for node in graph.nodes:
        inputs = node.all_input_nodes
        if getattr(node.target, "__name__", node.target) in _NOT_ACTIVATIONS or (inputs and all(n in shape_only for n in inputs)):
            shape_only.add(node)
    points = {
        node: name for node, name in tracer.node_to_qualname.items()
        if node not in shape_only and node.op != "get_attr" and (node.op != "placeholder" or node is first)
    }  # fmt: skip
    return GraphModule(tracer.root, graph), points


class TokensToMap(nn.Module):
    """A trunk whose tokens (N, L, C) are handed on as a map (N, C, L, 1)."""

    def __init__(self, trunk: nn.Module) -> None:
        super().__init__()
        self.trunk = trunk

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x).transpose(1, 2).unsqueeze(-1)


class MapToTokens(nn.Module):
    """A head fed a token map (N, C, L, 1), turned back into the tokens (N, L, C) it reads."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        return self.head(feat.squeeze(-1).transpose(1, 2))


def _resolve(model: nn.Module, layer: str) -> tuple[str, str]:
    """Check `layer` and return (layer, name of the graph's last node)."""
    nodes = list_layers(model)
    if layer not in nodes and not any(n.startswith(layer + ".") for n in nodes):
        hint = ", ".join(nodes)
        raise LayerError(f"layer {layer!r} is not a node of {type(model).__name__}; valid names: {hint}")
    if layer in (nodes[0], nodes[-1]):
        raise LayerError(f"layer {layer!r} is the model's input or output; choose an intermediate layer")
    return layer, nodes[-1]


def split_model(model: nn.Module, layer: str, input_size: tuple[int, int, int] | None = None) -> tuple[nn.Module, nn.Module]:
    """Return (trunk, head) with head(trunk(x)) == model(x); both share model's parameters.

    With `input_size`, a layer that outputs tokens gets the token-map wrappers
    (without it, trunk and head are the plain graphs).
    """
    layer, last = _resolve(model, layer)
    was_training = model.training
    model.eval()
    tracer = tracer_kwargs(model)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="NOTE: The nodes obtained by tracing")
            trunk_full = create_feature_extractor(model, {layer: "feat"}, tracer_kwargs=tracer)
            full = create_feature_extractor(model, {layer: "feat", last: "logits"}, tracer_kwargs=tracer)
    finally:
        model.train(was_training)
    trunk, head = _single_output(trunk_full, "feat"), _cut_head(full, layer)
    if input_size is not None and len(feature_shape(trunk, input_size, type(model).__name__)) == 2:
        return TokensToMap(trunk), MapToTokens(head)
    return trunk, head


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
    with graph.inserting_after(inputs[-1]):
        # The head's first op may be in place (ReLU(inplace=True) in VGG, AlexNet, ResNet): it works on a copy, so
        # head(f) leaves the caller's f as it was.
        feat_copy = graph.call_function(torch.clone, (feat_in,))
    feat_node.replace_all_uses_with(feat_copy)
    out.args = (logits_node,)
    for node in [n for n in graph.nodes if n.op == "call_function" and getattr(n.target, "__name__", "") == "_assert"]:
        graph.erase_node(node)  # checks of the input's shape (timm's patch embedding) belong to the trunk
    graph.eliminate_dead_code()
    optional = [n for n in inputs if n.args]  # forward arguments with defaults (timm's attn_mask): kept, not fed
    if any(n.users for n in inputs if n not in optional):
        raise LayerError(
            f"layer {layer!r} is not a clean cut point: the layers above it also read the "
            "model's input or earlier activations (e.g. a residual branch); choose the output "
            "of a whole block, such as a stage name like 'layer3'"
        )
    for n in inputs:
        if not n.users:
            graph.erase_node(n)
    # A plain GraphModule: torchvision's dual train/eval graphs would undo the cut in train mode.
    return GraphModule(full, graph)


@torch.no_grad()
def feature_shape(trunk: nn.Module, input_size: tuple[int, int, int], name: str = "the net") -> tuple[int, ...]:
    """Shape of one sample's output (C,) or (C, H, W) for an input of size (C, H, W).

    An input the net cannot take (too small for its downsampling, or not the size
    a ViT was built for) is a ConfigError naming the size, not a traceback.
    """
    was_training = trunk.training
    trunk.eval()
    try:
        param = next(trunk.parameters(), None)
        x = torch.zeros(1, *input_size, device=param.device if param is not None else None)
        return tuple(trunk(x).shape[1:])
    except (RuntimeError, AssertionError, ValueError) as e:
        raise _size_error(name, input_size, e) from e
    finally:
        trunk.train(was_training)


def _size_error(name: str, input_size: tuple[int, int, int], e: Exception) -> ConfigError:
    """One line naming the input size a net refused, with the op's own reason."""
    reason = (str(e).strip().splitlines() or [type(e).__name__])[-1][:200]
    return ConfigError(f"{name} cannot take {input_size[1]}x{input_size[2]} inputs ({reason}); pass --img-size with a size it accepts")
