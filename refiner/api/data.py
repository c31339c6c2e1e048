"""A task's images as a DataLoader, for trying the API on the bundled digits (or any registered task) in a few lines."""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import DataLoader

from refiner.data.datasets import ImageDataset

from refiner.data.samples import Preprocess
from refiner.data.tasks import SplitOptions, get_task, load_task

__all__ = ["loader"]


def loader(
    task: str = "digits", split: str = "test", *, data: str | Path | None = None, preprocess: Preprocess | None = None,
    batch_size: int = 64, classes: list[str] | None = None, target: bool = False, per_class: int | None = None,
    shuffle: bool = False, drop_last: bool = False,
) -> DataLoader:  # fmt: skip
    """A DataLoader of (images, class indices) of one split of a task, preprocessed as `preprocess` says (default: the task's).

    `target`: the task's target classes rather than its base classes; `per_class`: at most this many images per class.

    Examples:
        >>> import refiner
        >>> x, y = next(iter(refiner.loader("digits", "test", batch_size=8)))
        >>> tuple(x.shape), y.dtype
        ((8, 3, 16, 16), torch.int64)
    """
    options = SplitOptions(train_per_class=per_class) if split == "train" else SplitOptions(test_per_class=per_class) if split == "test" else SplitOptions()
    tasks = load_task(task, Path(data) if data is not None else None, target=target, classes=classes, options=options)
    dataset = ImageDataset(tasks.split(split), tasks.classes, preprocess or get_task(task).preprocess)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last)
