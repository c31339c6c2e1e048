"""The artifact format's one definition, shared by the writer (refiner) and the reader (the server).

A model version is metadata.json (`ArtifactMeta`) beside model.onnx: the tensors it takes and
gives, its class names, and the preprocessing (`Preprocess`, applied by `preprocess_image`) that
turns an image into its input. Plain pydantic + PIL + NumPy, so the server needs neither torch
nor refiner; refiner builds its datasets and writes its artifacts with these same classes.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["ARTIFACT_FORMAT", "INTERPOLATIONS", "TensorSpec", "Preprocess", "ArtifactMeta", "preprocess_image"]

ARTIFACT_FORMAT = "refiner-artifact/1"
INTERPOLATIONS = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}


class TensorSpec(BaseModel):
    """One model input or output, without its batch axis."""

    name: str
    datatype: str = "FP32"  # KServe v2 datatype name
    shape: list[int]


class Preprocess(BaseModel):
    """What a model expects: input size, resize and crop, normalisation; stored with its weights and in every artifact.

    Examples:
        >>> from serving.schema import Preprocess
        >>> pre = Preprocess(input_size=(3, 224, 224), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), resize_size=256)
        >>> round(pre.crop_pct, 3)
        0.875
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    input_size: tuple[int, int, int] = (3, 32, 32)  # (C, H, W); C is always 3 (RGB)
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)  # per-channel mean of [0, 1] pixels
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)  # per-channel std of [0, 1] pixels
    resize_size: int | None = Field(None, ge=1)  # shorter side before the centre crop to (H, W); None: plain resize to (H, W)
    interpolation: Literal["nearest", "bilinear", "bicubic"] = "bilinear"  # PIL's filter for the resize

    @model_validator(mode="after")
    def _valid(self) -> Preprocess:
        if not all(math.isfinite(m) for m in self.mean) or not all(math.isfinite(v) and v > 0 for v in self.std):
            raise ValueError(f"mean must be finite and std finite and above 0, got mean {self.mean}, std {self.std}")
        if min(self.input_size) < 1:
            raise ValueError(f"input_size must be positive, got {self.input_size}")
        if self.resize_size is not None and self.resize_size < max(self.input_size[1:]):
            raise ValueError(f"resize_size {self.resize_size} is smaller than the {self.input_size[1]}x{self.input_size[2]} crop")
        return self

    @property
    def crop_pct(self) -> float:
        """Crop size over resize size, as timm writes it (1.0 for a plain resize)."""
        return 1.0 if self.resize_size is None else self.input_size[1] / self.resize_size


class ArtifactMeta(BaseModel):
    """The fields of metadata.json that feed the model and explain its output (a writer may add more; a reader ignores them)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    format: Literal["refiner-artifact/1"]  # required of what is read: a file without it is not an artifact
    name: str
    version: int = Field(ge=1)
    class_names: list[str]
    input: TensorSpec  # normalised float image batch (N, 3, H, W)
    output: TensorSpec  # logits (N, num_classes)
    preprocess: Preprocess
    max_batch_size: int = Field(ge=1)
    onnx_sha256: str


def preprocess_image(image: Image.Image, pre: Preprocess) -> np.ndarray:
    """PIL image -> normalised float32 array (3, H, W): RGB; resize (and centre crop); /255; (x - mean) / std."""
    _, h, w = pre.input_size
    image = image.convert("RGB")
    mode = INTERPOLATIONS[pre.interpolation]
    if pre.resize_size is None:
        if image.size != (w, h):
            image = image.resize((w, h), mode)
    else:  # torchvision's Resize(int) then CenterCrop, with its rounding
        iw, ih = image.size
        short, long = min(iw, ih), max(iw, ih)
        new_short, new_long = pre.resize_size, int(pre.resize_size * long / short)
        size = (new_short, new_long) if iw <= ih else (new_long, new_short)
        if size != image.size:
            image = image.resize(size, mode)
        top, left = int(round((size[1] - h) / 2.0)), int(round((size[0] - w) / 2.0))
        image = image.crop((left, top, left + w, top + h))
    x = np.asarray(image, dtype=np.float32) / 255.0
    x = (x - np.asarray(pre.mean, dtype=np.float32)) / np.asarray(pre.std, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))
