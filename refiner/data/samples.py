"""Image samples and the preprocessing that travels with every model: no torch, so names and files are checked before it loads.

`Preprocess` and its transform `preprocess_image` are the artifact format's own
(serving/schema.py: plain PIL + NumPy), so a served model sees exactly the arrays
it was fitted and tested on.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from refiner.errors import ConfigError, DataError
from serving.schema import INTERPOLATIONS, Preprocess, preprocess_image

__all__ = ["INTERPOLATIONS", "Preprocess", "with_overrides", "Sample", "FileSample", "ArraySample", "preprocess_image", "fingerprint"]


def with_overrides(
    pre: Preprocess, img_size: int | None = None, crop_pct: float | None = None, mean: tuple[float, float, float] | None = None,
    std: tuple[float, float, float] | None = None, interpolation: str | None = None,
) -> Preprocess:  # fmt: skip
    """A copy of `pre` with the given fields replaced; a new img_size keeps the crop ratio unless crop_pct is given too."""
    if img_size is not None and img_size < 1:
        raise ConfigError(f"--img-size must be a positive number of pixels, got {img_size}")
    if crop_pct is not None and not 0 < crop_pct <= 1:
        raise ConfigError(f"--crop-pct must be in (0, 1], got {crop_pct}")
    if mean is not None and not all(math.isfinite(m) for m in mean):
        raise ConfigError(f"--mean must be three finite numbers, got {' '.join(map(str, mean))}")
    if std is not None and not all(math.isfinite(v) and v > 0 for v in std):
        raise ConfigError(f"--std must be three finite numbers above 0, got {' '.join(map(str, std))}")
    size = img_size or pre.input_size[1]
    pct = crop_pct if crop_pct is not None else None if pre.resize_size is None else pre.crop_pct
    resize = None if pct is None else math.floor(size / pct + 1e-9)  # timm's scale_size
    fields = dict(input_size=(3, size, size) if img_size else pre.input_size, resize_size=resize)
    fields.update({k: v for k, v in (("mean", mean), ("std", std), ("interpolation", interpolation)) if v is not None})
    return Preprocess(**{**pre.model_dump(), **fields})


class Sample:
    """One labelled image that can load itself as a PIL image."""

    label: str

    def load(self) -> Image.Image:
        raise NotImplementedError

    def ident(self) -> str:
        """A stable identity used to fingerprint splits for the feature cache."""
        raise NotImplementedError


@dataclass(frozen=True)
class FileSample(Sample):
    """An image file, optionally cropped to a box (left, top, right, bottom)."""

    path: Path
    label: str
    box: tuple[int, int, int, int] | None = None

    def load(self) -> Image.Image:
        try:
            with Image.open(self.path) as image:
                image = image.convert("RGB")
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:  # PIL's ways of saying "not an image"
            raise self._unreadable(e) from e
        return image.crop(self.box) if self.box else image

    def _unreadable(self, e: Exception) -> DataError:
        return DataError(
            f"cannot read image {str(self.path)!r} ({type(e).__name__}: {e}); replace or delete it, "
            "or pass --skip-bad-images to leave unreadable files out"
        )

    def readable(self) -> bool:
        """Whether the file decodes as an image (header and data), without keeping it."""
        try:
            with Image.open(self.path) as image:
                image.load()
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
            return False
        return True

    def ident(self) -> str:
        """Resolved path, size and mtime: another folder with the same names, or an edited file, is another sample."""
        try:
            st = os.stat(self.path)
        except OSError as e:
            raise self._unreadable(e) from e
        return f"{_resolved_dir(self.path.parent.absolute())}/{self.path.name}|{st.st_size}|{st.st_mtime_ns}|{self.box}|{self.label}"


@functools.lru_cache(maxsize=4096)
def _resolved_dir(folder: Path) -> str:
    """A folder's absolute path with links resolved, once per folder (a split has many files per folder)."""
    return str(folder.resolve())


@dataclass(frozen=True, eq=False)
class ArraySample(Sample):
    """An in-memory uint8 image (H, W) or (H, W, 3)."""

    array: np.ndarray
    label: str

    def load(self) -> Image.Image:
        return Image.fromarray(self.array)

    def ident(self) -> str:
        """Content hash with shape and dtype (the same bytes as 8x8 or 4x16 are different images)."""
        return f"{hashlib.sha1(self.array.tobytes()).hexdigest()[:16]}|{self.array.shape}|{self.array.dtype}|{self.label}"


def fingerprint(samples: list[Sample]) -> str:
    """Hash of a split's sample identities and order."""
    digest = hashlib.sha256()
    for s in samples:
        digest.update(s.ident().encode())
        digest.update(b"\n")
    return digest.hexdigest()[:16]
