"""Reading a model repository: Triton's layout plus metadata.json (its fields: serving/schema.py).

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

from pydantic import ValidationError

from serving.errors import ArtifactError
from serving.schema import ARTIFACT_FORMAT, ArtifactMeta

__all__ = ["Artifact", "discover", "read_artifact"]

_VERSION_DIR = re.compile(r"[1-9][0-9]*")


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
