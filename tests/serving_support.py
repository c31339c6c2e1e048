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




def crafted_artifact(
    repo: Path, name: str, version: int = 1, *, kind: str = "good", classes: int = 3, max_batch_size: int = 8,
    hidden: int = 0, external: str = "secret.txt",
) -> Path:  # fmt: skip
    """A hand-made ONNX artifact of (N, 3, 4, 4) -> (N, classes) logits, honest or lying about what it serves.

    kind: "good" (a linear layer); "batch1" (the graph's batch axis is fixed to 1); "mean" (one row, the batch
    mean, whatever the batch); "mix" (each row minus the batch mean: the right shape, rows mixing clients);
    "external" (its weights are external data at `external`, resolved against the server's working folder).
    hidden: with kind "good", a hidden layer of this width (48 x hidden + hidden x classes weights): a model of a
    given weight, all of it used.
    """
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(version)
    w = rng.standard_normal((48, classes)).astype(np.float32)
    batch_axis = 1 if kind == "batch1" else "N"
    nodes = [helper.make_node("Flatten", ["input"], ["flat"]), helper.make_node("MatMul", ["flat", "w"], ["z"])]
    extra = []
    if hidden:
        nodes[1:] = [helper.make_node("MatMul", ["flat", "w1"], ["h"]), helper.make_node("MatMul", ["h", "w"], ["z"])]
        w = (rng.standard_normal((hidden, classes)) / np.sqrt(hidden)).astype(np.float32)
        extra.append(numpy_helper.from_array((rng.random((48, hidden), dtype=np.float32) - 0.5), "w1"))
    if kind == "mean":
        nodes.append(helper.make_node("ReduceMean", ["z"], ["logits"], axes=[0], keepdims=1))
    elif kind == "mix":
        nodes += [helper.make_node("ReduceMean", ["z"], ["m"], axes=[0], keepdims=1), helper.make_node("Sub", ["z", "m"], ["logits"])]
    else:
        nodes.append(helper.make_node("Identity", ["z"], ["logits"]))
    weights = numpy_helper.from_array(w, "w")
    if kind == "external":
        weights = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=w.shape)
        weights.data_location = TensorProto.EXTERNAL
        for key, value in (("location", external), ("offset", "0"), ("length", str(w.nbytes))):
            weights.external_data.add(key=key, value=value)
    initializers = [weights, *extra]
    graph = helper.make_graph(
        nodes, "crafted", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch_axis, 3, 4, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch_axis if kind != "mean" else 1, classes])], initializers,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    data = model.SerializeToString()
    folder = repo / name / str(version)
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(data)
    meta = {
        "format": "refiner-artifact/1", "name": name, "version": version, "class_names": [f"c{i}" for i in range(classes)],
        "input": {"name": "input", "datatype": "FP32", "shape": [3, 4, 4]},
        "output": {"name": "logits", "datatype": "FP32", "shape": [classes]},
        "preprocess": {"input_size": [3, 4, 4]}, "max_batch_size": max_batch_size, "onnx_sha256": hashlib.sha256(data).hexdigest(),
    }  # fmt: skip
    (folder / "metadata.json").write_text(json.dumps(meta))
    return folder


def rss_mib(pid: int) -> float:
    """A process's resident memory (VmRSS of /proc/PID/status), in MiB."""
    line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def stalled_upload(port: int, stop: threading.Event, every_s: float = 0.2, model: str = "big") -> None:
    """Infer requests whose bodies come a byte every `every_s` and never complete: each waits for its body (holding
    no version meanwhile) until the server's body timeout closes it, then another opens, until `stop` is set."""
    while not stop.is_set():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
                s.sendall(f"POST /v2/models/{model}/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n".encode())
                while not stop.is_set():
                    s.sendall(b" ")
                    time.sleep(every_s)
        except OSError:
            time.sleep(0.05)  # answered 408 and closed: open another
