"""The replaced block: its parameters are freed and synthesized from its neighbours on every forward.

A replaced block keeps its module, its class (a subclass is swapped in, so `isinstance` checks,
Transformers' gradient checkpointing, attention masks, drop-path and buffers behave as before) and
its buffers, but its parameters are deleted. The synthesis runs inside the block's `forward`, so a
gradient-checkpointing recompute rebuilds the weights from the coefficients and the neighbours
instead of reusing stale ones.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .blocks import Block
from .config import ReplacementConfig
from .fusion import FusionError, apply_resample, fan_in_dims, resample_plan

RESAMPLE_BUFFER_PREFIX = "replacement_resample_"


class ReplacementCoefficients(nn.Module):
    """Holds each replaced block's coefficients, a (2, K) fp32 parameter named by the block index.

    Row 0 holds `a` (previous neighbour), row 1 `b` (next neighbour); K is 1, the number of tensors
    or the number of output channels, by granularity. `model.half()` and `model.to(torch.bfloat16)`
    move them but keep them fp32: they are few, and rounding them to bf16 would stall their updates.
    """

    def _apply(self, fn, recurse: bool = True):
        def keep_fp32(tensor: torch.Tensor) -> torch.Tensor:
            converted = fn(tensor)
            return converted.float() if converted.is_floating_point() else converted

        return super()._apply(keep_fp32, recurse)


@dataclass(frozen=True)
class _Source:
    """A neighbour's same-named tensor and the resample matrices (buffer names) mapping it to shape."""

    owner: nn.Module
    attr: str
    resample: tuple[tuple[int, str], ...]


@dataclass(frozen=True)
class _SynthesizedTensor:
    """One parameter tensor of the replaced block and how to build it."""

    name: str
    owner: nn.Module
    attr: str
    previous: _Source | None
    next: _Source | None
    columns: slice
    coefficient_shape: tuple[int, ...]
    requires_grad: bool


@dataclass
class _ReplacementState:
    index: int
    previous_index: int
    next_index: int
    coefficients: ReplacementCoefficients
    tensors: tuple[_SynthesizedTensor, ...]
    detach_neighbors: bool
    recompute: bool


# The resample matrices mapping a neighbour's tensor to the replaced block's shape: [] when the
# shapes match, None when that neighbour is not used (fusion="nearest" and another shape).
SourcePlan = list[tuple[int, torch.Tensor]] | None


@dataclass(frozen=True)
class TensorPlan:
    name: str
    shape: tuple[int, ...]
    previous: SourcePlan
    next: SourcePlan


@dataclass(frozen=True)
class BlockPlan:
    """A validated plan to replace one block; nothing is changed until `apply_plan`."""

    block: Block
    previous: Block
    next: Block
    tensors: tuple[TensorPlan, ...]
    num_columns: int


def plan_block(block: Block, previous: Block, next_block: Block, config: ReplacementConfig) -> BlockPlan:
    """Check that `block` can be synthesized from its neighbours; raise `FusionError` if not."""
    tensors = []
    num_columns = 0
    for name, parameter in block.module.named_parameters():
        owner_name, _, attr = name.rpartition(".")
        fan_in = fan_in_dims(block.module.get_submodule(owner_name), attr, parameter.ndim)
        sources = [
            _plan_source(block, neighbour, name, parameter.shape, fan_in, config.fusion)
            for neighbour in (previous, next_block)
        ]
        if sources == [None, None]:
            raise FusionError(
                f"{block.name}.{name} {tuple(parameter.shape)}: no neighbour tensor of the same shape "
                f"(fusion='nearest'); use fusion='resample' or replace another block."
            )
        tensors.append(TensorPlan(name, tuple(parameter.shape), *sources))
        num_columns += _coefficient_width(config.coefficient_granularity, parameter.shape)
    if not tensors:
        raise FusionError(f"{block.name} has no parameters: there is nothing to replace.")
    return BlockPlan(block, previous, next_block, tuple(tensors), max(num_columns, 1))


def _coefficient_width(granularity: str, shape: tuple[int, ...]) -> int:
    """Columns of the coefficient matrix a tensor uses; 0 for "block", which shares column 0."""
    if granularity == "block":
        return 0
    if granularity == "tensor":
        return 1
    return shape[0] if len(shape) else 1


def _plan_source(
    block: Block, neighbour: Block, name: str, shape: torch.Size, fan_in: set[int], fusion: str
) -> SourcePlan:
    try:
        source = neighbour.module.get_parameter(name)
    except AttributeError:
        raise FusionError(
            f"{block.name} and its neighbour {neighbour.name} are different kinds of block: "
            f"the neighbour has no parameter {name!r}."
        ) from None
    if source.shape == shape:
        return []
    if source.ndim != len(shape):
        raise FusionError(
            f"{block.name} and its neighbour {neighbour.name} are different kinds of block: "
            f"{name} has shape {tuple(shape)} here and {tuple(source.shape)} there."
        )
    if fusion == "nearest":
        return None
    if fusion == "error":
        raise FusionError(
            f"{block.name}.{name} has shape {tuple(shape)} but {neighbour.name}.{name} has "
            f"{tuple(source.shape)} (fusion='error'); use fusion='resample' or 'nearest'."
        )
    return [(dim, matrix.to(source.dtype)) for dim, matrix in resample_plan(source.shape, shape, fan_in)]


