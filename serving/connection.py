"""Connection guards uvicorn does not have: a bound on request-head bytes, a deadline for the head, a shutdown grace.

uvicorn's httptools protocol buffers a request head of any size for as long as
the client takes. This subclass answers 431 once the head passes
`max_header_bytes` and 408 when it has not arrived within `header_timeout_s`
(also for a connection that never sends a byte), then closes the connection.
At shutdown an idle keep-alive connection stays open `shutdown_grace_s` for a
request already in transit, which is answered with `Connection: close`,
instead of being reset. Past `max_connections` (uvicorn's `limit_concurrency`)
uvicorn answers a text/plain 503 of its own; here that 503 is JSON with
Retry-After, like every other error the server sends. The limits are the
app's ServeSettings, which its lifespan puts in the lifespan state (so every
worker process reads its own); give uvicorn
`http="serving.connection:GuardedHttpProtocol"`.
"""

from __future__ import annotations

import asyncio
import logging

import orjson
from starlette.types import Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from serving.settings import ServeSettings

__all__ = ["SETTINGS_KEY", "GuardedHttpProtocol"]

SETTINGS_KEY = "refiner.serve_settings"  # where the app's lifespan leaves its ServeSettings

_REASONS = {408: b"Request Timeout", 431: b"Request Header Fields Too Large", 503: b"Service Unavailable"}


_DEFAULTS = ServeSettings.model_fields

log = logging.getLogger("serving.connection")


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the guards above."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        settings = self.app_state.get(SETTINGS_KEY)
        limits = ("max_header_bytes", "header_timeout_s", "shutdown_grace_s", "retry_after_s")
        self.max_header_bytes, self.header_timeout_s, self.shutdown_grace_s, self.retry_after_s = (
            getattr(settings, name) if settings is not None else _DEFAULTS[name].default for name in limits
        )
        self._head_bytes = 0
        self._in_head = True  # waiting for (the rest of) a request head
        self._closing_soon = False
        self._head_timer: asyncio.TimerHandle | None = self.loop.call_later(self.header_timeout_s, self._head_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)  # may start a request (on_message_begin) or finish its head
        if self._in_head and not self.transport.is_closing():
            self._head_bytes += len(data)
            if self._head_bytes > self.max_header_bytes:
                self._refuse(431, f"the request line and headers exceed {self.max_header_bytes} bytes")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head, self._head_bytes = True, 0
        if self._head_timer is None:  # a keep-alive connection's next request: its head gets the same deadline
            self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timeout)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._cancel_head_timer()
        limit = self.limit_concurrency
        if limit is not None and (len(self.connections) >= limit or len(self.tasks) >= limit):
            # uvicorn's own check would answer with its text/plain `service_unavailable`: run this request
            # through uvicorn's usual cycle (pipelining, keep-alive, logging) but with the JSON 503 as its app.
            log.warning("over the concurrency limit (max_connections=%d): answered 503", limit)
            app, self.app, self.limit_concurrency = self.app, self._over_limit, None
            try:
                super().on_headers_complete()
            finally:
                self.app, self.limit_concurrency = app, limit
        else:
            super().on_headers_complete()
        if self._closing_soon and self.cycle is not None:
            self.cycle.keep_alive = False

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._closing_soon and not self.transport.is_closing():
            self.transport.close()

    def shutdown(self) -> None:
        """Close when idle, after a grace for a request already on its way; a running request ends its connection."""
        self._closing_soon = True
        if self.cycle is None or self.cycle.response_complete:
            self.loop.call_later(self.shutdown_grace_s, self._close_if_idle)
        else:
            self.cycle.keep_alive = False

    def _close_if_idle(self) -> None:
        idle = (self.cycle is None or self.cycle.response_complete) and not (self._in_head and self._head_bytes)
        if idle and not self.transport.is_closing():
            self.transport.close()

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timeout(self) -> None:
        self._head_timer = None
        if self._in_head and not self.transport.is_closing():
            if self._head_bytes == 0 and (self.cycle is not None or self._closing_soon):
                self.transport.close()  # an idle keep-alive connection: uvicorn's keep-alive timeout's job, close quietly
            else:
                self._refuse(408, f"the request head did not arrive within {self.header_timeout_s:g} s")

    async def _over_limit(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The ASGI app of a request past `max_connections`: a JSON 503 with Retry-After, then close."""
        message = f"the server is at its connection limit (max_connections={self.limit_concurrency}); retry later"
        body = orjson.dumps({"error": message})
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
            (b"retry-after", str(self.retry_after_s).encode()),
        ]
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    def _refuse(self, status: int, message: str) -> None:
        """Answer a JSON error and close: the connection is in no state to carry another request."""
        self._cancel_head_timer()
        body = orjson.dumps({"error": message})
        head = (
            b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
            % (status, _REASONS[status], len(body))
        )
        self.transport.write(head + body)
        self.transport.close()
