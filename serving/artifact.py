"""The artifact format the server reads: Triton's repository layout plus refiner's metadata.json.

    <models>/<name>/config.pbtxt, labels.txt
    <models>/<name>/<version>/model.onnx, metadata.json

Only the fields the server needs are read; folders whose names are not integers
(e.g. ".3.xyz.tmp", a version still being written) are ignored.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from serving.errors import ArtifactError

__all__ = ["ARTIFACT_FORMAT", "TensorSpec", "Preprocess", "ArtifactMeta", "Artifact", "discover", "read_artifact"]

ARTIFACT_FORMAT = "refiner-artifact/1"
_VERSION_DIR = re.compile(r"[1-9][0-9]*")


class TensorSpec(BaseModel):
    """A model input or output without its batch axis."""

    name: str
    datatype: str  # KServe v2 datatype name, e.g. "FP32"
    shape: list[int]


class Preprocess(BaseModel):
    """RGB; shorter side to resize_size + centre crop to (H, W), or a plain resize to (H, W); /255; (x - mean) / std."""

    input_size: tuple[int, int, int]  # (3, H, W)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize_size: int | None = Field(None, ge=1)  # absent in artifacts written before crops existed: plain resize
    interpolation: Literal["nearest", "bilinear", "bicubic"] = "bilinear"

    @model_validator(mode="after")
    def _crop_fits(self) -> Preprocess:
        if self.resize_size is not None and self.resize_size < max(self.input_size[1:]):
            raise ValueError(f"resize_size {self.resize_size} is smaller than the {self.input_size[1]}x{self.input_size[2]} crop")
        return self


class ArtifactMeta(BaseModel):
    """The part of metadata.json the server uses."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    format: Literal["refiner-artifact/1"]
    name: str
    version: int = Field(ge=1)
    class_names: list[str]
    input: TensorSpec
    output: TensorSpec
    preprocess: Preprocess
    max_batch_size: int = Field(ge=1)
    onnx_sha256: str


@dataclass(frozen=True)
class Artifact:
    """A verified model version: its metadata and the exact ONNX bytes whose sha256 was checked."""

    meta: ArtifactMeta
    onnx: bytes
    path: Path


def discover(models: Path) -> dict[str, list[int]]:
    """Model name -> its complete versions, newest first."""
    if not models.is_dir():
        raise FileNotFoundError(f"model repository {str(models)!r} is not a folder; set REFINER_SERVE_MODELS")
    found = {}
    for model_dir in sorted(models.iterdir()):
        if model_dir.is_dir() and not model_dir.name.startswith("."):
            versions = [int(p.name) for p in model_dir.iterdir() if p.is_dir() and _VERSION_DIR.fullmatch(p.name)]
            found[model_dir.name] = sorted(versions, reverse=True)
    return found


def read_artifact(models: Path, name: str, version: int) -> Artifact:
    """Read and check one version: metadata matches its folder, model.onnx matches onnx_sha256."""
    folder = models / name / str(version)
    try:
        raw = json.loads((folder / "metadata.json").read_text())
        meta = ArtifactMeta.model_validate(raw)
    except FileNotFoundError as e:
        raise ArtifactError(f"{folder}: metadata.json is missing") from e
    except (ValueError, ValidationError) as e:
        detail = str(e).replace("\n", "; ")
        raise ArtifactError(f"{folder}: metadata.json is not valid {ARTIFACT_FORMAT} metadata: {detail}") from e
    if (meta.name, meta.version) != (name, version):
        raise ArtifactError(
            f"{folder}: metadata.json describes {meta.name!r} version {meta.version}, expected {name!r} version {version}"
        )
    if meta.input.datatype != "FP32" or meta.output.datatype != "FP32" or meta.preprocess.input_size[0] != 3:
        raise ArtifactError(f"{folder}: expected an FP32 (N, 3, H, W) input and FP32 output, got {meta.input}, {meta.output}")
    try:
        onnx = (folder / "model.onnx").read_bytes()
    except OSError as e:
        raise ArtifactError(f"{folder}: model.onnx is unreadable: {e}") from e
    digest = hashlib.sha256(onnx).hexdigest()
    if digest != meta.onnx_sha256:
        raise ArtifactError(
            f"{folder}: model.onnx sha256 is {digest}, metadata.json says {meta.onnx_sha256}; "
            "the file is corrupted or was replaced"
        )
    return Artifact(meta=meta, onnx=onnx, path=folder)
