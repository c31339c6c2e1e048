"""Shared by the serving tests: the artifact under test, request builders and a live uvicorn server."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import socket
import threading
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from PIL import Image

from serving.app import make_server
from serving.runtime import CPU
from serving.settings import ServeSettings


@dataclass(frozen=True)
class Served:
    """The model under test: a copy of the build's repository entry, its torch model and real images."""

    models: Path
    name: str
    version: int
    metadata: dict[str, Any]
    torch_model: torch.nn.Module
    images: list[Image.Image]  # validation images of the build's task

    @property
    def input_shape(self) -> list[int]:
        return self.metadata["input"]["shape"]

    @property
    def class_names(self) -> list[str]:
        return self.metadata["class_names"]

    @property
    def max_batch_size(self) -> int:
        return self.metadata["max_batch_size"]

    @cached_property
    def session(self) -> ort.InferenceSession:
        return ort.InferenceSession(str(self.models / self.name / str(self.version) / "model.onnx"), providers=[CPU])


def copy_version(
    served: Served, repo: Path, name: str, version: int, corrupt: str | None = None,
    class_names: list[str] | None = None, atomic: bool = False,
) -> Path:  # fmt: skip
    """Copy the served version to repo/name/version (metadata renamed); corrupt: "flip" a byte or "garbage" ONNX;
    class_names: new names for the outputs; atomic: written in a hidden folder beside, then renamed into place
    (as `refiner export` publishes a version), so a server scanning the repository never sees it half written."""
    folder = repo / name / str(version)
    staging = repo / name / f".{version}.tmp" if atomic else folder
    shutil.copytree(served.models / served.name / str(served.version), staging)
    meta = json.loads((staging / "metadata.json").read_text())
    if class_names is not None:
        meta["class_names"] = class_names
    onnx = staging / "model.onnx"
    if corrupt == "flip":  # metadata's sha256 no longer matches
        data = bytearray(onnx.read_bytes())
        data[len(data) // 2] ^= 0xFF
        onnx.write_bytes(bytes(data))
    elif corrupt == "garbage":  # sha256 matches, but it is not an ONNX model
        onnx.write_bytes(b"not an onnx model" * 10)
        meta["onnx_sha256"] = hashlib.sha256(onnx.read_bytes()).hexdigest()
    (staging / "metadata.json").write_text(json.dumps({**meta, "name": name, "version": version}))
    if atomic:
        os.rename(staging, folder)
    return folder


def random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    (image.convert("RGB") if fmt == "JPEG" else image).save(buf, fmt)
    return buf.getvalue()


def infer_json(x: np.ndarray, name: str = "input", **extra: Any) -> dict[str, Any]:
    return {"inputs": [{"name": name, "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}], **extra}


def batch(served: Served, n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *served.input_shape)).astype(np.float32)



class Live:
    """A uvicorn server on a free loopback port, run in a background thread."""

    def __init__(self, settings: ServeSettings) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.server = make_server(settings, log_level="warning")
        self.state = self.server.config.app.state.server
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> Live:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


