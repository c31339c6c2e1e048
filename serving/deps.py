"""FastAPI dependencies shared by the routers: the server's state, and the restricted-API check."""

from __future__ import annotations

import hmac
from typing import Annotated, Literal

from fastapi import Depends, Request

from serving.errors import Unauthorized
from serving.state import ServerState

__all__ = ["ServerDep", "restricted"]


async def _server(request: Request) -> ServerState:
    return request.app.state.server


ServerDep = Annotated[ServerState, Depends(_server)]

Api = Literal["model-repository", "inference", "metadata", "metrics"]


def restricted(api: Api) -> object:
    """A dependency refusing `api` (401) without the key header, when the settings set a key and restrict `api`.
    The key is compared in constant time, as bytes, so its length is all a timing can tell."""

    async def check(request: Request, server: ServerDep) -> None:
        s = server.settings
        if s.api_key is None or api not in s.restricted_apis:
            return
        given = request.headers.get(s.api_key_header, "").encode("latin-1", "replace")
        if not hmac.compare_digest(given, s.api_key.get_secret_value().encode()):
            what = "without" if not given else "with a wrong"
            raise Unauthorized(f"the {api} API is restricted and this request came {what} {s.api_key_header!r} header")

    return Depends(check)
