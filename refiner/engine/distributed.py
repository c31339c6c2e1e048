"""Data parallelism under torchrun: process group, rank helpers, DDP wrapping, work splitting.

`torchrun --nproc-per-node N -m refiner ...` sets RANK/WORLD_SIZE/LOCAL_RANK;
`init_from_env` joins the group (NCCL on GPUs, gloo on CPUs) and gives each
process its own GPU. Without torchrun every helper is a no-op for one process.
Rank 0 writes every file; the others compute and wait.
"""

from __future__ import annotations

import atexit
import datetime
import os
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
import torch.distributed as tdist
from torch import nn

from refiner.engine.device import Runtime
from refiner.errors import ConfigError

__all__ = [
    "init_from_env",
    "is_distributed",
    "rank",
    "world_size",
    "is_main",
    "barrier",
    "wrap",
    "mean",
    "average_",
    "broadcast",
    "gather",
    "shard",
    "run_split",
]

T = TypeVar("T")


def init_from_env(device_spec: str) -> str:
    """Join the torchrun process group when WORLD_SIZE > 1; returns the device spec this rank should use.

    Process i takes GPU LOCAL_RANK i, so a fixed `cuda:N` (every process on GPU N) is refused.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or tdist.is_initialized():
        return device_spec
    if device_spec.startswith("cuda:"):
        raise ConfigError(
            f"--device {device_spec} under torchrun would put all {world} processes on one GPU; pass --device cuda "
            "(each process takes GPU LOCAL_RANK) and choose the GPUs with CUDA_VISIBLE_DEVICES"
        )
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_spec in ("auto", "cuda") and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local)
    tdist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=30))
    # A group left to the interpreter's teardown can abort the process ("terminate called without an
    # active exception") while gloo's threads still run: leave it explicitly.
    atexit.register(_leave_group)
    return f"cuda:{local}" if use_cuda else ("cpu" if device_spec == "auto" else device_spec)


def _leave_group() -> None:
    if tdist.is_initialized():
        tdist.destroy_process_group()


def is_distributed() -> bool:
    return tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1


def rank() -> int:
    return tdist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return tdist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        tdist.barrier()


def wrap(module: nn.Module, runtime: Runtime) -> nn.Module:
    """DistributedDataParallel around `module` when running under torchrun, else `module` itself."""
    if not is_distributed():
        return module
    ids = [runtime.device.index] if runtime.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=ids)


def mean(total: float, count: int) -> float:
    """sum(total) / sum(count) over all processes."""
    if not is_distributed():
        return total / max(count, 1)
    device = torch.device("cuda", torch.cuda.current_device()) if tdist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([total, float(count)], dtype=torch.float64, device=device)
    tdist.all_reduce(t)
    return float(t[0] / t[1].clamp_min(1))


def average_(tensor: torch.Tensor) -> None:
    """Replace `tensor` in place by its mean over all processes (the same value on every rank)."""
    if is_distributed():
        tdist.all_reduce(tensor)
        tensor.div_(world_size())


def broadcast(obj: T, src: int = 0) -> T:
    """Rank `src`'s `obj` on every process."""
    if not is_distributed():
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=src)
    return box[0]


def gather(obj: T) -> list[T]:
    """Every process's `obj`, in rank order, on every process."""
    if not is_distributed():
        return [obj]
    out: list = [None] * world_size()
    tdist.all_gather_object(out, obj)
    return out


def shard(n: int) -> range:
    """This process's share of n items (contiguous blocks, so writes to one memory map do not interleave)."""
    per = -(-n // world_size())
    return range(min(rank() * per, n), min((rank() + 1) * per, n))


def run_split(jobs: Sequence[T], run: Callable[[T], object]) -> list[object]:
    """Run jobs[i] on rank i % world; return every job's result, in job order, on every process."""
    mine = {i: run(job) for i, job in enumerate(jobs) if i % world_size() == rank()}
    merged: dict[int, object] = {}
    for part in gather(mine):
        merged.update(part)
    return [merged[i] for i in range(len(jobs))]
