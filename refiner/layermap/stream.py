"""One streamed pass of two nets over the same images, every chosen layer captured as it was produced.

Each net runs as one graph (torchvision's feature extraction) that returns all of its
chosen layers and nothing above the deepest one. Every returned value is cloned at its
node: a later in-place op (ReLU(inplace=True), ResNet's `out += identity`) would
otherwise overwrite it, and a pre-activation layer would be measured after the ReLU.
BatchNorm is folded into the convolution before it where that conv's output is not
itself captured, and maps run channels_last. Per batch only Gram matrices and
running sums are kept (see `refiner.layermap.cka`).
"""

from __future__ import annotations

import copy
import itertools
import time
from collections.abc import Iterable, Iterator
import warnings
from typing import Literal
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as tdist
from torch import Tensor, nn
from torch.fx import GraphModule
from torch.utils.data import DataLoader, Dataset
from torchvision.models.feature_extraction import create_feature_extractor

from refiner.layermap.cka import MIN_BATCH, MinibatchCKA, PositionCKA, bootstrap_interval, gram, position_key
from refiner.data.datasets import ImageDataset
from refiner.data.samples import Preprocess, Sample
from refiner.engine import distributed as dist
from refiner.engine.device import Runtime
from refiner.engine.features import check_in_order, images_of
from refiner.engine.ortforward import OrtForward
from refiner.errors import ConfigError, LayerError
from refiner.models.layers import list_layers, trace_eval, tracer_kwargs
from refiner.progress import bar, note

__all__ = ["LayerInfo", "capture_model", "probe_layers", "choose_layers", "batch_sizes", "task_batches", "paired_batches", "StreamResult", "stream_cka"]


@dataclass(frozen=True)
class LayerInfo:
    """A layer of one net: its name, one image's output shape, and whether the net can be split there."""

    name: str
    shape: tuple[int, ...]
    clean_cut: bool  # nothing above it reads an earlier activation: `refiner build` can split here


def capture_model(model: nn.Module, layers: list[str], runtime: Runtime | None = None) -> GraphModule:
    """An eval-mode copy of `model` returning {layer: its output} for every layer, each as that layer produced it.

    The graph stops at the deepest layer. Values are cloned at their nodes (so in-place ops
    downstream do not reach them); BatchNorm is folded where its conv's output is not captured.
    """
    model = copy.deepcopy(model).eval()  # .to() and folding below must not touch the caller's net
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="NOTE: The nodes obtained by tracing")
        try:
            extractor = create_feature_extractor(model, {name: name for name in layers}, tracer_kwargs=tracer_kwargs(model))
        except ValueError as e:
            raise LayerError(f"{e}; `refiner layers --arch ...` lists the names") from e
    graph = extractor.graph
    out = next(n for n in graph.nodes if n.op == "output")
    kept = {}
    for name, node in out.args[0].items():
        if not _written_later(node, extractor):  # nothing in place reaches it: its value stays as produced
            kept[name] = node
            continue
        with graph.inserting_after(node):
            kept[name] = graph.call_function(_kept, (node,))
    out.args = (kept,)
    captured = GraphModule(extractor, graph).eval()
    try:
        from torch.fx.experimental.optimization import fuse

        captured = fuse(captured, inplace=True, no_trace=True)
    except Exception:  # unusual graphs keep their BatchNorm
        pass
    if runtime is not None:
        captured = captured.to(runtime.device)
        if any(isinstance(m, nn.Conv2d) for m in captured.modules()):
            captured = captured.to(memory_format=torch.channels_last)
    return captured


_VIEWS = {"view", "reshape", "flatten", "permute", "transpose", "squeeze", "unsqueeze", "expand", "contiguous", "__getitem__", "chunk", "split", "unbind"}


def _written_later(node, root: nn.Module) -> bool:
    """Whether an in-place op may write `node`'s value (or a view of it) after it is produced: a module with
    inplace=True, an augmented assignment (operator.iadd, ...), or a tensor method ending in "_". Unknown aliasing
    counts as written, so a clone is only ever left out where it is certainly not needed."""
    import operator

    in_place_functions = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.iand, operator.ior}
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        for user in n.users:
            if user in seen or user.op == "output":
                continue
            seen.add(user)
            if user.op == "call_module" and getattr(root.get_submodule(user.target), "inplace", False):
                return True
            if user.op == "call_function" and (
                user.target in in_place_functions or user.kwargs.get("inplace") is True or True in user.args[1:]  # F.relu(x, True)
                or getattr(user.target, "__name__", "").endswith("_")  # torch.relu_, torch.add_
            ):  # fmt: skip
                return True
            if user.op == "call_method" and user.target.endswith("_") and not user.target.endswith("__"):
                return True
            name = user.target if user.op == "call_method" else getattr(user.target, "__name__", "")
            if name in _VIEWS:
                todo.append(user)  # a view shares the memory: what writes it writes the node
    return False


