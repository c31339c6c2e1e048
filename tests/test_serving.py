"""Serving, on the artifact of a real `refiner build` (conftest's tiny_build):

every endpoint through TestClient; equivalence with refiner's preprocessing and the
refined model; a corpus of bad inputs (all 4xx with a specific message, never 5xx);
corrupted artifacts; dynamic batching; a live uvicorn server driven by the stock
tritonclient; graceful shutdown; and the import boundary between the two packages.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from serving_support import Live, Served, batch, copy_version, encode, infer_json, random_image

from serving.app import create_app
from serving.artifact import discover
from serving.batching import BatchStats, DynamicBatcher
from serving.errors import DeviceError, InferenceFailed, Unavailable
from serving.runtime import CPU, CUDA, choose_providers
from serving.settings import PILLOW_MAX_IMAGE_PIXELS, ServeSettings

pytestmark = pytest.mark.filterwarnings(
    "ignore:Using `httpx` with `starlette.testclient`", "ignore::PIL.Image.DecompressionBombWarning"
)


@pytest.fixture(scope="module")
def client(served: Served):
    with TestClient(create_app(ServeSettings(models=served.models))) as c:
        yield c


# --- health, metadata, docs ----------------------------------------------------------------------


def test_health_and_server_metadata(client):
    for path in ("/v2/health/live", "/v2/health/ready"):  # v2 health: the status is the answer, the body is empty
        r = client.get(path)
        assert (r.status_code, r.content) == (200, b"")
    meta = client.get("/v2").json()
    assert meta["name"] == "refiner-serving" and "binary_tensor_data" in meta["extensions"]


def test_model_metadata_reports_signature_classes_and_provider(client, served):
    for path in (f"/v2/models/{served.name}", f"/v2/models/{served.name}/versions/{served.version}"):
        meta = client.get(path).json()
        assert meta["name"] == served.name and meta["versions"] == [str(served.version)]
        assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, *served.input_shape]}]
        assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, len(served.class_names)]}]
        expected_provider = CUDA if choose_providers("auto")[0] == CUDA else CPU
        assert meta["parameters"]["execution_provider"] == expected_provider
        assert meta["parameters"]["class_names"] == served.class_names
        assert meta["parameters"]["preprocess"] == served.metadata["preprocess"]


def test_model_ready_and_config(client, served):
    for prefix in (f"/v2/models/{served.name}", f"/v2/models/{served.name}/versions/{served.version}"):
        r = client.get(prefix + "/ready")
        assert (r.status_code, r.content) == (200, b"")
        config = client.get(prefix + "/config").json()
        assert config["max_batch_size"] == served.max_batch_size and config["input"][0]["dims"] == served.input_shape


def test_openapi_docs_list_every_endpoint(client):
    assert "swagger" in client.get("/docs").text.lower()
    paths = client.get("/openapi.json").json()["paths"]
    for path in (
        "/v2/health/live", "/v2/health/ready", "/v2", "/v2/models/{name}", "/v2/models/{name}/versions/{version}",
        "/v2/models/{name}/ready", "/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer",
        "/v1/models/{name}/classify", "/metrics",
    ):  # fmt: skip
        assert path in paths, path
    assert "image/png" in paths["/v1/models/{name}/classify"]["post"]["requestBody"]["content"]


# --- equivalence with refiner ---------------------------------------------------------------------


def _varied_images(served: Served) -> list[Image.Image]:
    """The task's own images plus other sizes and modes, to exercise resize and colour conversion."""
    h, w = served.input_shape[1:]
    return [
        *served.images[:3],
        random_image(w, h, seed=2),  # already at input size: no resize
        random_image(40, 30, seed=1),
        random_image(7, 50, seed=3).convert("L"),
        random_image(33, 17, seed=4).convert("RGBA"),
        random_image(20, 20, seed=5).convert("P"),
        Image.open(io.BytesIO(encode(random_image(24, 24, seed=6), "JPEG"))),
    ]


def test_refiner_and_the_server_share_one_artifact_schema(served):
    """One definition of the format: refiner's datasets and artifacts use serving.schema's classes and transform."""
    from refiner.data import samples
    from refiner.refine.repository import ArtifactMetadata
    from serving import schema

    assert samples.Preprocess is schema.Preprocess and samples.preprocess_image is schema.preprocess_image
    assert issubclass(ArtifactMetadata, schema.ArtifactMeta)
    written = ArtifactMetadata.model_validate(served.metadata)  # what refiner wrote reads back under its own rules
    assert schema.ArtifactMeta.model_validate(served.metadata) == schema.ArtifactMeta.model_validate(written.model_dump())


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "nearest"])
@pytest.mark.parametrize("resize_size", [None, 16, 19])
def test_resize_and_crop_match_torchvision(served, resize_size, interpolation):
    """Shorter side to resize_size + centre crop (or a plain resize): the format's transform == torchvision's transforms."""
    from torchvision import transforms as T

    from serving.schema import Preprocess, preprocess_image

    raw = {"input_size": (3, 16, 16), "mean": (0.4, 0.5, 0.6), "std": (0.2, 0.3, 0.25), "resize_size": resize_size, "interpolation": interpolation}
    pre = Preprocess.model_validate(raw)
    mode = getattr(T.InterpolationMode, interpolation.upper())
    resize = [T.Resize((16, 16), mode)] if resize_size is None else [T.Resize(resize_size, mode), T.CenterCrop(16)]
    reference = T.Compose([*resize, T.ToTensor(), T.Normalize(raw["mean"], raw["std"])])
    for image in _varied_images(served):
        a = preprocess_image(image, pre)
        assert a.dtype == np.float32 and a.shape == (3, 16, 16)
        np.testing.assert_allclose(a, reference(image.convert("RGB")).numpy(), atol=1e-6)


