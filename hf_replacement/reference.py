"""The reference synthesis: a replaced block's weights written as the paper's formula in plain autograd.

`synthesis.synthesize` (one fused autograd node, resampling as gathers) is the fast path every
forward uses; `reference_synthesize` computes the same values a few lines at a time, with dense
resampling matrices, so that the tests (and `benchmarks/synthesis_overhead.py`) can hold the fast
path to it, values and gradients.
"""

from __future__ import annotations

import torch
from torch import nn

from .planning import coefficient_width
from .resampling import Step
from .synthesis import replacement_state


def reference_synthesize(module: nn.Module) -> list[torch.Tensor]:
    """`synthesize` written as the formula, in plain autograd: the reference the fast path is held to.

    For each parameter tensor: `a·R(p_prev) + b·R(p_next)`, where `R` resamples a neighbour of
    another shape with the dense matrix of each dimension, and `a`, `b` are the block's pair, the
    tensor's pair or one pair per output channel (granularity).
    """
    state = replacement_state(module)
    if state is None:
        raise ValueError(f"{type(module).__name__} is not a replaced block: it has no weights to synthesize.")
    rows = state.coefficient_rows()
    plan = state.plan
    weights, column = [], 0
    # In the parameters' dtype, as `synthesize` (autocast would run the products in bf16).
    with torch.autocast(rows.device.type, enabled=False):
        for tensor in plan.tensors:
            width = coefficient_width(state.granularity, tensor.shape)
            pair = rows[:, column : column + max(width, 1)]
            column += width
            per_channel = state.granularity == "channel" and len(tensor.shape) > 0
            shape = (2, width, *(1,) * (len(tensor.shape) - 1)) if per_channel else (2,)
            a, b = pair.reshape(shape)
            value = None
            for coefficient, neighbour, steps in ((a, plan.previous, tensor.previous), (b, plan.next, tensor.next)):
                if steps is None:
                    continue
                source = neighbour.module.get_parameter(tensor.name)
                if state.detach_neighbors:
                    source = source.detach()
                for step in steps:
                    source = _dense_resample(source, step)
                term = coefficient.to(source.dtype) * source
                value = term if value is None else value + term
            weights.append(value)
    return weights


def _dense_resample(tensor: torch.Tensor, step: Step) -> torch.Tensor:
    matrix = step.matrix().to(tensor)
    moved = torch.tensordot(matrix, tensor.movedim(step.dim, 0), dims=1)
    return moved.movedim(0, step.dim)


__all__ = ["reference_synthesize"]
