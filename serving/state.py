"""The server's life: load the models (serving/control.py), answer readiness, drain on shutdown."""

from __future__ import annotations

import asyncio
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import anyio
import anyio.to_thread

from serving.control import ModelControl
from serving.metrics import Metrics
from serving.repository import ModelRepository
from serving.runtime import choose_providers
from serving.settings import ServeSettings

__all__ = ["ServerState", "StartupError", "watch_shutdown_signals"]

_JSON_OVERHEAD = 64 * 1024  # bytes of an infer request's JSON beside its tensor data

log = logging.getLogger("serving.state")
T = TypeVar("T")


class RefusalLog:
    """Refused control calls, logged at most once per `every_s` (with how many came since), so that a caller
    hammering a restricted API cannot flood the log."""

    def __init__(self, every_s: float) -> None:
        self.every_s = every_s
        self._last = -math.inf
        self._since = 0

    def note(self, what: str) -> None:
        now = time.monotonic()
        self._since += 1
        if now - self._last >= self.every_s:
            more = f" ({self._since - 1} more refused since the last line)" if self._since > 1 else ""
            log.warning("refused %s%s", what, more)
            self._last, self._since = now, 0


class StartupError(RuntimeError):
    """The server cannot start as its settings ask (exit_on_error with a model refused)."""


class ServerState:
    """Settings, metrics and models of one app, and its readiness.

    Ready means: started, not draining, and serving at least one model; with strict_readiness, also
    serving every model the repository holds (none refused, unreadable or loading; models unloaded on
    request do not count). The default lets the good models serve beside a broken one, which the
    repository index lists UNAVAILABLE with its reason.
    """

    def __init__(self, settings: ServeSettings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.repository = ModelRepository()
        self.control = ModelControl(settings, metrics, self.repository)
        self.started = False
        self.draining = False  # set on the first shutdown signal: no longer ready
        self.in_flight = 0  # HTTP requests being answered (see middleware.py)
        self.refusals = RefusalLog(60.0)  # refused control calls (restricted APIs, load / unload not allowed)
        self._limiter: anyio.CapacityLimiter | None = None
        self.exit_timer: threading.Timer | None = None  # the hard deadline's last resort (watch_shutdown_signals)
        self.grpc: object | None = None  # the gRPC service when settings.grpc_port is set (serving/grpc_server.py)

    @property
    def ready(self) -> bool:
        r = self.repository
        if not self.started or self.draining or not r.models:
            return False
        return not self.settings.strict_readiness or not (set(r.refused) - set(r.models) or r.unreadable or r.loading)

    @property
    def body_limit(self) -> int:
        """Largest infer body accepted: the setting, else the largest valid request of any model served now:
        max_batch x input bytes as JSON text (json_expansion bytes per tensor byte) plus the JSON around it."""
        if self.settings.max_body_bytes is not None:
            return self.settings.max_body_bytes
        tensors = [m.meta.max_batch_size * math.prod(m.meta.input.shape) * 4 for m in self.repository.models.values()]
        return int(max(tensors, default=0) * self.settings.json_expansion) + _JSON_OVERHEAD

    async def to_thread(self, func: Callable[..., T], *args: object) -> T:
        """Run blocking `func` (decoding, parsing) on the bounded worker threads, off the event loop."""
        assert self._limiter is not None, "ServerState.start() was not called"
        return await anyio.to_thread.run_sync(func, *args, limiter=self._limiter)

    async def start(self) -> None:
        """Load and warm up every model (serving/control.py), polling the repository from then on if asked."""
        s = self.settings
        self._limiter = anyio.CapacityLimiter(s.decode_threads)
        providers = choose_providers(s.device)
        log.info(
            "model repository %s, providers %s, batching %s, model control %s",
            s.models.resolve(), providers, s.batching, s.model_control,
        )  # fmt: skip
        refused = await self.control.start(providers)
        if refused and self.settings.exit_on_error:
            await self.control.close(0)
            raise StartupError(f"{len(refused)} model(s) refused and exit_on_error is set: " + "; ".join(refused))
        if not self.repository.models:
            log.error("no model could be loaded from %s; the server stays not ready", s.models)
        self.started = True
        log.info("ready: serving %s", {n: m.meta.version for n, m in self.repository.models.items()})

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
        await self.control.close(max(0.0, deadline - loop.time()))
        if self.exit_timer is not None:
            self.exit_timer.cancel()
        log.info("shutdown complete")


def watch_shutdown_signals(state: ServerState) -> None:
    """Chain onto the server's SIGINT/SIGTERM handlers (uvicorn's, however it was started).

    The first signal makes the server not ready before connections drain, and
    arms a hard deadline: past `hard_deadline_s` the server's handler is called
    again (uvicorn: force exit), and 2 s later the process exits regardless, from
    a timer thread that needs neither the event loop nor the other threads (a read
    blocked for good cannot hold the process). A shutdown that completes disarms it.
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
                state.exit_timer = threading.Timer(state.settings.hard_deadline_s + 2.0, os._exit, (1,))
                state.exit_timer.daemon = True
                state.exit_timer.start()
            if callable(previous):
                previous(signum, frame)

        signal.signal(sig, handler)
