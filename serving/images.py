"""Untrusted image bytes -> a decoded PIL image, its size checked before any pixel is decoded.

The arithmetic that turns it into the model's input is the artifact format's own
(serving.schema.preprocess_image), the same function refiner's datasets use.
"""

from __future__ import annotations

import io

from PIL import Image, UnidentifiedImageError

from serving.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType

__all__ = ["ACCEPTED_FORMATS", "decode_image"]

ACCEPTED_FORMATS = ("JPEG", "PNG")
_EXPECTED = "expected a JPEG or PNG image"
_SIGNATURES = {"PNG": b"\x89PNG\r\n\x1a\n", "JPEG": b"\xff\xd8\xff"}


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Decode a JPEG/PNG of at most `max_pixels` pixels; the size is checked before any pixel is decoded."""
    if not data:
        raise BadRequest(f"the request body is empty; {_EXPECTED}")
    try:
        image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except Image.DecompressionBombError as e:
        raise PayloadTooLarge(f"image refused as a decompression bomb ({e}); at most {max_pixels} pixels allowed") from e
    except UnidentifiedImageError as e:
        claimed = next((fmt for fmt, magic in _SIGNATURES.items() if data.startswith(magic)), None)
        if claimed:
            raise BadRequest(f"the {claimed} image header is corrupt (Pillow cannot parse it); {_EXPECTED}") from e
        raise UnsupportedMediaType(
            f"the body is not a JPEG or PNG image ({len(data)} bytes, starting {data[:8]!r}); {_EXPECTED}"
        ) from e
    except (OSError, ValueError, SyntaxError) as e:  # Pillow's parsers raise these on corrupt headers
        raise BadRequest(f"the image header is corrupt ({e}); {_EXPECTED}") from e
    try:
        _check_and_load(image, max_pixels)
    except Exception:
        image.close()
        raise
    return image


def _check_and_load(image: Image.Image, max_pixels: int) -> None:
    width, height = image.size
    if width * height > max_pixels:
        raise PayloadTooLarge(f"image is {width}x{height} = {width * height} pixels; at most {max_pixels} pixels allowed")
    if width == 0 or height == 0:
        raise BadRequest(f"image is {width}x{height} pixels; {_EXPECTED} with at least one pixel")
    try:
        image.load()
    except (OSError, ValueError, SyntaxError, EOFError) as e:  # truncated or corrupt pixel data
        raise BadRequest(f"the {image.format} image data is truncated or corrupt ({e}); {_EXPECTED}") from e
