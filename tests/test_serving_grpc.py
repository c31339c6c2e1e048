"""The gRPC half of the KServe v2 / Triton protocol, through stock tritonclient.grpc over a real socket."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import httpx
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as triton_grpc
from serving_support import Live, crafted_artifact
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc
from tritonclient.utils import InferenceServerException

from serving.settings import ServeSettings

ROOT = Path(__file__).resolve().parents[1]
KEY = "grpc-key"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("grpc") / "models"
    crafted_artifact(repo, "m", max_batch_size=8)
    return repo


@pytest.fixture(scope="module")
def live(repo):
    settings = ServeSettings(models=repo, grpc_port=_free_port(), model_control="explicit", api_key=KEY, max_batch_bytes=64 * 1024)
    with Live(settings) as live:
        yield live


def _client(live: Live) -> triton_grpc.InferenceServerClient:
    return triton_grpc.InferenceServerClient(f"127.0.0.1:{live.state.settings.grpc_port}")


def _input(x: np.ndarray, name: str = "input", datatype: str = "FP32") -> triton_grpc.InferInput:
    i = triton_grpc.InferInput(name, list(x.shape), datatype)
    i.set_data_from_numpy(x)
    return i


def _x(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 4, 4)).astype(np.float32)


def test_health_metadata_and_config(live):
    c = _client(live)
    assert c.is_server_live() and c.is_server_ready() and c.is_model_ready("m") and c.is_model_ready("m", "1")
    meta = c.get_server_metadata(as_json=True)
    assert meta["name"] == "refiner-serving" and "model_repository" in meta["extensions"]
    model = c.get_model_metadata("m", as_json=True)
    http = httpx.get(f"http://127.0.0.1:{live.port}/v2/models/m").json()
    assert {k: model[k] for k in ("name", "versions", "platform")} == {k: http[k] for k in ("name", "versions", "platform")}
    assert model["inputs"] == [{"name": "input", "datatype": "FP32", "shape": ["-1", "3", "4", "4"]}]
    config = c.get_model_config("m", as_json=True)["config"]
    assert config["max_batch_size"] == 8 and config["input"][0]["dims"] == ["3", "4", "4"]


def test_infer_raw_and_typed_contents_match_onnxruntime_and_http(live, repo):
    x = _x(3)
    session = ort.InferenceSession(str(repo / "m" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    expected = session.run(None, {"input": x})[0]
    raw = _client(live).infer("m", [_input(x)], request_id="r1")  # tritonclient sends raw_input_contents
    assert raw.get_response().id == "r1" and raw.get_response().model_version == "1"
    np.testing.assert_array_equal(raw.as_numpy("logits"), expected)
    with grpc.insecure_channel(f"127.0.0.1:{live.state.settings.grpc_port}") as channel:  # the typed contents, by the stub
        request = pb.ModelInferRequest(model_name="m")
        request.inputs.add(name="input", datatype="FP32", shape=list(x.shape)).contents.fp32_contents.extend(x.ravel().tolist())
        response = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
    np.testing.assert_array_equal(np.frombuffer(response.raw_output_contents[0], "<f4").reshape(3, 3), expected)
    body = {"inputs": [{"name": "input", "shape": [3, 3, 4, 4], "datatype": "FP32", "data": x.ravel().tolist()}]}
    http = httpx.post(f"http://127.0.0.1:{live.port}/v2/models/m/infer", json=body).json()
    np.testing.assert_array_equal(np.array(http["outputs"][0]["data"], np.float32).reshape(3, 3), expected)


@pytest.mark.parametrize(
    ("case", "code", "message"),
    [
        ("unknown model", "StatusCode.NOT_FOUND", "unknown model 'nope'"),
        ("wrong shape", "StatusCode.INVALID_ARGUMENT", r"input 'input' has shape [2, 3, 4, 5]; expected [N, 3, 4, 4] with 1 <= N <= 8"),
        ("too many rows", "StatusCode.INVALID_ARGUMENT", "with 1 <= N <= 8 (the model's max batch size)"),
        ("wrong datatype", "StatusCode.INVALID_ARGUMENT", "input 'input' has datatype 'FP64'; expected FP32"),
        ("wrong input name", "StatusCode.INVALID_ARGUMENT", "request inputs are ['x']; model 'm' takes exactly one input"),
        ("NaN", "StatusCode.INVALID_ARGUMENT", "contains NaN or infinite values"),
        ("message too large", "StatusCode.RESOURCE_EXHAUSTED", "Received message larger than max"),
    ],
)
def test_bad_requests_get_the_code_and_the_words_of_http(live, case, code, message):
    x, name, model, datatype = _x(2), "input", "m", "FP32"
    if case == "unknown model":
        model = "nope"
    elif case == "wrong shape":
        x = np.zeros((2, 3, 4, 5), np.float32)
    elif case == "too many rows":
        x = _x(9)
    elif case == "wrong datatype":
        x, datatype = x.astype(np.float64), "FP64"
    elif case == "wrong input name":
        name = "x"
    elif case == "NaN":
        x[0, 0, 0, 0] = np.nan
    elif case == "message too large":  # over max_batch_bytes (64 KiB) + 1 MiB of the message's own fields
        x = np.zeros((2, 3, 400, 400), np.float32)
    with pytest.raises(InferenceServerException) as e:
        _client(live).infer(model, [_input(x, name, datatype)])
    assert e.value.status() == code and message in e.value.message(), e.value


def test_the_repository_extension_needs_the_key_and_inference_does_not(live):
    c = _client(live)
    for call in (lambda h: c.get_model_repository_index(headers=h), lambda h: c.unload_model("m", headers=h)):
        for headers in (None, {"x-refiner-key": "wrong"}):
            with pytest.raises(InferenceServerException) as e:
                call(headers)
            assert e.value.status() == "StatusCode.UNAUTHENTICATED" and "model-repository API is restricted" in e.value.message()
    key = {"x-refiner-key": KEY}
    assert [m.name for m in c.get_model_repository_index(headers=key).models] == ["m"]
    c.unload_model("m", headers=key)
    with pytest.raises(InferenceServerException) as e:
        c.infer("m", [_input(_x(1))])
    assert e.value.status() == "StatusCode.NOT_FOUND" and "is unloaded" in e.value.message()
    c.load_model("m", headers=key)
    assert c.infer("m", [_input(_x(1))]).as_numpy("logits").shape == (1, 3)  # no key needed: inference is not restricted


def test_unimplemented_parts_of_the_service_say_so(live):
    with pytest.raises(InferenceServerException) as e:
        _client(live).get_inference_statistics("m")
    assert e.value.status() == "StatusCode.UNIMPLEMENTED"


def test_refiner_serve_grpc_port_and_a_clean_stop(repo, tmp_path):
    http_port, grpc_port = _free_port(), _free_port()
    cmd = [sys.executable, "-m", "refiner", "serve", "--models", str(repo), "--port", str(http_port), "--grpc-port", str(grpc_port), "--device", "cpu"]
    process = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        client = triton_grpc.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        deadline = time.monotonic() + 60
        while True:
            try:
                if client.is_server_ready():
                    break
            except InferenceServerException:
                pass
            assert time.monotonic() < deadline and process.poll() is None, "the server did not start"
            time.sleep(0.2)
        assert client.infer("m", [_input(_x(2))]).as_numpy("logits").shape == (2, 3)
        process.terminate()
        assert process.wait(timeout=30) == 0
        out = process.stdout.read().decode()
        assert f"gRPC (KServe v2 / Triton) on 127.0.0.1:{grpc_port}" in out and "shutdown complete" in out, out
    finally:
        if process.poll() is None:
            process.kill()
