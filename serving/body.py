"""Request bodies read with a size limit enforced while streaming (Content-Length is not trusted)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import Request

from serving.errors import BadRequest, PayloadTooLarge, RequestTimeout, UnsupportedMediaType
from serving.protocol import decimal

__all__ = ["read_body", "multipart_file"]


async def read_body(request: Request, max_bytes: int, timeout_s: float) -> bytes:
    """The whole body; PayloadTooLarge (413) once more than `max_bytes` have arrived, RequestTimeout (408) after `timeout_s`."""
    if request.headers.get("content-encoding", "identity").lower() != "identity":
        raise UnsupportedMediaType(
            f"Content-Encoding {request.headers['content-encoding']!r} is not accepted; send the body uncompressed"
        )
    declared = decimal(request.headers.get("content-length"))
    if declared is not None and declared > max_bytes:
        raise PayloadTooLarge(f"request body is {declared} bytes; the limit is {max_bytes} bytes")
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout_s):  # the whole body: a client trickling bytes gains nothing
            async for chunk in request.stream():
                size += len(chunk)
                if size > max_bytes:
                    raise PayloadTooLarge(f"request body exceeds the limit of {max_bytes} bytes")
                chunks.append(chunk)
    except TimeoutError:
        raise RequestTimeout(f"the request body did not arrive within {timeout_s:g} s ({size} bytes came)") from None
    return b"".join(chunks)


def _replay(body: bytes) -> Callable[[], Awaitable[dict]]:
    """An ASGI receive callable that hands out `body` once."""
    sent = False

    async def receive() -> dict:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


async def multipart_file(request: Request, body: bytes) -> bytes:
    """The content of the one file part of a multipart/form-data `body` (already size-checked)."""
    replayed = Request(request.scope, _replay(body))
    try:
        form = await replayed.form(max_files=1, max_fields=16)
    except (MultiPartException, HTTPException) as e:
        detail = getattr(e, "message", None) or getattr(e, "detail", str(e))
        raise BadRequest(f"malformed multipart/form-data body ({detail}); expected one file part holding the image") from e
    try:
        files = [v for v in form.values() if isinstance(v, UploadFile)]
        if len(files) != 1:
            raise BadRequest(
                f"multipart body has {len(files)} file parts (fields: {list(form.keys())}); "
                "expected exactly one file part holding the image"
            )
        return await files[0].read()
    finally:
        await form.close()
