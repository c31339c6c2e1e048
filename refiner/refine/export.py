"""ONNX export of a model taking a normalised image batch, and its validation against PyTorch.

Validation follows optimum's exporter: output names, then shapes, then the max
absolute difference of logits and top-1 agreement, at a batch size different
from the one used to export, so the dynamic batch axis is really exercised.
An fp16 export keeps float32 input and output (casts inside the graph), so it
is served like any other; it is held to a tolerance relative to the logits'
scale, and its top-1 agreement is recorded rather than required.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel
from torch import nn

from refiner.errors import ExportValidationError

__all__ = ["INPUT_NAME", "OUTPUT_NAME", "ExportCheck", "HalfPrecision", "export_onnx", "validate_onnx", "ShapeError", "AtolError"]

INPUT_NAME = "input"  # float32 (N, 3, H, W), normalised with the artifact's mean/std
OUTPUT_NAME = "logits"  # float32 (N, num_classes), before softmax
EXPORT_BATCH = 2
FP16_RTOL = 1e-2  # fp16 logits may differ by this share of the largest |logit|


class ShapeError(ExportValidationError):
    """ONNX outputs have other names or shapes than PyTorch's."""


class AtolError(ExportValidationError):
    """ONNX logits differ from PyTorch's beyond the tolerance, or a top-1 prediction differs."""


class ExportCheck(BaseModel):
    """What validation measured."""

    batch_size: int
    max_abs_diff: float
    top1_agreement: float
    atol: float
    precision: str = "fp32"  # fp32 or fp16 (weights and activations; input and output stay float32)
    opset: int | None = None  # the ONNX opset written


class HalfPrecision(nn.Module):
    """`model` in float16 behind a float32 interface: x.half() -> model -> logits.float()."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model.half()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.half()).float()


def export_onnx(model: nn.Module, input_size: tuple[int, int, int], path: Path, opset: int | None = None) -> int:
    """Export `model` (eval mode) as one self-contained .onnx file with a dynamic batch axis; returns its opset.

    A requested opset the exporter did not write (it falls back with a warning) is an ExportValidationError.
    """
    import onnx

    model.eval()
    example = torch.randn(EXPORT_BATCH, *input_size)
    batch = torch.export.Dim("batch", min=1, max=4096)
    kwargs = {"opset_version": opset} if opset else {}
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # progress lines, fallback tracebacks
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=True,
            external_data=False,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: batch},),
            **kwargs,
        )
    written = next(o.version for o in onnx.load(str(path), load_external_data=False).opset_import if o.domain in ("", "ai.onnx"))
    if opset and written != opset:
        raise ExportValidationError(f"torch's ONNX exporter wrote opset {written}, not the requested {opset}; choose another --opset")
    return written


def validate_onnx(path: Path, model: nn.Module, images: torch.Tensor, atol: float = 1e-4, fp16: bool = False) -> ExportCheck:
    """Compare ONNX Runtime with the float32 PyTorch model on `images`; raise ShapeError / AtolError on mismatch.

    fp16: the tolerance is FP16_RTOL of the largest |logit| (at least `atol`) and top-1 changes are allowed.
    """
    import onnx
    import onnxruntime as ort

    onnx.checker.check_model(str(path))
    if len(images) == EXPORT_BATCH:
        images = images[:-1]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    with torch.inference_mode():
        expected = model.eval()(images).numpy()
    if names != [OUTPUT_NAME]:
        raise ShapeError(f"ONNX outputs are {names}, expected [{OUTPUT_NAME!r}]")
    (got,) = session.run(None, {INPUT_NAME: images.numpy()})
    if got.shape != expected.shape:
        raise ShapeError(f"ONNX logits have shape {got.shape} at batch {len(images)}, PyTorch {expected.shape}")
    diff = float(np.abs(got - expected).max())
    agree = float((got.argmax(1) == expected.argmax(1)).mean())
    if fp16:
        atol = max(atol, FP16_RTOL * float(np.abs(expected).max()))
    if diff > atol or (agree < 1.0 and not fp16):
        raise AtolError(
            f"ONNX logits differ from PyTorch by up to {diff:.3g} (tolerance {atol:g}) and agree on "
            f"{agree:.1%} of top-1 predictions, at batch {len(images)}"
        )
    return ExportCheck(batch_size=len(images), max_abs_diff=diff, top1_agreement=agree, atol=atol, precision="fp16" if fp16 else "fp32")
