"""Planning a replacement: which neighbour tensors build each parameter of a block, and how.

`plan_block` checks that a block can be synthesized from its neighbours and records, per
parameter tensor, the resampling steps each neighbour's same-named tensor needs, together with every
choice of the `ReplacementConfig` that matters after planning (granularity, initial coefficients,
detach, recompute, the surrogate). Planning is the last step that reads the config: the forward,
the fit, the merge and sharding read the plan. Nothing is changed here: `layer.apply_plan` carries
a plan out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .blocks import Block
from .config import ReplacementConfig
from .resampling import DimNarrow, FusionError, Step, fan_in_dims, resample_plan
from .surrogates import Surrogate, surrogate_for

# The steps mapping a neighbour's tensor to the replaced block's shape (narrowing for a surrogate,
# then resampling): () when the shapes match, None when that neighbour is not used (fusion="nearest"
# and another shape).
SourcePlan = tuple[Step, ...] | None


@dataclass(frozen=True)
class TensorPlan:
    name: str
    shape: tuple[int, ...]  # what is synthesized
    previous: SourcePlan
    next: SourcePlan
    # The block's own shape where a surrogate uses only the leading `shape` entries of the tensor.
    block_shape: tuple[int, ...] | None = None


@dataclass(frozen=True)
class BlockPlan:
    """A validated plan to replace one block, self-contained: everything `apply_plan`, the forward,
    the fit, the merge and sharding need. Nothing is changed until `apply_plan`."""

    block: Block
    previous: Block
    next: Block
    tensors: tuple[TensorPlan, ...]
    num_columns: int
    granularity: str  # `ReplacementConfig.coefficient_granularity`
    # `ReplacementConfig.coefficient_init`: (a, b), or "fit" (`fitting.py`) when the block is replaced.
    coefficient_init: tuple[float, float] | str
    detach_neighbors: bool
    recompute: bool  # `ReplacementConfig.recompute_replaced`
    surrogate: Surrogate | None = None  # what the block computes instead of its own forward; None: all of it
    # The block's parameters the surrogate does not use (name, shape): freed, never synthesized.
    unused: tuple[tuple[str, tuple[int, ...]], ...] = ()


def plan_block(block: Block, previous: Block, next_block: Block, config: ReplacementConfig) -> BlockPlan:
    """Check that `block` can be synthesized from its neighbours; raise `FusionError` if not (and
    `ReplacementConfigError` if its family has no such `config.surrogate`)."""
    surrogate = surrogate_for(block.module, config.surrogate, block.name)
    tensors, unused = [], []
    num_columns = 0
    for name, parameter in block.module.named_parameters():
        block_shape = tuple(parameter.shape)
        if surrogate is not None and not surrogate.uses(name):
            unused.append((name, block_shape))
            continue
        shape = surrogate.shape(name, block_shape) if surrogate is not None else block_shape
        owner_name, _, attr = name.rpartition(".")
        fan_in = fan_in_dims(block.module.get_submodule(owner_name), attr, parameter.ndim)
        sources = [
            _plan_source(block, neighbour, name, shape, fan_in, config.fusion, surrogate)
            for neighbour in (previous, next_block)
        ]
        if sources == [None, None]:
            raise FusionError(
                f"{block.name}.{name} {shape}: no neighbour tensor of the same shape "
                f"(fusion='nearest'); use fusion='resample' or replace another block."
            )
        tensors.append(TensorPlan(name, shape, *sources, block_shape=None if shape == block_shape else block_shape))
        num_columns += coefficient_width(config.coefficient_granularity, shape)
    if not tensors:
        raise FusionError(f"{block.name} has no parameters: there is nothing to replace.")
    return BlockPlan(
        block,
        previous,
        next_block,
        tuple(tensors),
        max(num_columns, 1),
        granularity=config.coefficient_granularity,
        coefficient_init=config.coefficient_init,
        detach_neighbors=config.detach_neighbors,
        recompute=config.recompute_replaced,
        surrogate=surrogate,
        unused=tuple(unused),
    )


def coefficient_width(granularity: str, shape: tuple[int, ...]) -> int:
    """Columns of the coefficient matrix a tensor uses; 0 for "block", which shares column 0."""
    if granularity == "block":
        return 0
    if granularity == "tensor":
        return 1
    return shape[0] if len(shape) else 1


def _plan_source(
    block: Block,
    neighbour: Block,
    name: str,
    shape: tuple[int, ...],
    fan_in: set[int],
    fusion: str,
    surrogate: Surrogate | None,
) -> SourcePlan:
    try:
        source = neighbour.module.get_parameter(name)
    except AttributeError:
        raise FusionError(
            f"{block.name} and its neighbour {neighbour.name} are different kinds of block: "
            f"the neighbour has no parameter {name!r}."
        ) from None
    if source.ndim != len(shape):
        raise FusionError(
            f"{block.name} and its neighbour {neighbour.name} are different kinds of block: "
            f"{name} has shape {tuple(shape)} here and {tuple(source.shape)} there."
        )
    # A surrogate takes the neighbour's own leading hidden units (half of *its* width), then resamples.
    narrowed = surrogate.shape(name, tuple(source.shape)) if surrogate is not None else source.shape
    steps = tuple(
        DimNarrow(dim, full, kept) for dim, (full, kept) in enumerate(zip(source.shape, narrowed)) if full != kept
    )
    if tuple(narrowed) == tuple(shape):
        return steps
    if fusion == "nearest":
        return None
    if fusion == "error":
        raise FusionError(
            f"{block.name}.{name} has shape {tuple(shape)} but {neighbour.name}.{name} has "
            f"{tuple(narrowed)} (fusion='error'); use fusion='resample' or 'nearest'."
        )
    return steps + resample_plan(torch.Size(narrowed), torch.Size(shape), fan_in)
