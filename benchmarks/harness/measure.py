"""Memory and speed of each method on one model: state and activation bytes, checkpoint size,
interleaved step times with the synthesis share, inference throughput."""

from __future__ import annotations

import contextlib
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from hf_replacement import find_blocks
from hf_replacement.commands.training_steps import make_optimizer, train_step
from hf_replacement.layer import is_replaced
from hf_replacement.synthesis import synthesize
from hf_replacement.utils import count_parameters

from .baselines import full_depth
from .device import autocast, synchronize
from .meters import SavedTensorMeter, SynthesisCounter, forward_flops_per_image, parameter_state_bytes, state_memory
from .methods import (
    FLOPS_INTERVAL,
    MethodModel,
    build_method_model,
    inference_model,
    replaced_block_indices,
    replacement_of,
)
from .suites import SuiteSpec
from .tasks import task_of
from .training import clipped_backward

Batch = Mapping[str, torch.Tensor]
Synthesizer = Callable[[nn.Module], list[torch.Tensor]]
# Timed repeats dropped before the medians: the allocator and caches warm up on them.
WARMUP_REPEATS = 2


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


def replaced_modules(model: nn.Module) -> list[nn.Module]:
    """The replaced blocks of `model`, in module order (none for a model without RepL)."""
    return [module for module in model.modules() if is_replaced(module)]


def rotated(names: Sequence[str], round_index: int) -> list[str]:
    """`names` starting at a different one each round: no contender always runs first (or after another)."""
    shift = round_index % len(names)
    return list(names[shift:]) + list(names[:shift])


def time_synthesis(
    model: nn.Module,
    repeats: int,
    implementations: Mapping[str, Synthesizer] | None = None,
    device: torch.device | None = None,
) -> dict[str, tuple[float, float]]:
    """Median seconds to synthesize every replaced block's weights, per implementation: (forward, forward + backward).

    Measured alone, with the backward into the coefficients and both neighbours that a training
    step does; gradients are cleared after each repeat. `implementations` (default: the shipped
    `synthesize` as "fused") alternate, their order flipping at every repeat, since the second to
    run finds the neighbours' tensors in cache.
    """
    implementations = dict(implementations or {"fused": synthesize})
    modules = replaced_modules(model)
    if not modules:
        return {name: (0.0, 0.0) for name in implementations}
    device = device or torch.device("cpu")
    with torch.no_grad():
        gradients = [torch.ones_like(w) for module in modules for w in synthesize(module)]
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in implementations}
    for repeat in range(repeats + WARMUP_REPEATS):
        for name in list(implementations)[:: 1 if repeat % 2 else -1]:
            synchronize(device)
            started = time.perf_counter()
            weights = [w for module in modules for w in implementations[name](module)]
            synchronize(device)
            forward_done = time.perf_counter()
            torch.autograd.backward(weights, gradients)
            synchronize(device)
            finished = time.perf_counter()
            model.zero_grad(set_to_none=True)
            if repeat >= WARMUP_REPEATS:
                times[name].append((forward_done - started, finished - started))
    return {
        name: (statistics.median(t[0] for t in values), statistics.median(t[1] for t in values))
        for name, values in times.items()
    }


def block_flops(built: MethodModel, batch: Batch, input_name: str = "pixel_values") -> float | None:
    """Forward FLOPs per image of one of the blocks RepL with k=`FLOPS_INTERVAL` replaces, as this method
    runs it (mean over those blocks; the synthesis, a cost per step, not included): the plain block for
    bp and freeze, the replaced block (its surrogate) for RepL with that k, 0 for the blocks drop
    deletes. None where not comparable (another k, LoRA)."""
    method, model = built.method, built.model
    if method.kind not in ("bp", "freeze") and method.interval != FLOPS_INTERVAL:
        return None
    if method.kind == "drop":
        return 0.0
    if replacement_of(model) is not None:
        modules = replaced_modules(model)
    elif method.kind in ("bp", "freeze"):
        blocks = find_blocks(model)
        modules = [blocks[index].module for index in replaced_block_indices(model, FLOPS_INTERVAL)]
    else:
        return None
    counts = forward_flops_per_image(model, modules, batch[input_name], input_name)
    return sum(counts) / len(counts)


def one_step_memory(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: Batch,
    precision: contextlib.AbstractContextManager,
    per_block: bool = False,
) -> tuple[int, dict[str, int], list[int] | None]:
    """One training step's memory: the bytes autograd saves for backward (the meter around the forward: what
    it holds when backward starts), the state after the optimizer step with the gradients still held
    (`meters.state_memory`), and with `per_block` each block's parameters with their gradients and optimizer
    state. Leaves no gradient behind. `precision`: the autocast context of the forward."""
    meter = SavedTensorMeter(exclude=list(model.parameters()) + list(model.buffers()))
    with meter, precision:
        loss = model(**batch).loss
    loss.backward()
    del loss
    optimizer.step()
    state = state_memory(model, optimizer)
    block_state = (
        [parameter_state_bytes(list(block.module.parameters()), optimizer) for block in find_blocks(model)]
        if per_block
        else None
    )
    optimizer.zero_grad(set_to_none=True)
    return meter.bytes, state, block_state


