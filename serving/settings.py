"""Server settings, read from REFINER_SERVE_* environment variables (pydantic-settings)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["PILLOW_MAX_IMAGE_PIXELS", "ServeSettings", "settings_error"]

# Pillow's default Image.MAX_IMAGE_PIXELS; our own limit must stay below it.
PILLOW_MAX_IMAGE_PIXELS = 1024 * 1024 * 1024 // 4 // 3


class ServeSettings(BaseSettings):
    """Everything the server needs; e.g. REFINER_SERVE_MODELS=models, REFINER_SERVE_PINNED_VERSIONS='{"m": 1}'."""

    model_config = SettingsConfigDict(env_prefix="REFINER_SERVE_", extra="forbid")

    models: Path = Path("models")  # the model repository (Triton layout)
    pinned_versions: dict[str, int] = {}  # model name -> version to serve instead of the latest
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA if a CUDA device really exists
    workers: int = Field(1, ge=1)  # server processes sharing the port, each with its own sessions
    model_control: Literal["none", "poll", "explicit"] = "none"  # Triton's model control mode (see serving/control.py)
    poll_s: float = Field(15.0, gt=0)  # seconds between repository scans under model_control "poll"
    intra_op_threads: int = Field(0, ge=0)  # onnxruntime threads per session; 0: the available cores split between workers
    decode_threads: int = Field(2, ge=1)  # threads decoding images and request bodies
    max_body_bytes: int | None = Field(None, ge=1)  # larger infer bodies get 413; None: derived from the models served
    json_expansion: float = Field(8.0, ge=1)  # JSON text bytes per binary tensor byte allowed in the derived limit
    max_image_bytes: int = Field(8 * 1024 * 1024, ge=1)  # larger /classify bodies get 413
    max_image_pixels: int = Field(16_000_000, ge=1, lt=PILLOW_MAX_IMAGE_PIXELS)  # larger images get 413
    max_header_bytes: int = Field(16 * 1024, ge=1024)  # request line + headers; more get 431 and the connection closes
    header_timeout_s: float = Field(10.0, gt=0)  # a request's head must arrive within this, else 408 and close
    body_timeout_s: float = Field(30.0, gt=0)  # a request's whole body must arrive within this, else 408 and close
    keep_alive_timeout_s: float = Field(5.0, gt=0)  # idle keep-alive connections close after this
    max_connections: int = Field(1024, ge=1)  # open connections (and tasks); more are answered 503
    batching: bool = True  # coalesce concurrent requests into batches (off: one request per run)
    max_queue_delay_ms: float = Field(2.0, ge=0)  # how long the oldest request waits for a fuller batch
    queue_size: int = Field(256, ge=1)  # requests waiting per model; more get 503
    drain_timeout_s: float = Field(10.0, ge=0)  # how long shutdown waits for in-flight requests, then answers them 503
    shutdown_grace_s: float = Field(0.5, ge=0)  # idle keep-alive connections stay open this long at shutdown for requests in transit
    retry_after_s: int = Field(1, ge=0)  # Retry-After of every 503
    top_k: int = Field(5, ge=1)  # classes returned by /classify when the request does not say
    # What the repository may ask of the server (it is not trusted): versions over these limits are refused.
    max_batch_size: int = Field(256, ge=1)  # most rows an artifact may declare as its max_batch_size
    max_batch_bytes: int = Field(256 * 1024 * 1024, ge=1)  # max_batch_size x input bytes of one artifact
    load_timeout_s: float = Field(60.0, gt=0)  # reading, opening and warming up one version; past it the version is refused
    exit_on_error: bool = False  # as Triton's --exit-on-error: any model refused at start-up fails the start
    strict_readiness: bool = False  # as Triton's --strict-readiness: ready only while every model found is served
    # The restricted API (as Triton's --http-restricted-api): with a key set, the APIs listed need the header.
    api_key: SecretStr | None = None  # the value the header must carry (compared in constant time); None: nothing restricted
    api_key_header: str = Field("x-refiner-key", pattern=r"^[a-z0-9-]+$")  # a lower-case header name
    restricted_apis: list[Literal["model-repository", "inference", "metadata", "metrics"]] = ["model-repository"]
    # The gRPC half of the protocol, on its own port: off unless asked for (one more open port is a choice to make).
    grpc_port: int | None = Field(None, ge=0, le=65535)  # None: no gRPC; 0: any free port
    grpc_host: str = "127.0.0.1"  # the address it listens on (the command line sets it to --host)

    @model_validator(mode="after")
    def _explicit_needs_one_worker(self) -> ServeSettings:
        if self.model_control == "explicit" and self.workers > 1:
            raise ValueError(
                f"model control 'explicit' needs 1 worker, not {self.workers}: a load or unload request reaches one "
                "worker process only; use model control 'poll' with several workers"
            )
        return self

    def to_env(self) -> dict[str, str]:
        """These settings as REFINER_SERVE_* variables, for worker processes that build their app from the environment."""
        out = {}
        for key, value in self.model_dump(mode="json").items():
            if isinstance(getattr(self, key), SecretStr):
                value = getattr(self, key).get_secret_value()
            if value is not None:
                out[f"REFINER_SERVE_{key.upper()}"] = json.dumps(value) if isinstance(value, dict | list) else str(value)
        return out

    @property
    def hard_deadline_s(self) -> float:
        """From the first shutdown signal to a forced exit, however the server was started."""
        return self.drain_timeout_s + self.shutdown_grace_s + 2.0


def settings_error(e: ValidationError) -> str:
    """Invalid settings in one line for a command line: each problem after the setting it concerns."""
    parts = []
    for err in e.errors():
        message = err["msg"].removeprefix("Value error, ")
        parts.append(f"{err['loc'][0]}: {message}" if err["loc"] else message)
    return "; ".join(parts)