def _kept(value):
    """A copy of a tensor output (a tuple, e.g. a ViT's unbound q, k, v, is passed on and left out later)."""
    return value.clone() if isinstance(value, Tensor) else value


def _clean_cuts(model: nn.Module) -> tuple[list[str], set[str]]:
    """`list_layers(model)` and those of them that are clean cut points (no later node reads an earlier activation)."""
    names = list_layers(model)
    tracer, graph = trace_eval(model)
    nodes = [n for n in graph.nodes if n.op not in ("get_attr", "output")]
    index = {n: i for i, n in enumerate(nodes)}
    earliest_read = [min((index[a] for a in n.all_input_nodes if a in index), default=i) for i, n in enumerate(nodes)]
    clean, low = set(), len(nodes)
    for i in range(len(nodes) - 1, -1, -1):  # suffix minimum of what the nodes after i read
        if low >= i and nodes[i] in tracer.node_to_qualname:
            clean.add(tracer.node_to_qualname[nodes[i]])
        low = min(low, earliest_read[i])
    return names, clean


@torch.no_grad()
def probe_layers(model: nn.Module, input_size: tuple[int, int, int], name: str = "the net") -> list[LayerInfo]:
    """Every split point of `model` whose output is one tensor with the batch first, with its shape (two images probed)."""
    names, clean = _clean_cuts(model)
    names = names[1:-1]  # not the input, not the logits
    probe = capture_model(model, names)
    param = next(model.parameters(), None)
    try:
        outputs = probe.to(param.device if param is not None else "cpu")(torch.zeros(2, *input_size, device=param.device if param is not None else None))
    except (RuntimeError, AssertionError, ValueError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[-1][:200]
        raise ConfigError(f"{name} cannot take {input_size[1]}x{input_size[2]} inputs ({reason}); pass --img-size with a size it accepts") from e
    return [
        LayerInfo(n, tuple(outputs[n].shape[1:]), n in clean) for n in names
        if isinstance(outputs.get(n), Tensor) and outputs[n].dim() >= 2 and outputs[n].shape[0] == 2 and outputs[n].is_floating_point()
    ]  # fmt: skip


def choose_layers(layers: list[LayerInfo], asked: list[str] | None, default: str | None, max_layers: int = 16) -> list[LayerInfo]:
    """The asked layers (checked), or the clean cut points thinned evenly by depth to `max_layers`, `default` kept."""
    by_name = {info.name: info for info in layers}
    for name in asked or []:  # a module name ("layer1.0") stands for the last node inside it, as in torchvision
        inside = [info for info in layers if info.name.startswith(name + ".")]
        if name not in by_name and inside:
            by_name[name] = LayerInfo(name, inside[-1].shape, inside[-1].clean_cut)
    if asked:
        missing = [n for n in asked if n not in by_name]
        if missing:
            raise LayerError(
                f"layer(s) {', '.join(map(repr, missing))} are not split points with one tensor output; valid names: {', '.join(by_name)}"
            )
        if len(set(asked)) < len(asked):
            raise LayerError(f"layers {sorted({n for n in asked if asked.count(n) > 1})} are asked for more than once")
        return [by_name[n] for n in asked]
    cuts = [info for info in layers if info.clean_cut] or layers
    if len(cuts) <= max_layers:
        return cuts
    picks = sorted({int(round(i)) for i in np.linspace(0, len(cuts) - 1, max_layers)})
    names = [c.name for c in cuts]
    if default in names and names.index(default) not in picks:
        nearest = min(picks[1:-1] or picks, key=lambda i: abs(i - names.index(default)))
        picks = sorted({*picks} - {nearest} | {names.index(default)})
    return [cuts[i] for i in picks]


def batch_sizes(n: int, batch_size: int) -> list[int]:
    """Split n images into ceil(n / batch_size) batches of equal size (+-1), none below MIN_BATCH."""
    if n < MIN_BATCH:
        raise ConfigError(f"the atlas needs at least {MIN_BATCH} images for the unbiased HSIC estimator, got {n}")
    if batch_size < MIN_BATCH:
        raise ConfigError(f"--batch-size {batch_size} is too small for the unbiased HSIC estimator: it needs at least {MIN_BATCH}")
    k = -(-n // batch_size)
    k = min(k, n // MIN_BATCH)
    return [n // k + (1 if i < n % k else 0) for i in range(k)]


def task_batches(samples: list[Sample], pre_a: Preprocess, pre_b: Preprocess, runtime: Runtime, batch_size: int) -> tuple[DataLoader, DataLoader | None]:
    """Loaders of this process's block of `samples` in equal batches (+-1) of at least MIN_BATCH, as A and B read them.

    B's loader is None when both nets read images alike. Under torchrun each process takes a contiguous block.
    """
    batch_sizes(len(samples), batch_size)  # too few images or too small batches: refused before any work
    rows = dist.shard(len(samples))
    sizes = batch_sizes(len(rows), batch_size) if len(rows) >= MIN_BATCH else []
    if dist.is_distributed() and min(dist.gather(len(sizes))) == 0:
        raise ConfigError(f"{len(samples)} images over {dist.world_size()} processes leave one with fewer than {MIN_BATCH}; use more images or fewer processes")
    starts = np.cumsum([rows.start, *sizes])
    batches = [list(range(s, e)) for s, e in zip(starts[:-1], starts[1:])]
    loader = lambda pre: DataLoader(_Images(samples, pre), batch_sampler=batches, num_workers=runtime.workers, pin_memory=runtime.pin_memory)  # noqa: E731
    return loader(pre_a), None if pre_b == pre_a else loader(pre_b)


def paired_batches(data: Iterable, data_b: Iterable | None = None) -> Iterator[tuple[Tensor, Tensor]]:
    """(x_A, x_B) batch by batch: B reads A's images unless it has its own batches, which must match A's one for one."""
    if data_b is None:
        for n, batch in enumerate(data, 1):
            x = images_of(batch)
            _check_batch(n, len(x), "data")
            yield x, x
        return
    check_in_order(data, "data")
    check_in_order(data_b, "data_b")
    ia, ib = iter(data), iter(data_b)
    for n in itertools.count(1):
        a, b = next(ia, None), next(ib, None)
        if a is None and b is None:
            return
        if a is None or b is None:
            longer, rest = ("data_b", ib) if a is None else ("data", ia)
            extra = 1 + sum(1 for _ in rest)
            raise ConfigError(
                f"data and data_b give different numbers of batches: {longer} has {extra} more after batch {n - 1}; "
                "B's batches must be the same images as A's, batch for batch"
            )
        xa, xb = images_of(a, "data"), images_of(b, "data_b")
        if len(xa) != len(xb):
            raise ConfigError(f"batch {n} has {len(xa)} images in data but {len(xb)} in data_b; B's batches must be A's images, batch for batch")
        _check_batch(n, len(xa), "data")
        yield xa, xb


def _check_batch(n: int, size: int, what: str) -> None:
    if size < MIN_BATCH:
        raise ConfigError(
            f"batch {n} of {what} has {size} image(s); the unbiased HSIC estimator needs at least {MIN_BATCH} per batch: "
            "use a larger batch size, or DataLoader(..., drop_last=True) for a short last batch"
        )


@dataclass
class StreamResult:
    """What one pass measured: minibatch CKA (La, Lb), position CKA of the equal-position pairs, counts and timings."""

    cka: np.ndarray
    position_cka: dict[tuple[int, int], float]
    images: int
    batches: int
    seconds: dict[str, float] = field(default_factory=dict)  # forward passes, CKA, total
    cka_interval: tuple[np.ndarray, np.ndarray] | None = None  # 95 % bootstrap over the batches (None: a single batch)


@torch.no_grad()
def stream_cka(
    net_a: GraphModule, net_b: GraphModule, layers_a: list[str], layers_b: list[str], pairs: Iterable[tuple[Tensor, Tensor]],
    runtime: Runtime, positions: bool | Literal["auto"] = "auto", total: int | None = None,
) -> StreamResult:  # fmt: skip
    """Stream (x_A, x_B) batches through both captured nets (from `capture_model`) and accumulate CKA between every layer pair.

    `positions`: also the (image, position) CKA of the pairs with equal positions; "auto" keeps it only when the
    first batch says it adds at most POSITIONS_CHEAP of the pass's forward time (or under POSITIONS_FREE_S in all).
    Under torchrun each process streams its own block of images and the sums are added over processes.
    """
    minibatch, position = MinibatchCKA(), None
    seconds, first_s = {"forward": 0.0, "cka": 0.0}, 0.0
    t_start = time.perf_counter()
    for xa, xb in bar(pairs, desc="atlas", unit="batch", total=total, leave=False):
        t0 = time.perf_counter()
        fa, fb = _forward(net_a, xa, layers_a, runtime), _forward(net_b, xb, layers_b, runtime)
        _sync(runtime)
        t1 = time.perf_counter()
        minibatch.add(torch.stack([gram(f) for f in fa]), torch.stack([gram(f) for f in fb]))
        if positions and position is None and minibatch.batches == 1:
            position = PositionCKA(_same_positions(fa, fb))
        if position is not None and position.pairs:
            t_pos = time.perf_counter()
            position.add(fa, fb)
            _sync(runtime)
            if positions == "auto" and minibatch.batches == 1 and not _cheap(time.perf_counter() - t_pos, t1 - t0, total):
                position = None
        _sync(runtime)
        seconds["forward"] += t1 - t0
        seconds["cka"] += time.perf_counter() - t1
        if minibatch.batches == 1:
            first_s = time.perf_counter() - t0
        elif minibatch.batches == 2 and total:  # measured, not guessed: the second batch (warm) times the rest
            each = time.perf_counter() - t0
            note(f"the CKA pass takes about {_duration(first_s + each * (total - 1))} ({total} batches; the second: forward {t1 - t0:.2f} s, CKA {each - (t1 - t0):.2f} s)")
    for t in minibatch.state() + (position.state() if position is not None else []):
        _sum_over_processes(t)
    per_batch = [b for rank in dist.gather(minibatch.per_batch) for b in rank]  # every process's batches
    images, n_batches = minibatch.images, minibatch.batches
    seconds["total"] = time.perf_counter() - t_start
    return StreamResult(
        cka=minibatch.value().numpy(),
        position_cka=position.value(images) if position is not None and position.pairs else {},
        images=images,
        batches=n_batches,
        seconds=seconds,
        cka_interval=bootstrap_interval(per_batch) if len(per_batch) > 1 else None,
    )


class _Images(Dataset):
    """Images only, preprocessed as one net reads them."""

    def __init__(self, samples: list[Sample], pre: Preprocess) -> None:
        self.data = ImageDataset(samples, sorted({s.label for s in samples}), pre)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> Tensor:
        return self.data[i][0]


def _forward(net: GraphModule | OrtForward, x: Tensor, layers: list[str], runtime: Runtime) -> list[Tensor]:
    if isinstance(net, OrtForward):  # the exported graph, on the CPU
        out = net(x)
        return [out[name] for name in layers]
    (x,) = runtime.to(x)
    if runtime.device.type != "mps":
        x = x.contiguous(memory_format=torch.channels_last)
    with runtime.autocast():
        out = net(x)
    return [out[name] for name in layers]


POSITIONS_CHEAP = 0.25  # "auto": the position CKA stays if it adds at most this share of the forward time ...
POSITIONS_FREE_S = 5.0  # ... or less than this in all


def _cheap(position_s: float, forward_s: float, total: int | None) -> bool:
    """Whether the position CKA is cheap enough to keep by default, from its cost on the first batch (the same answer
    on every process); if not, one line says what it would cost and how to ask for it."""
    batches = total or 1
    keep = position_s * batches < POSITIONS_FREE_S or position_s <= POSITIONS_CHEAP * forward_s
    keep = dist.broadcast(keep)
    if not keep:
        note(
            f"position CKA left out: it would add about {_duration(position_s * batches)} ({position_s / forward_s:.0%} of the "
            "forward time) to the pass; --position-cka on computes it"
        )  # fmt: skip
    return keep


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def _same_positions(fa: list[Tensor], fb: list[Tensor]) -> list[tuple[int, int]]:
    keys_a, keys_b = [position_key(f) for f in fa], [position_key(f) for f in fb]
    return [(i, j) for i, ka in enumerate(keys_a) for j, kb in enumerate(keys_b) if ka is not None and ka == kb]


def _sync(runtime: Runtime) -> None:
    if runtime.device.type == "cuda":
        torch.cuda.synchronize(runtime.device)


def _sum_over_processes(t: Tensor) -> None:
    if dist.is_distributed():
        tdist.all_reduce(t)
