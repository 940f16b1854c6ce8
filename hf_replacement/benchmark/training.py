"""Training a method's model: the optimizer and step every phase shares, the schedule, evaluation, one seeded run."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..model import ReplacementModel
from .data import TensorData
from .device import autocast
from .methods import build_method_model
from .suites import SuiteSpec


def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over the trainable parameters only: frozen ones get no optimizer state."""
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    pixel_values: torch.Tensor,
    labels: torch.Tensor,
    mixed_precision: str | None = None,
    scheduler: Any = None,
) -> torch.Tensor:
    """One forward + backward + AdamW update; returns the (detached) loss."""
    with autocast(pixel_values.device, mixed_precision):
        loss = model(pixel_values=pixel_values, labels=labels).loss
    loss.backward()
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def _cosine_with_warmup(total_steps: int, warmup_ratio: float) -> Callable[[int], float]:
    warmup = max(1, int(warmup_ratio * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, pixels: torch.Tensor, labels: torch.Tensor, device: torch.device,
                      mixed_precision: str | None = None, batch_size: int = 500) -> float:
    """Top-1 accuracy of `model` on the test tensors, evaluated in batches; the training mode is restored."""
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(labels), batch_size):
        batch = pixels[start:start + batch_size].to(device)
        with autocast(device, mixed_precision):
            logits = model(pixel_values=batch).logits
        correct += int((logits.argmax(-1).cpu() == labels[start:start + batch_size]).sum())
    model.train(was_training)
    return correct / max(1, len(labels))


def _coefficients(model: nn.Module) -> dict[str, tuple[float, float]]:
    if not isinstance(model, ReplacementModel):
        return {}
    return {
        f"block {index}": (float(parameter[0].detach().mean()), float(parameter[1].detach().mean()))
        for index, parameter in model.replacement_coefficients.named_parameters()
    }


def train_run(
    suite: SuiteSpec, model_name: str, method: str, seed: int, data: TensorData, device: torch.device
) -> dict[str, Any]:
    """Train `method` on `model_name` from seed `seed`; accuracy after each epoch and coefficient traces."""
    built = build_method_model(method, model_name, data.num_labels, suite.image_size, suite.num_channels, seed, data.id2label)
    model = built.model.to(device).train()
    optimizer = make_optimizer(model, suite.lr, suite.weight_decay)
    count = len(data.train_y)
    steps_per_epoch = math.ceil(count / suite.batch_size)
    total_steps = steps_per_epoch * suite.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _cosine_with_warmup(total_steps, suite.warmup_ratio))
    generator = torch.Generator().manual_seed(seed)  # same data order for every method of a seed
    curve: list[float] = []
    losses: list[float] = []
    trace: dict[str, Any] = {"steps": [], "blocks": {}}
    record_every = max(1, total_steps // 200)
    step = 0
    started = time.perf_counter()

    def record_coefficients() -> None:
        for block, (a, b) in _coefficients(model).items():
            entry = trace["blocks"].setdefault(block, {"a": [], "b": []})
            entry["a"].append(a)
            entry["b"].append(b)
        trace["steps"].append(step)

    record_coefficients()
    for _ in range(suite.epochs):
        order = torch.randperm(count, generator=generator)
        epoch_loss = 0.0
        for start in range(0, count, suite.batch_size):
            index = order[start:start + suite.batch_size]
            loss = train_step(
                model, optimizer, data.train_x[index].to(device), data.train_y[index].to(device), suite.mixed_precision, scheduler
            )
            epoch_loss += float(loss) * len(index)
            step += 1
            if isinstance(model, ReplacementModel) and (step % record_every == 0 or step == total_steps):
                record_coefficients()
        losses.append(epoch_loss / count)
        curve.append(evaluate_accuracy(model, data.test_x, data.test_y, device, suite.mixed_precision))
    result = {
        "seed": seed,
        "accuracy": curve[-1] if curve else None,
        "accuracy_per_epoch": curve,
        "train_loss_per_epoch": losses,
        "train_seconds": time.perf_counter() - started,
        "steps": step,
    }
    if isinstance(model, ReplacementModel):
        result["coefficients"] = trace
    return result
