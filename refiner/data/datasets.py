"""Image samples, the preprocessing that travels with every model, and torch Datasets.

Preprocessing is plain PIL + NumPy (RGB, bilinear resize, /255, per-channel
normalisation) so that the serving package can reproduce it exactly.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field
from torch.utils.data import Dataset

from refiner.errors import DataError

__all__ = ["Preprocess", "Sample", "FileSample", "ArraySample", "ImageDataset", "preprocess_image", "fingerprint"]


class Preprocess(BaseModel):
    """What a model expects: input size and normalisation, stored with its weights."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    input_size: tuple[int, int, int] = (3, 32, 32)  # (C, H, W); C is always 3 (RGB)
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)  # per-channel mean of [0, 1] pixels
    std: tuple[float, float, float] = Field((0.5, 0.5, 0.5))  # per-channel std of [0, 1] pixels


def preprocess_image(image: Image.Image, pre: Preprocess) -> np.ndarray:
    """PIL image -> normalised float32 array (3, H, W)."""
    _, h, w = pre.input_size
    image = image.convert("RGB")
    if image.size != (w, h):
        image = image.resize((w, h), Image.BILINEAR)
    x = np.asarray(image, dtype=np.float32) / 255.0
    x = (x - np.asarray(pre.mean, dtype=np.float32)) / np.asarray(pre.std, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


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
            raise DataError(
                f"cannot read image {str(self.path)!r} ({type(e).__name__}: {e}); replace or delete it, "
                "or pass --skip-bad-images to leave unreadable files out"
            ) from e
        return image.crop(self.box) if self.box else image

    def readable(self) -> bool:
        """Whether the file decodes as an image (header and data), without keeping it."""
        try:
            with Image.open(self.path) as image:
                image.load()
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
            return False
        return True

    def ident(self) -> str:
        return f"{self.path.name}|{self.path.parent.name}|{self.box}|{self.label}"


@dataclass(frozen=True, eq=False)
class ArraySample(Sample):
    """An in-memory uint8 image (H, W) or (H, W, 3)."""

    array: np.ndarray
    label: str

    def load(self) -> Image.Image:
        return Image.fromarray(self.array)

    def ident(self) -> str:
        return hashlib.sha1(self.array.tobytes()).hexdigest()[:16] + "|" + self.label


def fingerprint(samples: list[Sample]) -> str:
    """Hash of a split's sample identities and order."""
    digest = hashlib.sha256()
    for s in samples:
        digest.update(s.ident().encode())
        digest.update(b"\n")
    return digest.hexdigest()[:16]


class ImageDataset(Dataset):
    """Samples -> (normalised image tensor, class index) for a fixed class list."""

    def __init__(self, samples: list[Sample], classes: list[str], pre: Preprocess) -> None:
        self.samples = samples
        self.classes = classes
        self.pre = pre
        self._index = {c: i for i, c in enumerate(classes)}

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        s = self.samples[i]
        return torch.from_numpy(preprocess_image(s.load(), self.pre)), self._index[s.label]
