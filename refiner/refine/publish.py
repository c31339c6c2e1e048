"""A new repository version from a refined model: ONNX (fp32 or fp16), validated, optionally INT8, with metadata.

Shared by `refiner build` and `refiner export`. Everything is written inside
the version's temporary folder, which becomes models/<name>/<version> only
when the export validated (and the INT8 model kept its accuracy).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from refiner.refine.export import INPUT_NAME, OUTPUT_NAME, ExportCheck, HalfPrecision, export_onnx, validate_onnx
from refiner.refine.quantize import QuantCheck, check_quantized, quantize_int8
from refiner.refine.refined import RefinedModel, RefinedSpec, save_refined
from refiner.refine.repository import ArtifactMetadata, TensorSpec, new_version, now_iso, write_model_files
from refiner.data.datasets import stack_images
from refiner.data.samples import Preprocess
from refiner.data.tasks import SplitOptions, TaskData, load_task
from refiner.errors import ConfigError
from refiner.models.checkpoints import file_sha256

__all__ = ["ExportOptions", "Published", "export_images", "publish", "export_artifact"]

RANDOM_VALIDATION = 8  # seeded N(0, 1) inputs check an export when no task images are given


class ExportOptions(BaseModel):
    """How a refined model becomes an artifact.

    Examples:
        >>> import refiner
        >>> refiner.ExportOptions(fp16=True, max_batch_size=64).atol
        0.0001
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    opset: int | None = Field(None, ge=18)  # ONNX opset (None: the exporter's default)
    fp16: bool = False  # float16 weights and activations behind a float32 input and output
    quantize: Literal["int8"] | None = None  # onnxruntime static INT8 (QDQ), calibrated on validation images
    validation_images: int = Field(16, ge=3)  # real validation images the export is checked on (without INT8)
    atol: float = Field(1e-4, gt=0)  # ONNX vs PyTorch tolerance on logits (fp16: relative to their scale)
    max_int8_drop: float = Field(1.0, ge=0)  # points of test accuracy INT8 may lose before the artifact is refused
    calibration_images: int = Field(128, ge=1)  # validation images INT8 is calibrated on
    int8_test_images: int = Field(2000, ge=1)  # test images the INT8 model is scored on
    max_batch_size: int = Field(32, ge=1)  # written into config.pbtxt and metadata.json


@dataclass
class Published:
    """The version being written (folder is temporary until the context exits)."""

    version: int
    folder: Path
    check: ExportCheck
    quantization: QuantCheck | None
    metadata: ArtifactMetadata


def export_images(data: TaskData, pre: Preprocess, options: ExportOptions) -> tuple[torch.Tensor, tuple[np.ndarray, np.ndarray] | None]:
    """Validation images that check the export (and calibrate INT8), and with INT8 the test (images, labels) that score it."""
    val, _ = stack_images(data.val, data.classes, pre, options.calibration_images if options.quantize else options.validation_images)
    test = tuple(t.numpy() for t in stack_images(data.test, data.classes, pre, options.int8_test_images)) if options.quantize else None
    return val, test


@contextmanager
def publish(
    models: Path, name: str, model: RefinedModel, spec: RefinedSpec, options: ExportOptions, val_images: torch.Tensor,
    test: tuple[np.ndarray, np.ndarray] | None = None,
) -> Iterator[Published]:  # fmt: skip
    """Export, validate, quantise and describe `model` as the next version of `name`; the caller may add files.

    val_images: real preprocessed validation images (parity check, INT8 calibration); test: (images,
    labels in class_names order) for scoring the INT8 model.
    """
    if options.fp16 and options.quantize:
        raise ConfigError("--fp16 and --quantize int8 are two different precisions; choose one")
    if options.quantize and test is None:
        raise ConfigError("--quantize int8 is scored on test images: give the task (--task, --data) the model was built for")
    with new_version(models, name) as (version, folder):
        onnx = folder / "model.onnx"
        opset = export_onnx(HalfPrecision(copy.deepcopy(model)) if options.fp16 else model, spec.preprocess.input_size, onnx, options.opset)
        check = validate_onnx(onnx, model, val_images, options.atol, fp16=options.fp16).model_copy(update={"opset": opset})
        quantization = None
        if options.quantize == "int8":
            int8 = folder / "model.int8.onnx"
            quantize_int8(onnx, int8, val_images.numpy())
            quantization = check_quantized(onnx, int8, *test, calibrated_on=len(val_images), max_drop=options.max_int8_drop)
            int8.replace(onnx)
        save_refined(folder / "refined.pt", model, spec)
        meta = ArtifactMetadata(
            name=name, version=version, created=now_iso(), class_names=spec.class_names,
            input=TensorSpec(name=INPUT_NAME, shape=list(spec.preprocess.input_size)),
            output=TensorSpec(name=OUTPUT_NAME, shape=[len(spec.class_names)]),
            preprocess=spec.preprocess, max_batch_size=options.max_batch_size, onnx_sha256=file_sha256(onnx),
            precision="int8" if quantization else "fp16" if options.fp16 else "fp32",
            refined={"layer_a": spec.a.layer, "layer_b": spec.b.layer, "orders": spec.g.orders, "lambda": spec.g.lam, **spec.info},
            export_check=check.model_dump(), quantization=quantization.model_dump() if quantization else None,
        )  # fmt: skip
        (folder / "metadata.json").write_text(meta.model_dump_json(indent=2))
        yield Published(version, folder, check, quantization, meta)
    write_model_files(models, meta)


def export_artifact(
    model: RefinedModel, spec: RefinedSpec, models: Path, name: str, options: ExportOptions, task: str | None = None,
    data_dir: Path | None = None, split: SplitOptions | None = None,
) -> Published:  # fmt: skip
    """`refiner export`: a new version of `name` from a refined model; task images validate (and calibrate) it when given."""
    if task is None:
        val = torch.randn(RANDOM_VALIDATION, *spec.preprocess.input_size, generator=torch.Generator().manual_seed(0))
        test = None
    else:
        val, test = export_images(load_task(task, data_dir, target=True, classes=spec.class_names, options=split), spec.preprocess, options)
    with publish(models, name, model, spec, options, val, test) as out:
        pass
    return dataclasses.replace(out, folder=Path(models) / name / str(out.version))  # where the version now is
