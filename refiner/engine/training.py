"""Training recipe for base classifiers (and the shared evaluate / train-one-epoch loops)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from refiner.data.datasets import ImageDataset

from refiner.data.samples import Preprocess
from refiner.data.tasks import SplitOptions, load_task
from refiner.engine import distributed as dist
from refiner.engine.device import Runtime, RuntimeConfig
from refiner.errors import ConfigError
from refiner.models.architectures import create_model
from refiner.models.checkpoints import CheckpointMeta, save_checkpoint
from refiner.models.layers import feature_shape
from refiner.progress import bar

__all__ = ["TrainConfig", "PAPER_STOP_LOSS", "paper_regime", "train_base", "train_classifier", "train_one_epoch", "evaluate", "augment"]

PAPER_STOP_LOSS = 0.02  # the paper's nets are over-fitted: training cross-entropy at most this


class TrainConfig(BaseModel):
    """SGD with Nesterov momentum and a one-cycle (cosine) learning-rate schedule (`refiner train`, the analyses' students).

    Examples:
        >>> import refiner
        >>> refiner.TrainConfig(epochs=3).lr
        0.05
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    epochs: int = Field(12, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(0.05, gt=0)  # peak learning rate
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    augment: bool = False  # random crop (pad 4) and horizontal flip; off as in the paper
    stop_loss: float | None = Field(None, gt=0)  # stop once an epoch's training CE is at most this (the paper's regime: 0.02)
    seed: int = 0
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)  # device, AMP, threads, workers


def paper_regime(**overrides) -> TrainConfig:
    """The paper's base-net regime: no augmentation, train until training CE <= 0.02 or the epoch budget ends."""
    if overrides.get("augment"):
        raise ConfigError("the paper's regime trains without augmentation; drop --augment or use --regime default")
    return TrainConfig(**{"epochs": 60, **overrides, "augment": False, "stop_loss": PAPER_STOP_LOSS})


def augment(x: Tensor) -> Tensor:
    """Random 4-pixel-padded crop and horizontal flip of a normalised batch."""
    n, _, h, w = x.shape
    padded = F.pad(x, (4, 4, 4, 4), mode="reflect")
    i, j = torch.randint(0, 9, (2,)).tolist()
    x = padded[:, :, i : i + h, j : j + w]
    flip = (torch.rand(n) < 0.5).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(3), x)


LossFn = Callable[[Tensor, Tensor, Tensor], Tensor]  # (logits, inputs, labels) -> loss


def train_one_epoch(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    optimizer: torch.optim.Optimizer,
    transform: Callable[[Tensor], Tensor] | None = None,
    desc: str = "train",
    loss_fn: LossFn | None = None,
    runtime: Runtime | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> dict[str, float]:
    """One pass of training (cross-entropy unless `loss_fn` says otherwise); this process's mean loss and accuracy."""
    runtime = runtime or Runtime.resolve(device=_device_of(model))
    scaler = scaler or runtime.grad_scaler()
    model.train()
    total, correct = 0, 0
    loss_sum = torch.zeros((), dtype=torch.float64, device=runtime.device)
    shown = bar(batches, desc=desc, unit="batch", leave=False)
    for x, y in shown:
        x, y = runtime.to(x, y)
        if transform is not None:
            x = transform(x)
        with runtime.autocast():
            logits = model(x)
            loss = loss_fn(logits, x, y) if loss_fn else F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        total += len(y)
        correct += (logits.argmax(1) == y).sum().item()
        loss_sum += loss.detach().double() * len(y)
        shown.set_postfix(acc=f"{correct / total:.3f}")
    return {"loss": loss_sum.item() / max(total, 1), "acc": correct / max(total, 1), "images": total}


@torch.inference_mode()
def evaluate(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], runtime: Runtime | None = None) -> dict[str, float]:
    """Loss and top-1 accuracy in eval mode (sums in float64); restores the model's mode after."""
    runtime = runtime or Runtime.resolve(device=_device_of(model))
    was_training = model.training
    model.eval()
    total, correct = 0, 0
    loss_sum = torch.zeros((), dtype=torch.float64, device=runtime.device)
    for x, y in batches:
        x, y = runtime.to(x, y)
        with runtime.autocast():
            logits = model(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").double()
        correct += (logits.argmax(1) == y).sum().item()
        total += len(y)
    model.train(was_training)
    return {"loss": loss_sum.item() / max(total, 1), "acc": correct / max(total, 1)}


def _device_of(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def train_classifier(
    model: nn.Module, train: Dataset, val: Dataset, config: TrainConfig, loss_fn: LossFn | None = None, desc: str = "epochs"
) -> list[dict[str, float]]:
    """Train from scratch on the configured device; returns per-epoch train/val figures (model left in eval mode).

    Under torchrun the model is wrapped in DDP and each rank reads its share of
    every epoch (DistributedSampler); the weights end identical on every rank.
    """
    runtime = Runtime.resolve(config.runtime)
    torch.manual_seed(config.seed)
    model.to(runtime.device)
    net = dist.wrap(model, runtime)
    generator = torch.Generator().manual_seed(config.seed)
    world = dist.world_size()
    drop_last = len(train) > config.batch_size * world
    sampler = DistributedSampler(train, shuffle=True, seed=config.seed, drop_last=drop_last) if dist.is_distributed() else None
    train_loader = DataLoader(
        train, batch_size=config.batch_size, shuffle=sampler is None, sampler=sampler, generator=generator,
        num_workers=runtime.workers, pin_memory=runtime.pin_memory, drop_last=drop_last,
    )  # fmt: skip
    val_loader = DataLoader(val, batch_size=256, num_workers=runtime.workers, pin_memory=runtime.pin_memory)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay, nesterov=True)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.lr, total_steps=config.epochs * len(train_loader), pct_start=0.15
    )
    scaler = runtime.grad_scaler()
    history = []
    epochs = bar(range(config.epochs), desc=desc, unit="epoch")
    for epoch in epochs:
        if sampler is not None:
            sampler.set_epoch(epoch)
        stats = train_one_epoch(
            net, _stepping(train_loader, scheduler), optimizer, augment if config.augment else None,
            loss_fn=loss_fn, runtime=runtime, scaler=scaler,
        )  # fmt: skip
        stats = {key: dist.mean(stats[key] * stats["images"], stats["images"]) for key in ("loss", "acc")}  # all ranks
        val_stats = evaluate(model, val_loader, runtime)
        history.append({"epoch": epoch + 1, "train_loss": stats["loss"], "train_acc": stats["acc"], "val_loss": val_stats["loss"], "val_acc": val_stats["acc"]})
        epochs.set_postfix(train_acc=f"{stats['acc']:.3f}", val_acc=f"{val_stats['acc']:.3f}")
        if config.stop_loss is not None and stats["loss"] <= config.stop_loss:
            break
    model.eval()
    return history


