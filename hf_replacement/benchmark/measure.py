"""Memory and speed of each method on one model: state and activation bytes, checkpoint size,
interleaved step times with the synthesis share, inference throughput."""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .. import layer as replacement_layer
from ..layer import is_replaced
from .device import autocast, synchronize
from .meters import SavedTensorMeter, SynthesisCounter, state_memory
from .methods import MethodModel, build_method_model, inference_model, parameter_counts
from .suites import SuiteSpec
from .training import make_optimizer, train_step


def checkpoint_size(built: MethodModel) -> dict[str, Any]:
    """Bytes of what `save_pretrained` writes for this method (weights and configs; no model card)."""
    with tempfile.TemporaryDirectory() as directory:
        # RepL: the compact checkpoint; LoRA: adapters + classifier (the base model is needed as well).
        built.model.save_pretrained(directory)
        files = {
            name: os.path.getsize(os.path.join(directory, name))
            for name in sorted(os.listdir(directory))
            if name.endswith((".safetensors", ".json"))
        }
    return {"bytes": sum(files.values()), "files": files}


def _replaced_modules(model: nn.Module) -> list[nn.Module]:
    return [module for module in model.modules() if is_replaced(module)]


def time_synthesis(model: nn.Module, device: torch.device, repeats: int) -> tuple[float, float]:
    """Median seconds to synthesize every replaced block's weights: (forward, forward + backward).

    Measured alone, with the backward into the coefficients and both neighbours that a training
    step does; gradients are cleared afterwards.
    """
    modules = _replaced_modules(model)
    if not modules:
        return 0.0, 0.0
    with torch.no_grad():
        gradients = [torch.ones_like(w) for module in modules for w in replacement_layer.synthesize(module)]
    forward_times, total_times = [], []
    for _ in range(repeats + 2):
        synchronize(device)
        started = time.perf_counter()
        weights = [w for module in modules for w in replacement_layer.synthesize(module)]
        synchronize(device)
        forward_done = time.perf_counter()
        torch.autograd.backward(weights, gradients)
        synchronize(device)
        finished = time.perf_counter()
        forward_times.append(forward_done - started)
        total_times.append(finished - started)
        model.zero_grad(set_to_none=True)
    return statistics.median(forward_times[2:]), statistics.median(total_times[2:])


