"""Regression tests for the serving holes an adversarial run found, each against a real uvicorn over a socket.

Raw sockets where a client library would hide the problem: oversized and slow
request heads, trickled and truncated bodies, keep-alive sockets at shutdown.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
from serving_support import Live, batch, encode, infer_json, random_image

from serving.settings import ServeSettings

FAST = dict(header_timeout_s=0.5, body_timeout_s=0.8, keep_alive_timeout_s=0.5, drain_timeout_s=1.0, shutdown_grace_s=0.5)


@pytest.fixture(scope="module")
def live(served):
    with Live(ServeSettings(models=served.models, **FAST)) as server:
        yield server


def _url(live: Live, path: str) -> str:
    return f"http://127.0.0.1:{live.port}{path}"


def _read_response(sock: socket.socket) -> bytes:
    """One HTTP response (head and Content-Length body), or whatever came before the server closed."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")), 0)
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


def _status(response: bytes) -> int:
    return int(response.split(b" ", 2)[1]) if response.startswith(b"HTTP/1.1 ") else -1


def _json_body(response: bytes) -> dict:
    return json.loads(response.partition(b"\r\n\r\n")[2])


def _raw(live: Live, data: bytes, timeout: float = 10) -> bytes:
    with socket.create_connection(("127.0.0.1", live.port), timeout=timeout) as sock:
        sock.sendall(data)
        return _read_response(sock)


def _post_head(path: str, length: int, extra: str = "") -> bytes:
    return f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n{extra}\r\n".encode()


# --- 1-4: inputs that raised inside the server ---------------------------------------------------


