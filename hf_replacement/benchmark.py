"""Benchmark: RepL against ordinary training and its alternatives, same model/data/seed, one run.

`hf-replacement benchmark --suite quick` (or `python -m hf_replacement.benchmark`) trains and
measures, in one process, every method on every model of a suite:

- `bp`: ordinary training (back-propagation through the whole plain model);
- `repl-k4`, `repl-k3`: Replacement Learning, every k-th block replaced (`ReplacementConfig`);
- `repl-k4-recompute`: as `repl-k4`, the replaced blocks' activations recomputed in backward;
- `drop-k4`, `drop-k3`: the blocks RepL would replace deleted (a shallower model: the ablation
  RepL must beat, since it is cheaper still);
- `freeze-k4`, `freeze-k3`: the same blocks kept at their initial weights, not trained;
- `lora`: PEFT LoRA (r=8) on the attention q/v projections (ViT/DeiT) or the pointwise Linear layers
  (ConvNeXt), the classifier trained fully.

Per method and model it reports trainable/total parameters, training memory (on CPU: the exact
bytes of parameters + buffers + gradients + optimizer state, and the bytes autograd saves for
backward in one forward; on CUDA also `max_memory_allocated`), the median step time (warm-up
excluded, methods interleaved in rounds so drift hits them alike) with the share of a RepL step
spent synthesizing weights, test accuracy mean ± std over seeds with per-epoch curves, the
checkpoint size and the inference throughput of the merged model. It writes `results.json`,
`results.md`, `accuracy_curves.png` and `coefficients.png`, each atomically.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import logging
import math
import os
import platform
import resource
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from . import layer as replacement_layer
from .blocks import find_blocks
from .config import ReplacementConfig
from .layer import is_replaced
from .model import ReplacementModel, get_replacement_model
from .presets import PRESETS, build_preset_model
from .selection import select_blocks

logger = logging.getLogger(__name__)

MB = 2**20


class BenchmarkError(ValueError):
    """A benchmark cannot run as asked (unknown method or model, no CUDA for the gpu suite, ...)."""


# --------------------------------------------------------------------------------------------------
# Methods


@dataclass(frozen=True)
class Method:
    """One way of training: `kind` is bp, repl, drop, freeze or lora; `interval` the k of RepL's blocks."""

    name: str
    kind: str
    interval: int | None = None
    recompute: bool = False


METHODS: dict[str, Method] = {
    "bp": Method("bp", "bp"),
    "repl-k4": Method("repl-k4", "repl", 4),
    "repl-k3": Method("repl-k3", "repl", 3),
    "repl-k4-recompute": Method("repl-k4-recompute", "repl", 4, recompute=True),
    "repl-k3-recompute": Method("repl-k3-recompute", "repl", 3, recompute=True),
    "drop-k4": Method("drop-k4", "drop", 4),
    "drop-k3": Method("drop-k3", "drop", 3),
    "freeze-k4": Method("freeze-k4", "freeze", 4),
    "freeze-k3": Method("freeze-k3", "freeze", 3),
    "lora": Method("lora", "lora"),
}
METHOD_ALIASES = {"repl": "repl-k4", "drop": "drop-k4", "freeze": "freeze-k4", "baseline": "bp"}
DEFAULT_METHODS = ("bp", "repl-k4", "repl-k3", "repl-k4-recompute", "drop-k4", "drop-k3", "freeze-k4", "lora")

LORA_RANK = 8
# PEFT has no default LoRA targets for v5 ViT (DESIGN.md §3): name them per architecture.
LORA_TARGETS = {"vit": ["q_proj", "v_proj"], "deit": ["q_proj", "v_proj"], "convnext": ["pwconv1", "pwconv2"]}
LORA_FROM_SCRATCH_NOTE = (
    "from scratch: LoRA adapts a random, frozen network (shown for parameter/memory/time comparison "
    "only; its accuracy says nothing about LoRA fine-tuning of a pretrained model)"
)


def resolve_methods(names: Sequence[str]) -> list[str]:
    """Canonical method names, aliases resolved and duplicates dropped; raise on an unknown name."""
    resolved: list[str] = []
    for raw in names:
        for name in (part.strip() for part in raw.split(",")):
            if not name:
                continue
            name = METHOD_ALIASES.get(name, name)
            if name not in METHODS:
                raise BenchmarkError(f"Unknown method {name!r}; choose from {', '.join(METHODS)} (aliases: {METHOD_ALIASES}).")
            if name not in resolved:
                resolved.append(name)
    if not resolved:
        raise BenchmarkError("No method given.")
    return resolved


# --------------------------------------------------------------------------------------------------
# Suites


@dataclass(frozen=True)
class SuiteSpec:
    """Everything one benchmark run does; `SUITES` holds the standard ones, `dataclasses.replace` tunes them.

    `methods` are all measured (memory, time, checkpoint, throughput); `accuracy_methods` (default:
    all of them) are also trained over `seeds` seeds. `dataset=None` uses random tensors and trains
    nothing (memory/time only).
    """

    name: str
    models: tuple[str, ...]
    dataset: str | None
    image_size: int
    num_channels: int = 1
    num_labels: int = 10  # synthetic data only; a data set brings its own
    methods: tuple[str, ...] = DEFAULT_METHODS
    accuracy_methods: tuple[str, ...] | None = None
    seeds: int = 3
    epochs: int = 10
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_ratio: float = 0.05
    max_train_samples: int | None = None
    max_test_samples: int | None = None
    timing_batch_size: int | None = None  # default: batch_size
    timing_warmup_steps: int = 3
    timing_rounds: int = 4
    timing_steps_per_round: int = 5
    inference_batch_size: int = 256
    inference_rounds: int = 5
    inference_calls_per_round: int = 3
    mixed_precision: str | None = None  # "bf16": autocast
    requires_cuda: bool = False
    notes: tuple[str, ...] = ()

    @property
    def trains(self) -> bool:
        return self.dataset is not None and self.epochs > 0

    def trained_methods(self) -> list[str]:
        wanted = self.methods if self.accuracy_methods is None else self.accuracy_methods
        return [m for m in self.methods if m in wanted] if self.trains else []


