"""A repository the server does not control: broken or lying models, blocked reads, and who may drive the server.

Every artifact here is hand-made ONNX (tests/serving_support.py: crafted_artifact), served by a real
uvicorn on a loopback socket. A bad model sorted before the good one must never stop it serving.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as triton_http
from serving_support import Live, crafted_artifact, rss_mib, stalled_upload

from serving.app import make_server
from serving.settings import ServeSettings

ROOT = Path(__file__).resolve().parents[1]


def _url(live: Live, path: str) -> str:
    return f"http://127.0.0.1:{live.port}{path}"


def _infer(live: Live, name: str, rows: int = 1, seed: int = 0, headers: dict | None = None) -> httpx.Response:
    x = np.random.default_rng(seed).standard_normal((rows, 3, 4, 4)).astype(np.float32)
    body = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
    return httpx.post(_url(live, f"/v2/models/{name}/infer"), json=body, headers=headers, timeout=30)


def _index(live: Live, headers: dict | None = None) -> dict[str, dict]:
    rows = httpx.post(_url(live, "/v2/repository/index"), headers=headers).json()
    return {row["name"]: row for row in rows}


def _wait(condition, what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _broken(repo: Path, how: str) -> str:
    """A model 'aaa' (sorted before 'good') broken as `how` says; returns what its refusal must say."""
    folder = crafted_artifact(repo, "aaa")
    meta = folder / "metadata.json"
    if how == "metadata is a folder":
        meta.unlink()
        meta.mkdir()
        return "aaa/1/metadata.json is not a regular file"
    if how == "metadata is a symlink loop":
        meta.unlink()
        meta.symlink_to(meta)
        return "aaa/1/metadata.json is unreadable: Too many levels of symbolic links"
    if how == "metadata is a FIFO":  # opening it would block until a writer comes
        meta.unlink()
        os.mkfifo(meta)
        return "aaa/1/metadata.json is not a regular file"
    if how == "metadata is not UTF-8":
        meta.write_bytes(b"\xff\xfe{")
        return "aaa/1/metadata.json is not valid refiner-artifact/1 metadata"
    if how == "model folder is a symlink loop":
        import shutil

        shutil.rmtree(repo / "aaa")
        (repo / "aaa").symlink_to(repo / "aaa")
        return "aaa/: the folder cannot be listed: Too many levels of symbolic links"
    raise AssertionError(how)


BROKEN = ["metadata is a folder", "metadata is a symlink loop", "metadata is a FIFO", "metadata is not UTF-8", "model folder is a symlink loop"]


@pytest.mark.parametrize("how", BROKEN)
@pytest.mark.parametrize("mode", ["none", "poll", "explicit"])
def test_an_unreadable_model_is_unavailable_and_the_others_serve(tmp_path, caplog, how, mode):
    repo = tmp_path / "models"
    crafted_artifact(repo, "good")
    reason = _broken(repo, how)
    caplog.set_level(logging.INFO, logger="serving")
    with Live(ServeSettings(models=repo, model_control=mode, poll_s=0.2)) as live:
        assert httpx.get(_url(live, "/v2/health/ready")).status_code == 200
        assert _infer(live, "good").status_code == 200
        row = _index(live)["aaa"]
        assert row["state"] == "UNAVAILABLE" and row["reason"].startswith(reason), row
        assert str(repo) not in row["reason"]
        if mode == "poll":  # the scan goes on: a new version of the good model is served
            crafted_artifact(repo, "good", 2)
            _wait(lambda: _index(live)["good"]["version"] == "2", "version 2 of good")
        if mode == "explicit":
            r = httpx.post(_url(live, "/v2/repository/models/aaa/load"))
            assert r.status_code == 400 and reason.split(":")[0] in r.json()["error"], r.text
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "REFUSED model aaa" in errors[0].getMessage(), [r.getMessage() for r in errors]


def test_lying_artifacts_are_refused_at_load_and_bound_nothing(tmp_path, monkeypatch, caplog):
    repo = tmp_path / "models"
    crafted_artifact(repo, "good", max_batch_size=8)
    crafted_artifact(repo, "batch1", kind="batch1", max_batch_size=32)
    crafted_artifact(repo, "mean", kind="mean")
    crafted_artifact(repo, "mix", kind="mix")
    crafted_artifact(repo, "huge", max_batch_size=10**9)
    crafted_artifact(repo, "external", kind="external")
    monkeypatch.chdir(tmp_path)  # where onnxruntime would resolve the external data of a model given as bytes
    (tmp_path / "secret.txt").write_bytes(b"the server's private key " * 40)
    caplog.set_level(logging.INFO, logger="serving")
    with Live(ServeSettings(models=repo)) as live:
        index = _index(live)
        assert index["good"]["state"] == "READY"
        reasons = {name: row.get("reason", "") for name, row in index.items()}
        assert "warm-up failed: at batch 2 inference failed: [ONNXRuntimeError]" in reasons["batch1"], reasons["batch1"]
        assert "at batch 2 the model returns float32 of shape [1, 3], expected float32 of shape [2, 3]" in reasons["mean"]
        assert "row 0 of a batch of 2 differs from the same input alone" in reasons["mix"]
        assert "max_batch_size 1000000000 is over the server's limit of 256" in reasons["huge"]
        assert "tensor 'w' is stored as external data ('secret.txt')" in reasons["external"]
        assert all(index[n]["state"] == "UNAVAILABLE" for n in ("batch1", "mean", "mix", "huge", "external"))
        # the body limit follows the model served: 8 rows of 48 floats as JSON, not 10^9 rows
        assert live.state.body_limit == int(8 * 48 * 4 * live.state.settings.json_expansion) + 64 * 1024
        for name in ("batch1", "mean", "mix", "huge", "external"):
            assert _infer(live, name).status_code == 404
    errors = sorted(r.getMessage().split(":")[0] for r in caplog.records if r.levelno >= logging.ERROR)
    assert errors == [f"REFUSED model {n} version 1" for n in ("batch1", "external", "huge", "mean", "mix")], errors


def test_a_wrong_row_count_at_run_time_fails_every_request_and_takes_the_version_out(tmp_path, caplog):
    repo = tmp_path / "models"
    crafted_artifact(repo, "m")
    with Live(ServeSettings(models=repo, max_queue_delay_ms=200)) as live:
        model = live.state.repository.models["m"]
        honest = model.batcher._infer
        model.batcher._infer = lambda x: honest(x)[:1]  # from now on one row, whatever the batch
        answers: list[httpx.Response] = []
        threads = [threading.Thread(target=lambda i=i: answers.append(_infer(live, "m", 2, seed=i))) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        codes = [r.status_code for r in answers]  # the first batch fails; later requests find the version gone
        assert 200 not in codes and codes.count(500) >= 1 and set(codes) <= {500, 404}, [r.text for r in answers]
        assert all("not one row per input row" in r.json()["error"] for r in answers if r.status_code == 500)
        row = _index(live)["m"]
        assert row["state"] == "UNAVAILABLE" and "taken out of service" in row["reason"], row
        assert _infer(live, "m").status_code == 404


def test_exit_on_error_fails_the_start_with_the_reason(tmp_path):
    repo = tmp_path / "models"
    crafted_artifact(repo, "good")
    crafted_artifact(repo, "mean", kind="mean")
    env = {**os.environ, "REFINER_SERVE_EXIT_ON_ERROR": "true", "REFINER_SERVE_DEVICE": "cpu"}
    done = subprocess.run([sys.executable, "-m", "serving", "--models", str(repo), "--port", "0"], env=env, capture_output=True,
                          text=True, timeout=60, cwd=ROOT)  # fmt: skip
    assert done.returncode != 0
    assert "1 model(s) refused and exit_on_error is set: mean/1: warm-up failed" in done.stderr, done.stderr


@pytest.mark.parametrize("strict", [False, True])
def test_readiness_rule(tmp_path, strict):
    repo = tmp_path / "models"
    crafted_artifact(repo, "good")
    crafted_artifact(repo, "mean", kind="mean")
    with Live(ServeSettings(models=repo, strict_readiness=strict)) as live:
        assert httpx.get(_url(live, "/v2/health/ready")).status_code == (400 if strict else 200)
        assert _infer(live, "good").status_code == 200  # the good model serves either way


def test_an_unexpected_start_up_failure_is_logged_with_its_traceback_and_fails_the_start(tmp_path, monkeypatch, caplog):
    repo = tmp_path / "models"
    crafted_artifact(repo, "good")

    async def broken(self, providers):
        raise RuntimeError("injected start-up bug")

    monkeypatch.setattr("serving.control.ModelControl.start", broken)
    caplog.set_level(logging.INFO)
    server = make_server(ServeSettings(models=repo), log_level="warning")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        thread.join(30)
    assert not thread.is_alive() and not server.started
    failed = [r for r in caplog.records if r.getMessage() == "start-up failed"]
    assert len(failed) == 1 and "injected start-up bug" in str(failed[0].exc_info[1])
    assert not any("lifespan' protocol appears unsupported" in r.getMessage() for r in caplog.records)


# --- blocked reads: per model, bounded, and never holding the process ----------------------------


def _block_reads_of(monkeypatch, name: str) -> threading.Event:
    """Reads of model `name` block until the event is set (a stalled network file system)."""
    import serving.control

    release, real = threading.Event(), serving.control.read_artifact

    def read(models, model, version):
        if model == name:
            release.wait()
        return real(models, model, version)

    monkeypatch.setattr(serving.control, "read_artifact", read)
    return release


def test_a_blocked_load_blocks_nothing_else_and_times_out(tmp_path, monkeypatch):
    repo = tmp_path / "models"
    crafted_artifact(repo, "good")
    release = _block_reads_of(monkeypatch, "stuck")
    try:
        with Live(ServeSettings(models=repo, model_control="explicit", load_timeout_s=3)) as live:
            crafted_artifact(repo, "stuck")
            answer: list[httpx.Response] = []
            loading = threading.Thread(target=lambda: answer.append(httpx.post(_url(live, "/v2/repository/models/stuck/load"), timeout=30)))
            loading.start()
            _wait(lambda: "stuck" in live.state.repository.loading, "the load to start")
            r = httpx.get(_url(live, "/v2/models/stuck"))
            assert r.status_code == 503 and r.headers["retry-after"] and "is being loaded" in r.json()["error"]
            t0 = time.monotonic()
            assert httpx.post(_url(live, "/v2/repository/models/good/unload")).status_code == 200
            assert httpx.post(_url(live, "/v2/repository/models/good/load")).status_code == 200
            assert _infer(live, "good").status_code == 200
            assert time.monotonic() - t0 < 2.5  # all done while the stuck read still blocks
            assert _index(live)["stuck"]["state"] == "LOADING"
            loading.join(30)
            assert answer[0].status_code == 400 and "took over 3 s" in answer[0].json()["error"], answer[0].text
            assert _index(live)["stuck"]["state"] == "UNAVAILABLE"
    finally:
        release.set()


_STUCK_SERVER = """
import sys, threading
import serving.control
from serving.app import serve
from serving.settings import ServeSettings

