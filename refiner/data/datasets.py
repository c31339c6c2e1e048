"""torch Datasets of image samples, preprocessed as a model expects (refiner.data.samples)."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from refiner.data.samples import Preprocess, Sample, preprocess_image

__all__ = ["ImageDataset", "stack_images"]


class ImageDataset(Dataset):
    """Samples -> (normalised image tensor, class index) for a fixed class list."""

    def __init__(self, samples: list[Sample], classes: list[str], pre: Preprocess) -> None:
        self.samples = samples
        self.classes = classes
        self.pre = pre
        self._index = {c: i for i, c in enumerate(classes)}

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        s = self.samples[i]
        return torch.from_numpy(preprocess_image(s.load(), self.pre)), self._index[s.label]


def stack_images(samples: list[Sample], classes: list[str], pre: Preprocess, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n samples spread evenly over the split (so every class is in), preprocessed into one batch, and their class indices."""
    picked = [samples[i] for i in np.linspace(0, len(samples) - 1, min(n, len(samples))).round().astype(int)] if samples else []
    dataset = ImageDataset(picked, classes, pre)
    images, labels = zip(*(dataset[i] for i in range(len(dataset))))
    return torch.stack(images), torch.as_tensor(labels)
