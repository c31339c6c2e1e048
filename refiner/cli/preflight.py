"""Checks of a command's arguments that need no tensor, run before torch is imported (a bad value answers in a fraction
of a second): the files named exist and can be read, architecture and task names are known (with the closest names),
the data folder has its task's layout, and --classes are among the classes that layout shows."""

from __future__ import annotations

import difflib
import os
from pathlib import Path

from refiner.errors import CheckpointError

__all__ = ["check"]

PRETRAINED = ("torchvision/", "timm/")  # names of cached pretrained weights, not files
# (attribute, flag, what it names): the files a command reads
_FILES = (
    ("a", "--a", "net A"), ("b", "--b", "net B"), ("checkpoint", "--checkpoint", "the checkpoint"), ("model", "--model", "the model"),
    ("g_file", "--g", "g"),
)  # fmt: skip
_ARCHS = (("arch", "--arch"), ("arch_a", "--arch-a"), ("arch_b", "--arch-b"))


def check(args, classes: list[str] | None) -> None:
    """Every check that needs no tensor; raises the error the command would raise later, only sooner (`classes`: --classes parsed)."""
    from refiner.data.tasks import check_task
    from refiner.models.registry import check_arch

    for attr, flag, what in _FILES:
        value = getattr(args, attr, None)
        if value is not None and not (attr in ("a", "b", "checkpoint", "model") and str(value).startswith(PRETRAINED)):
            check_file(Path(value), flag, what)
    for attr, flag in _ARCHS:
        if getattr(args, attr, None):
            check_arch(getattr(args, attr), flag)
    if isinstance(getattr(args, "task", None), str):
        data = getattr(args, "data", None)
        check_task(args.task, Path(data) if data is not None else None, classes)


def check_file(path: Path, flag: str, what: str) -> None:
    """A readable regular file, or a CheckpointError saying what is wrong (with the closest names beside it)."""
    if not path.exists():
        hint = ""
        if path.parent.is_dir():
            close = difflib.get_close_matches(path.name, [p.name for p in path.parent.iterdir() if p.is_file()], n=3, cutoff=0.6)
            hint = f" (did you mean {' or '.join(repr(str(path.parent / c)) for c in close)}?)" if close else ""
        pretrained = " (pretrained weights are named torchvision/<model> or timm/<model>)" if flag in ("--a", "--b", "--checkpoint", "--model") else ""
        raise CheckpointError(f"{what}: {flag} {str(path)!r} does not exist{hint}{pretrained}")
    if path.is_dir():
        raise CheckpointError(f"{what}: {flag} {str(path)!r} is a folder; expected a checkpoint file")
    if not os.access(path, os.R_OK):
        raise CheckpointError(f"{what}: {flag} {str(path)!r} cannot be read (permission denied)")
