"""The device arguments every public function takes, as the engine's RuntimeConfig."""

from __future__ import annotations

from refiner.engine.device import RuntimeConfig

__all__ = ["runtime_config"]


def runtime_config(
    device: str = "auto", amp: str = "off", threads: int | None = None, workers: int | None = None, forward: str = "auto"
) -> RuntimeConfig:
    """device ("auto": the first CUDA GPU, else the CPU), AMP mode, torch CPU threads, data-loading workers and the
    frozen nets' forward (torch, onnxruntime, or auto: onnxruntime where measured faster)."""
    return RuntimeConfig(device=device, amp=amp, threads=threads, workers=workers, forward=forward)
