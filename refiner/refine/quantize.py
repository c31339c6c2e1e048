"""Static INT8 quantisation of an exported model with onnxruntime, and the check that it kept its accuracy.

Calibration runs on validation images (QDQ format, per-channel weights, MinMax
ranges), so test images stay unseen; the quantised model is then scored
against the fp32 ONNX on test images: top-1 agreement and the accuracy drop.
Past `max_drop` points the artifact is refused.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
from pydantic import BaseModel

from refiner.refine.export import INPUT_NAME
from refiner.errors import ExportValidationError

__all__ = ["QuantCheck", "QuantizationError", "quantize_int8", "check_quantized", "format_quantization"]

CALIBRATION_BATCH = 16


class QuantizationError(ExportValidationError):
    """The INT8 model lost more accuracy than allowed."""


class QuantCheck(BaseModel):
    """What the INT8 model was calibrated on and how it scored against the fp32 ONNX."""

    mode: str = "int8-static-qdq"
    calibration_images: int
    test_images: int
    top1_agreement: float  # share of test images with the same top-1 as the fp32 ONNX
    accuracy_fp32: float
    accuracy_int8: float
    accuracy_drop_points: float  # 100 x (fp32 - int8)
    max_drop_points: float


def quantize_int8(fp32: Path, out: Path, calibration: np.ndarray) -> None:
    """Write a static INT8 (QDQ) copy of `fp32`, calibrated on `calibration` (N, 3, H, W) images."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class _Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(range(0, len(calibration), CALIBRATION_BATCH))

        def get_next(self) -> dict[str, np.ndarray] | None:
            i = next(self._it, None)
            return None if i is None else {INPUT_NAME: np.ascontiguousarray(calibration[i : i + CALIBRATION_BATCH], np.float32)}

    prepared = out.with_name(out.stem + ".pre.onnx")
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)  # shape inference + graph folding
            quantize_static(
                str(prepared), str(out), _Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
                activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
            )  # fmt: skip
    finally:
        prepared.unlink(missing_ok=True)


def _logits(path: Path, images: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, {INPUT_NAME: images[i : i + 64]})[0] for i in range(0, len(images), 64)])


def check_quantized(fp32: Path, int8: Path, images: np.ndarray, labels: np.ndarray, calibrated_on: int, max_drop: float) -> QuantCheck:
    """Score the INT8 model against the fp32 one on test images; QuantizationError past `max_drop` points."""
    ref, got = _logits(fp32, images).argmax(1), _logits(int8, images).argmax(1)
    acc32, acc8 = float((ref == labels).mean()), float((got == labels).mean())
    check = QuantCheck(
        calibration_images=calibrated_on, test_images=len(images), top1_agreement=float((ref == got).mean()),
        accuracy_fp32=acc32, accuracy_int8=acc8, accuracy_drop_points=100 * (acc32 - acc8), max_drop_points=max_drop,
    )  # fmt: skip
    if check.accuracy_drop_points > max_drop:
        raise QuantizationError(
            f"INT8 quantisation loses {check.accuracy_drop_points:.2f} points of test accuracy ({100 * acc32:.2f} -> "
            f"{100 * acc8:.2f} on {len(images)} images, top-1 agreement {check.top1_agreement:.1%}); at most {max_drop:g} "
            "allowed (--max-int8-drop); nothing was written"
        )
    return check


def format_quantization(q: QuantCheck) -> str:
    """One line for the console: agreement and accuracy of the INT8 model against the fp32 one."""
    return (
        f"INT8 (calibrated on {q.calibration_images} validation images): top-1 agreement {q.top1_agreement:.1%} on "
        f"{q.test_images} test images, accuracy {100 * q.accuracy_fp32:.2f} -> {100 * q.accuracy_int8:.2f} "
        f"(a drop of {q.accuracy_drop_points:.2f} points; at most {q.max_drop_points:g} allowed)"
    )
