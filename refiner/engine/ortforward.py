"""Frozen forward passes through onnxruntime, where that is faster: the atlas's captured graph (`capture_model`, every
captured layer an output) or a trunk cut at a layer (feature extraction) exported once to ONNX, cached by its graph,
weights, layers and input size, checked against torch on the first batch, and timed against torch on it when the
choice is "auto" (`RuntimeConfig.forward`). Any failure falls back to torch with one line saying why."""

from __future__ import annotations

import contextlib
import hashlib
import io
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, fx, nn

from refiner.engine.device import Runtime
from refiner.progress import LOGGER, note

__all__ = ["OrtForward", "choose_forward", "trunk_forward", "RTOL", "EXPORT_WORTH_S"]

RTOL = 1e-3  # largest |onnxruntime - torch| of a layer, relative to that layer's largest |value| (fp32 kernels differ ~1e-6)


class OrtForward:
    """{layer: output} of one batch from an onnxruntime session of the exported captured graph (CPU tensors)."""

    def __init__(self, path: Path, layers: list[str], threads: int) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # idle threads must not spin: torch computes the CKA between runs
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.layers = layers

    def __call__(self, x: Tensor) -> dict[str, Tensor]:
        outs = self.session.run(None, {"input": x.detach().float().cpu().contiguous().numpy()})
        return {name: torch.from_numpy(out) for name, out in zip(self.layers, outs)}


class _Outputs(nn.Module):
    """The captured graph with its {layer: value} output as a tuple in layer order (what the exporter takes)."""

    def __init__(self, captured: nn.Module, layers: list[str]) -> None:
        super().__init__()
        self.captured, self.layers = captured, layers

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        out = self.captured(x)
        return tuple(out[name] for name in self.layers)


class _Named(nn.Module):
    """A trunk's single output as {name: output}, the captured graph's form."""

    def __init__(self, trunk: nn.Module, name: str) -> None:
        super().__init__()
        self.trunk, self.name = trunk, name

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {self.name: self.trunk(x)}


def _key(captured: nn.Module, layers: list[str], size: tuple[int, ...]) -> str:
    """The graph (modules and traced code: two cuts of one net share their weights), the weights, layers, size, torch."""
    code = [m.code for m in captured.modules() if isinstance(m, fx.GraphModule)]
    digest = hashlib.sha256(repr((layers, size, torch.__version__, str(captured), code)).encode())
    for name, value in captured.state_dict().items():
        digest.update(name.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:24]


def _path(captured: nn.Module, layers: list[str], example: Tensor, cache_dir: Path) -> Path:
    return cache_dir / f"captured-{_key(captured, layers, tuple(example.shape[1:]))}.onnx"


def _export(captured: nn.Module, layers: list[str], example: Tensor, path: Path) -> None:
    """The captured graph as ONNX at `path` (a dynamic batch axis), unless these weights, layers and size were exported
    there before; written atomically."""
    from refiner.atomic import atomic_file

    if path.exists():
        return
    batch = torch.export.Dim("batch", min=1, max=4096)
    with atomic_file(path) as tmp, warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _Outputs(captured, layers).eval(), (example[:2].float().cpu(),), str(tmp), dynamo=True, external_data=False,
            input_names=["input"], output_names=list(layers), dynamic_shapes=({0: batch},),
        )  # fmt: skip


SAMPLE = 8  # images of the first batch the export is checked on
EXPORT_WORTH_S = 30.0  # "auto" exports only for a pass projected longer than this (an export costs a few seconds a net)