def test_preprocess_refuses_a_crop_larger_than_the_resize():
    from pydantic import ValidationError

    from serving.schema import Preprocess

    with pytest.raises(ValidationError, match="resize_size 20 is smaller than the 24x24 crop"):
        Preprocess(input_size=(3, 24, 24), mean=(0.5,) * 3, std=(0.5,) * 3, resize_size=20)


def test_v2_json_round_trip_equals_onnx_session(client, served):
    x = batch(served, 3)
    r = client.post(f"/v2/models/{served.name}/infer", json=infer_json(x, id="req-7"))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"] == "req-7" and body["model_name"] == served.name and body["model_version"] == str(served.version)
    (out,) = body["outputs"]
    assert out["name"] == "logits" and out["datatype"] == "FP32" and out["shape"] == [3, len(served.class_names)]
    expected = served.session.run(None, {"input": x})[0]
    np.testing.assert_allclose(np.asarray(out["data"], np.float32).reshape(out["shape"]), expected, rtol=1e-5, atol=1e-6)


def test_v2_nested_data_and_versioned_route(client, served):
    x = batch(served, 1, seed=3)
    body = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.tolist()}]}
    r = client.post(f"/v2/models/{served.name}/versions/{served.version}/infer", json=body)
    expected = served.session.run(None, {"input": x})[0]
    np.testing.assert_allclose(np.asarray(r.json()["outputs"][0]["data"]).reshape(expected.shape), expected, atol=1e-6)


def test_v2_binary_tensor_extension(client, served):
    x = batch(served, 2, seed=5)
    header = json.dumps({
        "inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "parameters": {"binary_data_size": x.nbytes}}],
        "outputs": [{"name": "logits", "parameters": {"binary_data": True}}],
    }).encode()  # fmt: skip
    r = client.post(
        f"/v2/models/{served.name}/infer",
        content=header + x.tobytes(),
        headers={"Inference-Header-Content-Length": str(len(header)), "Content-Type": "application/octet-stream"},
    )
    assert r.status_code == 200, r.text
    n = int(r.headers["Inference-Header-Content-Length"])
    meta = json.loads(r.content[:n])
    assert meta["outputs"][0]["parameters"]["binary_data_size"] == len(r.content) - n
    got = np.frombuffer(r.content[n:], "<f4").reshape(meta["outputs"][0]["shape"])
    np.testing.assert_allclose(got, served.session.run(None, {"input": x})[0], rtol=1e-5, atol=1e-6)


def test_classify_equals_refined_model_on_refiners_preprocessing(client, served):
    """Served prediction == the refined PyTorch model and the ONNX session on refiner's preprocessing."""
    from refiner.data.samples import Preprocess, preprocess_image

    pre = Preprocess.model_validate(served.metadata["preprocess"])
    k = len(served.class_names)
    for i, image in enumerate(_varied_images(served)):
        data = encode(image, "JPEG" if i % 3 == 2 else "PNG")
        r = client.post(f"/v1/models/{served.name}/classify?top_k={k}", content=data)
        assert r.status_code == 200, r.text
        preds = r.json()["predictions"]
        with Image.open(io.BytesIO(data)) as decoded:
            x = preprocess_image(decoded, pre)[None]
        with torch.inference_mode():
            torch_logits = served.torch_model(torch.from_numpy(x))[0].numpy()
        onnx_logits = served.session.run(None, {"input": x})[0][0]
        assert preds[0]["index"] == int(np.argmax(torch_logits)) == int(np.argmax(onnx_logits))
        assert preds[0]["label"] == served.class_names[preds[0]["index"]]
        z = np.exp(onnx_logits - onnx_logits.max())
        got = np.zeros(k)
        got[[p["index"] for p in preds]] = [p["probability"] for p in preds]
        np.testing.assert_allclose(got, z / z.sum(), atol=1e-6)
        assert [p["probability"] for p in preds] == sorted((p["probability"] for p in preds), reverse=True)


def test_classify_multipart_and_default_top_k(served):
    with TestClient(create_app(ServeSettings(models=served.models, top_k=2))) as client:
        data = encode(served.images[0])
        raw = client.post(f"/v1/models/{served.name}/classify", content=data, headers={"Content-Type": "image/png"})
        form = client.post(f"/v1/models/{served.name}/classify", files={"image": ("x.png", data, "image/png")})
        versioned = client.post(f"/v1/models/{served.name}/versions/{served.version}/classify?top_k=1", content=data)
    assert raw.status_code == form.status_code == versioned.status_code == 200
    assert raw.json() == form.json() and len(raw.json()["predictions"]) == 2
    assert versioned.json()["predictions"] == raw.json()["predictions"][:1]


# --- metrics -------------------------------------------------------------------------------------


def _metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_metrics_count_requests_latency_queue_and_batches(served):
    with TestClient(create_app(ServeSettings(models=served.models))) as client:
        x = batch(served, 2)
        for _ in range(3):
            client.post(f"/v2/models/{served.name}/infer", json=infer_json(x))
        client.get("/v2/models/nope")
        text = client.get("/metrics").text
    infer_route = "/v2/models/{name}/infer"
    assert _metric(text, "refiner_http_requests_total", route=infer_route, status="200") == 3
    assert _metric(text, "refiner_http_requests_total", route="/v2/models/{name}", status="404") == 1
    assert _metric(text, "refiner_http_request_duration_seconds_count", route=infer_route) == 3
    assert _metric(text, "refiner_http_request_duration_seconds_bucket", route=infer_route, le="+Inf") == 3
    # 3 requests of 2 rows (the warm-up runs on the session, not through the batcher: it is not traffic)
    assert _metric(text, "refiner_batch_size_count", model=served.name) == 3
    assert _metric(text, "refiner_batch_size_sum", model=served.name) == 6
    assert _metric(text, "refiner_queue_wait_seconds_count", model=served.name) == 3
    assert _metric(text, "refiner_inference_duration_seconds_count", model=served.name) == 3
    assert _metric(text, "refiner_model_loaded", model=served.name, version=str(served.version)) == 1


