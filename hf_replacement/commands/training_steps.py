"""The steps every training loop of the project shares: optimizer, schedule, one update, accuracy.

The launcher (`train.py`) and the benchmark harness (`benchmarks/`) both train with these, so a
change to how a step is taken or how accuracy is counted reaches both.
"""

from __future__ import annotations

import collections
import contextlib
import math
import statistics
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn
from transformers import get_scheduler

Batch = Mapping[str, torch.Tensor]


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite: the run diverged."""


class DivergenceError(RuntimeError):
    """The training loss stayed far above its start (`DivergenceMonitor`) and the run was asked to stop."""


class DivergenceMonitor:
    """Notices a loss that rises far above its start and stays there, short of NaN (e.g. `--lr 10`).

    The start is the first update's loss (computed before any step, so the initialised model's). The
    run is diverging when the mean loss of the last `window` updates exceeds `factor` times the start,
    and at least `minimum_rise` above it (a start near zero, e.g. a pretrained model on its own task, must
    not turn noise into an alarm). A loss that spikes for a few updates and recovers is not reported.
    """

    def __init__(self, factor: float = 3.0, window: int = 20, minimum_rise: float = 1.0) -> None:
        self.factor, self.window, self.minimum_rise = factor, window, minimum_rise
        self.start: float | None = None
        self.recent: collections.deque[float] = collections.deque(maxlen=window)
        self.message: str | None = None  # what was reported, once

    def observe(self, loss: float, update: int) -> str | None:
        """Record the loss of `update` (1-based); the first time the run is diverging, say so with the numbers."""
        if self.start is None:
            self.start = loss
        self.recent.append(loss)
        if self.message is not None or len(self.recent) < self.window:
            return None
        mean = statistics.fmean(self.recent)
        threshold = max(self.factor * self.start, self.start + self.minimum_rise)
        if mean <= threshold:
            return None
        self.message = (
            f"the training loss is diverging: its mean over updates {update - self.window + 1}-{update} is "
            f"{mean:.4g}, {mean / self.start:.1f}x its start ({self.start:.4g} at the first update; the alarm is "
            f"above {threshold:.4g}). Lower --lr (or the learning rate) or add warm-up"
        )
        return self.message


def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over the trainable parameters only: frozen (or freed) ones get no optimizer state."""
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)


def make_scheduler(
    optimizer: torch.optim.Optimizer, total_updates: int, warmup_ratio: float, steps_per_update: int = 1
) -> torch.optim.lr_scheduler.LRScheduler:
    """Cosine decay after a linear warm-up of `warmup_ratio` of the updates.

    `steps_per_update`: how often the scheduler is stepped per update (Accelerate's prepared
    scheduler steps once per process), so the schedule is laid out in those units.
    """
    return get_scheduler(
        "cosine",
        optimizer,
        num_warmup_steps=int(warmup_ratio * total_updates) * steps_per_update,
        num_training_steps=total_updates * steps_per_update,
    )


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: Batch,
    *,
    scheduler: Any = None,
    backward: Callable[[torch.Tensor], None] | None = None,
    precision: contextlib.AbstractContextManager | None = None,
) -> torch.Tensor:
    """One forward, backward and optimizer update on `batch`; returns the detached loss.

    `backward` replaces `loss.backward()` (e.g. `accelerator.backward`, which scales fp16 losses);
    `precision` wraps the forward (e.g. `torch.autocast(...)`).
    """
    with precision if precision is not None else contextlib.nullcontext():
        loss = model(**batch).loss
    if backward is None:
        loss.backward()
    else:
        backward(loss)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


@torch.no_grad()
def evaluate_accuracy(
    model: nn.Module,
    batches: Iterable[Batch],
    *,
    gather: Callable[[tuple[torch.Tensor, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]] | None = None,
    precision: contextlib.AbstractContextManager | None = None,
) -> float:
    """Top-1 accuracy of `model` over `batches` (dicts with `pixel_values` and `labels`).

    `gather` collects predictions and labels across processes (e.g. `accelerator.gather_for_metrics`).
    The model's training mode is restored afterwards.
    """
    was_training = model.training
    model.eval()
    correct = total = 0
    try:
        for batch in batches:
            with precision if precision is not None else contextlib.nullcontext():
                logits = model(pixel_values=batch["pixel_values"]).logits
            predictions, labels = logits.argmax(-1), batch["labels"].to(logits.device)
            if gather is not None:
                predictions, labels = gather((predictions, labels))
            correct += int((predictions == labels).sum())
            total += labels.numel()
    finally:
        model.train(was_training)
    if total == 0:
        raise ValueError("evaluate_accuracy got no evaluation batch: the evaluation set is empty.")
    return correct / total


def check_finite(loss: torch.Tensor, update: int) -> None:
    """Raise `NonFiniteLossError` when `loss` is NaN or infinite (the run diverged at `update`)."""
    value = float(loss)
    if not math.isfinite(value):
        raise NonFiniteLossError(
            f"the training loss is {value} at update {update}: the run diverged. Lower --lr (or the "
            "learning rate), add warm-up, or train in fp32; checkpoints written before this update are kept."
        )


__all__ = [
    "DivergenceError",
    "DivergenceMonitor",
    "NonFiniteLossError",
    "check_finite",
    "evaluate_accuracy",
    "make_optimizer",
    "make_scheduler",
    "train_step",
]
