"""The refiner checkpoint: one file with architecture, classes, preprocessing and weights; and the files users have.

Checkpoints are untrusted files: they are read with `torch.load(weights_only=True)`
or as safetensors. A file that needs arbitrary unpickling (a whole pickled
nn.Module) is refused unless the caller opts in with `trust=True`. Besides
refiner's own format, `load_checkpoint` reads what training code saves: bare
state_dicts, the containers of Lightning, timm and torchvision's reference
scripts ({'state_dict' | 'model' | 'model_state_dict' | 'ema' | 'state_dict_ema': ...}),
the `module.` / `_orig_mod.` / `model.` prefixes of DataParallel, DDP,
torch.compile and Lightning, and safetensors files; the architecture is inferred
from the keys and shapes when exactly one registered architecture fits. Names
`torchvision/<model>` and `timm/<model>` are pretrained weights from local caches
(refiner.models.pretrained).
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
from refiner.models.architectures import TIMM_PREFIX, create_model, get_arch, list_archs
from refiner.models.pretrained import is_pretrained_name, pretrained_source

__all__ = [
    "CheckpointMeta",
    "Classifier",
    "save_checkpoint",
    "load_checkpoint",
    "file_sha256",
    "read_untrusted",
    "load_weights",
]

FORMAT = "refiner-checkpoint/1"
CONTAINER_KEYS = ("state_dict", "model_state_dict", "model", "state_dict_ema", "ema")  # where training code puts weights
PREFIXES = ("module.", "_orig_mod.", "model.")  # DataParallel/DDP, torch.compile, Lightning


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
    preprocess_from: str = "the record in the checkpoint"  # where meta.preprocess came from, said to the user
    preprocess_guessed: bool = False  # a bare state_dict fed as its architecture's pretrained weights expect


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
    preprocess_from: str = "the default preprocessing",
    class_names: list[str] | None = None,
    trust: bool = False,
    who: str = "the net",
    arch_flag: str = "--arch-a/--arch-b",
) -> Classifier:
    """Load a refiner checkpoint, or the weights of any file the module docstring lists.

    Without refiner's metadata, `arch` (else the one architecture the keys fit)
    says what to build, num_classes is read from the classifier's weight, the
    preprocessing is the architecture's pretrained one (torchvision, timm) or else
    `preprocess` (described by `preprocess_from`), else the architecture's input size.
    `class_names` name the outputs (their count must match). `who` ("net A") and
    `arch_flag` ("--arch-a") name the net and the option that says its architecture in errors.
    """
    class_names_given = class_names
    if is_pretrained_name(path):  # torchvision/<model>, timm/<model>: from a local cache
        model, arch, class_names, pre, file = pretrained_source(str(path))
        meta = CheckpointMeta(arch=arch, num_classes=len(class_names), class_names=class_names, preprocess=pre, info={"pretrained": str(path)})
        clf = Classifier(model=model.eval(), meta=meta, sha256=file_sha256(file), path=file, preprocess_from=f"the pretrained transform of {path}")
        return _named(clf, class_names_given, who)
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {str(path)!r} does not exist (pretrained weights are named torchvision/<model> or timm/<model>)"
        )
    obj = _read_safetensors(path) if path.suffix == ".safetensors" else read_untrusted(path, trust)
    found: list[str] = []  # how the weights were reached, for the record and for errors
    if isinstance(obj, nn.Module):
        found.append(f"a whole pickled {type(obj).__name__}")
        timm_name = getattr(obj, "pretrained_cfg", {}).get("architecture") if type(obj).__module__.startswith("timm.") else None
        if timm_name and arch is None:  # timm models say what they are; others are recognised by their keys
            arch = TIMM_PREFIX + timm_name
            found.append(f"architecture {arch!r} from the object")
        obj = obj.state_dict()
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        try:
            meta = CheckpointMeta.model_validate(obj["meta"])
        except ValidationError as e:
            raise CheckpointError(f"checkpoint {str(path)!r} has malformed metadata: {e}") from e
        if arch is not None and arch != meta.arch:
            raise CheckpointError(f"checkpoint {str(path)!r} holds a {meta.arch!r}, not the requested {arch!r}")
        state = obj["state_dict"]
        source, guessed = f"the record in {path.name}", False
    else:
        hint = f"Say which architecture {who} is with {arch_flag}"
        state = _find_state_dict(obj, path, found, hint)
        arch = arch or _infer_arch(state, path, found, hint)
        meta = _bare_meta(state, arch, preprocess, path, found, hint)
        spec = get_arch(arch)
        guessed = spec.preprocess is not None
        source = (
            (f"timm's pretrained config of {arch}" if arch.startswith(TIMM_PREFIX) else f"torchvision's pretrained weights transform of {arch}")
            if guessed else preprocess_from if preprocess is not None else f"the input size of {arch}"
        )  # fmt: skip
    model = create_model(meta.arch, meta.num_classes)
    load_weights(model, state, meta.arch, path)
    model.eval()
    clf = Classifier(model=model, meta=meta, sha256=file_sha256(path), path=path, preprocess_from=source, preprocess_guessed=guessed)
    return _named(clf, class_names, who)


def _named(clf: Classifier, class_names: list[str] | None, who: str) -> Classifier:
    """`clf` with its outputs named `class_names` (None: as loaded); a count other than its outputs' is an error."""
    if class_names is None:
        return clf
    if len(class_names) != clf.meta.num_classes:
        raise CheckpointError(f"{len(class_names)} class names given for {who} ({clf.path.name}), which has {clf.meta.num_classes} outputs")
    clf.meta = clf.meta.model_copy(update={"class_names": list(class_names)})
    return clf


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file: tensors only, nothing executed."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {str(path)!r}: it is truncated or not a safetensors file ({e})") from e


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _find_state_dict(obj: Any, path: Path, found: list[str], hint: str) -> dict[str, torch.Tensor]:
    """The weights inside `obj` (a state_dict or a training container), with wrapper prefixes removed."""
    if isinstance(obj, dict) and not _is_state_dict(obj):
        for key in CONTAINER_KEYS:
            inner = obj.get(key)
            if isinstance(inner, nn.Module):
                inner = inner.state_dict()
            if _is_state_dict(inner):
                found.append(f"the {key!r} entry of a {type(obj).__name__} with keys {_first(obj)}")
                obj = inner
                break
    if not _is_state_dict(obj):
        keys = f" with top-level keys {_first(obj)}" if isinstance(obj, dict) else ""
        raise CheckpointError(
            f"{str(path)!r} holds no weights refiner can find: it is a {type(obj).__name__}{keys}, not a refiner "
            f"checkpoint, a state_dict, or a container with one under {list(CONTAINER_KEYS)}. Save "
            f"model.state_dict() (torch.save or safetensors); {hint[0].lower() + hint[1:]}"
        )
    stripped = True
    while stripped:
        stripped = False
        for prefix in PREFIXES:
            if all(k.startswith(prefix) for k in obj):
                obj = {k[len(prefix) :]: v for k, v in obj.items()}
                found.append(f"keys stripped of {prefix!r}")
                stripped = True
    return obj


