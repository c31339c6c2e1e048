"""Model control, as Triton's --model-control-mode: which version of each model is served, and when that changes.

none: the repository is read once, at start-up. poll: it is scanned again every
`poll_s` seconds; new versions and new models are loaded, removed models
unloaded. explicit: POST /v2/repository/models/{name}/load and .../unload do it
on request (the models found at start-up are loaded, as Triton's --load-model=*).

The repository is not trusted. Each model is loaded on its own, under its own lock
and within `load_timeout_s`: read on a daemon thread (a blocked read holds nothing
but that thread), checked (metadata, onnx sha256, no external data, the server's
batch limits), opened, and warmed up at batch 1, 2 and max_batch_size, where it must
answer one float32 row of the declared classes per input row, each row the same as
for that input alone. A version that fails is refused (UNAVAILABLE in the index with
its reason, one ERROR line), and tried again only when its files change; the other
models and the version serving keep serving. Only then is the model's entry swapped;
the old version closes once the requests that found it are answered.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TypeVar

import numpy as np

from serving.artifact import Found, discover, read_artifact, version_files
from serving.batching import DynamicBatcher
from serving.errors import ArtifactError, BadRequest, NotAllowed, NotFound, ServingError
from serving.metrics import Metrics
from serving.repository import LoadedModel, ModelRepository
from serving.runtime import ModelRuntime, release_memory
from serving.settings import ServeSettings

__all__ = ["ModelControl"]

log = logging.getLogger("serving.control")

_Files = tuple[tuple[int, int] | None, ...]  # (size, mtime) of metadata.json and model.onnx, None where absent
T = TypeVar("T")


def _open(settings: ServeSettings, name: str, version: int, providers: list[str]) -> tuple[ModelRuntime, _Files]:
    """A session for one checked version, and its files as they were read (blocking)."""
    folder = settings.models / name / str(version)
    files = version_files(folder)
    artifact = read_artifact(settings.models, name, version)
    meta = artifact.meta
    if meta.max_batch_size > settings.max_batch_size:
        raise ArtifactError(
            f"{name}/{version}: max_batch_size {meta.max_batch_size} is over the server's limit of {settings.max_batch_size} "
            "(REFINER_SERVE_MAX_BATCH_SIZE)"
        )
    batch_bytes = meta.max_batch_size * math.prod(meta.input.shape) * 4
    if batch_bytes > settings.max_batch_bytes:
        raise ArtifactError(
            f"{name}/{version}: a full batch ({meta.max_batch_size} x {meta.input.shape} FP32) is {batch_bytes} bytes, over the "
            f"server's limit of {settings.max_batch_bytes} (REFINER_SERVE_MAX_BATCH_BYTES)"
        )
    runtime = ModelRuntime(artifact, providers, settings.intra_op_threads)
    del artifact  # the checked bytes: the session has its own copy of the weights
    release_memory()  # and the transient copies of checking and opening go back to the system
    return runtime, files


def _on_daemon_thread(func: Callable[..., T], *args: object) -> asyncio.Future[T]:
    """`func(*args)` on a new daemon thread, as a future of the running loop. Await it through asyncio.shield with a
    timeout: if the call blocks for good (a FIFO, a stalled network file system), the wait still ends, and the
    thread holds neither a worker pool nor the process's exit. The future is done once the call returns."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()
    future.add_done_callback(lambda f: f.cancelled() or f.exception())  # read by whoever still waits; else dropped

    def settle(result: object, error: BaseException | None) -> None:
        if not future.done():
            future.set_exception(error) if error is not None else future.set_result(result)  # type: ignore[arg-type]

    def run() -> None:
        try:
            result, error = func(*args), None
        except BaseException as e:  # handed to the awaiting task
            result, error = None, e
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:  # the loop closed while this thread was blocked
            pass

    threading.Thread(target=run, name=f"read-{getattr(func, '__name__', 'model')}", daemon=True).start()
    return future


