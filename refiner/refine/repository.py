"""The model repository (Triton's layout) that builds write and the server reads.

    models/<name>/config.pbtxt          Triton model config (onnxruntime, dynamic batching)
    models/<name>/labels.txt            class names, one per line (Triton's label_filename)
    models/<name>/<version>/model.onnx  one file, no external data
    models/<name>/<version>/refined.pt        the refined PyTorch model (refiner.refine.refined)
    models/<name>/<version>/metadata.json, report.json, report.html, *.png

Versions are increasing integers; a version folder is written under a temporary
name and renamed into place only when complete and validated.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import ConfigDict, Field

from refiner.atomic import atomic_dir, atomic_file
from refiner.errors import ConfigError
from serving.schema import ARTIFACT_FORMAT, ArtifactMeta, TensorSpec

__all__ = [
    "ARTIFACT_FORMAT",
    "TensorSpec",
    "ArtifactMetadata",
    "new_version",
    "write_model_files",
    "triton_config",
    "now_iso",
]

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


class ArtifactMetadata(ArtifactMeta):
    """metadata.json as refiner writes it: the format's fields (serving.schema.ArtifactMeta) and the build's record."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["refiner-artifact/1"] = ARTIFACT_FORMAT
    name: str = Field(pattern=NAME_PATTERN)
    created: str  # ISO 8601, UTC
    precision: Literal["fp32", "fp16", "int8"] = "fp32"  # of the graph inside; input and output are always FP32
    refined: dict[str, Any]  # layers, K, lambda, source checkpoint hashes
    export_check: dict[str, Any]  # validation figures (max abs diff, top-1 agreement)
    quantization: dict[str, Any] | None = None  # INT8: calibration, top-1 agreement and accuracy drop on test images


def _versions(model_dir: Path) -> list[int]:
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


@contextmanager
def new_version(models: Path, name: str) -> Iterator[tuple[int, Path]]:
    """Yield (version, temporary folder); the folder becomes models/<name>/<version> on success."""
    if not re.match(NAME_PATTERN, name):
        raise ConfigError(f"model name {name!r} must match {NAME_PATTERN} (letters, digits, _ . -)")
    model_dir = Path(models) / name
    version = (_versions(model_dir) or [0])[-1] + 1
    new = not model_dir.exists()
    try:
        with atomic_dir(model_dir / str(version)) as tmp:
            yield version, tmp
    except BaseException:
        if new and model_dir.is_dir() and not any(model_dir.iterdir()):
            model_dir.rmdir()  # a first version that failed leaves no empty model folder for the server to find
        raise


def write_model_files(models: Path, meta: ArtifactMetadata, queue_delay_us: int = 2000) -> None:
    """Write config.pbtxt and labels.txt of the model from its newest version's metadata."""
    model_dir = Path(models) / meta.name
    with atomic_file(model_dir / "labels.txt") as tmp:
        tmp.write_text("".join(f"{c}\n" for c in meta.class_names))
    with atomic_file(model_dir / "config.pbtxt") as tmp:
        tmp.write_text(triton_config(meta, queue_delay_us))


def triton_config(meta: ArtifactMetadata, queue_delay_us: int = 2000) -> str:
    """A Triton model configuration (protobuf text format) for the ONNX model."""
    dims = lambda shape: ", ".join(str(d) for d in shape)  # noqa: E731
    preferred = sorted({b for b in (8, meta.max_batch_size) if b <= meta.max_batch_size})
    return f"""name: "{meta.name}"
platform: "onnxruntime_onnx"
max_batch_size: {meta.max_batch_size}
version_policy: {{ latest: {{ num_versions: 1 }} }}
input [
  {{
    name: "{meta.input.name}"
    data_type: TYPE_FP32
    format: FORMAT_NCHW
    dims: [ {dims(meta.input.shape)} ]
  }}
]
output [
  {{
    name: "{meta.output.name}"
    data_type: TYPE_FP32
    dims: [ {dims(meta.output.shape)} ]
    label_filename: "labels.txt"
  }}
]
dynamic_batching {{
  preferred_batch_size: [ {dims(preferred)} ]
  max_queue_delay_microseconds: {queue_delay_us}
}}
instance_group [ {{ count: 1, kind: KIND_AUTO }} ]
"""


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
