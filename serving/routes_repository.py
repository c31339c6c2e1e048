"""Triton's model repository extension: the index, and explicit load / unload (model control "explicit" only)."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter, Request, Response

from serving.body import read_body
from serving.deps import ServerDep, restricted
from serving.errors import BadRequest

__all__ = ["router"]

router = APIRouter(
    prefix="/v2/repository", tags=["v2 model repository (Triton's extension)"], dependencies=[restricted("model-repository")]
)

_SMALL_BODY = 4096  # these requests carry a few flags at most


async def _json_object(request: Request, server: ServerDep, what: str) -> dict[str, Any]:
    """The request's JSON object ({} for an empty body); BadRequest naming the expected shape."""
    body = await read_body(request, _SMALL_BODY, server.settings.body_timeout_s)
    try:
        value = orjson.loads(body) if body.strip() else {}
    except orjson.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise BadRequest(f"{what} takes an empty body or a JSON object")
    return value


@router.post("/index", summary="Repository index: every model version known, READY or UNAVAILABLE")
async def repository_index(request: Request, server: ServerDep) -> list[dict[str, str]]:
    ready = (await _json_object(request, server, 'the repository index ({"ready": true|false})')).get("ready", False)
    if not isinstance(ready, bool):
        raise BadRequest(f'"ready" is {ready!r}; expected true or false')
    return server.repository.index(ready_only=ready)


@router.post("/models/{name}/load", summary="Load (or reload) a model's newest version (model control explicit)")
async def load(name: str, request: Request, server: ServerDep) -> Response:
    parameters = (await _json_object(request, server, "a load request")).get("parameters") or {}
    if not isinstance(parameters, dict) or parameters:
        raise BadRequest(
            f"load parameters {sorted(parameters) if isinstance(parameters, dict) else parameters!r} are not supported "
            "(no config or file override): the model is loaded from the repository as it is"
        )
    await server.control.load(name)
    return Response(status_code=200)


@router.post("/models/{name}/unload", summary="Unload a model (model control explicit)")
async def unload(name: str, request: Request, server: ServerDep) -> Response:
    await _json_object(request, server, "an unload request")  # unload_dependents: there are no ensembles to unload
    await server.control.unload(name)
    return Response(status_code=200)
