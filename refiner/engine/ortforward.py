"""Captured layers through onnxruntime, where that is faster: the captured graph (`capture_model`) exported once to
ONNX with every captured layer an output, cached by its weights, layers and input size, checked against torch on
the first batch, and timed against torch on it when the choice is "auto". Any failure falls back to torch with
one line saying why."""

from __future__ import annotations

import contextlib
import hashlib
import io
import time
import warnings
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from refiner.progress import note

__all__ = ["Forward", "OrtForward", "choose_forward", "RTOL", "EXPORT_WORTH_S"]

Forward = Literal["auto", "torch", "onnxruntime"]
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


def _key(captured: nn.Module, layers: list[str], size: tuple[int, ...]) -> str:
    digest = hashlib.sha256(repr((layers, size, torch.__version__)).encode())
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
    captured: nn.Module, layers: list[str], first: Tensor, device: torch.device, mode: Forward, cache_dir: Path, who: str,
    threads: int, batches: int | None = None,
):  # fmt: skip
    """The forward to use for `captured` ({layer: output} of a batch): torch's, or onnxruntime's when asked for or
    ("auto") faster on `first`; the choice, the difference and the timings said in one line. "auto" keeps torch for a
    pass of `batches` projected under EXPORT_WORTH_S when no export is cached (exporting would cost more than it saves)."""
    if mode == "torch":
        return captured
    if device.type != "cpu":
        note(f"forward of {who}: torch on {device} (onnxruntime's CUDA provider is not measured against torch here)")
        return captured
    sample = first[:SAMPLE].float().cpu()  # checked on a few images; "auto" times whole batches (speed depends on the batch)
    want = captured(sample.contiguous(memory_format=torch.channels_last))  # the reference, and torch's warm-up
    whole = first.float().cpu().contiguous(memory_format=torch.channels_last)
    t0 = time.perf_counter()
    if mode == "auto":
        captured(whole)
    torch_s = time.perf_counter() - t0  # per batch
    path = _path(captured, layers, first, cache_dir)
    if mode == "auto" and not path.exists() and batches is not None and torch_s * batches < EXPORT_WORTH_S:  # (torch_s: a whole batch)
        note(f"forward of {who}: torch (a pass of about {torch_s * batches:.0f} s: exporting for onnxruntime would cost more than it saves)")
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