def apply_plan(plan: BlockPlan, coefficients: ReplacementCoefficients, config: ReplacementConfig) -> None:
    """Free the block's parameters and make it synthesize them from its neighbours."""
    module = plan.block.module
    device = next(module.parameters()).device
    initial = torch.tensor(config.coefficient_init, dtype=torch.float32, device=device)
    coefficients.register_parameter(
        str(plan.block.index), nn.Parameter(initial[:, None].repeat(1, plan.num_columns))
    )
    tensors = []
    column = 0
    for tensor in plan.tensors:
        owner_name, _, attr = tensor.name.rpartition(".")
        owner = module.get_submodule(owner_name)
        width = _coefficient_width(config.coefficient_granularity, tensor.shape)
        channel_shape = (width,) + (1,) * (len(tensor.shape) - 1)
        tensors.append(
            _SynthesizedTensor(
                name=tensor.name,
                owner=owner,
                attr=attr,
                previous=_register_source(module, plan.previous.module, tensor.name, tensor.previous),
                next=_register_source(module, plan.next.module, tensor.name, tensor.next),
                columns=slice(column, column + max(width, 1)),
                coefficient_shape=channel_shape if config.coefficient_granularity == "channel" else (),
                requires_grad=owner._parameters[attr].requires_grad,
            )
        )
        column += width
    for tensor in tensors:
        del tensor.owner._parameters[tensor.attr]
    module._replacement = _ReplacementState(
        index=plan.block.index,
        previous_index=plan.previous.index,
        next_index=plan.next.index,
        coefficients=coefficients,
        tensors=tuple(tensors),
        detach_neighbors=config.detach_neighbors,
        recompute=config.recompute_replaced,
    )
    module.__class__ = _replaced_class(type(module))


def _register_source(module: nn.Module, neighbour: nn.Module, name: str, plan: SourcePlan) -> _Source | None:
    if plan is None:
        return None
    buffer_names = []
    for dim, matrix in plan:
        buffer_name = f"{RESAMPLE_BUFFER_PREFIX}{len(module._buffers)}"
        module.register_buffer(buffer_name, matrix, persistent=False)
        buffer_names.append((dim, buffer_name))
    owner_name, _, attr = name.rpartition(".")
    return _Source(neighbour.get_submodule(owner_name), attr, tuple(buffer_names))


def synthesize(module: nn.Module) -> list[torch.Tensor]:
    """The replaced block's parameter tensors, `a·p(prev) + b·p(next)`, in `state.tensors` order."""
    state: _ReplacementState = module._replacement
    coefficients = state.coefficients._parameters[str(state.index)]
    a_row, b_row = coefficients[0], coefficients[1]
    synthesized = []
    for tensor in state.tensors:
        value = None
        for row, source in ((a_row, tensor.previous), (b_row, tensor.next)):
            if source is None:
                continue
            neighbour = source.owner._parameters[source.attr]
            if state.detach_neighbors:
                neighbour = neighbour.detach()
            if source.resample:
                neighbour = apply_resample(neighbour, [(dim, module._buffers[name]) for dim, name in source.resample])
            coefficient = row[tensor.columns].view(tensor.coefficient_shape).to(neighbour.dtype)
            term = coefficient * neighbour
            value = term if value is None else value + term
        synthesized.append(value)
    return synthesized


class ReplacedBlockMixin:
    """Mixed in front of a block's own class: synthesize the weights, run the block, drop them."""

    _replacement: _ReplacementState

    def forward(self, *args, **kwargs):
        if self._replacement.recompute and torch.is_grad_enabled():
            return checkpoint(self._forward_with_synthesized_weights, *args, use_reentrant=False, **kwargs)
        return self._forward_with_synthesized_weights(*args, **kwargs)

    def _forward_with_synthesized_weights(self, *args, **kwargs):
        with _synthesized_weights_attached(self):
            return super().forward(*args, **kwargs)

    def extra_repr(self) -> str:
        state = self._replacement
        return f"replaced: weights = a·block {state.previous_index} + b·block {state.next_index}"

    def __repr__(self) -> str:
        # Submodules such as nn.Linear read their weights in extra_repr: show the synthesized ones.
        with torch.no_grad(), _synthesized_weights_attached(self):
            return super().__repr__()


@contextlib.contextmanager
def _synthesized_weights_attached(module: nn.Module) -> Iterator[None]:
    tensors = module._replacement.tensors
    for tensor, value in zip(tensors, synthesize(module)):
        setattr(tensor.owner, tensor.attr, value)
    try:
        yield
    finally:
        # The weights are rebuilt on the next call; keeping them would hold a block's worth of memory.
        for tensor in tensors:
            delattr(tensor.owner, tensor.attr)


_REPLACED_CLASSES: dict[type, type] = {}


def _replaced_class(cls: type) -> type:
    if cls not in _REPLACED_CLASSES:
        _REPLACED_CLASSES[cls] = type(f"Replaced{cls.__name__}", (ReplacedBlockMixin, cls), {"__module__": cls.__module__})
    return _REPLACED_CLASSES[cls]


def is_replaced(module: nn.Module) -> bool:
    return isinstance(module, ReplacedBlockMixin)


@torch.no_grad()
def materialize(module: nn.Module) -> None:
    """Turn a replaced block back into an ordinary block holding its synthesized weights."""
    state: _ReplacementState = module._replacement
    for tensor, value in zip(state.tensors, synthesize(module)):
        tensor.owner.register_parameter(
            tensor.attr, nn.Parameter(value.detach().clone(), requires_grad=tensor.requires_grad)
        )
    for name in [b for b in module._buffers if b.startswith(RESAMPLE_BUFFER_PREFIX)]:
        del module._buffers[name]
    module.__class__ = type(module).__bases__[1]
    del module._replacement
