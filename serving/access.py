"""The restricted API (as Triton's --http-restricted-api): which calls need the key, and the check, for HTTP and gRPC."""

from __future__ import annotations

import hmac
from typing import Literal

from serving.errors import Unauthorized
from serving.settings import ServeSettings

__all__ = ["Api", "check_key"]

Api = Literal["model-repository", "inference", "metadata", "metrics"]


def check_key(settings: ServeSettings, api: Api, given: str | None) -> None:
    """Unauthorized unless `api` is open (no key set, or not restricted) or `given` is the key. Compared in constant
    time, as bytes, so that a timing tells no more than the key's length."""
    if settings.api_key is None or api not in settings.restricted_apis:
        return
    presented = (given or "").encode("latin-1", "replace")
    if not hmac.compare_digest(presented, settings.api_key.get_secret_value().encode()):
        what = "without" if not given else "with a wrong"
        raise Unauthorized(f"the {api} API is restricted and this request came {what} {settings.api_key_header!r} header")
