"""Fine-tune upper layers on fixed input features; score full-label and target-restricted accuracy and CE."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from refiner.engine.device import Runtime
from refiner.engine.training import train_one_epoch
from refiner.progress import bar

__all__ = ["HeadConfig", "Scores", "HeadResult", "finetune_head", "score_head"]

Batches = Callable[[], Iterable[tuple[Tensor, Tensor]]]  # a fresh pass over (input, label) batches


class HeadConfig(BaseModel):
    """Adam on the upper layers; the layers below stay frozen."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    epochs: int = Field(20, ge=1)
    lr: float = Field(1e-3, gt=0)  # first epoch's learning rate
    lr_end: float | None = Field(None, gt=0)  # log-spaced per epoch from lr to lr_end (the authors'); None: cosine to 0
    weight_decay: float = Field(1e-4, ge=0)
    batch_size: int = Field(64, ge=1)

    def lr_at(self, epoch: int) -> float:
        """Learning rate of epoch 0..epochs-1."""
        if self.lr_end is None:
            return self.lr * 0.5 * (1 + math.cos(math.pi * epoch / self.epochs))
        if self.epochs == 1:
            return self.lr
        return self.lr * (self.lr_end / self.lr) ** (epoch / (self.epochs - 1))


class Scores(BaseModel):
    """A head's figures on one split: over all its outputs, and over the target classes' outputs only."""

    acc: float  # argmax over every output (the paper's score when the base classifier is kept)
    acc_target: float  # argmax over the target classes' outputs only
    ce: float  # cross-entropy over every output
    ce_target: float  # cross-entropy of the softmax over the target classes' outputs only


class HeadResult(BaseModel):
    """Figures of one fine-tuning run."""

    best_epoch: int  # chosen on validation accuracy (argmax over every output)
    val: Scores  # at best_epoch
    test: Scores  # at best_epoch: the honest figure
    last: Scores  # test figures after the last epoch
    best_test_acc: float | None  # best test accuracy over epochs (the paper's figure; optimistic: test data chose it)
    history: list[dict[str, float]]


@torch.inference_mode()
def score_head(head: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], target: Sequence[int], runtime: Runtime) -> Scores:
    """Scores of `head` in eval mode; labels are output indices, all of them among `target`. Sums in float64."""
    was_training = head.training
    head.eval()
    cols = torch.as_tensor(list(target), device=runtime.device)
    position = torch.full((int(cols.max()) + 1,), -1, dtype=torch.long, device=runtime.device)
    position[cols] = torch.arange(len(cols), device=runtime.device)
    sums = torch.zeros(4, dtype=torch.float64, device=runtime.device)  # correct, correct_target, ce, ce_target
    total = 0
    for x, y in batches:
        x, y = runtime.to(x, y)
        with runtime.autocast():
            logits = head(x)
        logits = logits.float()
        restricted = logits.index_select(1, cols)
        y_restricted = position[y]
        sums += torch.stack([
            (logits.argmax(1) == y).sum().double(),
            (restricted.argmax(1) == y_restricted).sum().double(),
            F.cross_entropy(logits, y, reduction="sum").double(),
            F.cross_entropy(restricted, y_restricted, reduction="sum").double(),
        ])  # fmt: skip
        total += len(y)
    head.train(was_training)
    acc, acc_t, ce, ce_t = (sums / max(total, 1)).tolist()
    return Scores(acc=acc, acc_target=acc_t, ce=ce, ce_target=ce_t)


def finetune_head(
    head: nn.Module, train: Batches, val: Batches, test: Batches, config: HeadConfig, seed: int, *,
    target: Sequence[int], track_test: bool = False, desc: str = "head", runtime: Runtime | None = None,
) -> tuple[nn.Module, HeadResult]:  # fmt: skip
    """Train `head` for config.epochs; return the best-validation epoch's weights and its figures.

    `target`: the output indices of the target classes (every label is one of
    them). `track_test` also scores the test split after every epoch, for the
    best-on-test figure the paper reports; it never chooses the weights.
    """
    runtime = runtime or Runtime.resolve()
    torch.manual_seed(seed)
    head.to(runtime.device)
    scaler = runtime.grad_scaler()
    optimizer = torch.optim.Adam(head.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    best_state, best_val, best_epoch = None, None, 0
    best_test = None
    history = []
    for epoch in bar(range(config.epochs), desc=desc, unit="epoch", leave=False):
        for group in optimizer.param_groups:
            group["lr"] = config.lr_at(epoch)
        stats = train_one_epoch(head, train(), optimizer, runtime=runtime, scaler=scaler)
        val_scores = score_head(head, val(), target, runtime)
        row = {"epoch": epoch + 1, "lr": config.lr_at(epoch), "train_acc": stats["acc"], "train_loss": stats["loss"], "val_acc": val_scores.acc}
        if track_test:
            row["test_acc"] = score_head(head, test(), target, runtime).acc
            best_test = max(best_test or 0.0, row["test_acc"])
        history.append(row)
        if best_val is None or val_scores.acc > best_val.acc:
            best_state, best_val, best_epoch = copy.deepcopy(head.state_dict()), val_scores, epoch + 1
    last = score_head(head, test(), target, runtime)
    head.load_state_dict(best_state)
    head.eval()
    chosen = score_head(head, test(), target, runtime)
    return head, HeadResult(best_epoch=best_epoch, val=best_val, test=chosen, last=last, best_test_acc=best_test, history=history)
