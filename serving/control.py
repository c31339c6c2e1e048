"""Model control, as Triton's --model-control-mode: which version of each model is served, and when that changes.

none: the repository is read once, at start-up. poll: it is scanned again every
`poll_s` seconds; new versions and new models are loaded, removed models
unloaded. explicit: POST /v2/repository/models/{name}/load and .../unload do it
on request (the models found at start-up are loaded, as Triton's --load-model=*).

A load is checked as at start-up (metadata, onnx sha256, session, a warm-up
inference) while the version serving keeps serving; only then is the model's
entry swapped, and the old version closes once the requests that found it are
answered, so a swap fails no request. A version that fails is refused with one
log line, and tried again only when its files change; the version serving stays.
"""

from __future__ import annotations

import asyncio
import logging
from functools import partial
from pathlib import Path

import anyio.to_thread
import numpy as np

from serving.artifact import discover, read_artifact
from serving.batching import DynamicBatcher
from serving.errors import ArtifactError, BadRequest, NotFound, ServingError, Unavailable
from serving.metrics import Metrics
from serving.repository import LoadedModel, ModelRepository
from serving.runtime import ModelRuntime
from serving.settings import ServeSettings

__all__ = ["ModelControl"]

log = logging.getLogger("serving.control")

_Files = tuple[tuple[int, int] | None, ...]  # (size, mtime) of metadata.json and model.onnx, None where absent


def _files(folder: Path) -> _Files:
    """How a version's files look now: a refused version is tried again when this changes."""
    out = []
    for file in ("metadata.json", "model.onnx"):
        try:
            st = (folder / file).stat()
        except OSError:
            out.append(None)
        else:
            out.append((st.st_size, st.st_mtime_ns))
    return tuple(out)


def _open(models: Path, name: str, version: int, providers: list[str], intra_op_threads: int) -> ModelRuntime:
    """A session for one checked version (blocking)."""
    return ModelRuntime(read_artifact(models, name, version), providers, intra_op_threads)