SUITES: dict[str, SuiteSpec] = {
    # 2 CPU cores, under 10 minutes in all (measured: see benchmarks/quick/results.md).
    "quick": SuiteSpec(
        name="quick",
        models=("vit-mini", "convnext-mini"),
        dataset="digits",
        image_size=8,
        epochs=8,
        batch_size=64,
        lr=1e-3,
        warmup_ratio=0.2,
        accuracy_methods=tuple(m for m in DEFAULT_METHODS if not m.endswith("-recompute")),
        notes=("digits: 1437 train / 360 test images (scikit-learn, 8x8 grayscale), split fixed (seed 0); "
               "seeds vary the initialisation and the data order.",
               "repl-k4-recompute does the same arithmetic as repl-k4 (identical losses, checked in "
               "tests/test_benchmark.py): measured for memory/time, not retrained, to keep the suite under 10 minutes."),
    ),
    # 2 CPU cores, under an hour: the 12-block ViT/DeiT-tiny take ~1 s per step of 64 at 28x28 and
    # ConvNeXt-tiny (stem stride 1 at 28 px) ~3.7 s, so a full 60k epoch (15-60 min per run) cannot
    # fit: a stratum of the training set, and the methods that differ in accuracy are trained.
    "fashion-mnist": SuiteSpec(
        name="fashion-mnist",
        models=("vit-tiny", "deit-tiny", "convnext-tiny"),
        dataset="fashion-mnist",
        image_size=28,
        methods=DEFAULT_METHODS,
        accuracy_methods=("bp", "repl-k4", "drop-k4"),
        epochs=2,
        batch_size=64,
        max_train_samples=1024,
        max_test_samples=500,
        timing_rounds=2,
        timing_steps_per_round=2,
        timing_warmup_steps=2,
        inference_batch_size=64,
        inference_rounds=3,
        notes=("Fashion-MNIST subsampled to 1024 training / 500 test images (2 epochs = 32 steps) so the suite "
               "fits an hour on 2 CPU cores (estimated ~40 min: ConvNeXt-tiny at 28 px, stem stride 1, takes "
               "~3.7 s per step of 64); accuracies are therefore far below full-data numbers.",
               "Trained for accuracy: bp, repl-k4 and the ablation it must beat, drop-k4; the other methods are "
               "measured (memory, time, checkpoint, throughput) only. repl-k4-recompute does the same arithmetic "
               "as repl-k4; lora would adapt a random network."),
    ),
    # CUDA only: memory and time at 224x224 in bf16 autocast, random data, nothing trained.
    "gpu": SuiteSpec(
        name="gpu",
        models=("vit-base", "convnext-tiny"),
        dataset=None,
        image_size=224,
        num_channels=3,
        num_labels=1000,
        epochs=0,
        batch_size=64,
        timing_rounds=5,
        timing_steps_per_round=5,
        timing_warmup_steps=5,
        inference_batch_size=256,
        mixed_precision="bf16",
        requires_cuda=True,
        notes=("Random 224x224 RGB tensors, bf16 autocast, fp32 master weights and AdamW state.",),
    ),
}


def get_suite(name: str, **overrides: Any) -> SuiteSpec:
    """`SUITES[name]` with the non-None `overrides` applied (checked)."""
    if name not in SUITES:
        raise BenchmarkError(f"Unknown suite {name!r}; choose one of {', '.join(SUITES)}.")
    changes = {key: value for key, value in overrides.items() if value is not None}
    if "methods" in changes:
        changes["methods"] = tuple(resolve_methods(changes["methods"]))
    if "models" in changes:
        changes["models"] = tuple(changes["models"])
    suite = dataclasses.replace(SUITES[name], **changes)
    validate_suite(suite)
    return suite


def validate_suite(suite: SuiteSpec) -> None:
    resolve_methods(suite.methods)
    unknown = [m for m in suite.models if m not in PRESETS]
    if unknown:
        raise BenchmarkError(f"Unknown model(s) {unknown}; the benchmark builds presets: {', '.join(sorted(PRESETS))}.")
    if suite.seeds < 1 or suite.batch_size < 1 or suite.epochs < 0:
        raise BenchmarkError(f"seeds and batch size must be >= 1 and epochs >= 0 (got {suite.seeds}, {suite.batch_size}, {suite.epochs}).")
    if suite.mixed_precision not in (None, "bf16"):
        raise BenchmarkError(f"mixed_precision={suite.mixed_precision!r}: only None or 'bf16' are supported.")


# --------------------------------------------------------------------------------------------------
# Building each method's model


@dataclass
class MethodModel:
    """The module a method trains, and what the method did to the plain model."""

    method: Method
    model: nn.Module
    num_blocks: int  # blocks of the plain model
    affected_blocks: list[int]  # replaced / dropped / frozen block indices (forward order)
    plain_params: int  # parameters of the plain model before the method was applied


def replaced_block_indices(model: nn.Module, interval: int) -> list[int]:
    """The blocks RepL with `replace_interval=interval` replaces in `model` (planned, nothing changed)."""
    plans = select_blocks(find_blocks(model), ReplacementConfig(replace_interval=interval))
    return [plan.block.index for plan in plans]


