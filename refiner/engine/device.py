"""Where the engine runs: device choice, mixed precision (AMP), CPU threads and data-loader workers.

One `Runtime` is resolved from a `RuntimeConfig` and passed explicitly to every
loop that touches tensors (feature extraction, fitting g, training, fine-tuning).
Accumulators (Var, CKA, losses summed over a split) stay in float64 on any device.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from refiner.errors import ConfigError

__all__ = ["RuntimeConfig", "Runtime", "resolve_device", "default_threads", "default_workers"]

_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class RuntimeConfig(BaseModel):
    """How (not what) the engine computes; recorded in every report."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps; auto = the first CUDA device if any, else CPU
    amp: Literal["off", "bf16", "fp16"] = "off"  # autocast dtype for trunks, fitting and fine-tuning
    threads: int | None = Field(None, ge=1)  # torch CPU threads; None: $OMP_NUM_THREADS, else torch's default
    workers: int | None = Field(None, ge=0)  # DataLoader worker processes; None: from the core count
    forward: Literal["auto", "torch", "onnxruntime"] = "auto"  # frozen nets' forward (features, the atlas); auto: onnxruntime where measured faster


def resolve_device(spec: str) -> torch.device:
    """A torch.device for `spec`, or a ConfigError saying what is missing."""
    if spec == "auto":
        return torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as e:
        raise ConfigError(f"unknown device {spec!r}: expected auto, cpu, cuda, cuda:N or mps") from e
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {spec!r} asked for, but this torch build sees no CUDA GPU: use --device cpu or auto")
        index = device.index or 0
        if index >= torch.cuda.device_count():
            raise ConfigError(f"device {spec!r} asked for, but only {torch.cuda.device_count()} CUDA device(s) are visible")
        return torch.device("cuda", index)
    if device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ConfigError("device 'mps' asked for, but Apple's MPS backend is not available here")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"unsupported device {spec!r}: expected auto, cpu, cuda, cuda:N or mps")
    return device


def default_threads() -> int | None:
    """$OMP_NUM_THREADS when set (the usual way to share cores), else None (torch's own default)."""
    value = os.environ.get("OMP_NUM_THREADS", "")
    return int(value) if value.isascii() and value.isdigit() and int(value) > 0 else None


def default_workers(device: torch.device) -> int:
    """Data-loading processes: none on a 1-2 core CPU run (they would compete with the model), else up to 8."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if device.type == "cpu":
        return 0 if cores <= 2 else min(4, cores // 2)
    return min(8, max(cores - 1, 0))


@dataclass(frozen=True)
class Runtime:
    """A resolved RuntimeConfig: the device itself, the AMP dtype and the worker count."""

    config: RuntimeConfig
    device: torch.device
    workers: int

    @classmethod
    def resolve(cls, config: RuntimeConfig | None = None, *, device: torch.device | None = None) -> Runtime:
        """Resolve `config` (default: auto device, no AMP) and apply its thread count to torch."""
        config = config or RuntimeConfig()
        device = device or resolve_device(config.device)
        if config.amp != "off" and device.type == "cpu":
            warnings.warn(
                f"--amp {config.amp} on the CPU: most CPUs have no fast {config.amp} kernels "
                "(measured 14-19x slower than fp32 on the development machine); AMP pays off on GPUs",
                stacklevel=2,
            )
        threads = config.threads or default_threads()
        if threads:
            torch.set_num_threads(threads)
        workers = config.workers if config.workers is not None else default_workers(device)
        return cls(config=config, device=device, workers=workers)

    @classmethod
    def of(cls, module: nn.Module) -> Runtime:
        """The runtime a module already computes on (its first parameter's or buffer's device), leaving torch's settings alone."""
        first = next(itertools.chain(module.parameters(), module.buffers()), None)
        device = first.device if first is not None else torch.device("cpu")
        return cls(config=RuntimeConfig(device=str(device)), device=device, workers=0)

    @property
    def amp_dtype(self) -> torch.dtype | None:
        return _AMP_DTYPES.get(self.config.amp)

    @property
    def pin_memory(self) -> bool:
        return self.device.type == "cuda"

    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast to the AMP dtype on this device, or a no-op when AMP is off."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """A GradScaler that is active for fp16 only (bf16 and fp32 need none)."""
        return torch.amp.GradScaler(self.device.type, enabled=self.config.amp == "fp16")

    def to(self, *tensors: Tensor) -> Iterator[Tensor]:
        """Move tensors to the device (asynchronously from pinned memory)."""
        return (t.to(self.device, non_blocking=self.pin_memory) for t in tensors)

    def to_host(self, *tensors: Tensor) -> Iterator[np.ndarray]:
        """Tensors as NumPy arrays in host memory: the way back from `to` (`.numpy()` fails on a GPU tensor)."""
        return (t.detach().cpu().numpy() for t in tensors)

    def record(self) -> dict[str, object]:
        """Device, its name, AMP mode and threads, for report.json."""
        if self.device.type == "cuda":
            name = torch.cuda.get_device_name(self.device)
        elif self.device.type == "mps":
            name = "Apple MPS"
        else:
            name = _cpu_name()
        return {
            "device": str(self.device),
            "name": name,
            "amp": self.config.amp,
            "threads": torch.get_num_threads(),
            "workers": self.workers,
            "forward": self.config.forward,
            "torch": torch.__version__,
        }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine() or "cpu"
