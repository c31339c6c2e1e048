"""A seeded fuzzer against a live server: mutated JPEG, PNG, JSON and binary-extension requests never get a 5xx."""

from __future__ import annotations

import json
from collections.abc import Callable

import httpx
import numpy as np
import pytest
from serving_support import Live, batch, encode, infer_json, random_image

from serving.settings import ServeSettings

REQUESTS = 400
SEED = 20261125


def _flip(rng: np.random.Generator, data: bytes) -> bytes:
    out = bytearray(data)
    for i in rng.integers(0, len(out), size=rng.integers(1, 9)):
        out[i] ^= 1 << int(rng.integers(0, 8))
    return bytes(out)


def _truncate(rng: np.random.Generator, data: bytes) -> bytes:
    return data[: int(rng.integers(0, len(data)))]


def _insert(rng: np.random.Generator, data: bytes) -> bytes:
    i = int(rng.integers(0, len(data) + 1))
    return data[:i] + rng.bytes(int(rng.integers(1, 64))) + data[i:]


def _repeat(rng: np.random.Generator, data: bytes) -> bytes:
    i, j = sorted(rng.integers(0, len(data) + 1, size=2).tolist())
    return data[:j] + data[i:j] * int(rng.integers(1, 4)) + data[j:]


_ODD_VALUES = [None, True, "1", "", -1, 0, 2**70, 1e308, -0.0, [], {}, [[1.0]], {"a": 1}, "\u00b2", "FP16", [1] * 5]


def _mutate_json(rng: np.random.Generator, doc: object) -> object:
    """Replace one randomly chosen value (at any depth) of a JSON document with an odd one."""
    doc = json.loads(json.dumps(doc))
    parent, key = None, None
    node = doc
    for _ in range(int(rng.integers(1, 6))):
        if isinstance(node, dict) and node:
            key = list(node)[int(rng.integers(0, len(node)))]
        elif isinstance(node, list) and node:
            key = int(rng.integers(0, len(node)))
        else:
            break
        parent, node = node, node[key]
    value = _ODD_VALUES[int(rng.integers(0, len(_ODD_VALUES)))]
    if parent is None:
        return value
    parent[key] = value
    return doc


_BYTE_MUTATIONS: list[Callable[[np.random.Generator, bytes], bytes]] = [_flip, _truncate, _insert, _repeat]
_HEADER_LENGTHS = ["", "-1", "0", "99999999999999999999", "\u00b2", "12a", "+12", "1e3"]
_CONTENT_TYPES = ["image/png", "IMAGE/JPEG", "Multipart/Form-Data; boundary=x", "application/json", "text/plain", "", "multipart/form-data"]


def _case(rng: np.random.Generator, served, valid: dict[str, bytes]) -> tuple[str, bytes, dict[str, str | bytes]]:
    """One mutated request: (path, body, headers)."""
    infer, classify = f"/v2/models/{served.name}/infer", f"/v1/models/{served.name}/classify"
    kind = ["png", "jpeg", "json", "json-doc", "binary", "binary-header"][int(rng.integers(0, 6))]
    mutate = _BYTE_MUTATIONS[int(rng.integers(0, len(_BYTE_MUTATIONS)))]
    headers: dict[str, str | bytes] = {}
    if kind in ("png", "jpeg"):
        path, body = classify, mutate(rng, valid[kind])
        if rng.random() < 0.3:
            headers["Content-Type"] = _CONTENT_TYPES[int(rng.integers(0, len(_CONTENT_TYPES)))]
    elif kind == "json":
        path, body = infer, mutate(rng, valid["json"])
    elif kind == "json-doc":
        path, body = infer, json.dumps(_mutate_json(rng, json.loads(valid["json"]))).encode()
    else:
        header, tensor = valid["binary-header"], valid["binary-tensor"]
        if kind == "binary":
            header_length, body = str(len(header)), header + mutate(rng, tensor)
        else:
            mutated = mutate(rng, header)
            header_length = _HEADER_LENGTHS[int(rng.integers(0, len(_HEADER_LENGTHS)))] if rng.random() < 0.4 else str(len(mutated))
            body = mutated + tensor
        path = infer  # header values as bytes: 0xB2 (a Unicode digit in Latin-1) goes on the wire as is
        headers = {"Inference-Header-Content-Length": header_length.encode("latin-1"), "Content-Type": "application/octet-stream"}
    if rng.random() < 0.1:
        path = path.replace(served.name, served.name + "/versions/" + ["1", "01", "\u0661", "-1", "x"][int(rng.integers(0, 5))], 1)
    return path, body, headers


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_fuzzed_requests_never_get_a_5xx(served):
    rng = np.random.default_rng(SEED)
    x = batch(served, 2)
    binary_header = json.dumps(
        {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "parameters": {"binary_data_size": x.nbytes}}]}
    ).encode()
    valid = {
        "png": encode(random_image(20, 20)), "jpeg": encode(random_image(20, 20), "JPEG"),
        "json": json.dumps(infer_json(x)).encode(), "binary-header": binary_header, "binary-tensor": x.tobytes(),
    }  # fmt: skip
    statuses: dict[int, int] = {}
    with Live(ServeSettings(models=served.models, body_timeout_s=5.0)) as live, httpx.Client(base_url=f"http://127.0.0.1:{live.port}", timeout=10) as client:
        for i in range(REQUESTS):
            path, body, headers = _case(rng, served, valid)
            r = client.post(path, content=body, headers=headers)
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            assert r.status_code < 500, f"request {i} to {path} ({headers}) got {r.status_code}: {r.text[:300]}"
            assert r.headers["content-type"].startswith("application/json"), r.headers
        assert client.get("/v2/health/ready").status_code == 200
        r = client.post(f"/v2/models/{served.name}/infer", json=infer_json(x))  # and it still answers right
        got = np.asarray(r.json()["outputs"][0]["data"], np.float32).reshape(2, -1)
        np.testing.assert_allclose(got, served.session.run(None, {"input": x})[0], rtol=1e-5, atol=1e-6)
    assert sum(statuses.values()) == REQUESTS and len(statuses) >= 3  # the mutations reached several answers
