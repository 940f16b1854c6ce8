"""Training a method's model for accuracy: one seeded run, with the library's optimizer, schedule, step and evaluation.

The step, schedule and accuracy are `hf_replacement.commands.training_steps`, the ones the `hf-replacement train`
launcher uses, so the benchmark measures what a user's training does.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from hf_replacement.commands.training_steps import DivergenceMonitor, make_optimizer, make_scheduler, train_step
from hf_replacement.model import LOG_PREFIX, coefficient_logs

from .data import TensorData
from .device import autocast
from .methods import build_method_model, replacement_of
from .suites import SuiteSpec
from .tasks import task_of

logger = logging.getLogger(__name__)


def clipped_backward(model: nn.Module, max_norm: float | None) -> Callable[[torch.Tensor], None] | None:
    """`train_step`'s backward for a suite that clips gradients (`SuiteSpec.max_grad_norm`): the loss's backward,
    then the global norm of `model`'s gradients clipped to `max_norm`; None (a plain backward) without clipping."""
    if max_norm is None:
        return None

    def backward(loss: torch.Tensor) -> None:
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], max_norm)

    return backward


def _coefficients(model: nn.Module) -> dict[str, tuple[float, float]]:
    """Each replaced block's (a, b) in use (PEFT's trained copy under LoRA + RepL), averaged over columns for
    the finer granularities."""
    replacement = replacement_of(model)
    if replacement is None:
        return {}
    logs = coefficient_logs(replacement)
    return {
        f"block {index}": (logs[f"{LOG_PREFIX}a/block_{index}"], logs[f"{LOG_PREFIX}b/block_{index}"])
        for index in replacement.replaced_blocks
    }


def train_run(
    suite: SuiteSpec,
    model_name: str,
    method: str,
    seed: int,
    data: TensorData,
    device: torch.device,
    pretrained: str | None = None,
) -> dict[str, Any]:
    """Train `method` on `model_name` from seed `seed` (from the `pretrained` weights if given); accuracy
    after each epoch and coefficient traces."""
    built = build_method_model(
        method, model_name, data.num_labels, suite.image_size, suite.num_channels, seed, data.id2label, pretrained
    )
    return train_model(suite, built.model, seed, data, device)


def train_model(
    suite: SuiteSpec, model: nn.Module, seed: int, data: TensorData, device: torch.device
) -> dict[str, Any]:
    """Train `model` in place with the suite's settings, data order from `seed`; the run's record. `accuracy`
    (and `accuracy_per_epoch`) is the task's held-out metric (`tasks.Task.metric`: accuracy, perplexity, ...)."""
    task = task_of(suite)
    model = model.to(device).train()
    optimizer = make_optimizer(model, suite.lr, suite.weight_decay)
    backward = clipped_backward(model, suite.max_grad_norm)
    count = len(data.train_y)
    total_steps = math.ceil(count / suite.batch_size) * suite.epochs
    scheduler = make_scheduler(optimizer, total_steps, suite.warmup_ratio)
    generator = torch.Generator().manual_seed(seed)  # same data order for every method of a seed
    curve: list[float] = []
    losses: list[float] = []
    trace: dict[str, Any] = {"steps": [], "blocks": {}}
    record_every = max(1, total_steps // 200)  # ~200 points per curve, whatever the run's length
    step = 0
    divergence = DivergenceMonitor()  # the launcher's alarm: the suites must not trip it
    diverged: str | None = None
    started = time.perf_counter()

    def record_coefficients() -> None:
        for block, (a, b) in _coefficients(model).items():
            entry = trace["blocks"].setdefault(block, {"a": [], "b": []})
            entry["a"].append(a)
            entry["b"].append(b)
        trace["steps"].append(step)

    record_coefficients()
    elapsed: list[float] = []  # training seconds at the end of each epoch, evaluation excluded (equal wall-clock)
    evaluating = 0.0
    for _ in range(suite.epochs):
        order = torch.randperm(count, generator=generator)
        epoch_loss = 0.0
        for start in range(0, count, suite.batch_size):
            index = order[start:start + suite.batch_size]
            batch = task.batch(data.train_x[index], data.train_y[index], device)
            loss = train_step(
                model, optimizer, batch, scheduler=scheduler, precision=autocast(device, suite.mixed_precision),
                backward=backward,
            )
            epoch_loss += float(loss) * len(index)
            step += 1
            message = divergence.observe(float(loss), step)
            if message:
                diverged = message
                logger.warning("seed %d: %s", seed, message)
            if replacement_of(model) is not None and (step % record_every == 0 or step == total_steps):
                record_coefficients()
        losses.append(epoch_loss / count)
        evaluation_started = time.perf_counter()
        elapsed.append(evaluation_started - started - evaluating)
        curve.append(task.evaluate(model, data, device, autocast(device, suite.mixed_precision)))
        evaluating += time.perf_counter() - evaluation_started
    result = {
        "seed": seed,
        "accuracy": curve[-1] if curve else None,
        "accuracy_per_epoch": curve,
        "train_loss_per_epoch": losses,
        "train_seconds": time.perf_counter() - started,
        "train_seconds_at_epoch": elapsed,
        "steps": step,
        "divergence": diverged,
    }
    if replacement_of(model) is not None:
        result["coefficients"] = trace
    return result