# --- artifacts: corrupted, unreadable, pinned, in progress ----------------------------------------


@pytest.fixture(scope="module")
def mixed_repo(served: Served, tmp_path_factory) -> Path:
    """good (v1); fallback (v1 good, v2 sha256 mismatch); unreadable (garbage ONNX, matching sha256);
    nometa (no metadata.json); twice (v1, v2); plus folders that are not versions."""
    repo = tmp_path_factory.mktemp("mixed")
    copy_version(served, repo, "good", 1)
    copy_version(served, repo, "fallback", 1)
    copy_version(served, repo, "fallback", 2, corrupt="flip")
    copy_version(served, repo, "unreadable", 1, corrupt="garbage")
    (copy_version(served, repo, "nometa", 1) / "metadata.json").unlink()
    copy_version(served, repo, "twice", 1)
    copy_version(served, repo, "twice", 2)
    shutil.copytree(repo / "good" / "1", repo / "good" / ".2.abc.tmp")  # a version still being written
    (repo / ".hidden").mkdir()
    return repo


def test_corrupted_versions_are_refused_while_others_serve(mixed_repo, served, caplog):
    caplog.set_level(logging.INFO, logger="serving")
    with TestClient(create_app(ServeSettings(models=mixed_repo))) as client:
        assert client.get("/v2/health/ready").status_code == 200
        versions = {name: client.get(f"/v2/models/{name}").json().get("versions") for name in discover(mixed_repo).versions}
        assert versions == {"fallback": ["1"], "good": ["1"], "nometa": None, "twice": ["2"], "unreadable": None}
        # the client hears which version was refused; why (with hashes) is in the repository index, never a server path
        r = client.get("/v2/models/fallback/versions/2")
        assert r.status_code == 404 and "version '2' loaded (refused at load; the repository index says why)" in r.json()["error"]
        r = client.get("/v2/models/unreadable")
        assert r.json()["error"] == "model 'unreadable' could not be loaded (version 1 refused; the repository index and the server log say why)"
        reasons = {(row["name"], row["version"]): row.get("reason") for row in client.post("/v2/repository/index").json()}
        assert reasons[("fallback", "2")].startswith("fallback/2/model.onnx sha256 is ")
        assert reasons[("unreadable", "1")].startswith("unreadable/1/model.onnx is not an ONNX model")
        assert reasons[("nometa", "1")] == "nometa/1/metadata.json is missing"
        assert str(mixed_repo) not in str(reasons)
        r = client.get("/v2/models/nometa/ready")
        assert r.status_code == 404 and "nometa" in r.json()["error"]
        for path in ("/v2/models/fallback/versions/2", "/v2/models/unreadable", "/v2/models/nometa"):
            text = client.get(path).text
            assert str(mixed_repo) not in text and not re.search(r"[0-9a-f]{64}", text), text
        x = batch(served, 1)
        for name in ("good", "fallback", "twice"):
            assert client.post(f"/v2/models/{name}/infer", json=infer_json(x)).status_code == 200
    refusals = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR and "REFUSED" in r.getMessage()]
    assert any(re.search(r"model fallback version 2: .*sha256 is [0-9a-f]{64}, metadata.json says", m) for m in refusals)
    assert any("model unreadable version 1" in m for m in refusals) and any("model nometa version 1" in m for m in refusals)
    assert not any("good" in m or "twice" in m for m in refusals)


def test_pinned_versions(mixed_repo):
    settings = ServeSettings(models=mixed_repo, pinned_versions={"twice": 1, "fallback": 2, "absent": 1})
    with TestClient(create_app(settings)) as client:
        assert client.get("/v2/models/twice").json()["versions"] == ["1"]
        r = client.get("/v2/models/fallback")  # pinned to the corrupted version: no silent fallback
        assert r.status_code == 404 and "version 2 refused" in r.json()["error"]
        r = client.get("/v2/models/absent")
        assert r.status_code == 404 and "version 1 refused" in r.json()["error"]


def test_not_ready_when_no_model_loads(mixed_repo, tmp_path):
    shutil.copytree(mixed_repo / "unreadable", tmp_path / "unreadable")
    with TestClient(create_app(ServeSettings(models=tmp_path))) as client:
        assert client.get("/v2/health/live").status_code == 200
        r = client.get("/v2/health/ready")
        assert (r.status_code, r.content) == (400, b"")


def test_missing_repository_fails_startup(tmp_path):
    with pytest.raises(FileNotFoundError, match="REFINER_SERVE_MODELS"):
        with TestClient(create_app(ServeSettings(models=tmp_path / "nope"))):
            pass


# --- settings and providers ----------------------------------------------------------------------


def test_settings_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("REFINER_SERVE_MODELS", str(tmp_path))
    monkeypatch.setenv("REFINER_SERVE_PINNED_VERSIONS", '{"digits": 3}')
    monkeypatch.setenv("REFINER_SERVE_BATCHING", "false")
    monkeypatch.setenv("REFINER_SERVE_MAX_QUEUE_DELAY_MS", "5")
    s = ServeSettings()
    assert (s.models, s.pinned_versions, s.batching, s.max_queue_delay_ms) == (tmp_path, {"digits": 3}, False, 5.0)
    with pytest.raises(ValueError, match="max_image_pixels"):
        ServeSettings(max_image_pixels=PILLOW_MAX_IMAGE_PIXELS)


