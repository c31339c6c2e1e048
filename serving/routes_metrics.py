"""GET /metrics: Prometheus text format."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from serving.deps import ServerDep, restricted

__all__ = ["router"]

router = APIRouter(tags=["metrics"], dependencies=[restricted("metrics")])


@router.get("/metrics", response_class=Response, summary="Prometheus metrics")
async def metrics(server: ServerDep) -> Response:
    return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)