def _first(obj: Any, n: int = 8) -> str:
    keys = list(obj)
    return f"{keys[:n]}{' ...' if len(keys) > n else ''}"


def _infer_arch(state: dict[str, torch.Tensor], path: Path, found: list[str], hint: str) -> str:
    """The one registered architecture whose parameter names and shapes are exactly the state_dict's."""
    fits = []
    for name in list_archs():
        key = f"{get_arch(name).classifier}.weight"
        if key not in state:
            continue
        with torch.device("meta"):  # names and shapes only: nothing allocated
            expected = create_model(name, int(state[key].shape[0])).state_dict()
        if expected.keys() == state.keys() and all(expected[k].shape == state[k].shape for k in expected):
            fits.append(name)
    if len(fits) == 1:
        found.append(f"architecture {fits[0]!r} inferred from its keys")
        return fits[0]
    how = f" ({'; '.join(found)})" if found else ""
    what = f"fit several architectures {fits}" if fits else "fit no architecture registered so far"
    raise CheckpointError(
        f"{str(path)!r} is a state_dict{how} whose keys {what}; its first parameters: {_first(state, 5)}. "
        f"{hint} NAME (`refiner layers --arch NAME` lists its layers): one of {', '.join(list_archs())}, "
        "any torchvision model, or timm/<name>"
    )


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
        raise CheckpointError(
            f"cannot read checkpoint {str(path)!r}: it is truncated or not a file written by torch.save ({type(e).__name__}: {e})"
        ) from e
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise CheckpointError(f"cannot read checkpoint {str(path)!r}: {e}") from e


def _bare_meta(
    state: dict[str, torch.Tensor], arch: str, preprocess: Preprocess | None, path: Path, found: list[str], hint: str,
) -> CheckpointMeta:  # fmt: skip
    spec = get_arch(arch)
    key = f"{spec.classifier}.weight"
    if key not in state:
        how = f" ({'; '.join(found)})" if found else ""
        raise CheckpointError(
            f"state_dict {str(path)!r}{how} has no {key!r}, so it is not a {arch!r}; its first keys: {_first(state, 5)}. "
            f"{hint}"
        )
    num_classes = int(state[key].shape[0])
    pre = spec.preprocess or preprocess or Preprocess(input_size=spec.input_size)
    return CheckpointMeta(
        arch=arch,
        num_classes=num_classes,
        class_names=[str(i) for i in range(num_classes)],
        preprocess=pre,
        info={"loaded_from": found} if found else {},
    )


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