def drop_blocks(model: nn.Module, indices: Sequence[int]) -> nn.Module:
    """Delete blocks `indices` (forward order) from their `nn.ModuleList`s, in place; return the model.

    HF ViT, DeiT and ConvNeXt iterate their `layers` lists (Transformers 5.23; tested), so the
    forward runs the remaining blocks. The config's `num_hidden_layers` / `depths` are updated so
    `save_pretrained` writes a model that loads back with its new depth.
    """
    blocks = find_blocks(model)
    doomed = set(indices)
    if not doomed <= {block.index for block in blocks}:
        raise BenchmarkError(f"drop_blocks: {sorted(doomed)} are not all block indices of this {len(blocks)}-block model.")
    # Group the blocks by their container, keeping container order (ConvNeXt: one list per stage).
    containers: dict[str, list[int]] = {}
    for block in blocks:
        parent, _, position = block.name.rpartition(".")
        containers.setdefault(parent, [])
        if block.index in doomed:
            containers[parent].append(int(position))
    for parent, positions in containers.items():
        container = model.get_submodule(parent)
        if len(positions) == len(container):
            raise BenchmarkError(f"drop_blocks would empty {parent}; choose fewer blocks.")
        for position in sorted(positions, reverse=True):  # ModuleList renumbers after each delete
            del container[position]
    config = getattr(model, "config", None)
    if config is not None:
        if isinstance(getattr(config, "depths", None), (list, tuple)):
            config.depths = [len(model.get_submodule(parent)) for parent in containers]
        elif isinstance(getattr(config, "num_hidden_layers", None), int):
            config.num_hidden_layers = sum(len(model.get_submodule(parent)) for parent in containers)
    return model


def freeze_blocks(model: nn.Module, indices: Sequence[int]) -> nn.Module:
    """Stop training blocks `indices`: `requires_grad=False` on their parameters (kept at initialisation)."""
    blocks = find_blocks(model)
    for index in indices:
        for parameter in blocks[index].module.parameters():
            parameter.requires_grad_(False)
    return model


def apply_lora(model: nn.Module, rank: int = LORA_RANK) -> nn.Module:
    """PEFT LoRA on the architecture's projections; the classifier is trained fully (`modules_to_save`)."""
    from peft import LoraConfig, get_peft_model

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in LORA_TARGETS:
        raise BenchmarkError(f"No LoRA target modules known for model type {model_type!r} (known: {sorted(LORA_TARGETS)}).")
    config = LoraConfig(
        r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=LORA_TARGETS[model_type], modules_to_save=["classifier"]
    )
    return get_peft_model(model, config)


def build_method_model(
    method: Method | str,
    model_name: str,
    num_labels: int,
    image_size: int,
    num_channels: int,
    seed: int,
    id2label: dict[int, str] | None = None,
) -> MethodModel:
    """The plain preset built with `seed` (identical for every method), then changed by `method`."""
    method = METHODS[method] if isinstance(method, str) else method
    torch.manual_seed(seed)
    model = build_preset_model(model_name, num_labels, image_size, num_channels, id2label)
    num_blocks = len(find_blocks(model))
    plain_params = sum(p.numel() for p in model.parameters())
    affected: list[int] = []
    if method.kind in ("drop", "freeze", "repl"):
        affected = replaced_block_indices(model, method.interval)
    if method.kind == "repl":
        model = get_replacement_model(model, ReplacementConfig(replace_interval=method.interval, recompute_replaced=method.recompute))
    elif method.kind == "drop":
        model = drop_blocks(model, affected)
    elif method.kind == "freeze":
        model = freeze_blocks(model, affected)
    elif method.kind == "lora":
        model = apply_lora(model)
    return MethodModel(method, model, num_blocks, affected, plain_params)


def inference_model(built: MethodModel) -> nn.Module:
    """The model deployed after training: RepL and LoRA merged into the plain architecture."""
    model = built.model
    if isinstance(model, ReplacementModel):
        return model.merge_and_unload()
    if built.method.kind == "lora":
        return model.merge_and_unload()
    return model


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters held by `model` now."""
    parameters = list(model.parameters())
    return sum(p.numel() for p in parameters if p.requires_grad), sum(p.numel() for p in parameters)


# --------------------------------------------------------------------------------------------------
# Memory


def _tensor_bytes(tensors: Iterator[torch.Tensor] | Sequence[torch.Tensor]) -> int:
    seen: set[int] = set()
    total = 0
    for tensor in tensors:
        if tensor is None or id(tensor) in seen:
            continue
        seen.add(id(tensor))
        total += tensor.numel() * tensor.element_size()
    return total


def state_memory(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Exact bytes of parameters, buffers, gradients and optimizer state, read from the tensors."""
    parameters = list(model.parameters())
    optimizer_tensors = [value for state in optimizer.state.values() for value in state.values() if torch.is_tensor(value)]
    result = {
        "parameters": _tensor_bytes(parameters),
        "buffers": _tensor_bytes(list(model.buffers())),
        "gradients": _tensor_bytes([p.grad for p in parameters if p.grad is not None]),
        "optimizer": _tensor_bytes(optimizer_tensors),
    }
    result["total"] = sum(result.values())
    return result


