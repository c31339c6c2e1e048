"""What `refiner build` does besides choosing its inputs, as one typed config."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from refiner.refine.publish import ExportOptions
from refiner.engine.comparison import CompareConfig
from refiner.engine.finetune import HeadConfig

__all__ = ["BuildConfig", "Protocol", "default_head"]

Protocol = Literal["paper", "sound"]


def default_head(protocol: Protocol) -> HeadConfig:
    """The fine-tuning schedule of each protocol.

    paper: the authors' Adam 1e-5 -> 1e-7 log-spaced over 100 epochs on B's
    kept upper layers; sound: a new classifier learns at 1e-3 (cosine) for 20.
    """
    if protocol == "paper":
        return HeadConfig(epochs=100, lr=1e-5, lr_end=1e-7, weight_decay=1e-4)
    return HeadConfig()


class BuildConfig(BaseModel):
    """Everything `refiner build` does besides choosing its inputs.

    Examples:
        >>> import refiner
        >>> config = refiner.BuildConfig(name="pets-refined", protocol="paper", seeds=5)
        >>> config.head.lr_end  # the paper protocol's head schedule: Adam 1e-5 -> 1e-7
        1e-07
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str  # model name in the repository
    protocol: Protocol = "sound"  # paper: keep the base classifiers, label space of the base nets; sound: new target classifier
    compare: CompareConfig = Field(default_factory=CompareConfig)
    head: HeadConfig  # default: default_head(protocol)
    seeds: int = Field(3, ge=1)  # fine-tuning seeds per variant: a seed sets a new classifier's init, data order and dropout
    g_seeds: int = Field(1, ge=1)  # fits of g (seeds fit.seed, fit.seed + 1, ...): g's own noise enters the bootstrap
    resamples: int = Field(10_000, ge=10_000)  # bootstrap resamples of the paired tests
    bootstrap_seed: int = 0  # the bootstrap's draws (the same for every comparison)
    ablations: bool = True  # also fine-tune on x^(0), x^(0)+x^(1), ...
    control_seed: int = 0  # which other image's Delta each image gets in the Delta-shuffle control
    export: ExportOptions = Field(default_factory=ExportOptions)  # opset, fp16 or INT8, tolerances, check images, max batch

    @model_validator(mode="before")
    @classmethod
    def _protocol_head(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("head") is None:
            data = {**data, "head": default_head(data.get("protocol", "sound"))}
        return data