class ModelControl:
    """Loads, swaps and unloads the models of `repository`: one change per model at a time, models independently."""

    def __init__(self, settings: ServeSettings, metrics: Metrics, repository: ModelRepository) -> None:
        self.settings = settings
        self.metrics = metrics
        self.repository = repository
        self._providers: list[str] = []
        self._scan_lock = asyncio.Lock()  # one scan at a time
        self._locks: dict[str, asyncio.Lock] = {}  # one load, swap or unload of a model at a time
        self._refused_files: dict[tuple[str, int], _Files | None] = {}  # refused versions, with their files at the time
        self._reading: dict[tuple[str, int], asyncio.Future[object]] = {}  # reads past their timeout, maybe still blocked
        self._retiring: set[LoadedModel] = set()  # replaced or unloaded, closing once their requests are answered
        self._tasks: set[asyncio.Task[None]] = set()  # the retirements
        self._poller: asyncio.Task[None] | None = None
        self._scanned = False

    async def start(self, providers: list[str]) -> list[str]:
        """Load every model of the repository (FileNotFoundError if it is missing); under "poll", keep scanning it.
        Returns the reasons of the models and versions refused."""
        self._providers = providers
        await self.scan()
        if self.settings.model_control == "poll":
            self._poller = asyncio.get_running_loop().create_task(self._poll(), name="repository-poll")
            log.info("model control poll: the repository is scanned every %g s", self.settings.poll_s)
        refused = [why for versions in self.repository.refused.values() for why in versions.values()]
        return refused + list(self.repository.unreadable.values())

    async def scan(self) -> None:
        """Serve each model's newest good (or pinned) version; unload the models whose folder is gone. Models load side by side."""
        async with self._scan_lock:
            found = await self._discover()
            self._note_unreadable(found)
            names = set(found.versions) | set(self.repository.models) | set(self.repository.refused) | set(self.settings.pinned_versions)
            names -= set(self.repository.unloaded) | set(found.unreadable)
            await asyncio.gather(*(self._sync_locked(name, found.versions.get(name)) for name in sorted(names)))
            self._scanned = True

    async def load(self, name: str) -> None:
        """Triton's explicit load: serve `name`'s newest (or pinned) version, reloading it if its files changed;
        BadRequest when that version is not served after."""
        self._explicit_only()
        found = await self._discover()
        if name in found.unreadable:
            raise BadRequest(f"failed to load {name!r}: {found.unreadable[name]}")
        if name not in found.versions:
            raise NotFound(f"failed to load {name!r}: the model repository has no model {name!r}")
        self.repository.unloaded.pop(name, None)
        versions = found.versions[name]
        wanted = self.settings.pinned_versions.get(name, versions[0] if versions else None)
        await self._sync_locked(name, versions, reload=True)
        model = self.repository.models.get(name)
        if wanted is None:
            raise BadRequest(f"failed to load {name!r}: its folder holds no version folder (1, 2, ...)")
        if model is None or model.meta.version != wanted:
            now = f"version {model.meta.version} is served" if model else "no version of it is served"
            why = self.repository.refused.get(name, {}).get(wanted, "see the server log")
            raise BadRequest(f"failed to load {name!r}: version {wanted} was refused ({why}); {now}")

    async def unload(self, name: str) -> None:
        """Triton's explicit unload: stop serving `name` now; requests already holding it are still answered."""
        self._explicit_only()
        async with self._lock(name):
            model = self.repository.models.get(name)
            if model is None:
                if name in self.repository.unloaded:
                    return
                raise NotFound(f"failed to unload {name!r}: no such model is loaded")
            self._unserve(name, "unloaded on request")
            self.repository.unloaded[name] = model.meta.version

    async def close(self, timeout_s: float) -> None:
        """Stop polling, then close every version, serving or retiring; queued requests get up to `timeout_s`."""
        if self._poller is not None:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        models = [*self.repository.models.values(), *self._retiring]
        await asyncio.gather(*(m.batcher.close(timeout_s) for m in models))

    def _explicit_only(self) -> None:
        mode = self.settings.model_control
        if mode != "explicit":  # Triton answers this refusal too ("explicit model load / unload is not allowed ...")
            raise NotAllowed(
                f"explicit model load / unload is not allowed: model control is {mode!r}; start the server with "
                "--model-control explicit (REFINER_SERVE_MODEL_CONTROL=explicit)"
            )

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    async def _discover(self) -> Found:
        try:
            return await asyncio.wait_for(asyncio.shield(_on_daemon_thread(discover, self.settings.models)), self.settings.load_timeout_s)
        except TimeoutError:
            raise TimeoutError(f"listing the model repository took over {self.settings.load_timeout_s:g} s") from None

    def _note_unreadable(self, found: Found) -> None:
        for name, why in found.unreadable.items():
            if self.repository.unreadable.get(name) != why:
                log.error("REFUSED model %s: %s", name, why)
        self.repository.unreadable = dict(found.unreadable)

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.settings.poll_s)
            try:
                await self.scan()
            except Exception as e:  # a repository being edited (a folder gone mid-scan): the next scan sees it settled
                log.error("repository scan failed (%s: %s); the models loaded keep serving", type(e).__name__, e)

    async def _sync_locked(self, name: str, versions: list[int] | None, reload: bool = False) -> None:
        async with self._lock(name):
            await self._sync(name, versions, reload)

    async def _sync(self, name: str, versions: list[int] | None, reload: bool) -> None:
        """Serve the newest version of `name` that loads (its pinned one if pinned); versions None: no folder `name`.
        reload: read the version serving again if its files changed."""
        current = self.repository.models.get(name)
        present = versions or []
        pinned = self.settings.pinned_versions.get(name)
        for version in [v for v in self.repository.refused.get(name, {}) if v not in present and v != pinned]:
            self._unrefuse(name, version)  # its folder is gone
        if pinned is not None and pinned not in present:
            where = f"{name}/ does not exist" if versions is None else f"versions present are {present}"
            self._refuse(name, pinned, f"{name}/{pinned}: pinned, but {where}", None)
            return
        if not present:
            if current is not None:
                self._unserve(name, "its folder is gone from the repository" if versions is None else "it has no version left")
            elif versions is not None and not self._scanned:
                log.warning("model %s: no version folder in %s/; skipped", name, name)
            return
        for version in [pinned] if pinned is not None else present:
            folder = self.settings.models / name / str(version)
            if current is not None and version == current.meta.version:
                if not reload or await self._files(folder) == current.files:
                    return  # the newest good version is the one serving
            elif (name, version) in self._refused_files and self._refused_files[name, version] == await self._files(folder):
                continue  # refused, and unchanged since
            model = await self._load(name, version)
            if model is not None:
                self._swap(name, model)
                return

    async def _files(self, folder: Path) -> _Files | None:
        """The version's files now (None when looking timed out: a stuck file system)."""
        try:
            return await asyncio.wait_for(asyncio.shield(_on_daemon_thread(version_files, folder)), self.settings.load_timeout_s)
        except TimeoutError:
            return None

    async def _load(self, name: str, version: int) -> LoadedModel | None:
        """The version checked, opened and warmed up beside whatever serves now; None when refused (logged)."""
        s = self.settings
        key = (name, version)
        if key in self._reading and not self._reading[key].done():
            self._refuse(name, version, f"{name}/{version}: an earlier read of its files is still blocked", None)
            return None
        self.repository.loading.add(name)
        model: LoadedModel | None = None
        try:
            async with asyncio.timeout(s.load_timeout_s):
                read = self._reading[key] = _on_daemon_thread(_open, s, name, version, self._providers)
                runtime, files = await asyncio.shield(read)  # past the timeout, a blocked read keeps its entry
                del self._reading[key]
                model = LoadedModel(runtime, self._batcher(runtime), files)
                model.batcher.start()
                await _warm_up(model)
        except TimeoutError:
            self._refuse(name, version, f"{name}/{version}: reading, opening and warming up took over {s.load_timeout_s:g} s "
                         "(REFINER_SERVE_LOAD_TIMEOUT_S)", None)  # fmt: skip
        except (ArtifactError, ServingError, ValueError) as e:
            self._refuse(name, version, str(e) if isinstance(e, ArtifactError) else f"{name}/{version}: warm-up failed: {e}", model.files if model else None)
        except Exception as e:  # whatever else a hostile file can make a library raise: this model only
            log.exception("loading model %s version %d failed unexpectedly", name, version)
            self._refuse(name, version, f"{name}/{version}: {type(e).__name__}: {e}", None)
        else:
            meta = runtime.meta
            log.info(
                "loaded model %s version %d on %s (input %s %s, %d classes, max batch %d)",
                name, version, runtime.provider, meta.input.name, [-1, *meta.input.shape], len(meta.class_names), meta.max_batch_size,
            )  # fmt: skip
            model.batcher.on_broken = partial(self._broken, model)
            return model
        finally:
            self.repository.loading.discard(name)
        if model is not None:
            await model.batcher.close(0)
        return None

    def _batcher(self, runtime: ModelRuntime) -> DynamicBatcher:
        s, name = self.settings, runtime.meta.name
        return DynamicBatcher(
            name, runtime.run, max_batch_size=runtime.meta.max_batch_size, max_delay_s=s.max_queue_delay_ms / 1000,
            queue_size=s.queue_size, coalesce=s.batching, on_batch=partial(self.metrics.observe_batch, name),
        )  # fmt: skip

    def _broken(self, model: LoadedModel, reason: str) -> None:
        """A served version answered a batch with the wrong number of rows: take it out of service until its files change."""
        name, version = model.meta.name, model.meta.version
        if self.repository.models.get(name) is model:
            self._unserve(name, reason)
        self._refuse(name, version, f"{name}/{version}: taken out of service: {reason}", model.files)

    def _swap(self, name: str, model: LoadedModel) -> None:
        """Serve `model` from the next request on; the version it replaces closes after its requests in flight."""
        old = self.repository.models.get(name)
        self.repository.models[name] = model  # one assignment on the event loop: every request finds one version or the other
        self._unrefuse(name, model.meta.version)
        self.metrics.queue_depth.labels(name).set_function(lambda: model.batcher.depth)
        self.metrics.loaded.labels(name, str(model.meta.version), model.runtime.provider).set(1)
        if old is not None:
            log.info("model %s: version %d replaces version %d", name, model.meta.version, old.meta.version)
            self._retire(old)

    def _unserve(self, name: str, why: str) -> None:
        model = self.repository.models.pop(name)
        self.metrics.queue_depth.remove(name)
        log.info("model %s version %d unloaded: %s", name, model.meta.version, why)
        self._retire(model)

    def _retire(self, model: LoadedModel) -> None:
        self.metrics.loaded.remove(model.meta.name, str(model.meta.version), model.runtime.provider)
        self._retiring.add(model)
        task = asyncio.get_running_loop().create_task(self._close_when_idle(model))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _close_when_idle(self, model: LoadedModel) -> None:
        while model.users:  # requests that found this version before the swap; none can find it now
            await asyncio.sleep(0.01)
        await model.batcher.close(0)
        model.runtime.close()
        self._retiring.discard(model)
        log.info("model %s version %d closed", model.meta.name, model.meta.version)

    def _refuse(self, name: str, version: int, reason: str, files: _Files | None) -> None:
        if self.repository.refused.get(name, {}).get(version) != reason:
            log.error("REFUSED model %s version %d: %s", name, version, reason)
        self.repository.refused.setdefault(name, {})[version] = reason
        self._refused_files[name, version] = files  # None (not known): tried again at the next scan

    def _unrefuse(self, name: str, version: int) -> None:
        versions = self.repository.refused.get(name, {})
        versions.pop(version, None)
        if not versions:
            self.repository.refused.pop(name, None)
        self._refused_files.pop((name, version), None)


