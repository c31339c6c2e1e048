"""ASGI middleware counting every HTTP request by route template and status, with its latency."""

from __future__ import annotations

import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.state import ServerState

__all__ = ["RequestMetricsMiddleware"]


class RequestMetricsMiddleware:
    """Request counts, latency histogram and in-flight count (which graceful shutdown waits on)."""

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # what the client gets if the app raises before answering
        metrics = self.state.metrics

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        started = time.perf_counter()
        self.state.in_flight += 1
        metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_status)
        finally:
            self.state.in_flight -= 1
            metrics.in_flight.dec()
            # The route template (not the path) keeps label values few: /v2/models/{name}/infer.
            route = getattr(scope.get("route"), "path", "<unmatched>")
            metrics.requests.labels(scope["method"], route, str(status)).inc()
            metrics.latency.labels(scope["method"], route).observe(time.perf_counter() - started)
