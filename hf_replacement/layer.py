"""The replaced block: its parameters are freed and synthesized from its neighbours on every forward.

A replaced block keeps its module, its class (a subclass is swapped in, so `isinstance` checks,
Transformers' gradient checkpointing, attention masks, drop-path and buffers behave as before) and
its buffers, but its parameters are deleted. The synthesis runs inside the block's `forward`, so a
gradient-checkpointing recompute rebuilds the weights from the coefficients and the neighbours
instead of reusing stale ones.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import FIT, ReplacementConfig
from .fitting import CoefficientFit, fit_coefficients
from .fusion import DimResample
from .planning import BlockPlan, coefficient_width
from .synthesis import ReplacementState, SynthesizedTensor, Term, compile_program, synthesize

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


def apply_plan(
    plan: BlockPlan, coefficients: ReplacementCoefficients, config: ReplacementConfig
) -> CoefficientFit | None:
    """Free the block's parameters and make it synthesize them from its neighbours.

    With `coefficient_init="fit"` the coefficients are fitted to the block's weights first, and the
    fit is returned (else None).
    """
    module = plan.block.module
    device = next(module.parameters()).device
    fit = None
    if config.coefficient_init == FIT:
        fit = fit_coefficients(plan, config.coefficient_granularity)
        initial = fit.coefficients
    else:
        pair = torch.tensor(config.coefficient_init, dtype=torch.float32, device=device)
        initial = pair[:, None].repeat(1, plan.num_columns)
    coefficients.register_parameter(str(plan.block.index), nn.Parameter(initial))
    tensors, terms, widths, shapes, neighbours, table_names = [], [], [], [], [], []
    for output, tensor in enumerate(plan.tensors):
        owner_name, _, attr = tensor.name.rpartition(".")
        owner = module.get_submodule(owner_name)
        tensors.append(SynthesizedTensor(tensor.name, owner, attr, owner._parameters[attr].requires_grad))
        for row, (neighbour, steps) in enumerate(
            ((plan.previous.module, tensor.previous), (plan.next.module, tensor.next))
        ):
            if steps is None:
                continue
            source = neighbour.get_parameter(tensor.name)
            resample = tuple((step, _register_tables(module, step, source, table_names)) for step in steps)
            terms.append(Term(row, output, resample, shrinks=source.numel() > math.prod(tensor.shape)))
            neighbours.append((neighbour.get_submodule(owner_name), attr))
        width = coefficient_width(config.coefficient_granularity, tensor.shape)
        widths.append(max(width, 1))
        # "channel": one coefficient per output channel, broadcast over the other dimensions; a 0-dim
        # tensor has one coefficient and keeps its shape.
        per_channel = config.coefficient_granularity == "channel" and len(tensor.shape) > 0
        shapes.append((width,) + (1,) * (len(tensor.shape) - 1) if per_channel else ())
    for tensor in tensors:
        del tensor.owner._parameters[tensor.attr]
    module._replacement = ReplacementState(
        plan=plan,
        granularity=config.coefficient_granularity,
        coefficients=coefficients,
        tensors=tuple(tensors),
        program=compile_program(terms, widths, shapes, shared_coefficients=config.coefficient_granularity == "block"),
        neighbours=tuple(neighbours),
        table_names=tuple(table_names),
        detach_neighbors=config.detach_neighbors,
        recompute=config.recompute_replaced,
    )
    module.__class__ = _replaced_class(type(module))
    return fit


def _register_tables(
    module: nn.Module, step: DimResample, source: torch.Tensor, table_names: list[str]
) -> tuple[int, ...]:
    """Register `step`'s tables as non-persistent buffers of `module` (once per kind of step: many
    tensors of a block share sizes); return their positions in `table_names`."""
    positions = []
    for number, table in enumerate(step.tables(source.dtype)):
        name = f"{RESAMPLE_BUFFER_PREFIX}{step.key}_{number}"
        if name not in table_names:
            module.register_buffer(name, table.to(source.device), persistent=False)
            table_names.append(name)
        positions.append(table_names.index(name))
    return tuple(positions)


class ReplacedBlockMixin:
    """Mixed in front of a block's own class: synthesize the weights, run the block, drop them."""

    _replacement: ReplacementState

    def forward(self, *args, **kwargs):
        if self._replacement.recompute and torch.is_grad_enabled():
            return checkpoint(self._forward_with_synthesized_weights, *args, use_reentrant=False, **kwargs)
        return self._forward_with_synthesized_weights(*args, **kwargs)

    def _forward_with_synthesized_weights(self, *args, **kwargs):
        with _synthesized_weights_attached(self):
            return super().forward(*args, **kwargs)

    def __reduce_ex__(self, protocol: int) -> tuple:
        # The class is made at run time (`_replaced_class`) and pickle cannot find it by name: pickle the
        # block's own class instead, and make the replaced class again on load (copy.deepcopy too).
        reduced = super().__reduce_ex__(protocol)
        return (_new_replaced_block, (type(self).__bases__[1],), *reduced[2:])

    def extra_repr(self) -> str:
        state = self._replacement
        return f"replaced: weights = a·block {state.plan.previous.index} + b·block {state.plan.next.index}"

    def __repr__(self) -> str:
        # Submodules such as nn.Linear read their weights in extra_repr: show the synthesized ones.
        with torch.no_grad(), _synthesized_weights_attached(self):
            return super().__repr__()


@contextlib.contextmanager
def _synthesized_weights_attached(module: nn.Module) -> Iterator[None]:
    tensors = module._replacement.tensors
    # A plain tensor under a free name is what Module.__setattr__ stores in the instance dict, and
    # where `owner.weight` finds it; writing it there directly skips the checks (~1 µs a tensor).
    for tensor, value in zip(tensors, synthesize(module)):
        tensor.owner.__dict__[tensor.attr] = value
    try:
        yield
    finally:
        # The weights are rebuilt on the next call; keeping them would hold a block's worth of memory.
        for tensor in tensors:
            del tensor.owner.__dict__[tensor.attr]


_REPLACED_CLASSES: dict[type, type] = {}


def _replaced_class(cls: type) -> type:
    if cls not in _REPLACED_CLASSES:
        _REPLACED_CLASSES[cls] = type(
            f"Replaced{cls.__name__}", (ReplacedBlockMixin, cls), {"__module__": cls.__module__}
        )
    return _REPLACED_CLASSES[cls]


def _new_replaced_block(block_class: type) -> nn.Module:
    """An empty replaced block of `block_class`, its state set by pickle afterwards."""
    replaced = _replaced_class(block_class)
    return replaced.__new__(replaced)


def is_replaced(module: nn.Module) -> bool:
    return isinstance(module, ReplacedBlockMixin)


@torch.no_grad()
def materialize(module: nn.Module) -> None:
    """Turn a replaced block back into an ordinary block holding its synthesized weights."""
    state: ReplacementState = module._replacement
    for tensor, value in zip(state.tensors, synthesize(module)):
        tensor.owner.register_parameter(
            tensor.attr, nn.Parameter(value.detach().clone(), requires_grad=tensor.requires_grad)
        )
    for name in [b for b in module._buffers if b.startswith(RESAMPLE_BUFFER_PREFIX)]:
        del module._buffers[name]
    module.__class__ = type(module).__bases__[1]
    del module._replacement
