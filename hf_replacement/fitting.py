"""Fitted initial coefficients: the (a, b) that best rebuild a block's own trained weights from its neighbours.

`coefficient_init="fit"` calls `fit_coefficients` for each block just before `layer.apply_plan`
frees the block's parameters. The synthesis `w ≈ a·R(p_prev) + b·R(p_next)` is linear in (a, b)
given the resampled neighbours R(p) (`R`: the resampling the synthesis applies to a neighbour of
another shape, the identity otherwise), so each coefficient column is an ordinary least-squares
problem with two unknowns over the weight entries that column scales: every entry of the block
("block" granularity), of one tensor ("tensor") or of one output channel ("channel").

Where a column's design is rank-deficient (a neighbour's tensors are all zero, the two neighbours
are equal, or, with "channel" granularity, a 1-D tensor gives each column a single entry), the
least-squares solutions form a line or a plane; the one nearest to the default (0.5, 0.5) is
taken, so the fit never invents coefficients the weights do not determine.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .planning import BlockPlan, TensorPlan, coefficient_width

# Directions of a column's 2x2 Gram matrix with an eigenvalue below this fraction of its largest
# (neighbour directions determined to less than 1e-5 of their norm) are treated as undetermined.
GRAM_RTOL = 1e-10


@dataclass(frozen=True)
class CoefficientFit:
    """The fitted coefficients of one block and how well they rebuild its weights.

    `relative_error` is ||w - ŵ|| / ||w|| over all of the block's parameter tensors, ŵ the weights
    the fitted coefficients synthesize (0 when the block's weights are all zero: zero is rebuilt
    exactly); `default_relative_error` is the same with `prior` (a = b = 0.5), for comparison.
    """

    coefficients: torch.Tensor  # (2, K) float32, row 0 `a`, row 1 `b`, as `ReplacementCoefficients` holds them
    relative_error: float
    default_relative_error: float


def fit_coefficients(
    plan: BlockPlan, granularity: str, prior: tuple[float, float] = (0.5, 0.5)
) -> CoefficientFit:
    """Least-squares coefficients rebuilding `plan.block`'s current weights from its neighbours'.

    Computed in float64 on the weights' device; the block is left unchanged. Columns are laid out
    as the synthesis reads them (`planning.coefficient_width` per tensor, in plan order).
    """
    device = next(plan.block.module.parameters()).device
    num_columns = plan.num_columns
    gram = torch.zeros(num_columns, 2, 2, dtype=torch.float64, device=device)
    rhs = torch.zeros(num_columns, 2, dtype=torch.float64, device=device)
    # Kept for the error sums below rather than resampling the neighbours twice (one block, at conversion).
    design = list(_columns_and_design(plan, granularity))
    for columns, target, previous, following in design:
        # Per row of the design (a column's entries): the Gram matrix and right-hand side terms.
        gram[:, 0, 0].index_add_(0, columns, (previous * previous).sum(1))
        gram[:, 0, 1].index_add_(0, columns, (previous * following).sum(1))
        gram[:, 1, 1].index_add_(0, columns, (following * following).sum(1))
        rhs[:, 0].index_add_(0, columns, (previous * target).sum(1))
        rhs[:, 1].index_add_(0, columns, (following * target).sum(1))
    gram[:, 1, 0] = gram[:, 0, 1]
    start = torch.tensor(prior, dtype=torch.float64, device=device).expand(num_columns, 2)
    # The least-squares solution nearest to `prior`: prior + the minimum-norm solution for the residual.
    residual = rhs - (gram @ start[:, :, None])[:, :, 0]
    solution = start + (torch.linalg.pinv(gram, rtol=GRAM_RTOL, hermitian=True) @ residual[:, :, None])[:, :, 0]
    fitted, at_prior, norm = 0.0, 0.0, 0.0
    for columns, target, previous, following in design:
        a, b = solution[columns].T[:, :, None]
        fitted += float(((target - a * previous - b * following) ** 2).sum())
        at_prior += float(((target - prior[0] * previous - prior[1] * following) ** 2).sum())
        norm += float((target**2).sum())
    return CoefficientFit(
        coefficients=solution.T.to(torch.float32).contiguous(),
        relative_error=_relative(fitted, norm),
        default_relative_error=_relative(at_prior, norm),
    )


def _relative(squared_error: float, squared_norm: float) -> float:
    if squared_norm == 0.0:
        # All-zero weights: zero is in every column's span, so the least-squares minimum is exact; what
        # the sums hold is rounding.
        return 0.0
    return math.sqrt(squared_error / squared_norm)


def _columns_and_design(
    plan: BlockPlan, granularity: str
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per tensor of the block: (column of each row, target, resampled previous, resampled next), the
    last three float64 of shape (rows, entries per row); a neighbour the synthesis does not use is zeros."""
    offset = 0
    for tensor in plan.tensors:
        own = plan.block.module.get_parameter(tensor.name).detach().to(torch.float64)
        # A lighter surrogate synthesizes the leading part of the tensor (its first hidden units): fit that part.
        target = own[tuple(slice(0, size) for size in tensor.shape)]
        width = coefficient_width(granularity, tensor.shape)
        rows = width if granularity == "channel" and len(tensor.shape) > 0 else 1
        columns = torch.arange(offset, offset + rows, device=target.device) if width else target.new_zeros(1).long()
        offset += width
        previous, following = (
            _resampled(plan, tensor, neighbour, target) for neighbour in ("previous", "next")
        )
        yield columns, target.reshape(rows, -1), previous.reshape(rows, -1), following.reshape(rows, -1)


def _resampled(plan: BlockPlan, tensor: TensorPlan, side: str, target: torch.Tensor) -> torch.Tensor:
    """The neighbour's tensor as the synthesis uses it (resampled to the block's shape), float64."""
    steps = getattr(tensor, side)
    if steps is None:  # fusion="nearest" and another shape: this neighbour is not used
        return torch.zeros_like(target)
    neighbour = plan.previous if side == "previous" else plan.next
    source = neighbour.module.get_parameter(tensor.name).detach().to(torch.float64)
    for step in steps:
        source = step.apply(source, [table.to(source.device) for table in step.tables(torch.float64)])
    return source
