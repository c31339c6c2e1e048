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

import dataclasses
import functools
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import nn

from refiner.atomic import atomic_file
from refiner.data.samples import Preprocess
from refiner.errors import CheckpointError, ConfigError, UnsafeCheckpointError
from refiner.models.architectures import TIMM_PREFIX, create_model, get_arch, guess_default_layer, list_archs
from refiner.models.pretrained import is_pretrained_name, pretrained_source
from refiner.models.weights import file_sha256, load_weights, weights_sha256

__all__ = [
    "CheckpointMeta",
    "Classifier",
    "save_checkpoint",
    "load_checkpoint",
    "file_sha256",
    "read_untrusted",
    "load_weights",
    "weights_sha256",
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
    """A net with what refiner needs to feed and name it: `refiner.load` returns one, `Classifier.of` wraps any module.

    `sha256` identifies the net in g files, reports and the feature cache: the file's hash
    for a loaded checkpoint, the weights' hash (`weights_sha256`) for a module handed in.

    Examples:
        >>> import refiner
        >>> net = refiner.Classifier.of(refiner.create_model("tiny_vgg", 3), class_names=["cat", "dog", "owl"])
        >>> net.arch, net.class_names, net.default_layer
        ('tiny_vgg', ['cat', 'dog', 'owl'], 'features.4')
    """

    model: nn.Module
    meta: CheckpointMeta
    sha256: str
    path: Path
    preprocess_from: str = "the record in the checkpoint"  # where meta.preprocess came from, said to the user
    preprocess_guessed: bool = False  # a bare state_dict fed as its architecture's pretrained weights expect
    preprocess_known: bool = True  # False: a plain module, whose normalisation nobody recorded (only its input size is known)

    @property
    def class_names(self) -> list[str]:
        return self.meta.class_names

    @property
    def preprocess(self) -> Preprocess:
        return self.meta.preprocess

    @property
    def arch(self) -> str:
        return self.meta.arch

    @functools.cached_property
    def weights_sha256(self) -> str:
        """The hash of the weights themselves: the same for a module and any checkpoint it was saved as."""
        return weights_sha256(self.model)

    @property
    def default_layer(self) -> str:
        """Where `refiner build` splits this net unless told: its architecture's default, else one found in the module."""
        if self.meta.arch in list_archs() or self.meta.arch.startswith(TIMM_PREFIX) or "." not in self.meta.arch:
            try:
                return get_arch(self.meta.arch).default_layer
            except ConfigError:
                pass
        return guess_default_layer(self.model)

    def fed_at(self, input_size: tuple[int, ...]) -> Classifier:
        """This net (a copy of the record; the module is shared) fed inputs of `input_size` (C, H, W), e.g. the caller's batches'."""
        if len(input_size) != 3:
            raise ConfigError(f"expected image batches (N, C, H, W), got inputs of shape (N, {', '.join(map(str, input_size))})")
        if tuple(self.meta.preprocess.input_size) == tuple(input_size):
            return self
        pre = self.meta.preprocess.model_copy(update={"input_size": tuple(input_size)})
        return dataclasses.replace(self, meta=self.meta.model_copy(update={"preprocess": pre}))

    @classmethod
    def of(
        cls, model: nn.Module | Classifier, *, class_names: list[str] | None = None, preprocess: Preprocess | None = None,
        arch: str | None = None, name: str | None = None,
    ) -> Classifier:  # fmt: skip
        """`model` as a Classifier, without copying it: its architecture recognised when a registered one fits its weights.

        A Classifier is returned as it is (with `class_names`/`preprocess` replaced when given).
        Without `preprocess` its normalisation is unknown (`preprocess_known` False): the input
        size is taken from the caller's batches, and an export asks for the real preprocessing.
        """
        if isinstance(model, Classifier):
            clf = _named(model, class_names, "the net")
            if preprocess is not None:
                clf.meta = clf.meta.model_copy(update={"preprocess": preprocess})
                clf.preprocess_known = True
            return clf
        if not isinstance(model, nn.Module):
            raise ConfigError(f"expected a torch.nn.Module or a refiner Classifier, got {type(model).__name__}")
        arch = arch or _recognised_arch(model) or f"{type(model).__module__}.{type(model).__qualname__}"
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        num_classes = len(class_names) if class_names else linears[-1].out_features if linears else 0
        meta = CheckpointMeta(
            arch=arch, num_classes=num_classes, class_names=list(class_names or [str(i) for i in range(num_classes)]),
            preprocess=preprocess or Preprocess(input_size=(3, 224, 224)), info={"module": type(model).__qualname__},
        )  # fmt: skip
        clf = cls(
            model=model, meta=meta, sha256="", path=Path(name or f"<{type(model).__name__}>"), preprocess_from="the caller's data",
            preprocess_known=preprocess is not None,
        )  # fmt: skip
        clf.sha256 = clf.weights_sha256
        return clf


def _recognised_arch(model: nn.Module) -> str | None:
    """The registered architecture a module is (timm models say it; others by their weights' names and shapes), else None."""
    if type(model).__module__.startswith("timm."):
        name = getattr(model, "pretrained_cfg", {}).get("architecture")
        return TIMM_PREFIX + name if name else None
    state = model.state_dict()
    try:
        return _infer_arch(state, Path("<module>"), [], "")
    except CheckpointError:
        return None


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
