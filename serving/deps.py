"""FastAPI dependencies shared by the routers: the server's state, and the restricted-API check."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from serving.access import Api, check_key
from serving.state import ServerState

__all__ = ["ServerDep", "restricted"]


async def _server(request: Request) -> ServerState:
    return request.app.state.server


ServerDep = Annotated[ServerState, Depends(_server)]


def restricted(api: Api) -> object:
    """A dependency refusing `api` (401) without the key header, when the settings set a key and restrict `api`."""

    async def check(request: Request, server: ServerDep) -> None:
        check_key(server.settings, api, request.headers.get(server.settings.api_key_header))

    return Depends(check)
