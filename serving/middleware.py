"""ASGI middleware: request metrics, and the last word on failures (one log line set, a JSON answer, never text/plain)."""

from __future__ import annotations

import asyncio
import logging
import time

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.state import ServerState

__all__ = ["RequestMetricsMiddleware"]

log = logging.getLogger("serving.app")


class RequestMetricsMiddleware:
    """Request counts, latency histogram and in-flight count (which graceful shutdown waits on).

    An exception no handler took is logged once here and answered as JSON 500
    (Starlette would log it a second time and uvicorn answer text/plain); a
    request cancelled because shutdown passed its drain timeout is answered 503.
    """

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status, started = 500, False  # what the client gets if the app raises before answering
        metrics = self.state.metrics

        async def send_status(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
            await send(message)

        begun = time.perf_counter()
        self.state.in_flight += 1
        metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_status)
        except asyncio.CancelledError:
            # uvicorn cancels requests still running when shutdown passes its drain timeout. This is the
            # request task's top: answering and returning ends it as cancelling would, without a traceback.
            if not started:
                await _answer(send_status, 503, "the server is shutting down; retry on another replica", self.state.settings.retry_after_s)
        except Exception:
            log.exception("%s %s failed", scope["method"], scope["path"])
            if not started:
                await _answer(send_status, 500, "internal server error; the server log has the details")
        finally:
            self.state.in_flight -= 1
            metrics.in_flight.dec()
            # The route template (not the path) keeps label values few: /v2/models/{name}/infer.
            route = getattr(scope.get("route"), "path", "<unmatched>")
            metrics.requests.labels(scope["method"], route, str(status)).inc()
            metrics.latency.labels(scope["method"], route).observe(time.perf_counter() - begun)


async def _answer(send: Send, status: int, message: str, retry_after_s: int | None = None) -> None:
    body = orjson.dumps({"error": message})
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), (b"connection", b"close")]
    if retry_after_s is not None:
        headers.append((b"retry-after", str(retry_after_s).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
