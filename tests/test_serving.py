"""Serving: every endpoint and error through TestClient, equivalence with refiner's own preprocessing
and the exported model, artifact refusal, batching, and the import boundary between the packages.

Bad inputs are in test_serving_bad_input.py; a live uvicorn server with a stock v2 client in
test_serving_client.py. All use the `served` artifact fixture below.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from serving.app import create_app
from serving.artifact import discover
from serving.batching import BatchStats, DynamicBatcher
from serving.errors import InferenceFailed, Unavailable
from serving.images import preprocess
from serving.runtime import CPU, CUDA, choose_providers
from serving.settings import PILLOW_MAX_IMAGE_PIXELS, ServeSettings
from serving_artifact import Served, copy_version, png_bytes, random_image

pytestmark = pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")


@pytest.fixture(scope="module")
def client(served: Served):
    with TestClient(create_app(ServeSettings(models=served.models))) as c:
        yield c


def _infer_json(x: np.ndarray, name: str = "input", **extra) -> dict:
    return {"inputs": [{"name": name, "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}], **extra}


def _batch(served: Served, n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *served.input_shape)).astype(np.float32)


# --- health, metadata, docs ----------------------------------------------------------------------


def test_health_and_server_metadata(client):
    assert client.get("/v2/health/live").json() == {"live": True}
    r = client.get("/v2/health/ready")
    assert (r.status_code, r.json()) == (200, {"ready": True})
    meta = client.get("/v2").json()
    assert meta["name"] == "refiner-serving" and "binary_tensor_data" in meta["extensions"]


def test_model_metadata_reports_signature_classes_and_provider(client, served):
    for path in (f"/v2/models/{served.name}", f"/v2/models/{served.name}/versions/{served.version}"):
        meta = client.get(path).json()
        assert meta["name"] == served.name and meta["versions"] == [str(served.version)]
        assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, *served.input_shape]}]
        assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, len(served.class_names)]}]
        assert meta["parameters"]["execution_provider"] == CPU  # this machine has no GPU
        assert meta["parameters"]["class_names"] == served.class_names
        assert meta["parameters"]["preprocess"]["input_size"] == [3, *served.input_shape[1:]]


def test_model_ready_and_config(client, served):
    for prefix in (f"/v2/models/{served.name}", f"/v2/models/{served.name}/versions/{served.version}"):
        assert client.get(prefix + "/ready").json() == {"name": served.name, "ready": True}
        config = client.get(prefix + "/config").json()
        assert config["max_batch_size"] == served.max_batch_size and config["input"][0]["dims"] == served.input_shape


def test_openapi_docs_list_every_endpoint(client):
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    for path in (
        "/v2/health/live", "/v2/health/ready", "/v2", "/v2/models/{name}", "/v2/models/{name}/versions/{version}",
        "/v2/models/{name}/ready", "/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer",
        "/v1/models/{name}/classify", "/metrics",
    ):
        assert path in paths, path
    assert "image/png" in paths["/v1/models/{name}/classify"]["post"]["requestBody"]["content"]


# --- equivalence with refiner -------------------------------------------------------------------


def _test_images() -> list[Image.Image]:
    rgb = random_image(40, 30, seed=1)
    jpeg = io.BytesIO()
    rgb.save(jpeg, "JPEG", quality=90)
    return [
        rgb,
        random_image(16, 16, seed=2),  # already at input size: no resize
        random_image(7, 50, seed=3).convert("L"),
        random_image(33, 17, seed=4).convert("RGBA"),
        random_image(20, 20, seed=5).convert("P"),
        Image.open(io.BytesIO(jpeg.getvalue())),
    ]


def test_preprocessing_is_identical_to_refiners(served):
    from refiner.datasets import Preprocess as RefinerPreprocess
    from refiner.datasets import preprocess_image

    from serving.artifact import Preprocess

    raw = served.metadata["preprocess"]
    ours, theirs = Preprocess.model_validate(raw), RefinerPreprocess.model_validate(raw)
    for image in _test_images():
        a, b = preprocess(image, ours), preprocess_image(image, theirs)
        assert a.dtype == b.dtype == np.float32 and a.shape == b.shape == tuple(served.input_shape)
        assert np.array_equal(a, b)


def test_v2_json_round_trip_equals_onnx_session(client, served):
    x = _batch(served, 3)
    r = client.post(f"/v2/models/{served.name}/infer", json=_infer_json(x, id="req-7"))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"] == "req-7" and body["model_name"] == served.name and body["model_version"] == str(served.version)
    (out,) = body["outputs"]
    assert out["name"] == "logits" and out["datatype"] == "FP32" and out["shape"] == [3, len(served.class_names)]
    expected = served.session().run(None, {"input": x})[0]
    np.testing.assert_allclose(np.asarray(out["data"], np.float32).reshape(out["shape"]), expected, rtol=1e-5, atol=1e-6)


def test_v2_nested_data_and_versioned_route(client, served):
    x = _batch(served, 1, seed=3)
    body = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.tolist()}]}
    r = client.post(f"/v2/models/{served.name}/versions/{served.version}/infer", json=body)
    expected = served.session().run(None, {"input": x})[0]
    np.testing.assert_allclose(np.asarray(r.json()["outputs"][0]["data"]).reshape(expected.shape), expected, atol=1e-6)


def test_v2_binary_tensor_extension(client, served):
    x = _batch(served, 2, seed=5)
    header = json.dumps({
        "inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                    "parameters": {"binary_data_size": x.nbytes}}],
        "outputs": [{"name": "logits", "parameters": {"binary_data": True}}],
    }).encode()
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
    np.testing.assert_allclose(got, served.session().run(None, {"input": x})[0], rtol=1e-5, atol=1e-6)


def test_classify_equals_refined_model_on_refiners_preprocessing(client, served):
    from refiner.datasets import Preprocess as RefinerPreprocess
    from refiner.datasets import preprocess_image

    pre = RefinerPreprocess.model_validate(served.metadata["preprocess"])
    session = served.session()
    for i, image in enumerate(_test_images()):
        data = png_bytes(image) if i % 2 else _jpeg_or_png(image)
        r = client.post(f"/v1/models/{served.name}/classify?top_k={len(served.class_names)}", content=data)
        assert r.status_code == 200, r.text
        preds = r.json()["predictions"]
        with Image.open(io.BytesIO(data)) as decoded:
            x = preprocess_image(decoded, pre)[None]
        logits = session.run(None, {"input": x})[0][0]
        probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
        assert preds[0]["label"] == served.class_names[int(np.argmax(logits))]
        if served.torch_model is not None:
            import torch

            with torch.inference_mode():
                assert preds[0]["index"] == int(served.torch_model(torch.from_numpy(x)).argmax(1))
        got = np.zeros(len(probs))
        for p in preds:
            got[p["index"]] = p["probability"]
        np.testing.assert_allclose(got, probs, atol=1e-6)
        assert [p["probability"] for p in preds] == sorted((p["probability"] for p in preds), reverse=True)


def _jpeg_or_png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, "JPEG", quality=85)
    return buf.getvalue()


def test_classify_multipart_and_default_top_k(served):
    settings = ServeSettings(models=served.models, top_k=2)
    with TestClient(create_app(settings)) as client:
        data = png_bytes(random_image(24, 24, seed=9))
        raw = client.post(f"/v1/models/{served.name}/classify", content=data, headers={"Content-Type": "image/png"})
        form = client.post(f"/v1/models/{served.name}/classify", files={"image": ("x.png", data, "image/png")})
        versioned = client.post(f"/v1/models/{served.name}/versions/{served.version}/classify?top_k=1", content=data)
    assert raw.status_code == form.status_code == versioned.status_code == 200
    assert raw.json() == form.json() and len(raw.json()["predictions"]) == 2
    assert versioned.json()["predictions"] == raw.json()["predictions"][:1]


# --- metrics -------------------------------------------------------------------------------------


def _metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_metrics_count_requests_latency_queue_and_batches(served):
    with TestClient(create_app(ServeSettings(models=served.models))) as client:
        x = _batch(served, 2)
        for _ in range(3):
            client.post(f"/v2/models/{served.name}/infer", json=_infer_json(x))
        client.get("/v2/models/nope")
        text = client.get("/metrics").text
    infer_route = "/v2/models/{name}/infer"
    assert _metric(text, "refiner_http_requests_total", route=infer_route, status="200") == 3
    assert _metric(text, "refiner_http_requests_total", route="/v2/models/{name}", status="404") == 1
    assert _metric(text, "refiner_http_request_duration_seconds_count", route=infer_route) == 3
    assert _metric(text, "refiner_http_request_duration_seconds_bucket", route=infer_route, le="+Inf") == 3
    # 3 requests of 2 rows plus the warm-up's single row
    assert _metric(text, "refiner_batch_size_count", model=served.name) == 4
    assert _metric(text, "refiner_batch_size_sum", model=served.name) == 7
    assert _metric(text, "refiner_queue_wait_seconds_count", model=served.name) == 4
    assert _metric(text, "refiner_model_loaded", model=served.name, provider=CPU) == 1


# --- artifacts: corrupted, unreadable, pinned, in-progress ----------------------------------------


@pytest.fixture(scope="module")
def mixed_repo(served: Served, tmp_path_factory) -> Path:
    """good (v1), fallback (v1 good, v2 sha256 mismatch), unreadable (ONNX garbage, matching sha256),
    nometa (no metadata.json), twice (v1, v2 good), plus in-progress folders to ignore."""
    repo = tmp_path_factory.mktemp("mixed")
    src = (served.models, served.name, served.version)
    copy_version(*src, repo, "good", 1)
    copy_version(*src, repo, "fallback", 1)
    copy_version(*src, repo, "fallback", 2, corrupt="flip")
    copy_version(*src, repo, "unreadable", 1, corrupt="garbage")
    copy_version(*src, repo, "nometa", 1)
    (repo / "nometa" / "1" / "metadata.json").unlink()
    copy_version(*src, repo, "twice", 1)
    copy_version(*src, repo, "twice", 2)
    shutil.copytree(repo / "good" / "1", repo / "good" / ".2.abc.tmp")  # a version still being written
    (repo / ".hidden").mkdir()
    return repo


def test_corrupted_versions_are_refused_while_others_serve(mixed_repo, served, caplog):
    caplog.set_level(logging.INFO, logger="serving")
    with TestClient(create_app(ServeSettings(models=mixed_repo))) as client:
        assert client.get("/v2/health/ready").json() == {"ready": True}
        versions = {name: client.get(f"/v2/models/{name}").json().get("versions") for name in discover(mixed_repo)}
        assert versions == {"fallback": ["1"], "good": ["1"], "nometa": None, "twice": ["2"], "unreadable": None}
        refused = client.get("/v2/models/fallback/versions/2")
        assert refused.status_code == 404 and "sha256" in refused.json()["error"]
        r = client.get("/v2/models/unreadable")
        assert r.status_code == 404 and "onnxruntime cannot load model.onnx" in r.json()["error"]
        r = client.get("/v2/models/nometa/ready")
        assert r.status_code == 404 and "metadata.json is missing" in r.json()["error"]
        x = _batch(served, 1)
        for name in ("good", "fallback", "twice"):
            assert client.post(f"/v2/models/{name}/infer", json=_infer_json(x)).status_code == 200
    refusals = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR and "REFUSED" in r.getMessage()]
    assert any(re.search(r"model fallback version 2: .*sha256 is [0-9a-f]{64}, metadata.json says", m) for m in refusals)
    assert any("model unreadable version 1" in m for m in refusals) and any("model nometa version 1" in m for m in refusals)


def test_pinned_versions(mixed_repo):
    settings = ServeSettings(models=mixed_repo, pinned_versions={"twice": 1, "fallback": 2, "absent": 1})
    with TestClient(create_app(settings)) as client:
        assert client.get("/v2/models/twice").json()["versions"] == ["1"]
        r = client.get("/v2/models/fallback")  # pinned to the corrupted version: no silent fallback
        assert r.status_code == 404 and "sha256" in r.json()["error"]
        r = client.get("/v2/models/absent")
        assert r.status_code == 404 and "pinned" in r.json()["error"]


def test_not_ready_when_no_model_loads(mixed_repo, tmp_path):
    shutil.copytree(mixed_repo / "unreadable", tmp_path / "unreadable")
    with TestClient(create_app(ServeSettings(models=tmp_path))) as client:
        assert client.get("/v2/health/live").status_code == 200
        r = client.get("/v2/health/ready")
        assert (r.status_code, r.json()) == (503, {"ready": False})


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
    with pytest.raises(Exception, match="no CUDA device is usable"):
        choose_providers("cuda")
    if CUDA in ort.get_available_providers():
        monkeypatch.setattr(runtime, "cuda_device_count", lambda: 1)
        assert choose_providers("auto") == [CUDA, CPU]


# --- dynamic batching ----------------------------------------------------------------------------


def _run_batcher(requests: list[int], coalesce: bool = True, queue_size: int = 64, infer=None):
    """Submit requests of the given row counts at once; return (outputs, batch stats, infer threads)."""
    stats: list[BatchStats] = []
    threads: set[int] = set()

    def double(x: np.ndarray) -> np.ndarray:
        threads.add(threading.get_ident())
        return x * 2

    async def main():
        batcher = DynamicBatcher("m", infer or double, 8, 0.05, queue_size, coalesce, stats.append)
        batcher.start()
        try:
            xs = [np.full((n, 2), i, np.float32) for i, n in enumerate(requests)]
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
    assert all(s.rows <= 8 for s in stats) and loop_thread not in threads


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


def test_batcher_close_fails_what_cannot_finish():
    async def main():
        batcher = DynamicBatcher("m", lambda x: x, 8, 10.0, 4)  # would wait 10 s for a fuller batch
        batcher.start()
        pending = asyncio.ensure_future(batcher.infer(np.zeros((1, 2), np.float32)))
        await asyncio.sleep(0.01)
        await batcher.close(0.05)
        with pytest.raises(Unavailable, match="shutting down"):
            await batcher.infer(np.zeros((1, 2), np.float32))
        return await asyncio.gather(pending, return_exceptions=True)

    (result,) = asyncio.run(main())
    assert isinstance(result, Unavailable) and "shut down" in result.message


def test_graceful_shutdown_stops_readiness_and_drains(served):
    """Requests in flight when shutdown starts still get their answer; readiness turns false."""
    settings = ServeSettings(models=served.models, max_queue_delay_ms=300)  # a lone request waits 300 ms
    app = create_app(settings)
    state = app.state.server
    x = _batch(served, 1)
    with TestClient(app) as client:
        answers = []
        worker = threading.Thread(
            target=lambda: answers.append(client.post(f"/v2/models/{served.name}/infer", json=_infer_json(x)))
        )
        worker.start()
        while state.in_flight == 0:
            pass
    # Leaving the block ran the lifespan's shutdown: it waited for the request in flight.
    worker.join()
    assert state.draining and not state.ready
    assert answers[0].status_code == 200


# --- package boundary ----------------------------------------------------------------------------


def _imports(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_serving_does_not_import_refiner():
    code = (
        "import pkgutil, importlib, sys, serving\n"
        "for m in pkgutil.iter_modules(serving.__path__): importlib.import_module('serving.' + m.name)\n"
        "print(' '.join(sys.modules))"
    )
    assert not any(m == "refiner" or m.startswith("refiner.") for m in _imports(code))


def test_refiner_does_not_import_fastapi():
    code = "import sys, refiner, refiner.cli\nprint(' '.join(sys.modules))"
    modules = _imports(code)
    assert "refiner" in modules and not {"fastapi", "uvicorn", "serving"} & modules
