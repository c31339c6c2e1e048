"""Weights as data: strict loading with named mismatches, and the hashes that identify a file and a set of weights.

A net's identity in g files, reports and the feature cache is the hash of its weights
(`weights_sha256`), so a module handed in from Python and the checkpoint it is saved as
are the same net; the file's own hash (`file_sha256`) is kept for the record.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

from refiner.errors import CheckpointError

__all__ = ["file_sha256", "weights_sha256", "load_weights"]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def weights_sha256(model: nn.Module) -> str:
    """sha256 of a module's state_dict: names, dtypes, shapes and values, in key order (device and file format aside)."""
    digest = hashlib.sha256()
    for name, value in model.state_dict().items():
        t = value.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], arch: str, path: Path) -> None:
    """Load `state` into `model` strictly; a mismatch names the missing, unexpected and mis-shaped keys."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [
        f"{k}: file {tuple(state[k].shape)} vs {arch} {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        if wrong:
            parts.append(f"shape mismatches {wrong[:3]}")
        raise CheckpointError(f"checkpoint {str(path)!r} does not fit architecture {arch!r}: " + "; ".join(parts))
    model.load_state_dict(state)
