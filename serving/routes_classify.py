"""POST /v1/models/{name}/classify: a JPEG or PNG in, top-k class names and probabilities out."""

from __future__ import annotations

from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Query, Request
from pydantic import BaseModel

from serving.body import multipart_file, read_body
from serving.deps import ServerDep, restricted
from serving.errors import BadRequest
from serving.images import decode_image
from serving.schema import Preprocess, preprocess_image

__all__ = ["router", "Prediction", "Classification"]

router = APIRouter(prefix="/v1", tags=["classify"], dependencies=[restricted("inference")])


class Prediction(BaseModel):
    label: str  # class name from the artifact's metadata
    index: int  # position in the model's output
    probability: float  # softmax of the logits


class Classification(BaseModel):
    model_name: str
    model_version: str
    predictions: list[Prediction]  # most probable first


_BODY_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "The image as the raw body, or as the one file part of a multipart/form-data body.",
        "content": {
            "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
            "image/png": {"schema": {"type": "string", "format": "binary"}},
            "multipart/form-data": {
                "schema": {"type": "object", "properties": {"file": {"type": "string", "format": "binary"}}}
            },
        },
    }
}


def _image_array(data: bytes, pre: Preprocess, max_pixels: int) -> np.ndarray:
    with decode_image(data, max_pixels) as image:
        return preprocess_image(image, pre)[None]


def _top_k(classes: list[str], top_k: int | None, name: str) -> int | None:
    if top_k is not None and top_k > len(classes):
        raise BadRequest(f"top_k is {top_k}; model {name!r} has {len(classes)} classes, so expected 1 to {len(classes)}")
    return top_k


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits.astype(np.float64) - logits.max())
    return z / z.sum()


@router.post("/models/{name}/classify", summary="Classify an image", openapi_extra=_BODY_DOC)
@router.post("/models/{name}/versions/{version}/classify", summary="Classify with one version", openapi_extra=_BODY_DOC)
async def classify(
    name: str,
    request: Request,
    server: ServerDep,
    top_k: Annotated[int | None, Query(ge=1, description="classes to return (default: the server's top_k)")] = None,
    version: str | None = None,
) -> Classification:
    _top_k(server.repository.get(name, version).meta.class_names, top_k, name)  # 404, 503 or 400 before the body is read
    body = await read_body(request, server.settings.max_image_bytes, server.settings.body_timeout_s)  # holding no version meanwhile
    if request.headers.get("content-type", "").lower().startswith("multipart/form-data"):  # media types are case-insensitive
        body = await multipart_file(request, body)
    with server.repository.hold(name, version) as model:  # this version answers, even if a new one is swapped in
        classes = model.meta.class_names
        k = _top_k(classes, top_k, name) or min(server.settings.top_k, len(classes))
        with model.batcher.arrival() as arrival:  # announced once its body is in: a slow upload delays no one else
            x = await server.to_thread(_image_array, body, model.meta.preprocess, server.settings.max_image_pixels)
            probs = _softmax((await arrival.infer(x))[0])
    order = np.argsort(-probs, kind="stable")[:k]
    return Classification(
        model_name=name,
        model_version=str(model.meta.version),
        predictions=[Prediction(label=classes[i], index=int(i), probability=float(probs[i])) for i in order],
    )