def measure_memory(
    suite: SuiteSpec, model_name: str, method: str, batch: tuple[torch.Tensor, torch.Tensor], num_labels: int, device: torch.device
) -> dict[str, Any]:
    """Parameters, state and activation memory, checkpoint size (and CUDA peak) of one method, alone."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        baseline = torch.cuda.memory_allocated(device)
    built = build_method_model(method, model_name, num_labels, suite.image_size, suite.num_channels, seed=0)
    model = built.model.to(device).train()
    trainable, total = parameter_counts(model)
    optimizer = make_optimizer(model, suite.lr, suite.weight_decay)
    pixels, labels = batch
    # One step with the meter around the forward: what autograd holds at the start of backward.
    meter = SavedTensorMeter(exclude=list(model.parameters()) + list(model.buffers()))
    with meter, autocast(device, suite.mixed_precision):
        loss = model(pixel_values=pixels, labels=labels).loss
    loss.backward()
    del loss
    optimizer.step()
    state = state_memory(model, optimizer)  # gradients still held: their bytes count
    optimizer.zero_grad(set_to_none=True)
    result: dict[str, Any] = {
        "trainable_params": trainable,
        "total_params": total,
        "plain_params": built.plain_params,
        "num_blocks": built.num_blocks,
        "affected_blocks": built.affected_blocks,
        "state_memory_bytes": state,
        "saved_activation_bytes": meter.bytes,
        "batch_size": int(labels.shape[0]),
    }
    if device.type == "cuda":
        # Second step: the optimizer state exists, as in every later step.
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        train_step(model, optimizer, pixels, labels, suite.mixed_precision)
        torch.cuda.synchronize(device)
        result["cuda_peak_bytes"] = torch.cuda.max_memory_allocated(device) - baseline
    result["checkpoint"] = checkpoint_size(built)
    return result


def measure_speed(
    suite: SuiteSpec, model_name: str, methods: Sequence[str], batch: tuple[torch.Tensor, torch.Tensor],
    num_labels: int, device: torch.device,
) -> dict[str, dict[str, Any]]:
    """Median step time per method, methods interleaved in rounds (rotated start) after warm-up,
    the synthesis share of RepL steps, then the inference throughput of the merged models."""
    pixels, labels = batch
    built = {m: build_method_model(m, model_name, num_labels, suite.image_size, suite.num_channels, seed=0) for m in methods}
    models = {m: b.model.to(device).train() for m, b in built.items()}
    optimizers = {m: make_optimizer(model, suite.lr, suite.weight_decay) for m, model in models.items()}
    counters = {m: SynthesisCounter() for m in methods}
    times: dict[str, list[float]] = {m: [] for m in methods}
    synthesis: dict[str, list[tuple[float, float]]] = {m: [] for m in methods}
    for method in methods:
        for _ in range(suite.timing_warmup_steps):
            train_step(models[method], optimizers[method], pixels, labels, suite.mixed_precision)
    for round_index in range(suite.timing_rounds):
        shift = round_index % len(methods)
        for method in list(methods[shift:]) + list(methods[:shift]):
            model, optimizer = models[method], optimizers[method]
            with counters[method].active():
                for _ in range(suite.timing_steps_per_round):
                    synchronize(device)
                    started = time.perf_counter()
                    train_step(model, optimizer, pixels, labels, suite.mixed_precision)
                    synchronize(device)
                    times[method].append(time.perf_counter() - started)
            if _replaced_modules(model):
                with autocast(device, suite.mixed_precision):
                    synthesis[method].append(time_synthesis(model, device, repeats=suite.timing_steps_per_round))
    results: dict[str, dict[str, Any]] = {}
    for method in methods:
        median_step = statistics.median(times[method])
        entry: dict[str, Any] = {"median_step_s": median_step, "step_times_s": times[method]}
        replaced = len(_replaced_modules(models[method]))
        if replaced:
            forward = statistics.median(s[0] for s in synthesis[method])
            forward_backward = statistics.median(s[1] for s in synthesis[method])
            steps = suite.timing_rounds * suite.timing_steps_per_round
            calls_per_step = counters[method].calls / steps / replaced  # 2 with recompute
            per_step = forward_backward + (calls_per_step - 1) * forward
            entry.update(
                synthesis_forward_s=forward,
                synthesis_forward_backward_s=forward_backward,
                synthesis_calls_per_block_per_step=calls_per_step,
                synthesis_per_step_s=per_step,
                synthesis_percent=100 * per_step / median_step,
            )
        results[method] = entry
    del optimizers
    # Inference: the deployed (merged) models, eval mode, no grad, interleaved rounds too.
    inference_x = pixels[:1].expand(suite.inference_batch_size, *pixels.shape[1:]).contiguous()
    inference = {m: inference_model(built[m]).eval() for m in methods}
    inference_times: dict[str, list[float]] = {m: [] for m in methods}
    with torch.no_grad(), autocast(device, suite.mixed_precision):
        for method in methods:
            for _ in range(2):
                inference[method](pixel_values=inference_x)
        for round_index in range(suite.inference_rounds):
            shift = round_index % len(methods)
            for method in list(methods[shift:]) + list(methods[:shift]):
                for _ in range(suite.inference_calls_per_round):
                    synchronize(device)
                    started = time.perf_counter()
                    inference[method](pixel_values=inference_x)
                    synchronize(device)
                    inference_times[method].append(time.perf_counter() - started)
    for method in methods:
        results[method]["inference_images_per_s"] = suite.inference_batch_size / statistics.median(inference_times[method])
        results[method]["inference_params"] = sum(p.numel() for p in inference[method].parameters())
    return results