def test_huge_integer_and_deep_nesting_are_400(live, served):
    infer = _url(live, f"/v2/models/{served.name}/infer")
    huge = b'{"inputs": [{"name": "input", "shape": [1], "datatype": "FP32", "data": [' + b"9" * 5000 + b"]}]}"
    deep = b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    for body in (huge, deep):
        r = httpx.post(infer, content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and "not valid JSON" in r.json()["error"], r.text[:300]


@pytest.mark.parametrize("version", ["%C2%B2", "%E2%91%A0", "%D9%A3"])  # superscript two, circled one, Arabic-Indic three
def test_unicode_digit_versions_are_404(live, served, version):
    base = f"/v2/models/{served.name}/versions/{version}"
    x = batch(served, 1)
    for method, path, kwargs in (
        ("GET", base, {}), ("GET", base + "/ready", {}), ("POST", base + "/infer", {"json": infer_json(x)}),
        ("POST", f"/v1/models/{served.name}/versions/{version}/classify", {"content": encode(random_image(16, 16))}),
    ):  # fmt: skip
        r = httpx.request(method, _url(live, path), **kwargs)
        assert r.status_code == 404 and "versions are ASCII decimal numbers" in r.json()["error"], (path, r.text)


def test_non_ascii_digit_header_length_is_400(live, served):
    body = json.dumps(infer_json(batch(served, 1))).encode()
    head = _post_head(f"/v2/models/{served.name}/infer", len(body)).replace(b"\r\n\r\n", b"\r\nInference-Header-Content-Length: \xb2\r\n\r\n")
    response = _raw(live, head + body)
    assert _status(response) == 400 and "Inference-Header-Content-Length" in _json_body(response)["error"]


# --- 5, 6: request heads and bodies, sizes and slowness ------------------------------------------


def test_oversized_header_is_431_and_probes_stay_fast(live):
    header = b"X-Big: " + b"a" * (4 * 1024 * 1024) + b"\r\n"
    with socket.create_connection(("127.0.0.1", live.port), timeout=10) as sock:
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: t\r\n")
        try:
            sock.sendall(header)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server closed after its 431: what the rest of the header deserves
        response = _read_response(sock)
    assert _status(response) == 431 and "exceed 16384 bytes" in _json_body(response)["error"]
    assert httpx.get(_url(live, "/v2/health/ready")).status_code == 200


def test_slow_request_head_is_408(live):
    with socket.create_connection(("127.0.0.1", live.port), timeout=10) as sock:
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\n")
        for _ in range(6):  # one header byte every 0.2 s: past the 0.5 s head deadline
            time.sleep(0.2)
            try:
                sock.sendall(b"X")
            except (BrokenPipeError, ConnectionResetError):
                break
        response = _read_response(sock)
    assert _status(response) == 408 and "request head did not arrive within 0.5 s" in _json_body(response)["error"]


def test_silent_connection_is_closed(live):
    with socket.create_connection(("127.0.0.1", live.port), timeout=10) as sock:
        started = time.monotonic()
        response = _read_response(sock)  # never sends a byte
    assert _status(response) == 408 and time.monotonic() - started < 5


@pytest.mark.parametrize("trickle", [True, False], ids=["trickled body", "content-length beyond the body"])
def test_slow_or_short_body_is_408(live, served, trickle):
    body = json.dumps(infer_json(batch(served, 1))).encode()
    with socket.create_connection(("127.0.0.1", live.port), timeout=10) as sock:
        sock.sendall(_post_head(f"/v2/models/{served.name}/infer", len(body)) + body[:100])
        for i in range(100, 120) if trickle else ():
            time.sleep(0.1)
            try:
                sock.sendall(body[i : i + 1])
            except (BrokenPipeError, ConnectionResetError):
                break  # answered and closed at the deadline
        response = _read_response(sock)
    assert _status(response) == 408 and "did not arrive within 0.8 s" in _json_body(response)["error"]
    assert b"connection: close" in response.lower()


def test_idle_keep_alive_connection_closes(live):
    with socket.create_connection(("127.0.0.1", live.port), timeout=10) as sock:
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: t\r\n\r\n")
        assert _status(_read_response(sock)) == 200
        started = time.monotonic()
        assert sock.recv(1) == b""  # closed by the server after keep_alive_timeout_s
    assert time.monotonic() - started < 5


# --- 7, 11, 13: batching, limits, media types ----------------------------------------------------


def test_stalled_upload_is_not_announced_to_the_batcher(live, served):
    body = json.dumps(infer_json(batch(served, 1))).encode()
    batcher = live.state.repository.get(served.name).batcher
    with socket.create_connection(("127.0.0.1", live.port), timeout=10) as stalled:
        stalled.sendall(_post_head(f"/v2/models/{served.name}/infer", len(body)) + body[:50])
        while live.state.in_flight == 0:
            time.sleep(0.005)
        assert batcher._coming == 0  # a forming batch would not wait for it
        r = httpx.post(_url(live, f"/v2/models/{served.name}/infer"), json=infer_json(batch(served, 2)))
        assert r.status_code == 200


def test_body_limit_is_derived_from_the_models(live, served):
    tensor_bytes = served.max_batch_size * int(np.prod(served.input_shape)) * 4
    assert live.state.body_limit == tensor_bytes * 8 + 64 * 1024
    full = json.dumps(infer_json(batch(served, served.max_batch_size))).encode()  # the largest valid request fits
    assert len(full) < live.state.body_limit
    assert httpx.post(_url(live, f"/v2/models/{served.name}/infer"), content=full).status_code == 200
    response = _raw(live, _post_head(f"/v2/models/{served.name}/infer", live.state.body_limit + 1))
    assert _status(response) == 413 and f"the limit is {live.state.body_limit} bytes" in _json_body(response)["error"]


def test_media_types_are_case_insensitive_and_booleans_are_not_numbers(live, served):
    files = {"file": ("x.png", encode(random_image(16, 16)), "image/png")}
    request = httpx.Request("POST", _url(live, f"/v1/models/{served.name}/classify"), files=files)
    request.headers["Content-Type"] = request.headers["Content-Type"].replace("multipart/form-data", "Multipart/Form-Data")
    with httpx.Client() as client:
        assert client.send(request).status_code == 200
    body = infer_json(batch(served, 1))
    body["inputs"][0]["data"][0] = True
    r = httpx.post(_url(live, f"/v2/models/{served.name}/infer"), json=body)
    assert r.status_code == 400 and "booleans" in r.json()["error"]


def test_over_max_connections_is_json_503_with_retry_after(served):
    """Past max_connections uvicorn answers 503 itself (limit_concurrency); it must be JSON with Retry-After too."""
    settings = ServeSettings(models=served.models, max_connections=2, **FAST)
    with Live(settings) as live, socket.create_connection(("127.0.0.1", live.port), timeout=10) as first:
        first.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: t\r\n\r\n")
        assert _status(_read_response(first)) == 200  # alone under the limit; this connection stays open (keep-alive)
        with socket.create_connection(("127.0.0.1", live.port), timeout=10) as extra:
            extra.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: t\r\n\r\n")
            response = _read_response(extra)
            assert extra.recv(1) == b""  # then the extra connection closes
        head = response.partition(b"\r\n\r\n")[0].lower()
        assert _status(response) == 503, response[:300]
        assert b"content-type: application/json" in head and b"retry-after: 1" in head
        assert "max_connections=2" in _json_body(response)["error"]
        deadline = time.monotonic() + 5
        while len(live.server.server_state.connections) > 1:  # until the server has seen the extra connection go
            assert time.monotonic() < deadline, "the extra connection was not closed"
            time.sleep(0.005)
        first.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: t\r\n\r\n")
        assert _status(_read_response(first)) == 200  # back under the limit


# --- 8, 9, 10: shutdown --------------------------------------------------------------------------


def test_request_cut_by_shutdown_is_json_503_with_retry_after(served):
    body = json.dumps(infer_json(batch(served, 1))).encode()
    settings = ServeSettings(models=served.models, **{**FAST, "body_timeout_s": 30.0})
    with Live(settings) as live:
        with socket.create_connection(("127.0.0.1", live.port), timeout=15) as sock:
            sock.sendall(_post_head(f"/v2/models/{served.name}/infer", len(body)) + body[:50])  # stalls past the drain timeout
            while live.state.in_flight == 0:
                time.sleep(0.005)
            live.server.handle_exit(signal.SIGTERM, None)
            response = _read_response(sock)
        live.thread.join(10)
    assert _status(response) == 503, response[:300]
    assert b"retry-after: 1" in response.lower() and "shutting down" in _json_body(response)["error"]


def test_request_on_keep_alive_socket_at_shutdown_gets_an_answer(served):
    with Live(ServeSettings(models=served.models, **FAST)) as live:
        with socket.create_connection(("127.0.0.1", live.port), timeout=10) as sock:
            sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: t\r\n\r\n")
            assert _status(_read_response(sock)) == 200
            live.server.handle_exit(signal.SIGTERM, None)
            time.sleep(0.15)  # the server has begun shutting down; this request was already on its way
            sock.sendall(b"GET /v2/health/ready HTTP/1.1\r\nHost: t\r\n\r\n")
            response = _read_response(sock)
            assert sock.recv(1) == b""  # then the connection closes
        live.thread.join(10)
    assert _status(response) == 400 and b"connection: close" in response.lower()  # answered: not ready any more


def _plain_uvicorn(served, tmp_path, **env: str) -> tuple[subprocess.Popen, int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    environ = {**os.environ, "REFINER_SERVE_MODELS": str(served.models), **env}
    cmd = [sys.executable, "-m", "uvicorn", "serving.app:app", "--port", str(port), "--log-level", "info"]
    process = subprocess.Popen(cmd, env=environ, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=tmp_path)
    return process, port


def test_plain_uvicorn_drains_not_ready_and_meets_a_hard_deadline(served, tmp_path):
    """Under `uvicorn serving.app:app` (no make_server) the first SIGTERM still ends readiness and bounds shutdown."""
    env = {"REFINER_SERVE_DRAIN_TIMEOUT_S": "1", "REFINER_SERVE_SHUTDOWN_GRACE_S": "0.5", "REFINER_SERVE_BODY_TIMEOUT_S": "60"}
    process, port = _plain_uvicorn(served, tmp_path, **env)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline and process.poll() is None, "server did not become ready"
            time.sleep(0.1)
        body = json.dumps(infer_json(batch(served, 1))).encode()
        with socket.create_connection(("127.0.0.1", port), timeout=20) as stalled:
            stalled.sendall(_post_head(f"/v2/models/{served.name}/infer", len(body)) + body[:50])  # never finishes
            time.sleep(0.3)
            started = time.monotonic()
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=20)  # the stalled upload would hold a plain uvicorn forever
        assert time.monotonic() - started < 1 + 0.5 + 2 + 2 + 2  # hard deadline, its backstop, and slack
        out = process.stdout.read().decode()
        assert "shutdown signal: not ready" in out and "passed its hard deadline of 3.5 s" in out, out
    finally:
        if process.poll() is None:
            process.kill()


def test_missing_repository_is_one_line(tmp_path):
    process, _ = _plain_uvicorn(type("S", (), {"models": tmp_path / "nope"})(), tmp_path)
    out = process.communicate(timeout=60)[0].decode()
    assert process.returncode != 0 and "is not a folder; set REFINER_SERVE_MODELS" in out
    assert "Traceback" not in out, out


# --- 14: one log entry and a JSON answer per unexpected failure ---------------------------------


def test_unexpected_failure_is_logged_once_and_answered_json(live, served, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("injected bug")

    monkeypatch.setattr("serving.routes_v2.parse_infer_request", broken)
    caplog.set_level(logging.INFO)
    r = httpx.post(_url(live, f"/v2/models/{served.name}/infer"), json=infer_json(batch(served, 1)))
    assert r.status_code == 500 and r.json() == {"error": "internal server error; the server log has the details"}
    tracebacks = [rec for rec in caplog.records if rec.exc_info]
    assert len(tracebacks) == 1 and "injected bug" in str(tracebacks[0].exc_info[1])
    assert live.state.ready


# --- several worker processes ---------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    kids = []
    for stat in os.listdir("/proc"):
        if stat.isdigit():
            try:
                fields = open(f"/proc/{stat}/stat").read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                kids.append(int(stat))
    return kids


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads child processes from /proc")
def test_refiner_serve_with_two_workers(served, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "refiner", "serve", "--models", str(served.models), "--port", str(port), "--workers", "2"]
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 90
        ready = 0
        while ready < 10:  # both workers answer: several consecutive ready probes on new connections
            try:
                ready = ready + 1 if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready").status_code == 200 else 0
            except httpx.TransportError:
                ready = 0
            assert time.monotonic() < deadline and process.poll() is None, "server did not become ready"
            time.sleep(0.05)
        assert len(_children(process.pid)) >= 2  # uvicorn's supervisor and its two worker processes
        x = batch(served, 3)
        for _ in range(6):
            r = httpx.post(f"http://127.0.0.1:{port}/v2/models/{served.name}/infer", json=infer_json(x))
            got = np.asarray(r.json()["outputs"][0]["data"], np.float32).reshape(3, -1)
            np.testing.assert_allclose(got, served.session.run(None, {"input": x})[0], rtol=1e-5, atol=1e-6)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
