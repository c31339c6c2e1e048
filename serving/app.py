"""The FastAPI app: `uvicorn serving.app:app` (settings from REFINER_SERVE_* variables) or `create_app(settings)`.

Models are loaded in the lifespan, not at import; every refused request is
answered {"error": "..."} with a 4xx status saying what was wrong, every 503
carries Retry-After. `make_server` (what `refiner serve` runs) adds the
connection guards of serving/connection.py: bounded request heads, head and
keep-alive timeouts, a connection limit and a shutdown grace.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Iterator

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import Receive, Scope, Send

from serving import routes_classify, routes_metrics, routes_repository, routes_v2
from serving.connection import SETTINGS_KEY, GuardedHttpProtocol
from serving.errors import NotAllowed, PayloadTooLarge, RequestTimeout, ServingError, Unauthorized
from serving.metrics import Metrics
from serving.middleware import RequestMetricsMiddleware
from serving.runtime import available_cores
from serving.settings import ServeSettings
from serving.state import ServerState, StartupError, watch_shutdown_signals

__all__ = ["create_app", "make_server", "serve", "app"]

log = logging.getLogger("serving.app")


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def _serving_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServingError)
    if exc.status_code >= 500:
        log.error("%s %s: %s", request.method, request.url.path, exc.message)
    elif isinstance(exc, NotAllowed | Unauthorized):
        request.app.state.server.refusals.note(f"{request.method} {request.url.path}: {exc.message}")
    response = _error(exc.status_code, exc.message)
    if isinstance(exc, PayloadTooLarge | RequestTimeout | Unauthorized):  # the body was not read: the connection cannot be reused
        response.headers["Connection"] = "close"
    if exc.status_code == 503:
        response.headers["Retry-After"] = str(request.app.state.server.settings.retry_after_s)
    return response


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    parts = [f"{' '.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
    return _error(422, "invalid request parameters: " + "; ".join(parts))


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    message = str(exc.detail)
    if exc.status_code == 404:
        message = f"no such endpoint {request.url.path!r}; the API is listed at /docs"
    elif exc.status_code == 405:
        message = f"method {request.method} is not allowed on {request.url.path!r}; the API is listed at /docs"
    return JSONResponse({"error": message}, status_code=exc.status_code, headers=exc.headers)


def _configure_logging() -> None:
    """Show the serving logs (models loaded, providers, refusals) when nothing else configured logging."""
    logger = logging.getLogger("serving")
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def create_app(settings: ServeSettings | None = None) -> FastAPI:
    """A new app serving the repository of `settings` (default: from the environment)."""
    settings = settings or ServeSettings()
    state = ServerState(settings, Metrics())
    _configure_logging()

    async def lifespan(scope: Scope, receive: Receive, send: Send) -> None:
        """ASGI lifespan: any start-up failure ends startup with its reason (a known one in one line, others with
        their traceback); it is never left to uvicorn's "lifespan unsupported", which would serve nothing."""
        await receive()  # lifespan.startup
        grpc_server = None
        try:
            await state.start()
            if state.settings.grpc_port is not None:
                from serving.grpc_server import GrpcServer  # grpcio is imported only when asked for

                grpc_server = state.grpc = GrpcServer(state)
                await grpc_server.start()
        except (OSError, StartupError, TimeoutError) as e:  # uvicorn logs the message, not the traceback
            await send({"type": "lifespan.startup.failed", "message": str(e)})
            raise
        except Exception as e:
            log.exception("start-up failed")
            await send({"type": "lifespan.startup.failed", "message": f"{type(e).__name__}: {e}"})
            raise
        watch_shutdown_signals(state)
        if "state" in scope:  # the connection guards read their limits from here
            scope["state"][SETTINGS_KEY] = state.settings
        await send({"type": "lifespan.startup.complete"})
        await receive()  # lifespan.shutdown
        if grpc_server is not None:  # no new calls; those in flight are counted in state.in_flight, which stop() waits for
            await asyncio.gather(grpc_server.stop(state.settings.drain_timeout_s), state.stop())
        else:
            await state.stop()
        await send({"type": "lifespan.shutdown.complete"})

    application = FastAPI(
        title="refiner serving",
        summary="Refined models over HTTP: KServe v2 / Open Inference Protocol and an image endpoint",
    )
    application.router.lifespan = lifespan  # type: ignore[method-assign]
    application.state.server = state
    application.add_middleware(RequestMetricsMiddleware, state=state)
    application.add_exception_handler(ServingError, _serving_error)
    application.add_exception_handler(RequestValidationError, _validation_error)
    application.add_exception_handler(HTTPException, _http_error)
    for module in (routes_v2, routes_repository, routes_classify, routes_metrics):
        application.include_router(module.router)
    return application


class _DrainingServer(uvicorn.Server):
    """uvicorn's server, made not ready at the first shutdown signal (before connections drain), and returning
    from run() after a shutdown it completed: uvicorn raises the signal again at the end, so a drained SIGTERM
    would end the process with 143 (and SIGINT with a KeyboardInterrupt) instead of exit status 0."""

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self._state = state

    def handle_exit(self, sig: int, frame: object) -> None:
        self._state.begin_drain()
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        with super().capture_signals():
            yield
            self._captured_signals.clear()  # the shutdown they asked for is done (past the hard deadline: exit 1)


def _warn_if_exposed(settings: ServeSettings, host: str) -> None:
    """Load and unload reachable from other machines by anyone: say so once, at start-up."""
    loopback = host in ("localhost", "::1") or host.startswith("127.")
    if settings.model_control == "explicit" and settings.api_key is None and not loopback:
        log.warning(
            "model control is explicit on %s without an API key: anyone who reaches the port can load and unload "
            "models and read the repository index; set REFINER_SERVE_API_KEY (refiner serve --api-key-file)", host
        )  # fmt: skip


def make_server(settings: ServeSettings, host: str = "127.0.0.1", port: int = 8000, **options: object) -> uvicorn.Server:
    """A uvicorn server of a new app with the connection guards; in-flight requests get `drain_timeout_s` at shutdown."""
    _warn_if_exposed(settings, host)
    application = create_app(settings)
    config = uvicorn.Config(
        application, host=host, port=port, http=GuardedHttpProtocol,
        timeout_keep_alive=settings.keep_alive_timeout_s, limit_concurrency=settings.max_connections,
        timeout_graceful_shutdown=max(1, round(settings.drain_timeout_s)), lifespan="on", **options,
    )  # fmt: skip
    return _DrainingServer(config, application.state.server)


def serve(settings: ServeSettings, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run the server until SIGINT/SIGTERM (what `refiner serve` does); `settings.workers` processes share the port.

    Worker processes build their app from REFINER_SERVE_* variables (uvicorn's
    supervisor restarts a worker that dies); the cores are split between them.
    """
    if settings.workers == 1:
        make_server(settings, host, port).run()
        return
    _warn_if_exposed(settings, host)
    if settings.intra_op_threads == 0:
        settings = settings.model_copy(update={"intra_op_threads": max(1, available_cores() // settings.workers)})
    os.environ.update(settings.to_env())
    uvicorn.run(
        "serving.app:app", host=host, port=port, workers=settings.workers, http="serving.connection:GuardedHttpProtocol",
        timeout_keep_alive=settings.keep_alive_timeout_s, limit_concurrency=settings.max_connections,
        timeout_graceful_shutdown=max(1, round(settings.drain_timeout_s)), lifespan="on",
    )  # fmt: skip


app = create_app()