def test_providers_follow_real_devices(monkeypatch):
    import serving.runtime as runtime

    assert choose_providers("cpu") == [CPU]
    monkeypatch.setattr(runtime, "cuda_device_count", lambda: 0)
    assert choose_providers("auto") == [CPU]
    with pytest.raises(DeviceError, match="no CUDA device is usable"):
        choose_providers("cuda")
    if CUDA in ort.get_available_providers():
        monkeypatch.setattr(runtime, "cuda_device_count", lambda: 1)
        assert choose_providers("auto") == [CUDA, CPU]


# --- dynamic batching ----------------------------------------------------------------------------


def _run_batcher(rows: list[int], coalesce: bool = True, queue_size: int = 64, infer=None):
    """Submit requests of `rows` rows at once to a batcher (max batch 8); return what happened."""
    stats: list[BatchStats] = []
    threads: set[int] = set()

    def double(x: np.ndarray) -> np.ndarray:
        threads.add(threading.get_ident())
        return x * 2

    async def main():
        batcher = DynamicBatcher("m", infer or double, 8, 0.05, queue_size, coalesce, stats.append)
        batcher.start()
        try:
            xs = [np.full((n, 2), i, np.float32) for i, n in enumerate(rows)]
            results = await asyncio.gather(*(batcher.infer(x) for x in xs), return_exceptions=True)
            return xs, results, threading.get_ident()
        finally:
            await batcher.close(1)

    xs, results, loop_thread = asyncio.run(main())
    return xs, results, stats, threads, loop_thread


def test_batcher_coalesces_concurrent_requests_off_the_event_loop():
    xs, results, stats, threads, loop_thread = _run_batcher([1, 3, 2, 2, 4, 1])
    for x, y in zip(xs, results):
        np.testing.assert_array_equal(y, x * 2)  # each request gets its own rows back
    assert [s.rows for s in stats] == [8, 5]  # 1+3+2+2 fill the first batch; 4+1 the second
    assert loop_thread not in threads


def test_batcher_without_coalescing_runs_requests_alone():
    _, results, stats, _, _ = _run_batcher([1, 2, 1], coalesce=False)
    assert [s.rows for s in stats] == [1, 2, 1] and all(isinstance(r, np.ndarray) for r in results)


def test_batcher_queue_full_is_503():
    _, results, _, _, _ = _run_batcher([1] * 6, queue_size=2)
    refused = [r for r in results if isinstance(r, Unavailable)]
    assert refused and all(r.status_code == 503 and "queue limit" in r.message for r in refused)


def test_batcher_inference_error_fails_the_batch_only():
    def broken(x: np.ndarray) -> np.ndarray:
        raise RuntimeError("boom")

    _, results, _, _, _ = _run_batcher([1, 1], infer=broken)
    assert all(isinstance(r, InferenceFailed) and "boom" in r.message for r in results)


def test_batcher_waits_only_for_announced_requests():
    """A lone request runs at once; one announced while a batch forms joins it (within the delay)."""
    stats: list[BatchStats] = []

    async def main():
        batcher = DynamicBatcher("m", lambda x: x * 2, 8, 5.0, 8, on_batch=stats.append)  # delay 5 s
        batcher.start()
        t0 = time.perf_counter()
        await batcher.infer(np.zeros((1, 2), np.float32))
        lone = time.perf_counter() - t0
        with batcher.arrival() as coming:
            first = asyncio.ensure_future(batcher.infer(np.ones((1, 2), np.float32)))
            await asyncio.sleep(0.05)  # still reading its body, say
            second = await coming.infer(np.full((2, 2), 3, np.float32))
        np.testing.assert_array_equal(await first, [[2, 2]])
        np.testing.assert_array_equal(second, [[6, 6], [6, 6]])
        await batcher.close(1)
        return lone

    assert asyncio.run(main()) < 1.0
    assert [s.rows for s in stats] == [1, 3]


def test_batcher_close_fails_what_cannot_finish():
    async def main():
        batcher = DynamicBatcher("m", lambda x: x, 8, 10.0, 4)
        batcher.start()
        with batcher.arrival():  # announced but never sent: the batch would wait 10 s for it
            pending = asyncio.ensure_future(batcher.infer(np.zeros((1, 2), np.float32)))
            await asyncio.sleep(0.01)
            await batcher.close(0.05)
        with pytest.raises(Unavailable, match="shutting down"):
            await batcher.infer(np.zeros((1, 2), np.float32))
        return await asyncio.gather(pending, return_exceptions=True)

    (result,) = asyncio.run(main())
    assert isinstance(result, Unavailable) and "shut down" in result.message


# --- bad input: every one a 4xx with a specific message, never a 5xx ------------------------------


