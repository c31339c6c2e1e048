"""Pretrained weights named `torchvision/<model>` or `timm/<model>[.<tag>]`, read from local caches only.

refiner never downloads: torchvision's weights are looked for where torchvision
keeps them (`$TORCH_HOME/hub/checkpoints/`), timm's in the Hugging Face cache
(`$HF_HUB_CACHE`) or the torch hub folder. A missing file is an error that says
where it was looked for and how to put it there.
"""

from __future__ import annotations

from pathlib import Path

import torch

from refiner.data.samples import Preprocess
from refiner.errors import CheckpointError
from refiner.models.architectures import TIMM_PREFIX, get_arch, timm_preprocess
from refiner.models.weights import load_weights

__all__ = ["PRETRAINED_PREFIXES", "Pretrained", "is_pretrained_name", "pretrained_source"]

Pretrained = tuple[torch.nn.Module, str, list[str], Preprocess, Path]  # model with weights, arch, class names, preprocessing, file

TORCHVISION_PREFIX = "torchvision/"
PRETRAINED_PREFIXES = (TORCHVISION_PREFIX, TIMM_PREFIX)
_HF_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm reads from a Hugging Face repository, in order


def is_pretrained_name(path: Path | str) -> bool:
    """Whether a checkpoint argument names pretrained weights rather than a file."""
    return str(path).startswith(PRETRAINED_PREFIXES) and not Path(path).exists()


def pretrained_source(name: str) -> Pretrained:
    """(model with its weights, arch, class names, preprocessing, the local file) for a pretrained name."""
    if name.startswith(TORCHVISION_PREFIX):
        return _torchvision(name.removeprefix(TORCHVISION_PREFIX))
    return _timm(name.removeprefix(TIMM_PREFIX))


def _hub_checkpoints() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def _missing(what: str, looked: list[str], fetch: str) -> CheckpointError:
    return CheckpointError(
        f"no local copy of {what}: looked in {', '.join(looked)}. refiner never downloads weights; on a machine "
        f"with internet run {fetch} and copy the cache here, or pass the weights file itself"
    )


def _torchvision(arch: str) -> Pretrained:
    import torchvision

    spec = get_arch(arch)
    try:
        weights = torchvision.models.get_model_weights(arch).DEFAULT
    except ValueError as e:
        raise CheckpointError(f"torchvision has no pretrained weights for {arch!r}") from e
    file = _hub_checkpoints() / Path(weights.url).name
    if not file.is_file():
        raise _missing(f"torchvision's {weights}", [str(file)], f"`python -c \"import torchvision; torchvision.models.get_model('{arch}', weights='DEFAULT')\"`")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read {str(file)!r} as torchvision's {weights}: {e}") from e
    classes = list(weights.meta["categories"])
    model = spec.build(len(classes), 3)
    load_weights(model, state, arch, file)
    return model, arch, classes, spec.preprocess, file


def _timm(name: str) -> Pretrained:
    import timm
    from huggingface_hub import try_to_load_from_cache
    from timm.models import get_pretrained_cfg

    base = name.split(".")[0]
    get_arch(TIMM_PREFIX + base)  # an unknown name fails here, with similar names
    cfg = get_pretrained_cfg(name)
    if cfg is None:
        raise CheckpointError(f"timm has no pretrained weights {name!r} (see timm.list_pretrained('{base}*'))")
    looked, found = [], None
    if cfg.hf_hub_id:
        for filename in (cfg.hf_hub_filename, *_HF_FILES) if cfg.hf_hub_filename else _HF_FILES:
            looked.append(f"the Hugging Face cache for {cfg.hf_hub_id}/{filename}")
            hit = try_to_load_from_cache(cfg.hf_hub_id, filename)
            if isinstance(hit, str):
                found = Path(hit)
                break
    if found is None and cfg.url:
        file = _hub_checkpoints() / Path(cfg.url).name
        looked.append(str(file))
        found = file if file.is_file() else None
    if found is None:
        raise _missing(f"timm's {name!r} weights", looked, f"`python -c \"import timm; timm.create_model('{name}', pretrained=True)\"`")
    try:
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(found)})
    except Exception as e:  # timm reads the file with weights_only=True (or as safetensors)
        raise CheckpointError(f"cannot load {str(found)!r} as timm's {name!r}: {e}") from e
    classes = cfg.label_names or _imagenet_names(cfg, model.num_classes)
    return model, TIMM_PREFIX + base, list(classes), timm_preprocess(cfg.to_dict()), found


def _imagenet_names(cfg, n: int) -> list[str]:
    """Class names of an ImageNet subset the weights were trained on, else indices."""
    from timm.data import ImageNetInfo, infer_imagenet_subset

    subset = infer_imagenet_subset(cfg)
    names = ImageNetInfo(subset).label_descriptions() if subset else []
    return names if len(names) == n else [str(i) for i in range(n)]
