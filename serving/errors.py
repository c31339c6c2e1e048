"""Errors the server answers with: each carries its HTTP status and a message for the client."""

from __future__ import annotations

__all__ = [
    "ServingError",
    "BadRequest",
    "NotFound",
    "NotAllowed",
    "Unauthorized",
    "RequestTimeout",
    "PayloadTooLarge",
    "UnsupportedMediaType",
    "Unavailable",
    "InferenceFailed",
    "ArtifactError",
    "DeviceError",
]


class ServingError(Exception):
    """A request the server refuses; answered as {"error": message} with `status_code`."""

    status_code = 400

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(ServingError):
    status_code = 400


class NotFound(ServingError):
    status_code = 404


class NotAllowed(ServingError):
    """A control call the server's settings rule out (load / unload outside model control "explicit")."""

    status_code = 400


class Unauthorized(ServingError):
    """A restricted API called without the key header, or with a wrong key."""

    status_code = 401


class RequestTimeout(ServingError):
    """The body did not arrive in time; the connection is closed after the answer."""

    status_code = 408


class PayloadTooLarge(ServingError):
    status_code = 413


class UnsupportedMediaType(ServingError):
    status_code = 415


class Unavailable(ServingError):
    """The server cannot take the request now (queue full, shutting down); retry later."""

    status_code = 503


class InferenceFailed(ServingError):
    status_code = 500


class ArtifactError(Exception):
    """A model version in the repository cannot be served (bad metadata, sha256 mismatch, unreadable ONNX)."""


class DeviceError(ValueError):
    """The device the settings ask for is not usable on this machine."""