def _png_header(width: int, height: int) -> bytes:
    """A valid PNG header declaring width x height, with no pixel data (what a decompression bomb declares)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def _jpeg_declaring(width: int, height: int) -> bytes:
    data = bytearray(encode(random_image(8, 8), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def _truncated(fmt: str) -> bytes:
    data = encode(random_image(64, 64, seed=7), fmt)
    return data[: len(data) // 2]


def _bad_crc_png() -> bytes:
    data = bytearray(_png_header(10, 10))
    data[20] ^= 0xFF
    return bytes(data)


def _other_format(fmt: str) -> bytes:
    buf = io.BytesIO()
    random_image(16, 16).save(buf, fmt)
    return buf.getvalue()


def _binary_infer(s: Served, n: int = 1, size_delta: int = 0, extra: bytes = b"", header_len: str | None = None, nan: bool = False):
    x = batch(s, n)
    if nan:
        x.flat[7] = np.nan
    header = json.dumps({
        "inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "parameters": {"binary_data_size": x.nbytes + size_delta}}]
    }).encode()  # fmt: skip
    length = header_len if header_len is not None else str(len(header))
    return {"content": header + x.tobytes() + extra, "headers": {"Inference-Header-Content-Length": length}}


def _v2(s: Served, n: int = 1, copies: int = 1, extra: dict[str, Any] | None = None, **changes: Any) -> dict[str, Any]:
    """A JSON infer request (NaN allowed) for `n` rows, with the input tensor's fields changed."""
    x = batch(s, n)
    tensor = {"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist(), **changes}
    body = {"inputs": [tensor] * copies, **(extra or {})}
    return {"content": json.dumps(body).encode(), "headers": {"Content-Type": "application/json"}}


def _values(s: Served, value: Any) -> list[Any]:
    return [value] * int(np.prod(s.input_shape))


BODY_LIMIT = 1_000_000  # of the app under bad input (a full JSON batch of 32 3x16x16 images fits)
PIXEL_LIMIT = 1_000_000
I, C = "/v2/models/{m}/infer", "/v1/models/{m}/classify"
_Case = tuple[str, str, Callable[[Served], dict[str, Any]], int, str]
BAD_INPUTS: dict[str, _Case] = {
    # classify: images
    "empty body": ("POST", C, lambda s: {"content": b""}, 400, "body is empty; expected a JPEG or PNG"),
    "text, not an image": ("POST", C, lambda s: {"content": b"hello world"}, 415, "not a JPEG or PNG image"),
    "JSON, not an image": ("POST", C, lambda s: {"json": {"image": "x"}}, 415, "not a JPEG or PNG image"),
    "GIF": ("POST", C, lambda s: {"content": _other_format("GIF")}, 415, r"starting b'GIF8"),
    "BMP": ("POST", C, lambda s: {"content": _other_format("BMP")}, 415, "not a JPEG or PNG image"),
    "TIFF": ("POST", C, lambda s: {"content": _other_format("TIFF")}, 415, "not a JPEG or PNG image"),
    "truncated PNG": ("POST", C, lambda s: {"content": _truncated("PNG")}, 400, "PNG image data is truncated"),
    "truncated JPEG": ("POST", C, lambda s: {"content": _truncated("JPEG")}, 400, "JPEG image data is truncated"),
    "PNG header without pixels": ("POST", C, lambda s: {"content": _png_header(10, 10)}, 400, "truncated or corrupt"),
    "PNG with bad checksum": ("POST", C, lambda s: {"content": _bad_crc_png()}, 400, "PNG image header is corrupt"),
    "PNG signature only": ("POST", C, lambda s: {"content": b"\x89PNG\r\n\x1a\n"}, 400, "PNG image header is corrupt"),
    "PNG bomb 100000^2": ("POST", C, lambda s: {"content": _png_header(100_000, 100_000)}, 413, "decompression bomb.*at most 1000000 pixels"),
    "PNG bomb 10000^2": ("POST", C, lambda s: {"content": _png_header(10_000, 10_000)}, 413, "10000x10000 = 100000000 pixels; at most 1000000"),
    "PNG over pixel limit": ("POST", C, lambda s: {"content": _png_header(2000, 501)}, 413, "2000x501 = 1002000 pixels; at most 1000000"),
    "JPEG bomb": ("POST", C, lambda s: {"content": _jpeg_declaring(65000, 65000)}, 413, "decompression bomb"),
    "body over limit": ("POST", C, lambda s: {"content": b"\0" * (BODY_LIMIT + 1)}, 413, f"limit is {BODY_LIMIT} bytes"),
    "chunked body over limit": ("POST", C, lambda s: {"content": iter([b"\0" * (BODY_LIMIT // 2)] * 3)}, 413, f"exceeds the limit of {BODY_LIMIT}"),
    "gzip body": ("POST", C, lambda s: {"content": b"x", "headers": {"Content-Encoding": "gzip"}}, 415, "Content-Encoding 'gzip' is not accepted"),
    "top_k 0": ("POST", C + "?top_k=0", lambda s: {"content": b"x"}, 422, "top_k: Input should be greater than or equal to 1"),
    "top_k not a number": ("POST", C + "?top_k=many", lambda s: {"content": b"x"}, 422, "top_k: Input should be a valid integer"),
    "top_k over classes": ("POST", C + "?top_k=99", lambda s: {"content": b"x"}, 400, r"top_k is 99; model .* has \d+ classes"),
    "classify unknown model": ("POST", "/v1/models/nope/classify", lambda s: {"content": b"x"}, 404, r"unknown model 'nope'; the repository index \(POST /v2/repository/index\) lists the models"),
    "classify unknown version": ("POST", "/v1/models/{m}/versions/7/classify", lambda s: {"content": b"x"}, 404, "no version '7' loaded"),
    "multipart without file": ("POST", C, lambda s: {"files": {"text": (None, "hello")}}, 400, "0 file parts"),
    "multipart with two files": ("POST", C, lambda s: {"files": [("a", ("a.png", b"1")), ("b", ("b.png", b"2"))]}, 400, "malformed multipart.*Too many files"),
    "multipart without boundary": ("POST", C, lambda s: {"content": b"--x\r\n", "headers": {"Content-Type": "multipart/form-data"}}, 400, "malformed multipart"),
    "multipart file not an image": ("POST", C, lambda s: {"files": {"file": ("a.png", b"text")}}, 415, "not a JPEG or PNG image"),
    # v2 infer
    "malformed JSON": ("POST", I, lambda s: {"content": b'{"inputs": [', "headers": {"Content-Type": "application/json"}}, 400, "not valid JSON"),
    "not UTF-8": ("POST", I, lambda s: {"content": b"\xff\xfe\x00"}, 400, "not valid JSON"),
    "JSON list": ("POST", I, lambda s: {"json": [1, 2]}, 400, "request body is a JSON list"),
    "no inputs": ("POST", I, lambda s: {"json": {"outputs": []}}, 400, "inputs: Field required"),
    "unknown field": ("POST", I, lambda s: _v2(s, extra={"input": 1}), 400, "input: Extra inputs are not permitted"),
    "wrong input name": ("POST", I, lambda s: _v2(s, name="image"), 400, r"inputs are \['image'\]; model .* takes exactly one input 'input' FP32"),
    "two inputs": ("POST", I, lambda s: _v2(s, copies=2), 400, r"inputs are \['input', 'input'\]"),
    "FP64": ("POST", I, lambda s: _v2(s, datatype="FP64"), 400, "datatype 'FP64'; expected FP32"),
    "INT8": ("POST", I, lambda s: _v2(s, datatype="INT8"), 400, "datatype 'INT8'; expected FP32"),
    "shape without batch": ("POST", I, lambda s: _v2(s, shape=s.input_shape), 400, r"has shape \[3, .*expected \[N, 3, "),
    "wrong image size": ("POST", I, lambda s: _v2(s, shape=[1, 3, 5, 5]), 400, r"shape \[1, 3, 5, 5\]; expected \[N, "),
    "batch 0": ("POST", I, lambda s: _v2(s, shape=[0, *s.input_shape]), 400, r"with 1 <= N <= \d+"),
    "batch over max": ("POST", I, lambda s: _v2(s, s.max_batch_size + 1), 400, r"1 <= N <= \d+ \(the model's max batch size\)"),
    "shape of strings": ("POST", I, lambda s: _v2(s, shape=["1", *s.input_shape]), 400, "shape.0: Input should be a valid integer"),
    "too few values": ("POST", I, lambda s: _v2(s, data=[0.0] * 5), 400, r"has 5 values; shape \[1, .*\] needs \d+"),
    "strings as data": ("POST", I, lambda s: _v2(s, data=_values(s, "a")), 400, "not only numbers"),
    "booleans as data": ("POST", I, lambda s: _v2(s, data=_values(s, True)), 400, "not only numbers"),
    "ragged data": ("POST", I, lambda s: _v2(s, data=[[1.0, 2.0], [3.0]]), 400, "not a regular"),
    "NaN (not JSON)": ("POST", I, lambda s: _v2(s, data=_values(s, float("nan"))), 400, "not valid JSON"),
    "infinite values (not JSON)": ("POST", I, lambda s: _v2(s, data=_values(s, float("-inf"))), 400, "not valid JSON"),
    "NaN in binary data": ("POST", I, lambda s: _binary_infer(s, nan=True), 400, "NaN or infinite values"),
    "no data": ("POST", I, lambda s: _v2(s, data=None), 400, "no 'data' and no parameters.binary_data_size"),
    "unknown output": ("POST", I, lambda s: _v2(s, extra={"outputs": [{"name": "probs"}]}), 400, r"requested outputs \['probs'\]; model .* has one output 'logits'"),
    "classification extension": ("POST", I, lambda s: _v2(s, extra={"outputs": [{"name": "logits", "parameters": {"classification": 3}}]}), 400, r"parameters \['classification'\] are not supported"),
    "shared memory": ("POST", I, lambda s: _v2(s, parameters={"shared_memory_region": "r"}), 400, "not supported"),
    "binary: header length not a number": ("POST", I, lambda s: _binary_infer(s, header_len="ten"), 400, "Inference-Header-Content-Length is 'ten'"),
    "binary: header length past the body": ("POST", I, lambda s: _binary_infer(s, header_len="999999"), 400, r"body has \d+ bytes"),
    "binary: wrong size": ("POST", I, lambda s: _binary_infer(s, size_delta=-4), 400, r"binary_data_size is \d+ .* needs \d+ bytes"),
    "binary: trailing bytes": ("POST", I, lambda s: _binary_infer(s, extra=b"xx"), 400, r"binary section has \d+ bytes"),
    "binary without header": ("POST", I, lambda s: {"content": _binary_infer(s)["content"]}, 400, "not valid JSON"),
    "binary and data": ("POST", I, lambda s: _v2(s, parameters={"binary_data_size": 4}), 400, "both 'data' and parameters.binary_data_size"),
    "infer body over limit": ("POST", I, lambda s: {"content": b" " * (BODY_LIMIT + 1)}, 413, "limit is"),
    "infer unknown model": ("POST", "/v2/models/nope/infer", lambda s: _v2(s), 404, "unknown model 'nope'"),
    "infer unknown version": ("POST", "/v2/models/{m}/versions/2/infer", lambda s: _v2(s), 404, "has no version '2' loaded; the served version is \\d+"),
    "infer non-integer version": ("POST", "/v2/models/{m}/versions/latest/infer", lambda s: _v2(s), 404, "has no version 'latest'"),
    "metadata unknown model": ("GET", "/v2/models/nope", lambda s: {}, 404, "unknown model 'nope'"),
    "metadata unknown version": ("GET", "/v2/models/{m}/versions/9", lambda s: {}, 404, "has no version '9' loaded; the served version is \\d+"),
    "ready unknown model": ("GET", "/v2/models/nope/ready", lambda s: {}, 404, "unknown model 'nope'"),
    "ready unknown version": ("GET", "/v2/models/{m}/versions/9/ready", lambda s: {}, 404, "has no version '9' loaded"),
    "config unknown model": ("GET", "/v2/models/nope/config", lambda s: {}, 404, "unknown model 'nope'"),
    "config unknown version": ("GET", "/v2/models/{m}/versions/9/config", lambda s: {}, 404, "has no version '9' loaded"),
    "index ready not a boolean": ("POST", "/v2/repository/index", lambda s: {"json": {"ready": "yes"}}, 400, "\"ready\" is 'yes'; expected true or false"),
    "index body not JSON": ("POST", "/v2/repository/index", lambda s: {"content": b"[1"}, 400, "takes an empty body or"),
    "load body not JSON": ("POST", "/v2/repository/models/{m}/load", lambda s: {"content": b"[1"}, 400, "a load request takes an empty body or a JSON object"),
    "load with a config override": ("POST", "/v2/repository/models/{m}/load", lambda s: {"json": {"parameters": {"config": "{}"}}}, 400, r"load parameters \['config'\] are not supported"),
    "unload body a list": ("POST", "/v2/repository/models/{m}/unload", lambda s: {"json": [1]}, 400, "an unload request takes an empty body or a JSON object"),
    "GET infer": ("GET", I, lambda s: {}, 405, "method GET is not allowed"),
    "unknown endpoint": ("GET", "/v3/models", lambda s: {}, 404, "no such endpoint '/v3/models'"),
}  # fmt: skip


@pytest.fixture(scope="module")
def strict_client(served: Served):
    settings = ServeSettings(models=served.models, max_body_bytes=BODY_LIMIT, max_image_bytes=BODY_LIMIT, max_image_pixels=PIXEL_LIMIT)
    with TestClient(create_app(settings)) as c:
        yield c


def test_bad_inputs_reach_every_route_that_takes_input_and_distinct_checks(strict_client, served):
    """Measured on the server, not by counting the corpus: every route of its OpenAPI schema that takes a body or a
    parameter is sent bad input, and the answers name 60+ different problems."""
    paths = strict_client.get("/openapi.json").json()["paths"]
    routes = {
        (method.upper(), path) for path, operations in paths.items() for method, op in operations.items()
        if method == "post" or op.get("parameters")
    }  # fmt: skip
    reached, answers = set(), set()
    for method, path, make, _, _ in BAD_INPUTS.values():
        url = path.format(m=served.name)
        reached |= {(m, p) for m, p in routes if m == method and re.fullmatch(re.sub(r"\{\w+\}", "[^/]+", p), url.split("?")[0])}
        r = strict_client.request(method, url, **make(served))
        answers.add((r.status_code, r.json()["error"]))
    assert {("POST", "/v2/models/{name}/infer"), ("POST", "/v1/models/{name}/classify"), ("GET", "/v2/models/{name}/versions/{version}")} <= routes
    assert routes - reached == set()
    assert len(answers) >= 60


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_a_4xx_saying_what_was_expected(strict_client, served, case):
    method, path, make, status, message = BAD_INPUTS[case]
    r = strict_client.request(method, path.format(m=served.name), **make(served))
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    assert set(r.json()) == {"error"} and re.search(message, r.json()["error"]), r.json()["error"]


def test_server_keeps_serving_after_bad_inputs_without_any_5xx(strict_client, served):
    for method, path, make, _, _ in BAD_INPUTS.values():
        strict_client.request(method, path.format(m=served.name), **make(served))
    x = batch(served, 1)
    assert strict_client.post(f"/v2/models/{served.name}/infer", json=infer_json(x)).status_code == 200
    text = strict_client.get("/metrics").text
    statuses = set(re.findall(r'refiner_http_requests_total\{.*status="(\d+)"\}', text))
    assert statuses and not any(s.startswith("5") for s in statuses), statuses


# --- a live server: stock tritonclient, streaming body limit, graceful shutdown -------------------


@pytest.fixture(scope="module")
def live(served: Served):
    with Live(ServeSettings(models=served.models, max_body_bytes=BODY_LIMIT, max_image_bytes=BODY_LIMIT)) as server:
        yield server


def test_stock_tritonclient_works_unchanged(live, served):
    import tritonclient.http as triton
    from tritonclient.utils import InferenceServerException

    client = triton.InferenceServerClient(url=f"127.0.0.1:{live.port}")
    try:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready(served.name) and client.is_model_ready(served.name, str(served.version))
        meta = client.get_model_metadata(served.name)
        assert meta["inputs"][0]["shape"] == [-1, *served.input_shape]
        assert client.get_model_config(served.name)["max_batch_size"] == served.max_batch_size
        assert client.get_server_metadata()["name"] == "refiner-serving"
        x = batch(served, 4, seed=11)
        expected = served.session.run(None, {"input": x})[0]
        for binary in (False, True):
            inp = triton.InferInput("input", list(x.shape), "FP32")
            inp.set_data_from_numpy(x, binary_data=binary)
            out = triton.InferRequestedOutput("logits", binary_data=binary)
            result = client.infer(served.name, [inp], outputs=[out], request_id="r1", model_version=str(served.version))
            np.testing.assert_allclose(result.as_numpy("logits"), expected, rtol=1e-5, atol=1e-6)
            assert result.get_response()["id"] == "r1"
        result = client.infer(served.name, [inp])  # no outputs named: the client asks for binary_data_output
        np.testing.assert_allclose(result.as_numpy("logits"), expected, rtol=1e-5, atol=1e-6)
        with pytest.raises(InferenceServerException, match="unknown model 'nope'"):
            client.infer("nope", [inp])
    finally:
        client.close()


def test_body_limit_is_enforced_while_streaming(live, served):
    """A chunked body without Content-Length that never ends: 413 as soon as the limit is passed."""
    with socket.create_connection(("127.0.0.1", live.port), timeout=10) as sock:
        sock.sendall(
            f"POST /v1/models/{served.name}/classify HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
        )
        # Exactly the limit, then one byte more: the server has read all that was sent when it answers,
        # so closing the connection cannot reset it under the response.
        for chunk in [b"\0" * 50_000] * (BODY_LIMIT // 50_000) + [b"\0"]:
            sock.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
        response = b""  # the body's last chunk was never sent: the server answers and closes
        while data := sock.recv(65536):
            response += data
    assert response.startswith(b"HTTP/1.1 413"), response[:200]
    assert b"connection: close" in response.lower() and b"exceeds the limit of" in response


def test_graceful_shutdown_stops_readiness_and_drains_in_flight(served):
    """A request half uploaded when shutdown starts still gets its answer; readiness turns false at once."""
    x = batch(served, 2)
    request = _binary_infer(served, 2)
    head = (
        f"POST /v2/models/{served.name}/infer HTTP/1.1\r\nHost: test\r\nContent-Length: {len(request['content'])}\r\n"
        f"Inference-Header-Content-Length: {request['headers']['Inference-Header-Content-Length']}\r\n\r\n"
    ).encode()
    half = len(request["content"]) // 2
    with Live(ServeSettings(models=served.models)) as live:
        with socket.create_connection(("127.0.0.1", live.port), timeout=10) as sock:
            sock.sendall(head + request["content"][:half])
            while live.state.in_flight == 0:
                time.sleep(0.005)
            live.server.handle_exit(15, None)  # SIGTERM
            assert not live.state.ready
            time.sleep(0.1)
            sock.sendall(request["content"][half:])
            response = b""
            while data := sock.recv(65536):
                response += data
        live.thread.join(10)
        assert not live.thread.is_alive()
    assert response.startswith(b"HTTP/1.1 200"), response[:300]
    (out,) = json.loads(response.split(b"\r\n\r\n", 1)[1])["outputs"]
    got = np.asarray(out["data"], np.float32).reshape(out["shape"])
    np.testing.assert_allclose(got, served.session.run(None, {"input": x})[0], rtol=1e-5, atol=1e-6)


# --- package boundary ----------------------------------------------------------------------------


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nprint(' '.join(sys.modules))"], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_serving_does_not_import_refiner():
    code = (
        "import importlib, pkgutil, sys, serving\n"
        "for m in pkgutil.iter_modules(serving.__path__): importlib.import_module('serving.' + m.name)"
    )
    modules = _modules_after(code)
    assert "serving.app" in modules and not any(m == "refiner" or m.startswith("refiner.") for m in modules)


def test_refiner_does_not_import_fastapi():
    modules = _modules_after("import sys, refiner, refiner.cli")
    assert "refiner.cli" in modules and not {"fastapi", "starlette", "uvicorn", "serving"} & modules




@pytest.mark.needs_cuda
def test_cuda_provider_runs_through_io_binding_and_matches_cpu(served):
    from serving.artifact import read_artifact
    from serving.runtime import ModelRuntime

    artifact = read_artifact(served.models, served.name, served.version)
    gpu = ModelRuntime(artifact, choose_providers("cuda"))
    assert gpu.provider == CUDA
    x = batch(served, 5)
    np.testing.assert_allclose(gpu.run(x), served.session.run(None, {"input": x})[0], rtol=1e-4, atol=1e-5)


def test_repository_index_lists_ready_and_refused_versions(mixed_repo):
    import tritonclient.http as triton

    with TestClient(create_app(ServeSettings(models=mixed_repo))) as client:
        rows = client.post("/v2/repository/index").json()
        assert {(r["name"], r["version"], r["state"]) for r in rows} == {
            ("fallback", "1", "READY"), ("fallback", "2", "UNAVAILABLE"), ("good", "1", "READY"), ("nometa", "1", "UNAVAILABLE"),
            ("twice", "2", "READY"), ("unreadable", "1", "UNAVAILABLE"),
        }  # fmt: skip
        assert all(str(mixed_repo) not in r.get("reason", "") for r in rows)
        assert {r["state"] for r in client.post("/v2/repository/index", json={"ready": True}).json()} == {"READY"}
        assert client.post("/v2/repository/index", json={"ready": "yes"}).status_code == 400
    with Live(ServeSettings(models=mixed_repo)) as live:  # the stock client reads it too
        index = triton.InferenceServerClient(url=f"127.0.0.1:{live.port}").get_model_repository_index()
        assert {r["name"] for r in index} == {"fallback", "good", "nometa", "twice", "unreadable"}


# --- model control and exit status through the CLI (issue 17, points 6 and 7) ----------------------


@pytest.mark.parametrize("command", [["refiner", "serve"], ["serving"]], ids=["refiner serve", "python -m serving"])
def test_serve_polls_new_versions_and_exits_0_after_a_sigterm_drain(served, tmp_path, command):
    import httpx

    repo = tmp_path / "models"
    copy_version(served, repo, "m", 1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", *command, "--models", str(repo), "--port", str(port), "--model-control", "poll", "--poll-s", "0.2"]
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=tmp_path)
    url = f"http://127.0.0.1:{port}/v2/models/m"

    def versions() -> list[str] | None:
        try:
            return httpx.get(url).json().get("versions")
        except httpx.TransportError:
            return None

    try:
        deadline = time.monotonic() + 90
        while versions() != ["1"]:
            assert time.monotonic() < deadline and process.poll() is None, "server did not start"
            time.sleep(0.1)
        copy_version(served, repo, "m", 2, atomic=True)
        while versions() != ["2"]:
            assert time.monotonic() < deadline and process.poll() is None, "version 2 was not picked up"
            time.sleep(0.1)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0, process.stdout.read().decode()
        out = process.stdout.read().decode()
        assert "model m: version 2 replaces version 1" in out and "shutdown complete" in out, out
    finally:
        if process.poll() is None:
            process.kill()