class SavedTensorMeter:
    """Bytes autograd keeps for backward while the meter is active, each storage counted once.

    Parameters (and anything in `exclude`) are left out: they are counted as state. A tensor saved
    twice, or two views of one storage (an op saving its output that the next op saves as input),
    count once. A replaced block under `recompute_replaced=True` runs inside a non-reentrant
    checkpoint whose own saved-tensor hooks take over (only the innermost hooks apply), so what it
    would have saved is not counted; what the checkpoint keeps instead, its inputs, is counted by
    wrapping the `checkpoint` function layer.py calls.
    """

    def __init__(self, exclude: Sequence[torch.Tensor] = ()) -> None:
        self._exclude = {t.untyped_storage().data_ptr() for t in exclude}
        self._storages: dict[int, int] = {}
        self._stack = contextlib.ExitStack()

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.layout == torch.strided and tensor.device.type != "meta":
            storage = tensor.untyped_storage()
            pointer = storage.data_ptr()
            if pointer and pointer not in self._exclude:
                self._storages[pointer] = storage.nbytes()
        return tensor

    @property
    def bytes(self) -> int:
        return sum(self._storages.values())

    def __enter__(self) -> "SavedTensorMeter":
        original_checkpoint = replacement_layer.checkpoint

        def counting_checkpoint(function: Callable, *args: Any, **kwargs: Any) -> Any:
            for value in (*args, *kwargs.values()):
                if torch.is_tensor(value):
                    self._pack(value)
            return original_checkpoint(function, *args, **kwargs)

        self._stack.enter_context(_patched(replacement_layer, "checkpoint", counting_checkpoint))
        self._stack.enter_context(torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor))
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._stack.close()


@contextlib.contextmanager
def _patched(owner: Any, name: str, value: Any) -> Iterator[None]:
    original = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, original)


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


# --------------------------------------------------------------------------------------------------
# Steps and timing


def _autocast(device: torch.device, mixed_precision: str | None) -> contextlib.AbstractContextManager:
    if mixed_precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
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
    with _autocast(pixel_values.device, mixed_precision):
        loss = model(pixel_values=pixel_values, labels=labels).loss
    loss.backward()
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def _replaced_modules(model: nn.Module) -> list[nn.Module]:
    return [module for module in model.modules() if is_replaced(module)]


class _SynthesisCounter:
    """Counts `layer.synthesize` calls (a recompute calls it again in backward)."""

    def __init__(self) -> None:
        self.calls = 0

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        original = replacement_layer.synthesize

        def counted(module: nn.Module) -> list[torch.Tensor]:
            self.calls += 1
            return original(module)

        with _patched(replacement_layer, "synthesize", counted):
            yield


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
        _synchronize(device)
        started = time.perf_counter()
        weights = [w for module in modules for w in replacement_layer.synthesize(module)]
        _synchronize(device)
        forward_done = time.perf_counter()
        torch.autograd.backward(weights, gradients)
        _synchronize(device)
        finished = time.perf_counter()
        forward_times.append(forward_done - started)
        total_times.append(finished - started)
        model.zero_grad(set_to_none=True)
    return statistics.median(forward_times[2:]), statistics.median(total_times[2:])


# --------------------------------------------------------------------------------------------------
# Data


@dataclass
class TensorData:
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_labels: int
    id2label: dict[int, str]
    description: str


def load_tensor_data(suite: SuiteSpec, data_dir: str | None = None) -> TensorData:
    """The suite's data as in-memory tensors: the sets are small, and a permutation per epoch is all
    a DataLoader would do here, without its per-batch collation cost."""
    from .data import dataset_info, load_image_dataset, prepare_dataset, subsample

    raw = load_image_dataset(suite.dataset, data_dir=data_dir, seed=0)
    raw = subsample(raw, suite.max_train_samples, suite.max_test_samples, seed=0)
    num_labels, id2label = dataset_info(raw)
    prepared = prepare_dataset(raw, suite.image_size, suite.num_channels)
    tensors = {}
    for split in ("train", "test"):
        batch = prepared[split][:]
        tensors[split] = (torch.stack(list(batch["pixel_values"])), torch.as_tensor(batch["label"], dtype=torch.long))
    description = f"{suite.dataset}: {len(tensors['train'][1])} train / {len(tensors['test'][1])} test images at {suite.image_size}x{suite.image_size}"
    return TensorData(*tensors["train"], *tensors["test"], num_labels, id2label, description)


def synthetic_batch(suite: SuiteSpec, batch_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(batch_size, suite.num_channels, suite.image_size, suite.image_size, generator=generator)
    labels = torch.randint(0, suite.num_labels, (batch_size,), generator=generator)
    return pixels.to(device), labels.to(device)


# --------------------------------------------------------------------------------------------------
# The phases


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
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(labels), batch_size):
        batch = pixels[start:start + batch_size].to(device)
        with _autocast(device, mixed_precision):
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
    with meter, _autocast(device, suite.mixed_precision):
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
    del model, optimizer, built
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
    counters = {m: _SynthesisCounter() for m in methods}
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
                    _synchronize(device)
                    started = time.perf_counter()
                    train_step(model, optimizer, pixels, labels, suite.mixed_precision)
                    _synchronize(device)
                    times[method].append(time.perf_counter() - started)
            if _replaced_modules(model):
                with _autocast(device, suite.mixed_precision):
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
    with torch.no_grad(), _autocast(device, suite.mixed_precision):
        for method in methods:
            for _ in range(2):
                inference[method](pixel_values=inference_x)
        for round_index in range(suite.inference_rounds):
            shift = round_index % len(methods)
            for method in list(methods[shift:]) + list(methods[:shift]):
                for _ in range(suite.inference_calls_per_round):
                    _synchronize(device)
                    started = time.perf_counter()
                    inference[method](pixel_values=inference_x)
                    _synchronize(device)
                    inference_times[method].append(time.perf_counter() - started)
    for method in methods:
        results[method]["inference_images_per_s"] = suite.inference_batch_size / statistics.median(inference_times[method])
        results[method]["inference_params"] = sum(p.numel() for p in inference[method].parameters())
    return results