def _stepping(loader: DataLoader, scheduler: torch.optim.lr_scheduler.LRScheduler) -> Iterable[tuple[Tensor, Tensor]]:
    """Yield the loader's batches, advancing the per-step scheduler after each one."""
    for batch in loader:
        yield batch
        scheduler.step()


def train_base(
    arch: str, task: str, data: Path | None, config: TrainConfig, out: Path, split: SplitOptions | None = None,
    preprocess: Preprocess | None = None,
) -> CheckpointMeta:  # fmt: skip
    """Train a base classifier on a task's base classes from scratch and save a refiner checkpoint.

    `preprocess` (default: the task's) is what the net is trained with and what its checkpoint records.
    """
    task_data = load_task(task, data, target=False, options=split)
    pre = preprocess or task_data.preprocess
    datasets = {name: ImageDataset(task_data.split(name), task_data.classes, pre) for name in ("train", "val", "test")}
    torch.manual_seed(config.seed)
    model = create_model(arch, len(task_data.classes), pre.input_size[0])
    feature_shape(model, pre.input_size, arch)  # an input size the architecture cannot take fails here, in one line
    history = train_classifier(model, datasets["train"], datasets["val"], config)
    runtime = Runtime.resolve(config.runtime)
    final = {
        name: evaluate(model, DataLoader(datasets[name], batch_size=256, num_workers=runtime.workers, pin_memory=runtime.pin_memory), runtime)
        for name in ("train", "test")
    }  # eval mode: what the features the comparison reads were trained to
    if config.stop_loss is not None and final["train"]["loss"] > config.stop_loss and dist.is_main():
        warnings.warn(
            f"{out.name} is not over-fitted as the paper's regime asks: eval-mode training CE {final['train']['loss']:.4f} "
            f"> {config.stop_loss} after {len(history)} epochs; train longer (--epochs) or with a higher --lr",
            stacklevel=2,
        )
    meta = CheckpointMeta(
        arch=arch,
        num_classes=len(task_data.classes),
        class_names=task_data.classes,
        preprocess=pre,
        task=task,
        info={
            "train": config.model_dump(),
            "split": (split or SplitOptions()).model_dump(),
            "images": {name: len(d) for name, d in datasets.items()},
            "history": history,
            "epochs_run": len(history),
            "train_eval": final["train"],  # final eval-mode training loss and accuracy
            "test_acc": final["test"]["acc"],
            "runtime": runtime.record(),
        },
    )
    if dist.is_main():
        save_checkpoint(out, model, meta)
    dist.barrier()
    return meta
