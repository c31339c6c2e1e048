"""Open Inference Protocol (KServe v2): health, server and model metadata, readiness, infer (the repository: routes_repository.py)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response

from serving.body import read_body
from serving.deps import ServerDep, restricted
from serving.protocol import (
    BINARY_HEADER, decimal, encode_infer_response, model_config, model_metadata, parse_infer_request, server_metadata,
)  # fmt: skip

__all__ = ["router"]

router = APIRouter(prefix="/v2", tags=["v2 (Open Inference Protocol)"])

_INLINE_JSON_BYTES = 16 * 1024  # JSON parts up to this size are parsed on the event loop (well under 1 ms)
_MODEL = "/models/{name}"
_VERSION = "/models/{name}/versions/{version}"
_INFER_EXAMPLE = {
    "id": "42",
    "inputs": [{"name": "input", "shape": [1, 3, 32, 32], "datatype": "FP32", "data": [0.0, "... 3072 numbers"]}],
    "outputs": [{"name": "logits", "parameters": {"binary_data": False}}],
}


def _health(ok: bool) -> Response:
    """The v2 health answer: 200 for true, 400 for false, no body either way."""
    return Response(status_code=200 if ok else 400)


@router.get("/health/live", summary="Server liveness (200, empty body)")
async def live() -> Response:
    return _health(True)


@router.get("/health/ready", summary="Server readiness (200; 400 while loading or shutting down; empty body)")
async def ready(server: ServerDep) -> Response:
    return _health(server.ready)


@router.get("", summary="Server metadata")
async def server_metadata_route() -> dict[str, Any]:
    return server_metadata()


@router.get(_MODEL, summary="Model metadata", dependencies=[restricted("metadata")])
@router.get(_VERSION, summary="Model metadata of one version", dependencies=[restricted("metadata")])
async def metadata(name: str, server: ServerDep, version: str | None = None) -> dict[str, Any]:
    model = server.repository.get(name, version)
    return model_metadata(model.meta, model.runtime.provider)


@router.get(_MODEL + "/config", summary="Model configuration (Triton's, as JSON)", dependencies=[restricted("metadata")])
@router.get(_VERSION + "/config", summary="Model configuration of one version", dependencies=[restricted("metadata")])
async def config(name: str, server: ServerDep, version: str | None = None) -> dict[str, Any]:
    model = server.repository.get(name, version)
    s = server.settings
    return model_config(model.meta, int(s.max_queue_delay_ms * 1000), s.batching)


@router.get(_MODEL + "/ready", summary="Model readiness (200 or 400, empty body)")
@router.get(_VERSION + "/ready", summary="Model readiness of one version (200 or 400, empty body)")
async def model_ready(name: str, server: ServerDep, version: str | None = None) -> Response:
    server.repository.get(name, version)
    return _health(server.ready)


_INFER_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": (
            "A v2 inference request (JSON), or with the binary tensor data extension: the JSON header "
            f"({BINARY_HEADER} bytes) followed by the raw little-endian tensors."
        ),
        "content": {
            "application/json": {"schema": {"type": "object"}, "example": _INFER_EXAMPLE},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


@router.post(_MODEL + "/infer", summary="Inference", openapi_extra=_INFER_DOC, dependencies=[restricted("inference")])
@router.post(_VERSION + "/infer", summary="Inference on one version", openapi_extra=_INFER_DOC, dependencies=[restricted("inference")])
async def infer(name: str, request: Request, server: ServerDep, version: str | None = None) -> Response:
    server.repository.get(name, version)  # 404 or 503 before the body is read
    body = await read_body(request, server.body_limit, server.settings.body_timeout_s)  # holding no version meanwhile
    with server.repository.hold(name, version) as model:  # this version answers, even if a new one is swapped in
        with model.batcher.arrival() as arrival:  # announced once its body is in: a slow upload delays no one else
            header_length = request.headers.get(BINARY_HEADER)
            json_bytes = decimal(header_length)
            json_bytes = len(body) if json_bytes is None else json_bytes
            if json_bytes <= _INLINE_JSON_BYTES:  # a thread hop would cost more than parsing
                parsed = parse_infer_request(body, header_length, model.meta)
            else:
                parsed = await server.to_thread(parse_infer_request, body, header_length, model.meta)
            y = await arrival.infer(parsed.x)
    content, headers = encode_infer_response(parsed, model.meta, y)
    return Response(content, headers=headers)