# --------------------------------------------------------------------------------------------------
# The run


def machine_info(device: torch.device) -> dict[str, Any]:
    import peft
    import transformers

    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    info = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "platform": platform.platform(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def resolve_device(suite: SuiteSpec, device: str | torch.device | None = None) -> torch.device:
    """The device to run on; the gpu suite (and an explicit cuda device) needs CUDA and says so."""
    if suite.requires_cuda and not torch.cuda.is_available():
        raise BenchmarkError(
            f"Suite {suite.name!r} measures memory/time at 224x224 in bf16 and needs a CUDA GPU, but "
            "torch.cuda.is_available() is False here. Run --suite quick or --suite fashion-mnist on CPU."
        )
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BenchmarkError("device 'cuda' was asked for but torch.cuda.is_available() is False.")
    return device


def run_benchmark(
    suite: SuiteSpec,
    output_dir: str | os.PathLike | None = None,
    *,
    data_dir: str | None = None,
    device: str | torch.device | None = None,
    command: str | None = None,
) -> dict[str, Any]:
    """Run `suite`; write results.json, results.md, accuracy_curves.png, coefficients.png to
    `output_dir` (default `benchmarks/<suite>`) and return the results."""
    validate_suite(suite)
    device = resolve_device(suite, device)
    output_dir = os.fspath(output_dir or os.path.join("benchmarks", suite.name))
    methods = resolve_methods(suite.methods)
    if "bp" in methods:  # bp first: the ratio columns are against it
        methods = ["bp"] + [m for m in methods if m != "bp"]
    trained = [m for m in suite.trained_methods() if m in methods]
    run_started = time.perf_counter()
    phases: dict[str, float] = {}

    data = None
    if suite.trains:
        started = time.perf_counter()
        data = load_tensor_data(suite, data_dir)
        phases["data"] = time.perf_counter() - started
        logger.info("Data: %s", data.description)
    num_labels = data.num_labels if data is not None else suite.num_labels
    timing_batch_size = suite.timing_batch_size or suite.batch_size
    if data is not None:
        batch = (data.train_x[:timing_batch_size].to(device), data.train_y[:timing_batch_size].to(device))
        if len(batch[1]) < timing_batch_size:
            logger.warning("Only %d training images: timing uses batches of %d.", len(batch[1]), len(batch[1]))
    else:
        batch = synthetic_batch(suite, timing_batch_size, device)

    results: dict[str, Any] = {
        "suite": dataclasses.asdict(suite),
        "methods": methods,
        "trained_methods": trained,
        "command": command,
        "machine": machine_info(device),
        "data": data.description if data is not None else f"random tensors {suite.num_channels}x{suite.image_size}x{suite.image_size}",
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "models": {},
    }
    models: dict[str, Any] = results["models"]

    started = time.perf_counter()
    for model_name in tqdm(suite.models, desc="memory/time", disable=None):
        per_method: dict[str, dict[str, Any]] = {}
        for method in methods:
            per_method[method] = {"method": method, **measure_memory(suite, model_name, method, batch, num_labels, device)}
        for method, speed in measure_speed(suite, model_name, methods, batch, num_labels, device).items():
            per_method[method].update(speed)
        models[model_name] = {"methods": per_method}
        logger.info("%s: measured %s", model_name, ", ".join(f"{m} {per_method[m]['median_step_s'] * 1e3:.1f} ms" for m in methods))
    phases["memory_and_speed"] = time.perf_counter() - started

    started = time.perf_counter()
    runs = [(seed, model_name, method) for seed in range(suite.seeds) for model_name in suite.models for method in trained]
    for seed, model_name, method in tqdm(runs, desc="train", disable=None):
        run = train_run(suite, model_name, method, seed, data, device)
        models[model_name]["methods"][method].setdefault("runs", []).append(run)
        logger.info("%s %s seed %d: accuracy %.4f (%.1f s)", model_name, method, seed, run["accuracy"], run["train_seconds"])
    phases["training"] = time.perf_counter() - started

    _summarize(results)
    phases["total"] = time.perf_counter() - run_started
    results["phase_seconds"] = phases
    results["process_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    write_outputs(results, output_dir)
    logger.info("Wrote %s (%.0f s)", output_dir, phases["total"])
    return results


def _summarize(results: dict[str, Any]) -> None:
    """Derived fields: MB, ms, ratios against bp of the same run, accuracy mean ± std."""
    for model in results["models"].values():
        methods = model["methods"]
        bp = methods.get("bp")
        for entry in methods.values():
            entry["state_memory_mb"] = entry["state_memory_bytes"]["total"] / MB
            entry["saved_activations_mb"] = entry["saved_activation_bytes"] / MB
            entry["training_memory_mb"] = entry["state_memory_mb"] + entry["saved_activations_mb"]
            entry["median_step_ms"] = 1e3 * entry["median_step_s"]
            entry["checkpoint_mb"] = entry["checkpoint"]["bytes"] / MB
            if "cuda_peak_bytes" in entry:
                entry["cuda_peak_mb"] = entry["cuda_peak_bytes"] / MB
            runs = entry.get("runs", [])
            if runs:
                accuracies = [run["accuracy"] for run in runs]
                entry["accuracy_mean"] = statistics.fmean(accuracies)
                entry["accuracy_std"] = statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0
                entry["accuracies"] = accuracies
            if bp is not None:
                entry["step_ratio_vs_bp"] = entry["median_step_s"] / bp["median_step_s"]
                entry["memory_ratio_vs_bp"] = entry["training_memory_mb"] / bp["training_memory_mb"]
                entry["trainable_ratio_vs_bp"] = entry["trainable_params"] / bp["trainable_params"]
                if "cuda_peak_mb" in entry and "cuda_peak_mb" in bp:
                    entry["cuda_peak_ratio_vs_bp"] = entry["cuda_peak_mb"] / bp["cuda_peak_mb"]


# --------------------------------------------------------------------------------------------------
# Output


def _atomic_write(path: str, data: bytes | str) -> None:
    """Write to a temporary file beside `path`, then rename: readers never see a half-written file."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.chmod(temporary, 0o644)  # mkstemp makes it private; these are results to share
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def write_outputs(results: dict[str, Any], output_dir: str) -> None:
    _atomic_write(os.path.join(output_dir, "results.json"), json.dumps(results, indent=1, default=str) + "\n")
    _atomic_write(os.path.join(output_dir, "results.md"), render_markdown(results))
    _atomic_write(os.path.join(output_dir, "accuracy_curves.png"), plot_accuracy_curves(results))
    _atomic_write(os.path.join(output_dir, "coefficients.png"), plot_coefficients(results))


def _format_count(count: int) -> str:
    return f"{count / 1e6:.2f}M" if count >= 1e6 else f"{count / 1e3:.1f}k"


def _method_label(method: str, suite: dict[str, Any]) -> str:
    return f"{method} †" if method == "lora" and suite.get("dataset") is not None else method


def render_table(model_name: str, model: dict[str, Any], suite: dict[str, Any]) -> str:
    methods = model["methods"]
    cuda = any("cuda_peak_mb" in entry for entry in methods.values())
    header = [
        "method", "trainable params", "state MB", "saved act. MB", "memory ×bp", *(["CUDA peak MB", "peak ×bp"] if cuda else []),
        "median step ms", "step ×bp", "synthesis % of step", "accuracy (mean ± std)", "checkpoint MB", "inference img/s",
    ]
    lines = [f"### {model_name}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, entry in methods.items():
        accuracy = "not trained"
        if "accuracy_mean" in entry:
            accuracy = f"{100 * entry['accuracy_mean']:.1f} ± {100 * entry['accuracy_std']:.1f} (n={len(entry['accuracies'])})"
        elif method.endswith("-recompute") and "accuracy_mean" in methods.get(method.removesuffix("-recompute"), {}):
            accuracy = f"= {method.removesuffix('-recompute')} (same arithmetic, not retrained)"
        synthesis = f"{entry['synthesis_percent']:.1f}" if "synthesis_percent" in entry else "–"
        ratio = lambda key: f"{entry[key]:.2f}" if key in entry else "–"  # noqa: E731
        row = [
            _method_label(method, suite),
            f"{_format_count(entry['trainable_params'])} / {_format_count(entry['total_params'])}",
            f"{entry['state_memory_mb']:.2f}",
            f"{entry['saved_activations_mb']:.2f}",
            ratio("memory_ratio_vs_bp"),
            *([f"{entry.get('cuda_peak_mb', float('nan')):.0f}", ratio("cuda_peak_ratio_vs_bp")] if cuda else []),
            f"{entry['median_step_ms']:.1f}",
            ratio("step_ratio_vs_bp"),
            synthesis,
            accuracy,
            f"{entry['checkpoint_mb']:.2f}",
            f"{entry['inference_images_per_s']:.0f}",
        ]
        lines.append("| " + " | ".join(row) + " |")
    any_entry = next(iter(methods.values()))
    lines.append("")
    lines.append(
        f"{any_entry['num_blocks']} blocks; replaced/dropped/frozen blocks: "
        + "; ".join(f"{m}: {e['affected_blocks']}" for m, e in methods.items() if e["affected_blocks"])
        + f". Memory and step time at batch {any_entry['batch_size']}."
    )
    return "\n".join(lines)


WHERE_REPL_DOES_NOT_SAVE_TIME = (
    "A replaced block still runs its full forward and backward, with synthesized instead of stored weights: "
    "RepL removes only that block's weight gradients and AdamW update, and adds the synthesis (a few "
    "element-wise passes over two neighbours' weights, forward and backward). So a RepL step costs about "
    "what a bp step costs: it cannot approach the time of dropping the blocks (which skips their compute "
    "entirely), and `recompute_replaced=True` adds a second forward of each replaced block. What RepL "
    "saves is memory that scales with parameters (weights, gradients, optimizer state, checkpoint size): "
    "large when parameters dominate memory (big models, small batches, optimizer state), small when "
    "activations dominate (small models, large batches, high resolution). Synthesized weights are held "
    "for backward like activations, so without recompute the saved-activation bytes grow slightly. For "
    "ConvNeXt, a replaced block next to a stage boundary fuses a neighbour of another width through "
    "resampling matrices held as buffers (counted in state MB); they can cost more than the parameters "
    "saved in small models."
)


def _pair_findings(model_name: str, methods: dict[str, Any], interval: int) -> list[str]:
    repl, drop = methods.get(f"repl-k{interval}"), methods.get(f"drop-k{interval}")
    recompute = methods.get(f"repl-k{interval}-recompute")
    bp = methods.get("bp")
    lines = []
    if repl is None or bp is None:
        return lines
    fewer = 100 * (1 - repl["trainable_params"] / bp["trainable_params"])
    state = 100 * (repl["state_memory_mb"] / bp["state_memory_mb"] - 1)
    activations = 100 * (repl["saved_activations_mb"] / bp["saved_activations_mb"] - 1)
    text = (
        f"- {model_name}, repl-k{interval}: {fewer:.1f}% fewer trainable parameters than bp; state memory "
        f"{state:+.1f}%, saved activations {activations:+.1f}%, step time ×{repl['step_ratio_vs_bp']:.2f}"
    )
    if "synthesis_percent" in repl:
        text += f" (synthesis {repl['synthesis_percent']:.1f}% of the step)"
    if drop is not None:
        text += f"; drop-k{interval} steps at ×{drop['step_ratio_vs_bp']:.2f}"
    lines.append(text + ".")
    if "accuracy_mean" in repl and "accuracy_mean" in bp:
        parts = [f"accuracy repl-k{interval} {100 * repl['accuracy_mean']:.1f} ± {100 * repl['accuracy_std']:.1f} vs bp "
                 f"{100 * bp['accuracy_mean']:.1f} ± {100 * bp['accuracy_std']:.1f}"]
        if drop is not None and "accuracy_mean" in drop:
            difference = 100 * (repl["accuracy_mean"] - drop["accuracy_mean"])
            spread = 100 * math.hypot(repl["accuracy_std"], drop["accuracy_std"])
            verdict = "beats" if difference > spread else "loses to" if difference < -spread else "is within the seed spread of"
            parts.append(f"vs drop-k{interval} {100 * drop['accuracy_mean']:.1f} ± {100 * drop['accuracy_std']:.1f}: "
                         f"RepL {verdict} the shallower model ({difference:+.1f} points, spread {spread:.1f})")
        lines.append(f"- {model_name}: " + "; ".join(parts) + ".")
    if recompute is not None:
        saved = repl["saved_activations_mb"] - recompute["saved_activations_mb"]
        slower = 100 * (recompute["median_step_s"] / repl["median_step_s"] - 1)
        lines.append(
            f"- {model_name}, repl-k{interval}-recompute: {saved:.2f} MB fewer saved activations "
            f"({100 * saved / repl['saved_activations_mb']:.1f}%) for {slower:+.1f}% step time vs repl-k{interval}."
        )
    return lines


def _findings(model_name: str, model: dict[str, Any]) -> list[str]:
    methods = model["methods"]
    return _pair_findings(model_name, methods, 4) + _pair_findings(model_name, methods, 3)


def render_markdown(results: dict[str, Any]) -> str:
    suite = results["suite"]
    machine = results["machine"]
    phases = results.get("phase_seconds", {})
    lines = [
        f"# RepL benchmark: suite `{suite['name']}`",
        "",
        f"- command: `{results.get('command') or 'run_benchmark(...)'}`",
        f"- machine: {machine['cpu']} ({machine['cpu_count']} CPUs, {machine['torch_threads']} torch threads), device {machine['device']}"
        + (f" ({machine['gpu']})" if "gpu" in machine else "")
        + f"; torch {machine['torch']}, transformers {machine['transformers']}, peft {machine['peft']}",
        f"- data: {results['data']}; epochs {suite['epochs']}, batch {suite['batch_size']}, AdamW lr {suite['lr']} "
        f"(cosine, {suite['warmup_ratio']:.0%} warm-up), weight decay {suite['weight_decay']}, seeds {suite['seeds']}"
        + (f", {suite['mixed_precision']} autocast" if suite.get("mixed_precision") else ", fp32"),
        f"- runtime: {phases.get('total', float('nan')):.0f} s in all (memory/time {phases.get('memory_and_speed', float('nan')):.0f} s, "
        f"training {phases.get('training', float('nan')):.0f} s)",
        *(f"- {note}" for note in suite.get("notes", ())),
        "",
        "Columns: trainable / total parameters held in memory; state MB = parameters + buffers + gradients + AdamW state "
        "(exact, from the tensors); saved act. MB = bytes autograd keeps for backward during one forward (each storage once, "
        "parameters excluded); memory ×bp = (state + saved activations) relative to bp; median step = forward + backward + "
        "AdamW, warm-up excluded, methods interleaved in rounds in this run; synthesis % = time to build the replaced blocks' "
        "weights (forward + backward, measured alone; twice the forward with recompute) over the median RepL step; checkpoint = "
        "what save_pretrained writes (RepL: compact, without the replaced blocks; LoRA: adapters + classifier, the base model "
        "is needed as well); inference = images/s of the deployed model (RepL and LoRA merged), eval, no grad.",
        "",
    ]
    for model_name, model in results["models"].items():
        lines.append(render_table(model_name, model, suite))
        lines.append("")
    findings = [line for model_name, model in results["models"].items() for line in _findings(model_name, model)]
    if findings:
        lines += ["## Findings (computed from the numbers above)", "", *findings, ""]
    lines += ["## Where RepL does not save time", "", WHERE_REPL_DOES_NOT_SAVE_TIME, ""]
    lines += [
        "The synthesis cost per model size, and a fused `layer.synthesize` prototype that halves it (one autograd "
        "node per block; resampling from its structure instead of dense matrices), are measured by "
        "`benchmarks/synthesis_overhead.py` (results in `benchmarks/synthesis_overhead.md`).",
        "",
    ]
    if "lora" in results["methods"] and suite.get("dataset") is not None:
        lines.append(f"† {LORA_FROM_SCRATCH_NOTE}.")
        lines.append("")
    lines.append("Plots: `accuracy_curves.png` (test accuracy per epoch, mean ± std over seeds), `coefficients.png` (a, b of each replaced block over training, seed 0).")
    lines.append("")
    return "\n".join(lines)


def _figure_bytes(figure: Any) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only; no display here or in CI
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy_curves(results: dict[str, Any]) -> bytes:
    plt = _pyplot()
    names = list(results["models"])
    figure, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 4), squeeze=False)
    for axis, model_name in zip(axes[0], names):
        plotted = False
        for method, entry in results["models"][model_name]["methods"].items():
            curves = [run["accuracy_per_epoch"] for run in entry.get("runs", []) if run["accuracy_per_epoch"]]
            if not curves:
                continue
            epochs = range(1, len(curves[0]) + 1)
            mean = [statistics.fmean(values) for values in zip(*curves)]
            std = [statistics.stdev(values) if len(values) > 1 else 0.0 for values in zip(*curves)]
            line = axis.plot(epochs, mean, marker="o", markersize=3, label=_method_label(method, results["suite"]))[0]
            axis.fill_between(epochs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], color=line.get_color(), alpha=0.15)
            plotted = True
        axis.set_title(model_name)
        axis.set_xlabel("epoch")
        axis.set_ylabel("test accuracy")
        axis.grid(alpha=0.3)
        if plotted:
            axis.legend(fontsize=7)
        else:
            axis.text(0.5, 0.5, "not trained (memory/time only)", ha="center", va="center", transform=axis.transAxes)
    figure.suptitle(f"suite {results['suite']['name']}: accuracy per epoch (mean ± std over seeds)")
    return _figure_bytes(figure)


def plot_coefficients(results: dict[str, Any]) -> bytes:
    plt = _pyplot()
    panels = [
        (model_name, method, entry["runs"][0]["coefficients"])
        for model_name, model in results["models"].items()
        for method, entry in model["methods"].items()
        if entry.get("runs") and "coefficients" in entry["runs"][0]
    ]
    figure, axes = plt.subplots(1, max(1, len(panels)), figsize=(5 * max(1, len(panels)), 3.8), squeeze=False)
    for axis, (model_name, method, trace) in zip(axes[0], panels):
        for block, values in trace["blocks"].items():
            line = axis.plot(trace["steps"], values["a"], label=f"{block}: a")[0]
            axis.plot(trace["steps"], values["b"], linestyle="--", color=line.get_color(), label=f"{block}: b")
        axis.set_title(f"{model_name} {method}")
        axis.set_xlabel("step")
        axis.set_ylabel("coefficient")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    if not panels:
        axes[0][0].text(0.5, 0.5, "no RepL method trained", ha="center", va="center", transform=axes[0][0].transAxes)
    figure.suptitle("RepL coefficients over training (seed 0): w = a·w(prev) + b·w(next)")
    return _figure_bytes(figure)


# --------------------------------------------------------------------------------------------------
# Command line


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def add_benchmark_arguments(parser: argparse.ArgumentParser) -> None:
    """The `hf-replacement benchmark` flags."""
    parser.add_argument("--suite", choices=list(SUITES), default="quick",
                        help="quick: digits, mini models, < 10 min on 2 CPU cores; fashion-mnist: tiny models at 28x28, < 1 h; "
                             "gpu: ViT-B and ConvNeXt-T at 224x224 bf16, memory/time only (needs CUDA)")
    parser.add_argument("--seeds", type=_positive_int, default=None, help="seeds per trained method (default 3)")
    parser.add_argument("--epochs", type=_positive_int, default=None, help="training epochs (default: the suite's)")
    parser.add_argument("--output-dir", default=None, help="where results.json, results.md and the plots go (default benchmarks/<suite>)")
    parser.add_argument("--methods", nargs="+", default=None, help=f"subset of {', '.join(METHODS)} (space or comma separated)")
    parser.add_argument("--models", nargs="+", default=None, help="subset of presets (default: the suite's)")
    parser.add_argument("--data-dir", default=None, help="directory with the Fashion-MNIST IDX files")
    parser.add_argument("--max-train-samples", type=_positive_int, default=None, help="subsample the training set")
    parser.add_argument("--batch-size", type=_positive_int, default=None)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")


def suite_from_args(args: argparse.Namespace) -> SuiteSpec:
    models = [name for raw in args.models for name in raw.split(",") if name] if args.models else None
    return get_suite(
        args.suite,
        seeds=args.seeds,
        epochs=args.epochs,
        methods=args.methods,
        models=models,
        max_train_samples=args.max_train_samples,
        batch_size=getattr(args, "batch_size", None),
    )


def run_benchmark_from_args(args: argparse.Namespace) -> int:
    """Run the benchmark the flags describe, print the Markdown tables; 0 on success, 2 on a usage error."""
    # The command line as typed (console script, `python -m hf_replacement.cli` or this module).
    program = "python -m hf_replacement.benchmark" if sys.argv and sys.argv[0].endswith("benchmark.py") else "hf-replacement"
    command = " ".join([program, *(shlex.quote(a) for a in sys.argv[1:])])
    try:
        suite = suite_from_args(args)
        results = run_benchmark(suite, args.output_dir, data_dir=args.data_dir, device=args.device, command=command)
    except BenchmarkError as error:
        print(f"hf-replacement benchmark: error: {error}", file=sys.stderr)
        return 2
    print("\n\n".join(render_table(name, model, results["suite"]) for name, model in results["models"].items()))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
    parser = argparse.ArgumentParser(prog="python -m hf_replacement.benchmark", description=__doc__.split("\n\n")[0])
    add_benchmark_arguments(parser)
    return run_benchmark_from_args(parser.parse_args(argv))


__all__ = [
    "BenchmarkError",
    "DEFAULT_METHODS",
    "METHODS",
    "Method",
    "MethodModel",
    "SUITES",
    "SavedTensorMeter",
    "SuiteSpec",
    "add_benchmark_arguments",
    "apply_lora",
    "build_method_model",
    "drop_blocks",
    "freeze_blocks",
    "get_suite",
    "run_benchmark",
    "run_benchmark_from_args",
    "state_memory",
]


if __name__ == "__main__":
    sys.exit(main())