real = serving.control.read_artifact
def read(models, name, version):
    if name == "stuck":
        threading.Event().wait()  # for good
    return real(models, name, version)
serving.control.read_artifact = read
serve(ServeSettings(models=sys.argv[1], model_control="explicit", drain_timeout_s=1, shutdown_grace_s=0.5, device="cpu"), port=int(sys.argv[2]))
"""


def test_sigterm_ends_the_process_by_its_hard_deadline_during_a_stuck_load(tmp_path):
    repo = tmp_path / "models"
    crafted_artifact(repo, "good")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-c", _STUCK_SERVER, str(repo), str(port)], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT)  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        _wait(lambda: _ready(url), "the server", timeout=60)
        crafted_artifact(repo, "stuck")
        threading.Thread(target=lambda: _quiet_post(f"{url}/v2/repository/models/stuck/load"), daemon=True).start()
        time.sleep(0.5)
        t0 = time.monotonic()
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=20)
        took = time.monotonic() - t0
        hard_deadline = 1 + 0.5 + 2.0
        assert took < hard_deadline + 3, f"still alive {took:.1f} s after SIGTERM"
    finally:
        if process.poll() is None:
            process.kill()


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _quiet_post(url: str) -> None:
    try:
        httpx.post(url, timeout=60)
    except httpx.HTTPError:
        pass


def test_load_reloads_a_version_whose_files_changed(tmp_path):
    repo = tmp_path / "models"
    folder = crafted_artifact(repo, "m")
    with Live(ServeSettings(models=repo, model_control="explicit")) as live:
        first = live.state.repository.models["m"]
        assert httpx.post(_url(live, "/v2/repository/models/m/load")).status_code == 200
        assert live.state.repository.models["m"] is first  # unchanged files: kept
        meta = json.loads((folder / "metadata.json").read_text())
        (folder / "metadata.json").write_text(json.dumps({**meta, "class_names": ["x", "y", "z"]}))
        assert httpx.post(_url(live, "/v2/repository/models/m/load")).status_code == 200
        assert live.state.repository.models["m"] is not first
        assert live.state.repository.models["m"].meta.class_names == ["x", "y", "z"]


# --- the restricted API ---------------------------------------------------------------------------


def test_the_repository_api_needs_the_key_and_inference_does_not_by_default(tmp_path, caplog):
    repo = tmp_path / "models"
    crafted_artifact(repo, "m")
    caplog.set_level(logging.INFO, logger="serving")
    key = {"x-refiner-key": "s3cret-key"}
    with Live(ServeSettings(models=repo, model_control="explicit", api_key="s3cret-key")) as live:
        for headers in (None, {"x-refiner-key": "wrong"}, {"x-refiner-key": "s3cret-ke"}, {"x-refiner-key": ""}):
            for path in ("/v2/repository/index", "/v2/repository/models/m/unload", "/v2/repository/models/m/load"):
                r = httpx.post(_url(live, path), headers=headers)
                assert r.status_code == 401 and "the model-repository API is restricted" in r.json()["error"], (path, r.text)
        assert "m" in live.state.repository.models  # nothing was unloaded
        client = triton_http.InferenceServerClient(f"127.0.0.1:{live.port}")
        assert client.get_model_repository_index(headers=key)[0]["name"] == "m"
        client.unload_model("m", headers=key)
        client.load_model("m", headers=key)
        assert _infer(live, "m").status_code == 200  # inference is open unless restricted
        assert httpx.get(_url(live, "/v2/health/ready")).status_code == 200  # health is never restricted
    refusals = [r for r in caplog.records if r.getMessage().startswith("refused ")]
    assert len(refusals) == 1, [r.getMessage() for r in refusals]  # 12 refused calls, one line a minute at most


def test_restricting_inference_and_metadata(tmp_path):
    repo = tmp_path / "models"
    crafted_artifact(repo, "m")
    settings = ServeSettings(models=repo, api_key="k", restricted_apis=["inference", "metadata", "metrics"])
    with Live(settings) as live:
        assert _infer(live, "m").status_code == 401
        assert httpx.get(_url(live, "/v2/models/m")).status_code == 401
        assert httpx.get(_url(live, "/metrics")).status_code == 401
        assert _infer(live, "m", headers={"x-refiner-key": "k"}).status_code == 200
        assert httpx.get(_url(live, "/v2/models/m"), headers={"x-refiner-key": "k"}).status_code == 200
        assert httpx.post(_url(live, "/v2/repository/index")).status_code == 200  # not in the list: open


def test_refused_control_calls_are_4xx_and_logged_once_a_minute(tmp_path, caplog):
    repo = tmp_path / "models"
    crafted_artifact(repo, "m")
    caplog.set_level(logging.INFO, logger="serving")
    with Live(ServeSettings(models=repo)) as live:  # model control none
        for _ in range(5):
            assert httpx.post(_url(live, "/v2/repository/models/m/unload")).status_code == 400
    lines = [r for r in caplog.records if "not allowed" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING


@pytest.mark.parametrize(("host", "key", "warned"), [("0.0.0.0", None, True), ("127.0.0.1", None, False), ("0.0.0.0", "k", False)])
def test_explicit_control_on_an_open_address_without_a_key_warns(tmp_path, caplog, host, key, warned):
    crafted_artifact(tmp_path / "models", "m")
    caplog.set_level(logging.WARNING, logger="serving")
    make_server(ServeSettings(models=tmp_path / "models", model_control="explicit", api_key=key), host=host)
    assert any("without an API key" in r.getMessage() for r in caplog.records) == warned


def test_the_key_reaches_worker_processes_and_stays_out_of_the_settings_repr():
    settings = ServeSettings(api_key="s3cret")
    assert settings.to_env()["REFINER_SERVE_API_KEY"] == "s3cret"
    assert "s3cret" not in repr(settings) and "s3cret" not in textwrap.shorten(str(settings.model_dump()), 500)


def test_python_m_serving_reads_the_key_from_a_file_and_refuses_an_empty_one(tmp_path):
    repo = tmp_path / "models"
    crafted_artifact(repo, "m")
    (tmp_path / "empty").write_text("\n")
    done = subprocess.run([sys.executable, "-m", "serving", "--models", str(repo), "--api-key-file", str(tmp_path / "empty")],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)  # fmt: skip
    assert done.returncode == 2 and "is empty; expected the key on its first line" in done.stderr
    (tmp_path / "key").write_text("from-a-file\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "serving", "--models", str(repo), "--port", str(port), "--model-control", "explicit",
           "--api-key-file", str(tmp_path / "key"), "--device", "cpu"]  # fmt: skip
    process = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait(lambda: _ready(url), "the server", timeout=60)
        assert httpx.post(f"{url}/v2/repository/models/m/unload").status_code == 401
        assert httpx.post(f"{url}/v2/repository/models/m/unload", headers={"x-refiner-key": "from-a-file"}).status_code == 200
    finally:
        process.terminate()
        process.wait(30)


# --- bounded memory across versions ---------------------------------------------------------------


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads the server's RSS from /proc")
def test_memory_stays_bounded_across_load_unload_cycles_with_slow_clients(tmp_path):
    """20 cycles of a 24 MB model with 6 stalled uploads: the server stays within about two copies of the model
    above its unloaded self (benchmarks/serve_memory.py runs 50 cycles of 100 MB; docs/benchmarks.md)."""
    repo = tmp_path / "models"
    folder = crafted_artifact(repo, "big", hidden=24 * 2**20 // 4 // 51, max_batch_size=2)
    model_mib = (folder / "model.onnx").stat().st_size / 2**20
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "serving", "--models", str(repo), "--port", str(port), "--model-control", "explicit", "--device", "cpu"]
    process = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "REFINER_SERVE_INTRA_OP_THREADS": "1"})  # fmt: skip
    stop = threading.Event()
    url = f"http://127.0.0.1:{port}/v2/repository/models/big"
    try:
        _wait(lambda: _ready(f"http://127.0.0.1:{port}"), "the server", timeout=60)
        for _ in range(6):
            threading.Thread(target=stalled_upload, args=(port, stop), daemon=True).start()
        time.sleep(0.5)
        assert httpx.post(f"{url}/unload").status_code == 200
        time.sleep(0.5)
        unloaded = rss_mib(process.pid)
        rss = []
        for _ in range(20):
            assert httpx.post(f"{url}/load", timeout=60).status_code == 200
            rss.append(rss_mib(process.pid))
            assert httpx.post(f"{url}/unload").status_code == 200
        over = (max(rss) - unloaded) / model_mib
        assert over < 2.5, f"RSS {unloaded:.0f} MiB unloaded, {[round(r) for r in rss]} MiB loaded: {over:.1f} models"
    finally:
        stop.set()
        process.terminate()
        process.wait(30)
