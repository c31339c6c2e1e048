"""Fine-tune upper layers on fixed input features; score full-label and target-restricted accuracy and CE."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn
from tqdm import tqdm

from refiner.engine.device import Runtime
from refiner.engine.training import train_one_epoch
from refiner.progress import bar

__all__ = ["HeadConfig", "Scores", "Predictions", "HeadResult", "finetune_head", "score_head"]

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

    images: int  # images scored
    correct: int  # argmax over every output is the label (the paper's score when the base classifier is kept)
    correct_target: int  # argmax over the target classes' outputs only is the label
    ce: float  # mean cross-entropy over every output
    ce_target: float  # mean cross-entropy of the softmax over the target classes' outputs only

    @property
    def acc(self) -> float:
        return self.correct / max(self.images, 1)

    @property
    def acc_target(self) -> float:
        return self.correct_target / max(self.images, 1)


class Predictions(BaseModel):
    """Per-image predictions as target-class indices (what every accuracy is recomputed from)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    target: np.ndarray  # argmax over the target classes' outputs
    full: np.ndarray  # the target-class index of the argmax over every output; -1 when that output is no target class


class HeadResult(BaseModel):
    """Figures of one fine-tuning run, and its per-image predictions."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    best_epoch: int  # chosen on validation accuracy (argmax over every output)
    val: Scores  # at best_epoch
    test: Scores  # at best_epoch: the honest figure
    last: Scores  # test figures after the last epoch
    best_test: Scores | None  # the best test epoch's figures (the paper's figure; optimistic: test data chose it)
    diverged: bool = False  # a training loss or validation CE was not finite: training stopped there
    history: list[dict[str, float]]
    predictions: dict[str, Predictions] = Field(default_factory=dict, exclude=True)  # "val", "test", "test@last", "test@best"

    @property
    def best_test_acc(self) -> float | None:
        return None if self.best_test is None else self.best_test.acc


@torch.inference_mode()
def score_head(
    head: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], target: Sequence[int], runtime: Runtime
) -> tuple[Scores, Predictions]:
    """Scores of `head` in eval mode and its per-image predictions; labels are output indices, all among `target`."""
    was_training = head.training
    head.eval()
    cols = torch.as_tensor(list(target), device=runtime.device)
    width = int(cols.max()) + 1
    position = torch.full((width,), -1, dtype=torch.long, device=runtime.device)
    position[cols] = torch.arange(len(cols), device=runtime.device)
    ce = torch.zeros(2, dtype=torch.float64, device=runtime.device)  # ce, ce_target (sums)
    preds_target, preds_full, labels = [], [], []
    for x, y in batches:
        x, y = runtime.to(x, y)
        with runtime.autocast():
            logits = head(x)
        logits = logits.float()
        restricted = logits.index_select(1, cols)
        y_restricted = position[y]
        full = logits.argmax(1)
        preds_full.append(torch.where(full < width, position[full.clamp(max=width - 1)], -1).cpu())
        preds_target.append(restricted.argmax(1).cpu())
        labels.append(y_restricted.cpu())
        ce += torch.stack([F.cross_entropy(logits, y, reduction="sum").double(), F.cross_entropy(restricted, y_restricted, reduction="sum").double()])
    head.train(was_training)
    y_all = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long)
    p_target = torch.cat(preds_target) if preds_target else y_all
    p_full = torch.cat(preds_full) if preds_full else y_all
    n = len(y_all)
    mean_ce, mean_ce_t = (ce / max(n, 1)).tolist()
    scores = Scores(
        images=n, correct=int((p_full == y_all).sum()), correct_target=int((p_target == y_all).sum()), ce=mean_ce, ce_target=mean_ce_t
    )
    return scores, Predictions(target=p_target.numpy(), full=p_full.numpy())


def finetune_head(
    head: nn.Module, train: Batches, val: Batches, test: Batches, config: HeadConfig, seed: int, *,
    target: Sequence[int], track_test: bool = False, desc: str = "head", runtime: Runtime | None = None,
    progress: tqdm | None = None,
) -> tuple[nn.Module, HeadResult]:  # fmt: skip
    """Train `head` for config.epochs; return the best-validation epoch's weights, its figures and predictions.

    `target`: the output indices of the target classes (every label is one of
    them). `track_test` also scores the test split after every epoch, for the
    best-on-test figure the paper reports; it never chooses the weights. A
    non-finite training loss or validation CE stops the run and marks it diverged.
    `progress`: a bar over a whole stage, advanced one per epoch (else the run has its own bar).
    """
    runtime = runtime or Runtime.resolve()
    torch.manual_seed(seed)
    head.to(runtime.device)
    scaler = runtime.grad_scaler()
    optimizer = torch.optim.Adam(head.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    best_state, best_val, best_epoch, best_val_preds = None, None, 0, None
    best_test, best_test_preds = None, None
    history, diverged = [], False
    epochs = range(config.epochs) if progress is not None else bar(range(config.epochs), desc=desc, unit="epoch", leave=False)
    for epoch in epochs:
        for group in optimizer.param_groups:
            group["lr"] = config.lr_at(epoch)
        stats = train_one_epoch(head, train(), optimizer, runtime=runtime, scaler=scaler)
        val_scores, val_preds = score_head(head, val(), target, runtime)
        row = {"epoch": epoch + 1, "lr": config.lr_at(epoch), "train_acc": stats["acc"], "train_loss": stats["loss"], "val_acc": val_scores.acc}
        history.append(row)
        if progress is not None:
            progress.update(1)
        if not (math.isfinite(stats["loss"]) and math.isfinite(val_scores.ce)):
            diverged = True
            break
        if track_test:
            test_scores, test_preds = score_head(head, test(), target, runtime)
            row["test_acc"] = test_scores.acc
            if best_test is None or test_scores.correct > best_test.correct:
                best_test, best_test_preds = test_scores, test_preds
        if best_val is None or val_scores.correct > best_val.correct:
            best_state, best_val, best_epoch, best_val_preds = copy.deepcopy(head.state_dict()), val_scores, epoch + 1, val_preds
    if progress is not None:
        progress.update(config.epochs - len(history))  # a diverged run's epochs left
    if track_test and not diverged:  # the last epoch's test score is already there
        last, last_preds = test_scores, test_preds
    else:
        last, last_preds = score_head(head, test(), target, runtime)
    if best_state is None:  # diverged in the first epoch: nothing finite to go back to
        best_state, best_val, best_val_preds = copy.deepcopy(head.state_dict()), val_scores, val_preds
    head.load_state_dict(best_state)
    head.eval()
    chosen, chosen_preds = score_head(head, test(), target, runtime)
    predictions = {"val": best_val_preds, "test": chosen_preds, "test@last": last_preds}
    if best_test_preds is not None:
        predictions["test@best"] = best_test_preds
    result = HeadResult(
        best_epoch=best_epoch, val=best_val, test=chosen, last=last, best_test=best_test, diverged=diverged,
        history=history, predictions=predictions,
    )  # fmt: skip
    return head, result