@torch.no_grad()
def choose_forward(
    captured: nn.Module, layers: list[str], first: Tensor, runtime: Runtime, cache_dir: Path, who: str, batches: int | None = None,
    say_short: bool = True,
):  # fmt: skip
    """The forward to use for `captured` ({layer: output} of a batch): torch's, or onnxruntime's when asked for
    (`runtime.config.forward`) or ("auto") faster on `first`; the choice, the difference and the timings said in one
    line. "auto" keeps torch for a pass of `batches` projected under EXPORT_WORTH_S when no export is cached
    (exporting would cost more than it saves), saying so unless `say_short` is False (then only in the debug log)."""
    mode, device, threads = runtime.config.forward, runtime.device, torch.get_num_threads()
    if mode == "torch":
        return captured
    if device.type != "cpu":
        note(f"forward of {who}: torch on {device} (onnxruntime's CUDA provider is not measured against torch here)")
        return captured
    if runtime.amp_dtype is not None:
        note(f"forward of {who}: torch (--amp {runtime.config.amp} asked for; the onnxruntime export computes in float32)")
        return captured
    sample, whole = _layout(first[:SAMPLE]), _layout(first)  # checked on a few images; "auto" times whole batches (speed depends on the batch)
    t0 = time.perf_counter()
    want = captured(sample)  # the reference, and torch's warm-up (a lazy trunk is built by it)
    per_batch = (time.perf_counter() - t0) * len(first) / len(sample)  # cold: an overestimate
    path = _path(captured, layers, first, cache_dir)
    short = mode == "auto" and batches is not None and not path.exists()  # may the pass be too short to repay an export?
    say = note if say_short else LOGGER.debug
    if short and per_batch * batches >= EXPORT_WORTH_S / 2:  # the cold guess says long: the few images again, warm
        t0 = time.perf_counter()
        captured(sample)
        per_batch = (time.perf_counter() - t0) * len(first) / len(sample)
    if short and per_batch * batches < EXPORT_WORTH_S / 2:  # a first guess from the few images ends a short pass here
        say(f"forward of {who}: torch (a pass of about {per_batch * batches:.0f} s: exporting for onnxruntime would cost more than it saves)")
        return captured
    t0 = time.perf_counter()
    if mode == "auto":
        captured(whole)
    torch_s = time.perf_counter() - t0  # per batch
    if short and torch_s * batches < EXPORT_WORTH_S:
        say(f"forward of {who}: torch (a pass of about {torch_s * batches:.0f} s: exporting for onnxruntime would cost more than it saves)")
        return captured
    try:
        _export(captured, layers, first, path)
        ort = OrtForward(path, layers, threads)
        got = ort(sample)  # the compared values, and onnxruntime's warm-up
    except Exception as e:  # an exporter or a session that cannot take this graph: torch always can
        note(f"forward of {who}: torch eager (onnxruntime could not run it: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})")
        return captured
    worst, where = 0.0, layers[0]
    for name in layers:
        ref = want[name].float()
        scale = float(ref.abs().max()) or 1.0
        gap = float((got[name] - ref).abs().max()) / scale if got[name].shape == ref.shape else float("inf")
        if not gap <= worst:
            worst, where = gap, name
    if not worst <= RTOL:
        note(f"forward of {who}: torch eager (onnxruntime differs from it by {worst:.2g} of the values' scale at {where}; tolerance {RTOL:g})")
        return captured
    if mode == "onnxruntime":
        note(f"forward of {who}: onnxruntime (as asked; within {worst:.1g} of torch on {len(sample)} images)")
        return ort
    ort(first)  # warm at the batch's size (onnxruntime plans its memory per shape)
    t0 = time.perf_counter()
    ort(first)
    ort_s = time.perf_counter() - t0
    if ort_s >= torch_s:
        note(f"forward of {who}: torch (about {torch_s:.2f} s a batch against onnxruntime's {ort_s:.2f} s)")
        return captured
    note(f"forward of {who}: onnxruntime (about {ort_s:.2f} s a batch against torch's {torch_s:.2f} s; within {worst:.1g} of torch)")
    return ort


def _layout(x: Tensor) -> Tensor:
    """Float32 on the CPU, channels_last for an image batch (the layout torch's folded trunks run fastest in)."""
    x = x.float().cpu()
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x.contiguous()


def trunk_forward(trunk: nn.Module, first: Tensor, runtime: Runtime, cache_dir: Path, who: str, batches: int | None = None) -> Callable[[Tensor], Tensor]:
    """`trunk` (one output: the features at its cut), or its onnxruntime forward where choose_forward picks it; the
    usual choice, torch for a short pass, is not said."""
    named = _Named(trunk, "features")
    chosen = choose_forward(named, ["features"], first, runtime, cache_dir, who, batches, say_short=False)  # (a line per split would be noise)
    return trunk if chosen is named else lambda x: chosen(x)["features"]
