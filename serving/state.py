"""The server's life: load and warm up every model, answer readiness, drain on shutdown."""

from __future__ import annotations

import asyncio
import logging
import math
import os
import signal
import threading
from collections.abc import Callable
from functools import partial
from typing import TypeVar

import anyio
import anyio.to_thread
import numpy as np

from serving.batching import DynamicBatcher
from serving.errors import ServingError
from serving.metrics import Metrics
from serving.repository import LoadedModel, ModelRepository, load_runtimes
from serving.runtime import ModelRuntime, choose_providers
from serving.settings import ServeSettings

__all__ = ["ServerState", "watch_shutdown_signals"]

_JSON_OVERHEAD = 64 * 1024  # bytes of an infer request's JSON beside its tensor data

log = logging.getLogger("serving.state")
T = TypeVar("T")


class ServerState:
    """Settings, metrics and models of one app; ready once every model loaded and answered a warm-up."""

    def __init__(self, settings: ServeSettings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.repository = ModelRepository()
        self.started = False
        self.draining = False  # set on the first shutdown signal: no longer ready
        self.in_flight = 0  # HTTP requests being answered (see middleware.py)
        self.body_limit = settings.max_body_bytes or 0  # largest infer body accepted; derived from the models in start()
        self._limiter: anyio.CapacityLimiter | None = None

    @property
    def ready(self) -> bool:
        return self.started and not self.draining and bool(self.repository.models)

    def _derived_body_limit(self) -> int:
        """The setting, else the largest valid request of any model served: max_batch x input bytes as JSON text
        (json_expansion bytes per tensor byte) plus the JSON around it."""
        if self.settings.max_body_bytes is not None:
            return self.settings.max_body_bytes
        tensors = [m.meta.max_batch_size * math.prod(m.meta.input.shape) * 4 for m in self.repository.models.values()]
        return int(max(tensors, default=0) * self.settings.json_expansion) + _JSON_OVERHEAD

    async def to_thread(self, func: Callable[..., T], *args: object) -> T:
        """Run blocking `func` (decoding, parsing) on the bounded worker threads, off the event loop."""
        assert self._limiter is not None, "ServerState.start() was not called"
        return await anyio.to_thread.run_sync(func, *args, limiter=self._limiter)

    async def start(self) -> None:
        """Load every model (blocking work on a thread), start its batcher and warm it up."""
        s = self.settings
        self._limiter = anyio.CapacityLimiter(s.decode_threads)
        providers = choose_providers(s.device)
        log.info("model repository %s, providers %s, batching %s", s.models.resolve(), providers, s.batching)
        runtimes, refused = await anyio.to_thread.run_sync(
            load_runtimes, s.models, s.pinned_versions, providers, s.intra_op_threads
        )
        self.repository.refused.update(refused)
        for name, runtime in runtimes.items():
            model = self._serve(name, runtime)
            try:
                await self._warm_up(model)
            except (ServingError, ValueError) as e:
                await model.batcher.close(0)
                del self.repository.models[name]
                self.repository.refused.setdefault(name, {})[runtime.meta.version] = f"warm-up failed: {e}"
                log.error("REFUSED model %s version %d: warm-up failed: %s", name, runtime.meta.version, e)
                continue
            self.metrics.loaded.labels(name, str(runtime.meta.version), runtime.provider).set(1)
        if not self.repository.models:
            log.error("no model could be loaded from %s; the server stays not ready", s.models)
        self.body_limit = self._derived_body_limit()
        self.started = True
        log.info("ready: serving %s", {n: m.meta.version for n, m in self.repository.models.items()})

    def _serve(self, name: str, runtime: ModelRuntime) -> LoadedModel:
        s = self.settings
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
        self.metrics.queue_depth.labels(name).set_function(lambda: batcher.depth)
        model = self.repository.models[name] = LoadedModel(runtime, batcher)
        return model

    @staticmethod
    async def _warm_up(model: LoadedModel) -> None:
        meta = model.meta
        y = await model.batcher.infer(np.zeros((1, *meta.input.shape), dtype=np.float32))
        if y.shape != (1, len(meta.class_names)):
            raise ValueError(f"the model returns logits of shape {y.shape}, expected (1, {len(meta.class_names)}) classes")
        log.info("model %s version %d answered its warm-up inference", meta.name, meta.version)

    def begin_drain(self) -> None:
        """The first shutdown signal: not ready from now on (the deadline is armed by watch_shutdown_signals)."""
        if self.draining:
            return
        self.draining = True
        log.info("shutdown signal: not ready; in-flight requests get %.1f s", self.settings.drain_timeout_s)

    async def stop(self) -> None:
        """Stop being ready, wait for in-flight requests (bounded), then stop the batchers."""
        self.draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.drain_timeout_s
        while self.in_flight and loop.time() < deadline:
            await asyncio.sleep(0.01)
        if self.in_flight:
            log.warning("shutdown: %d requests still in flight after %.1f s", self.in_flight, self.settings.drain_timeout_s)
        remaining = max(0.0, deadline - loop.time())
        await asyncio.gather(*(m.batcher.close(remaining) for m in self.repository.models.values()))
        log.info("shutdown complete")


def watch_shutdown_signals(state: ServerState) -> None:
    """Chain onto the server's SIGINT/SIGTERM handlers (uvicorn's, however it was started).

    The first signal makes the server not ready before connections drain, and
    arms a hard deadline: past `hard_deadline_s` the server's handler is called
    again (uvicorn: force exit), and 2 s later the process exits regardless.
    Signal handlers live in the main thread only; elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    loop = asyncio.get_running_loop()

    def deadline(previous: Callable[[int, object], None] | None) -> None:
        log.error("shutdown passed its hard deadline of %.1f s; exiting", state.settings.hard_deadline_s)
        if callable(previous):
            previous(signal.SIGINT, None)
        loop.call_later(2.0, os._exit, 1)

    for sig in (signal.SIGINT, signal.SIGTERM):
        previous = signal.getsignal(sig)

        def handler(signum: int, frame: object, previous=previous) -> None:
            if not state.draining:
                state.begin_drain()
                loop.call_soon_threadsafe(loop.call_later, state.settings.hard_deadline_s, deadline, previous)
            if callable(previous):
                previous(signum, frame)

        signal.signal(sig, handler)
