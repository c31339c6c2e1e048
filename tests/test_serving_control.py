"""Model control (Triton's none / poll / explicit) on a live uvicorn, with requests flowing from a thread.

A new version is published into the repository (atomically, as `refiner export`
does) while infer and classify requests run back to back: none of them may fail,
and once the new version answers, the old one never answers again. Version 2
renames the classes, so /classify shows which version answered.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from serving_support import Live, Served, batch, copy_version, encode, infer_json

from serving.settings import ServeSettings

POLL_S = 0.2


@pytest.fixture
def repo(served: Served, tmp_path: Path) -> Path:
    copy_version(served, tmp_path / "models", "m", 1)
    return tmp_path / "models"


def _v2_names(served: Served) -> list[str]:
    return [f"v2-{c}" for c in served.class_names]


def _wait(condition: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


class _Traffic:
    """Infer and classify requests for model m, alternating, back to back over one keep-alive connection."""

    def __init__(self, live: Live, served: Served) -> None:
        base = f"http://127.0.0.1:{live.port}"
        self._infer = (f"{base}/v2/models/m/infer", infer_json(batch(served, 2)))
        self._classify = (f"{base}/v1/models/m/classify", encode(served.images[0]))
        self.answers: list[tuple[str, int, str | None, str | None]] = []  # (route, status, model_version, top label)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=20) as client:
            while not self._stop.is_set():
                r = client.post(self._infer[0], json=self._infer[1])
                body = r.json()
                self.answers.append(("infer", r.status_code, body.get("model_version"), None))
                r = client.post(self._classify[0], content=self._classify[1], headers={"content-type": "image/png"})
                body = r.json()
                label = body["predictions"][0]["label"] if r.status_code == 200 else None
                self.answers.append(("classify", r.status_code, body.get("model_version"), label))

    def __enter__(self) -> _Traffic:
        self._thread.start()
        self.wait_answers(4)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def wait_answers(self, n: int) -> None:
        """Until n more answers came back."""
        target = len(self.answers) + n
        _wait(lambda: len(self.answers) >= target or not self._thread.is_alive(), f"{n} answers")
        assert self._thread.is_alive(), "the request thread died"

    def wait_version(self, version: str) -> None:
        _wait(lambda: any(a[2] == version for a in self.answers), f"an answer from version {version}")
        self.wait_answers(6)

    def check(self, versions: list[str], served: Served) -> None:
        """Every answer 200, versions in the given order only (no old version after a new one), labels match."""
        failed = [a for a in self.answers if a[1] != 200]
        assert not failed, failed[:5]
        seen = [a[2] for a in self.answers]
        assert set(seen) <= set(versions), seen
        order = [versions.index(v) for v in seen]
        assert order == sorted(order), seen
        for _, _, version, label in self.answers:
            if label is not None:
                assert label in (_v2_names(served) if version == "2" else served.class_names), (version, label)


def _index(live: Live) -> set[tuple[str, str, str]]:
    rows = httpx.post(f"http://127.0.0.1:{live.port}/v2/repository/index").json()
    return {(r["name"], r["version"], r["state"]) for r in rows}


def test_poll_serves_new_versions_and_models_without_a_failed_request(repo, served, caplog):
    caplog.set_level(logging.INFO, logger="serving")
    with Live(ServeSettings(models=repo, model_control="poll", poll_s=POLL_S)) as live:
        url = f"http://127.0.0.1:{live.port}"
        with _Traffic(live, served) as traffic:
            copy_version(served, repo, "m", 2, class_names=_v2_names(served), atomic=True)
            traffic.wait_version("2")
            meta = httpx.get(f"{url}/v2/models/m").json()
            assert meta["versions"] == ["2"] and meta["parameters"]["class_names"] == _v2_names(served)
            _wait(lambda: not live.state.control._retiring, "version 1 to close")

            copy_version(served, repo, "m", 3, corrupt="flip", atomic=True)  # fails validation: refused, 2 keeps serving
            _wait(lambda: ("m", "3", "UNAVAILABLE") in _index(live), "version 3 refused")
            time.sleep(3 * POLL_S)  # more scans: it is not tried again while its files are unchanged
            traffic.wait_answers(6)
        traffic.check(["1", "2"], served)
        assert _index(live) == {("m", "2", "READY"), ("m", "3", "UNAVAILABLE")}
        refusals = [r.getMessage() for r in caplog.records if "REFUSED" in r.getMessage()]
        assert len(refusals) == 1 and "model m version 3: " in refusals[0] and "sha256" in refusals[0], refusals

        copy_version(served, repo, "n", 1, atomic=True)  # a new model
        _wait(lambda: httpx.get(f"{url}/v2/models/n/ready").status_code == 200, "model n to be served")
        shutil.rmtree(repo / "m" / "3")  # a refused version removed: no longer listed
        shutil.rmtree(repo / "n")  # a model removed: unloaded
        _wait(lambda: httpx.get(f"{url}/v2/models/n/ready").status_code == 404, "model n to be unloaded")
        assert _index(live) == {("m", "2", "READY")}
        assert live.state.body_limit > 0 and live.state.ready


def test_explicit_loads_and_unloads_on_request_with_the_stock_client(repo, served):
    import tritonclient.http as triton
    from tritonclient.utils import InferenceServerException

    with Live(ServeSettings(models=repo, model_control="explicit")) as live:
        client = triton.InferenceServerClient(url=f"127.0.0.1:{live.port}")
        try:
            with _Traffic(live, served) as traffic:
                copy_version(served, repo, "m", 2, class_names=_v2_names(served), atomic=True)
                time.sleep(0.3)
                traffic.wait_answers(4)
                assert traffic.answers[-1][2] == "1"  # nothing is loaded until asked
                client.load_model("m")
                assert client.get_model_metadata("m")["versions"] == ["2"]
                traffic.wait_version("2")

                copy_version(served, repo, "m", 3, corrupt="flip", atomic=True)
                with pytest.raises(InferenceServerException, match="version 3 was refused .*; version 2 is served") as e:
                    client.load_model("m")
                assert e.value.status() == "400"
                traffic.wait_answers(6)
            traffic.check(["1", "2"], served)
            assert _index(live) == {("m", "2", "READY"), ("m", "3", "UNAVAILABLE")}

            client.unload_model("m")
            assert not client.is_model_ready("m")
            assert _index(live) == {("m", "2", "UNAVAILABLE"), ("m", "3", "UNAVAILABLE")}
            r = httpx.post(f"http://127.0.0.1:{live.port}/v2/models/m/infer", json=infer_json(batch(served, 1)))
            assert r.status_code == 404 and "is unloaded; POST /v2/repository/models/m/load loads it" in r.json()["error"]
            client.unload_model("m")  # unloading again is no error, as in Triton
            shutil.rmtree(repo / "m" / "3")
            client.load_model("m")
            assert client.is_model_ready("m", "2") and _index(live) == {("m", "2", "READY")}
            with pytest.raises(InferenceServerException, match="the model repository has no model 'nope'"):
                client.load_model("nope")
            r = httpx.post(f"http://127.0.0.1:{live.port}/v2/repository/models/m/load", json={"parameters": {"config": "{}"}})
            assert r.status_code == 400 and "not supported" in r.json()["error"]
        finally:
            client.close()
        _wait(lambda: not live.state.control._retiring, "the old versions to close")


def test_model_control_none_ignores_new_versions_and_refuses_load_and_unload(repo, served):
    with Live(ServeSettings(models=repo)) as live:
        url = f"http://127.0.0.1:{live.port}"
        copy_version(served, repo, "m", 2, atomic=True)
        time.sleep(0.5)
        assert httpx.get(f"{url}/v2/models/m").json()["versions"] == ["1"]
        for action in ("load", "unload"):
            r = httpx.post(f"{url}/v2/repository/models/m/{action}")
            assert r.status_code == 400  # a 4xx: the caller's request, not the server, is at fault
            assert r.json()["error"].startswith("explicit model load / unload is not allowed: model control is 'none'")
            assert "--model-control explicit" in r.json()["error"]
        assert httpx.get(f"{url}/v2/models/m").json()["versions"] == ["1"]


def test_explicit_needs_one_worker():
    with pytest.raises(ValueError, match="model control 'explicit' needs 1 worker, not 2"):
        ServeSettings(model_control="explicit", workers=2)
