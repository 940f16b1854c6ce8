"""Planning a replacement: which neighbour tensors build each parameter of a block, and how.

`plan_block` checks that a block can be synthesized from its neighbours and records, per
parameter tensor, the resampling steps each neighbour's same-named tensor needs. Nothing is
changed here: `layer.apply_plan` carries a plan out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .blocks import Block
from .config import ReplacementConfig
from .fusion import DimResample, FusionError, fan_in_dims, resample_plan

# The resampling steps mapping a neighbour's tensor to the replaced block's shape: () when the shapes
# match, None when that neighbour is not used (fusion="nearest" and another shape).
SourcePlan = tuple[DimResample, ...] | None


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
        num_columns += coefficient_width(config.coefficient_granularity, parameter.shape)
    if not tensors:
        raise FusionError(f"{block.name} has no parameters: there is nothing to replace.")
    return BlockPlan(block, previous, next_block, tuple(tensors), max(num_columns, 1))


def coefficient_width(granularity: str, shape: tuple[int, ...]) -> int:
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
        return ()
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
    return resample_plan(source.shape, shape, fan_in)
