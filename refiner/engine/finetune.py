"""Fine-tune upper layers on fixed input features, selecting the epoch on validation accuracy."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn
from tqdm.auto import tqdm

from refiner.engine import distributed as dist
from refiner.engine.device import Runtime
from refiner.engine.training import evaluate, train_one_epoch

__all__ = ["HeadConfig", "HeadResult", "finetune_head"]

Batches = Callable[[], Iterable[tuple[Tensor, Tensor]]]  # a fresh pass over (input, label) batches


class HeadConfig(BaseModel):
    """Adam on the upper layers; the layers below stay frozen."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    epochs: int = Field(20, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    batch_size: int = Field(64, ge=1)


class HeadResult(BaseModel):
    """Accuracy of the epoch chosen on validation data."""

    best_epoch: int
    val_acc: float
    test_acc: float
    history: list[dict[str, float]]


def finetune_head(
    head: nn.Module, train: Batches, val: Batches, test: Batches, config: HeadConfig, seed: int, desc: str = "head",
    runtime: Runtime | None = None,
) -> tuple[nn.Module, HeadResult]:  # fmt: skip
    """Train `head` for config.epochs on the runtime's device; return the best validation epoch's weights and figures."""
    runtime = runtime or Runtime.resolve()
    torch.manual_seed(seed)
    head.to(runtime.device)
    scaler = runtime.grad_scaler()
    optimizer = torch.optim.Adam(head.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.epochs)
    best_state, best_acc, best_epoch = None, -1.0, 0
    history = []
    for epoch in tqdm(range(config.epochs), desc=desc, unit="epoch", leave=False, **dist.progress()):
        stats = train_one_epoch(head, train(), optimizer, runtime=runtime, scaler=scaler)
        scheduler.step()
        val_acc = evaluate(head, val(), runtime)["acc"]
        history.append({"epoch": epoch + 1, "train_acc": stats["acc"], "train_loss": stats["loss"], "val_acc": val_acc})
        if val_acc > best_acc:
            best_state, best_acc, best_epoch = copy.deepcopy(head.state_dict()), val_acc, epoch + 1
    head.load_state_dict(best_state)
    head.eval()
    test_acc = evaluate(head, test(), runtime)["acc"]
    return head, HeadResult(best_epoch=best_epoch, val_acc=best_acc, test_acc=test_acc, history=history)