async def _warm_up(model: LoadedModel) -> None:
    """Inference at batch 1, 2 and max_batch_size on fixed random inputs, on the session itself (not counted as
    traffic): one float32 row of the declared classes per input row, and each row the answer to its input alone
    (a model mixing rows would mix clients' answers)."""
    meta = model.meta
    sizes = sorted({1, min(2, meta.max_batch_size), meta.max_batch_size})
    x = np.random.default_rng(0).standard_normal((sizes[-1], *meta.input.shape), dtype=np.float32)
    answers = {}
    for n in sizes:
        try:
            y = await asyncio.shield(_on_daemon_thread(model.runtime.run, x[:n]))
        except Exception as e:  # onnxruntime's own errors: a graph that cannot take this batch
            raise ValueError(f"at batch {n} inference failed: {str(e)[:300]}") from e
        expected = (n, len(meta.class_names))
        if not isinstance(y, np.ndarray) or y.dtype != np.float32 or y.shape != expected:
            got = f"{y.dtype} of shape {list(y.shape)}" if isinstance(y, np.ndarray) else type(y).__name__
            raise ValueError(f"at batch {n} the model returns {got}, expected float32 of shape {list(expected)}")
        answers[n] = y
    alone = answers[1][0]
    for n in sizes[1:]:
        gap = float(np.max(np.abs(answers[n][0] - alone)))
        if not gap <= 1e-3 * (1.0 + float(np.max(np.abs(alone)))):  # not <=: a NaN gap fails too
            raise ValueError(f"row 0 of a batch of {n} differs from the same input alone by {gap:.3g}: each row's answer must depend on its own input only")
    log.info("model %s version %d answered its warm-up at batch %s", meta.name, meta.version, sizes)
