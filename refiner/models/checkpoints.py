"""The refiner checkpoint: one file with architecture, classes, preprocessing and weights.

Checkpoints are untrusted files: they are read with `torch.load(weights_only=True)`.
A file that needs arbitrary unpickling (a whole pickled nn.Module) is refused
unless the caller opts in with `trust=True`.
"""

from __future__ import annotations

import hashlib
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import nn

from refiner.atomic import atomic_file
from refiner.data.datasets import Preprocess
from refiner.errors import CheckpointError, UnsafeCheckpointError
from refiner.models.architectures import create_model, get_arch

__all__ = [
    "CheckpointMeta",
    "Classifier",
    "save_checkpoint",
    "load_checkpoint",
    "file_sha256",
    "read_untrusted",
]

FORMAT = "refiner-checkpoint/1"


class CheckpointMeta(BaseModel):
    """Everything needed to rebuild and feed a classifier, besides its weights."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    arch: str  # registered architecture name
    num_classes: int
    class_names: list[str]
    preprocess: Preprocess
    task: str | None = None  # task the net was trained on
    info: dict[str, Any] = {}  # training figures and options, for the record


@dataclass
class Classifier:
    """A loaded classifier with its metadata and the sha256 of the file it came from."""

    model: nn.Module
    meta: CheckpointMeta
    sha256: str
    path: Path


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_checkpoint(path: Path | str, model: nn.Module, meta: CheckpointMeta) -> Path:
    """Write a refiner checkpoint atomically (weights on the CPU, whatever device the model is on)."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    payload = {"format": FORMAT, "meta": meta.model_dump(mode="json"), "state_dict": state}
    with atomic_file(path) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def load_checkpoint(
    path: Path | str,
    *,
    arch: str | None = None,
    preprocess: Preprocess | None = None,
    class_names: list[str] | None = None,
    trust: bool = False,
) -> Classifier:
    """Load a refiner checkpoint, or a bare state_dict when `arch` is given.

    For a bare state_dict, num_classes is read from the classifier's weight and
    `preprocess` / `class_names` fill in what the file does not say.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    obj = read_untrusted(path, trust)
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        try:
            meta = CheckpointMeta.model_validate(obj["meta"])
        except ValidationError as e:
            raise CheckpointError(f"checkpoint {str(path)!r} has malformed metadata: {e}") from e
        if arch is not None and arch != meta.arch:
            raise CheckpointError(f"checkpoint {str(path)!r} holds a {meta.arch!r}, not the requested {arch!r}")
        state = obj["state_dict"]
    elif isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        if arch is None:
            raise CheckpointError(
                f"{str(path)!r} is a bare state_dict without metadata: pass --arch to say which architecture it is"
            )
        meta = _bare_meta(obj, arch, preprocess, class_names, path)
        state = obj
    else:
        raise CheckpointError(
            f"{str(path)!r} is neither a refiner checkpoint nor a state_dict (found {type(obj).__name__})"
        )
    model = create_model(meta.arch, meta.num_classes)
    _load_state(model, state, meta.arch, path)
    model.eval()
    return Classifier(model=model, meta=meta, sha256=file_sha256(path), path=path)


def read_untrusted(path: Path, trust: bool) -> Any:
    """torch.load with weights_only=True; arbitrary unpickling only when `trust` (else UnsafeCheckpointError)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        reason = lines[-2] if len(lines) >= 3 else lines[-1]  # torch wraps the reason in boilerplate
        if not trust:
            what = (
                "it needs arbitrary unpickling, which can run code hidden in the file"
                if "GLOBAL" in reason
                else "the safe loader cannot read it: it is not a torch checkpoint, or a pickle that needs arbitrary unpickling"
            )
            raise UnsafeCheckpointError(
                f"refusing to load {str(path)!r}: {what} ({reason}). Save a state_dict or a refiner "
                "checkpoint instead, or pass --trust-checkpoint if you trust where it came from"
            ) from e
    except Exception as e:  # zip/EOF/format errors: the file is not a torch checkpoint
        raise CheckpointError(f"cannot read checkpoint {str(path)!r}: {e}") from e
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise CheckpointError(f"cannot read checkpoint {str(path)!r}: {e}") from e


def _bare_meta(
    state: dict[str, torch.Tensor], arch: str, preprocess: Preprocess | None, class_names: list[str] | None, path: Path
) -> CheckpointMeta:
    spec = get_arch(arch)
    key = f"{spec.classifier}.weight"
    if key not in state:
        raise CheckpointError(
            f"state_dict {str(path)!r} has no {key!r}, so it is not a {arch!r} (its first keys: {list(state)[:5]})"
        )
    num_classes = int(state[key].shape[0])
    if class_names is not None and len(class_names) != num_classes:
        class_names = None
    pre = preprocess or Preprocess(input_size=spec.input_size)
    return CheckpointMeta(
        arch=arch,
        num_classes=num_classes,
        class_names=class_names or [str(i) for i in range(num_classes)],
        preprocess=pre,
    )


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], arch: str, path: Path) -> None:
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
