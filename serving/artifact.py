"""Reading a model repository: Triton's layout plus metadata.json (its fields: serving/schema.py).

    <models>/<name>/config.pbtxt, labels.txt
    <models>/<name>/<version>/model.onnx, metadata.json

Only the fields the server needs are read; folders whose names are not integers
(e.g. ".3.xyz.tmp", a version still being written) are ignored. The repository is
not trusted: every failure to read a model (any OSError, a file that is not a regular
file, bad JSON, an ONNX that is not one or that points at external data) is an
ArtifactError naming the file relative to the repository, for that model alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from serving.errors import ArtifactError
from serving.schema import ARTIFACT_FORMAT, ArtifactMeta

__all__ = ["Artifact", "Found", "discover", "read_artifact", "version_files"]

_VERSION_DIR = re.compile(r"[1-9][0-9]*")
_MAX_METADATA_BYTES = 1024 * 1024  # metadata.json is a few kB; more is not an artifact


@dataclass(frozen=True)
class Artifact:
    """A verified model version: its metadata and the exact ONNX bytes whose sha256 was checked."""

    meta: ArtifactMeta
    onnx: bytes
    path: Path


@dataclass
class Found:
    """One scan of the repository: each model's complete versions (newest first), and the model folders it could not list."""

    versions: dict[str, list[int]] = field(default_factory=dict)
    unreadable: dict[str, str] = field(default_factory=dict)  # model name -> why its folder could not be listed


def discover(models: Path) -> Found:
    """Every model folder and its versions; a folder that cannot be listed is reported, not raised."""
    if not models.is_dir():
        raise FileNotFoundError(f"model repository {str(models)!r} is not a folder; set REFINER_SERVE_MODELS")
    found = Found()
    for model_dir in sorted(models.iterdir()):
        if model_dir.name.startswith("."):
            continue
        try:
            if not stat.S_ISDIR(os.stat(model_dir).st_mode):  # os.stat, not is_dir(): a symlink loop raises, is not skipped
                continue
            versions = [int(p.name) for p in model_dir.iterdir() if _VERSION_DIR.fullmatch(p.name) and p.is_dir()]
        except OSError as e:
            found.unreadable[model_dir.name] = f"{model_dir.name}/: the folder cannot be listed: {_why(e)}"
        else:
            found.versions[model_dir.name] = sorted(versions, reverse=True)
    return found


def version_files(folder: Path) -> tuple[tuple[int, int] | None, ...]:
    """(size, mtime) of metadata.json and model.onnx (None where absent or unreadable): what a reload compares."""
    out = []
    for file in ("metadata.json", "model.onnx"):
        try:
            st = (folder / file).stat()
        except OSError:
            out.append(None)
        else:
            out.append((st.st_size, st.st_mtime_ns))
    return tuple(out)


def _why(e: OSError) -> str:
    return e.strerror or type(e).__name__


def _read_regular(path: Path, label: str, limit: int | None = None) -> bytes:
    """The bytes of a regular file; ArtifactError for anything else (a folder, a FIFO, a device, a symlink loop)
    or any OSError. A FIFO is refused before it is opened, since opening one blocks until a writer comes."""
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise ArtifactError(f"{label} is not a regular file")
        if limit is not None and st.st_size > limit:
            raise ArtifactError(f"{label} is {st.st_size} bytes; at most {limit} are read")
        with open(path, "rb") as f:
            return f.read() if limit is None else f.read(limit + 1)
    except FileNotFoundError as e:
        raise ArtifactError(f"{label} is missing") from e
    except OSError as e:
        raise ArtifactError(f"{label} is unreadable: {_why(e)}") from e


def read_artifact(models: Path, name: str, version: int) -> Artifact:
    """Read and check one version: metadata matches its folder, model.onnx matches onnx_sha256 and is self-contained."""
    folder = models / name / str(version)
    where = f"{name}/{version}"
    raw = _read_regular(folder / "metadata.json", f"{where}/metadata.json", _MAX_METADATA_BYTES)
    try:
        meta = ArtifactMeta.model_validate(json.loads(raw))
    except (ValueError, ValidationError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        detail = str(e).replace("\n", "; ")[:500]
        raise ArtifactError(f"{where}/metadata.json is not valid {ARTIFACT_FORMAT} metadata: {detail}") from e
    if (meta.name, meta.version) != (name, version):
        raise ArtifactError(f"{where}/metadata.json describes {meta.name!r} version {meta.version}, expected {name!r} version {version}")
    if meta.input.datatype != "FP32" or meta.output.datatype != "FP32" or meta.preprocess.input_size[0] != 3:
        raise ArtifactError(f"{where}: expected an FP32 (N, 3, H, W) input and FP32 output, got {meta.input}, {meta.output}")
    onnx = _read_regular(folder / "model.onnx", f"{where}/model.onnx")
    digest = hashlib.sha256(onnx).hexdigest()
    if digest != meta.onnx_sha256:
        raise ArtifactError(
            f"{where}/model.onnx sha256 is {digest}, metadata.json says {meta.onnx_sha256}; the file is corrupted or was replaced"
        )
    _refuse_external_data(onnx, f"{where}/model.onnx")
    return Artifact(meta=meta, onnx=onnx, path=folder)


def _refuse_external_data(onnx_bytes: bytes, label: str) -> None:
    """The format's model.onnx holds all its tensors: a tensor stored as external data would be read from
    wherever the server runs (onnxruntime resolves it against the working folder for a model given as bytes)."""
    import onnx

    try:
        model = onnx.load_model_from_string(onnx_bytes)
    except Exception as e:  # protobuf's DecodeError, and whatever else bytes that are not a model make it raise
        raise ArtifactError(f"{label} is not an ONNX model: {e}") from e
    graphs = [model.graph]
    nodes = [n for f in model.functions for n in f.node]
    tensors = []
    while graphs or nodes:
        if graphs:
            g = graphs.pop()
            tensors += [*g.initializer, *(s.values for s in g.sparse_initializer), *(s.indices for s in g.sparse_initializer)]
            nodes += list(g.node)
            continue
        for attr in nodes.pop().attribute:
            tensors += [attr.t, *attr.tensors, *(s.values for s in [attr.sparse_tensor, *attr.sparse_tensors])]
            graphs += [*([attr.g] if attr.HasField("g") else []), *attr.graphs]
    for t in tensors:
        if t.data_location == onnx.TensorProto.EXTERNAL or t.external_data:
            where = next((e.value for e in t.external_data if e.key == "location"), "?")
            raise ArtifactError(
                f"{label}: tensor {t.name!r} is stored as external data ({where!r}); the artifact format keeps every tensor inside model.onnx"
            )