def measure_memory(
    suite: SuiteSpec, model_name: str, method: str, batch: Batch, num_labels: int, device: torch.device
) -> dict[str, Any]:
    """Parameters, state and activation memory, checkpoint size (and CUDA peak) of one method, alone."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
    baseline = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    built = build_method_model(method, model_name, num_labels, suite.image_size, suite.num_channels, seed=0)
    model = built.model.to(device).train()
    with full_depth(model):  # stochastic depth: the step that runs every block, what memory must hold
        return _measure_memory(suite, built, batch, device, baseline)


def _measure_memory(
    suite: SuiteSpec, built: MethodModel, batch: Batch, device: torch.device, cuda_baseline: int
) -> dict[str, Any]:
    model = built.model
    trainable, total = count_parameters(model)
    flops = block_flops(built, batch, task_of(suite).input_name)
    optimizer = make_optimizer(model, suite.lr, suite.weight_decay)
    # bp's, per block: what RepL frees of it gives RepL's analytic memory (runner._summarize).
    saved, state, block_state = one_step_memory(
        model, optimizer, batch, autocast(device, suite.mixed_precision), per_block=built.method.kind == "bp"
    )
    result: dict[str, Any] = {
        "trainable_params": trainable,
        "total_params": total,
        "plain_params": built.plain_params,
        "num_blocks": built.num_blocks,
        "affected_blocks": built.affected_blocks,
        "state_memory_bytes": state,
        "saved_activation_bytes": saved,
        "batch_size": len(batch["labels"]),  # a detection batch's labels: one target dict per image
    }
    if flops is not None:
        result["block_flops_per_image"] = flops
    if block_state is not None:
        result["block_state_bytes"] = block_state
    if device.type == "cuda":
        # Second step: the optimizer state exists, as in every later step.
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        train_step(model, optimizer, batch, precision=autocast(device, suite.mixed_precision))
        torch.cuda.synchronize(device)
        result["cuda_peak_bytes"] = torch.cuda.max_memory_allocated(device) - cuda_baseline
    result["checkpoint"] = checkpoint_size(built)
    return result


def _synthesis_share(
    forward: list[float], forward_backward: list[float], calls: int, steps: int, replaced: int, median_step: float
) -> dict[str, float]:
    """Synthesis seconds per training step and their share of the step.

    A step synthesizes each replaced block once in forward (plus its backward), and once more in
    backward when the block is recomputed: counted calls say how many forwards to add.
    """
    forward_s, forward_backward_s = statistics.median(forward), statistics.median(forward_backward)
    calls_per_step = calls / steps / replaced  # 2 with recompute
    per_step = forward_backward_s + (calls_per_step - 1) * forward_s
    return {
        "synthesis_forward_s": forward_s,
        "synthesis_forward_backward_s": forward_backward_s,
        "synthesis_calls_per_block_per_step": calls_per_step,
        "synthesis_per_step_s": per_step,
        "synthesis_percent": 100 * per_step / median_step,
    }


def time_training_steps(
    suite: SuiteSpec, models: Mapping[str, nn.Module], batch: Batch, device: torch.device
) -> dict[str, dict[str, Any]]:
    """Median step time per method, methods interleaved in rounds (rotated start) after warm-up,
    and the synthesis share of RepL steps."""
    methods = list(models)
    optimizers = {m: make_optimizer(model, suite.lr, suite.weight_decay) for m, model in models.items()}
    counters = {m: SynthesisCounter() for m in methods}
    times: dict[str, list[float]] = {m: [] for m in methods}
    synthesis: dict[str, list[tuple[float, float]]] = {m: [] for m in methods}

    backwards = {m: clipped_backward(model, suite.max_grad_norm) for m, model in models.items()}

    def step(method: str) -> None:
        train_step(models[method], optimizers[method], batch, precision=autocast(device, suite.mixed_precision),
                   backward=backwards[method])

    for method in methods:
        for _ in range(suite.timing_warmup_steps):
            step(method)
    for round_index in range(suite.timing_rounds):
        for method in rotated(methods, round_index):
            with counters[method].active():
                for _ in range(suite.timing_steps_per_round):
                    synchronize(device)
                    started = time.perf_counter()
                    step(method)
                    synchronize(device)
                    times[method].append(time.perf_counter() - started)
            if replaced_modules(models[method]):
                with autocast(device, suite.mixed_precision):
                    timed = time_synthesis(models[method], suite.timing_steps_per_round, device=device)
                synthesis[method].append(timed["fused"])
    results: dict[str, dict[str, Any]] = {}
    for method in methods:
        median_step = statistics.median(times[method])
        results[method] = {"median_step_s": median_step, "step_times_s": times[method]}
        replaced = len(replaced_modules(models[method]))
        if replaced:
            results[method].update(_synthesis_share(
                [s[0] for s in synthesis[method]], [s[1] for s in synthesis[method]], counters[method].calls,
                suite.timing_rounds * suite.timing_steps_per_round, replaced, median_step,
            ))
    return results


def time_inference(
    suite: SuiteSpec, models: Mapping[str, nn.Module], pixels: torch.Tensor, device: torch.device
) -> dict[str, dict[str, Any]]:
    """Images (samples) per second of each (deployed) model in eval mode without gradients, interleaved in rounds
    too; `pixels` is the task's input (`Task.input_name`: a text model's token ids)."""
    methods = list(models)
    name = task_of(suite).input_name
    inputs = {name: pixels[:1].expand(suite.inference_batch_size, *pixels.shape[1:]).contiguous()}
    times: dict[str, list[float]] = {m: [] for m in methods}
    with torch.no_grad(), autocast(device, suite.mixed_precision):
        for method in methods:
            for _ in range(2):  # warm-up
                models[method](**inputs)
        for round_index in range(suite.inference_rounds):
            for method in rotated(methods, round_index):
                for _ in range(suite.inference_calls_per_round):
                    synchronize(device)
                    started = time.perf_counter()
                    models[method](**inputs)
                    synchronize(device)
                    times[method].append(time.perf_counter() - started)
    return {
        method: {
            "inference_images_per_s": suite.inference_batch_size / statistics.median(times[method]),
            "inference_params": count_parameters(models[method])[1],
        }
        for method in methods
    }


def measure_speed(
    suite: SuiteSpec, model_name: str, methods: Sequence[str], batch: Batch, num_labels: int, device: torch.device,
) -> dict[str, dict[str, Any]]:
    """Training step times with the synthesis share of RepL steps, then the inference throughput of the
    merged models, every method built from the same seed."""
    built = {
        m: build_method_model(m, model_name, num_labels, suite.image_size, suite.num_channels, seed=0) for m in methods
    }
    models = {m: b.model.to(device).train() for m, b in built.items()}
    results = time_training_steps(suite, models, batch, device)
    # Inference: the deployed (merged) models.
    deployed = {m: inference_model(built[m]).eval() for m in methods}
    for method, entry in time_inference(suite, deployed, batch[task_of(suite).input_name], device).items():
        results[method].update(entry)
    return results


def _compiled_steps(
    suite: SuiteSpec, model: nn.Module, batch: Batch, device: torch.device
) -> tuple[float, list[float], int | None]:
    """Compile `model` with the suite's backend, then (seconds of the first steps, which compile; timed steps;
    CUDA peak bytes over the timed steps, None off CUDA)."""
    compiled = torch.compile(model, backend=suite.compile_backend)
    optimizer = make_optimizer(model, suite.lr, suite.weight_decay)

    def step() -> None:
        train_step(compiled, optimizer, batch, precision=autocast(device, suite.mixed_precision))
        synchronize(device)

    started = time.perf_counter()
    for _ in range(max(1, suite.timing_warmup_steps)):
        step()
    compile_seconds = time.perf_counter() - started
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(suite.timing_rounds * suite.timing_steps_per_round):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return compile_seconds, times, peak


def measure_compiled(
    suite: SuiteSpec, model_name: str, methods: Sequence[str], batch: Batch, num_labels: int, device: torch.device,
) -> dict[str, dict[str, Any]]:
    """Training steps under `torch.compile` for the suite's `compiled_methods`: median step, images/s and (CUDA)
    peak memory. One method at a time, alone on the device, so each peak is that method's own (from the
    allocation before its model was built); not interleaved, since compiling each takes far longer than its
    timed steps."""
    results: dict[str, dict[str, Any]] = {}
    for method in (m for m in methods if m in suite.compiled_methods):
        if device.type == "cuda":
            torch.cuda.empty_cache()
            baseline = torch.cuda.memory_allocated(device)
        built = build_method_model(method, model_name, num_labels, suite.image_size, suite.num_channels, seed=0)
        compile_seconds, times, peak = _compiled_steps(suite, built.model.to(device).train(), batch, device)
        median_step = statistics.median(times)
        results[method] = {
            "compiled_median_step_s": median_step,
            "compiled_train_images_per_s": len(batch["labels"]) / median_step,
            "compile_seconds": compile_seconds,
        }
        if peak is not None:
            results[method]["compiled_cuda_peak_bytes"] = peak - baseline
        del built
    return results
