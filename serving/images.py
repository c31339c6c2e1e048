"""Untrusted image bytes -> the normalised array the model expects.

`preprocess` is the same arithmetic as refiner.data.datasets.preprocess_image (RGB;
shorter side to resize_size with torchvision's rounding and a centre crop, or a
plain resize to (W, H); /255; (x - mean) / std; HWC -> CHW), re-implemented here
because the server depends on the artifact format only; tests check that both
give identical arrays, and both match torchvision's transforms.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError

from serving.artifact import Preprocess
from serving.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType

__all__ = ["ACCEPTED_FORMATS", "decode_image", "preprocess"]

ACCEPTED_FORMATS = ("JPEG", "PNG")
_EXPECTED = "expected a JPEG or PNG image"
_FILTERS = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}
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


def preprocess(image: Image.Image, pre: Preprocess) -> np.ndarray:
    """PIL image -> normalised float32 array (3, H, W)."""
    _, h, w = pre.input_size
    image = image.convert("RGB")
    mode = _FILTERS[pre.interpolation]
    if pre.resize_size is None:
        if image.size != (w, h):
            image = image.resize((w, h), mode)
    else:
        iw, ih = image.size
        new_short, new_long = pre.resize_size, int(pre.resize_size * max(iw, ih) / min(iw, ih))
        size = (new_short, new_long) if iw <= ih else (new_long, new_short)
        if size != image.size:
            image = image.resize(size, mode)
        top, left = int(round((size[1] - h) / 2.0)), int(round((size[0] - w) / 2.0))
        image = image.crop((left, top, left + w, top + h))
    x = np.asarray(image, dtype=np.float32) / 255.0
    x = (x - np.asarray(pre.mean, dtype=np.float32)) / np.asarray(pre.std, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))
