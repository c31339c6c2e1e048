"""Server settings, read from REFINER_SERVE_* environment variables (pydantic-settings)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["PILLOW_MAX_IMAGE_PIXELS", "ServeSettings"]

# Pillow's default Image.MAX_IMAGE_PIXELS; our own limit must stay below it.
PILLOW_MAX_IMAGE_PIXELS = 1024 * 1024 * 1024 // 4 // 3


class ServeSettings(BaseSettings):
    """Everything the server needs; e.g. REFINER_SERVE_MODELS=models, REFINER_SERVE_PINNED_VERSIONS='{"m": 1}'."""

    model_config = SettingsConfigDict(env_prefix="REFINER_SERVE_", extra="forbid")

    models: Path = Path("models")  # the model repository (Triton layout)
    pinned_versions: dict[str, int] = {}  # model name -> version to serve instead of the latest
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA if a CUDA device really exists
    intra_op_threads: int = Field(0, ge=0)  # onnxruntime threads per session; 0: one per available core
    decode_threads: int = Field(2, ge=1)  # threads decoding images and request bodies
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1)  # larger request bodies get 413
    max_image_pixels: int = Field(16_000_000, ge=1, lt=PILLOW_MAX_IMAGE_PIXELS)  # larger images get 413
    batching: bool = True  # coalesce concurrent requests into batches (off: one request per run)
    max_queue_delay_ms: float = Field(2.0, ge=0)  # how long the oldest request waits for a fuller batch
    queue_size: int = Field(256, ge=1)  # requests waiting per model; more get 503
    drain_timeout_s: float = Field(10.0, ge=0)  # how long shutdown waits for in-flight requests
    top_k: int = Field(5, ge=1)  # classes returned by /classify when the request does not say