class ModelControl:
    """Loads, swaps and unloads the models of `repository`, one change at a time."""

    def __init__(self, settings: ServeSettings, metrics: Metrics, repository: ModelRepository) -> None:
        self.settings = settings
        self.metrics = metrics
        self.repository = repository
        self._providers: list[str] = []
        self._lock = asyncio.Lock()  # one scan, load or unload at a time
        self._refused_files: dict[tuple[str, int], _Files] = {}  # refused versions, with their files at the time
        self._retiring: set[LoadedModel] = set()  # replaced or unloaded, closing once their requests are answered
        self._tasks: set[asyncio.Task[None]] = set()  # the retirements
        self._poller: asyncio.Task[None] | None = None
        self._scanned = False

    async def start(self, providers: list[str]) -> None:
        """Load every model of the repository (FileNotFoundError if it is missing); under "poll", keep scanning it."""
        self._providers = providers
        await self.scan()
        if self.settings.model_control == "poll":
            self._poller = asyncio.get_running_loop().create_task(self._poll(), name="repository-poll")
            log.info("model control poll: the repository is scanned every %g s", self.settings.poll_s)

    async def scan(self) -> None:
        """Serve each model's newest good (or pinned) version; unload the models whose folder is gone."""
        async with self._lock:
            found = await anyio.to_thread.run_sync(discover, self.settings.models)
            names = set(found) | set(self.repository.models) | set(self.repository.refused) | set(self.settings.pinned_versions)
            for name in sorted(names - set(self.repository.unloaded)):
                await self._sync(name, found.get(name))
            self._scanned = True

    async def load(self, name: str) -> None:
        """Triton's explicit load: serve `name`'s newest (or pinned) version; BadRequest when that version is not served after."""
        self._explicit_only()
        async with self._lock:
            found = await anyio.to_thread.run_sync(discover, self.settings.models)
            if name not in found:
                raise NotFound(f"failed to load {name!r}: the model repository has no model {name!r}; it has {sorted(found)}")
            self.repository.unloaded.pop(name, None)
            await self._sync(name, found[name])
        wanted = self.settings.pinned_versions.get(name, found[name][0] if found[name] else None)
        model = self.repository.models.get(name)
        if wanted is None:
            raise BadRequest(f"failed to load {name!r}: its folder holds no version folder (1, 2, ...)")
        if model is None or model.meta.version != wanted:
            now = f"version {model.meta.version} is served" if model else "no version of it is served"
            raise BadRequest(f"failed to load {name!r}: version {wanted} was refused (the server log says why); {now}")

    async def unload(self, name: str) -> None:
        """Triton's explicit unload: stop serving `name` now; requests already holding it are still answered."""
        self._explicit_only()
        async with self._lock:
            model = self.repository.models.get(name)
            if model is None:
                if name in self.repository.unloaded:
                    return
                raise NotFound(f"failed to unload {name!r}: no such model is loaded; loaded: {sorted(self.repository.models)}")
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
        if mode != "explicit":  # Triton answers UNAVAILABLE ("explicit model load / unload is not allowed ...") too
            raise Unavailable(
                f"explicit model load / unload is not allowed: model control is {mode!r}; start the server with "
                "--model-control explicit (REFINER_SERVE_MODEL_CONTROL=explicit)"
            )

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.settings.poll_s)
            try:
                await self.scan()
            except Exception as e:  # a repository being edited (a folder gone mid-scan): the next scan sees it settled
                log.error("repository scan failed (%s: %s); the models loaded keep serving", type(e).__name__, e)

    async def _sync(self, name: str, versions: list[int] | None) -> None:
        """Serve the newest version of `name` that loads (its pinned one if pinned); versions None: no folder `name`."""
        current = self.repository.models.get(name)
        present = versions or []
        pinned = self.settings.pinned_versions.get(name)
        for version in [v for v in self.repository.refused.get(name, {}) if v not in present and v != pinned]:
            self._unrefuse(name, version)  # its folder is gone
        if pinned is not None and pinned not in present:
            where = f"{self.settings.models / name} does not exist" if versions is None else f"versions present are {present}"
            self._refuse(name, pinned, f"pinned, but {where}", None)
            return
        if not present:
            if current is not None:
                self._unserve(name, "its folder is gone from the repository" if versions is None else "it has no version left")
            elif versions is not None and not self._scanned:
                log.warning("model %s: no version folder in %s; skipped", name, self.settings.models / name)
            return
        for version in [pinned] if pinned is not None else present:
            if current is not None and version == current.meta.version:
                return  # the newest good version is the one serving
            files = _files(self.settings.models / name / str(version))
            if self._refused_files.get((name, version)) == files:
                continue  # refused, and unchanged since
            model = await self._load(name, version, files)
            if model is not None:
                self._swap(name, model)
                return

    async def _load(self, name: str, version: int, files: _Files) -> LoadedModel | None:
        """The version checked, opened and warmed up beside whatever serves now; None when refused (logged)."""
        s = self.settings
        try:
            runtime = await anyio.to_thread.run_sync(_open, s.models, name, version, self._providers, s.intra_op_threads)
        except ArtifactError as e:
            self._refuse(name, version, str(e), files)
            return None
        batcher = DynamicBatcher(
            name,
            runtime.run,
            max_batch_size=runtime.meta.max_batch_size,
            max_delay_s=s.max_queue_delay_ms / 1000,
            queue_size=s.queue_size,
            coalesce=s.batching,
            on_batch=partial(self.metrics.observe_batch, name),
        )
        batcher.start()
        model = LoadedModel(runtime, batcher)
        try:
            await _warm_up(model)
        except (ServingError, ValueError) as e:
            await batcher.close(0)
            self._refuse(name, version, f"warm-up failed: {e}", files)
            return None
        meta = runtime.meta
        log.info(
            "loaded model %s version %d on %s (input %s %s, %d classes, max batch %d)",
            name, version, runtime.provider, meta.input.name, [-1, *meta.input.shape], len(meta.class_names), meta.max_batch_size,
        )  # fmt: skip
        return model

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
        self._retiring.discard(model)
        log.info("model %s version %d closed", model.meta.name, model.meta.version)

    def _refuse(self, name: str, version: int, reason: str, files: _Files | None) -> None:
        if self.repository.refused.get(name, {}).get(version) != reason:
            log.error("REFUSED model %s version %d: %s", name, version, reason)
        self.repository.refused.setdefault(name, {})[version] = reason
        if files is not None:
            self._refused_files[name, version] = files

    def _unrefuse(self, name: str, version: int) -> None:
        versions = self.repository.refused.get(name, {})
        versions.pop(version, None)
        if not versions:
            self.repository.refused.pop(name, None)
        self._refused_files.pop((name, version), None)


async def _warm_up(model: LoadedModel) -> None:
    meta = model.meta
    y = await model.batcher.infer(np.zeros((1, *meta.input.shape), dtype=np.float32))
    if y.shape != (1, len(meta.class_names)):
        raise ValueError(f"the model returns logits of shape {y.shape}, expected (1, {len(meta.class_names)}) classes")
    log.info("model %s version %d answered its warm-up inference", meta.name, meta.version)
