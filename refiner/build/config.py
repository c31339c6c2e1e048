"""What `refiner build` does besides choosing its inputs, as one typed config."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from refiner.engine.comparison import CompareConfig
from refiner.engine.finetune import HeadConfig

__all__ = ["BuildConfig"]


class BuildConfig(BaseModel):
    """Everything `refiner build` does besides choosing its inputs."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str  # model name in the repository
    compare: CompareConfig = Field(default_factory=CompareConfig)
    head: HeadConfig = Field(default_factory=HeadConfig)
    seeds: int = Field(3, ge=1)  # fine-tuning seeds per variant
    ablations: bool = True  # also fine-tune on x^(0), x^(0)+x^(1), ...
    max_batch_size: int = Field(32, ge=1)  # written into config.pbtxt and metadata.json
    atol: float = Field(1e-4, gt=0)  # ONNX vs PyTorch tolerance on logits
    validation_images: int = Field(16, ge=3)  # real validation images used to check the export
