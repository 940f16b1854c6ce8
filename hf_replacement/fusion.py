"""Parameter fusion for neighbours of another shape (CNN channel changes at stage boundaries).

The rule ("resample"), applied independently along each dimension whose size differs:

1. Linear interpolation (align_corners) maps n source entries to m target entries; its rows sum
   to one, so constants (a LayerNorm weight of ones, a zero bias) are kept exactly.
2. Each row's deviation from the source mean is rescaled by 1/||row||, so an i.i.d. tensor keeps its
   element variance (interpolating two entries halfway would otherwise halve it). Written as one
   matrix: M = D R + (1 - d) 1ᵀ / n, with d = 1/||R_r|| and D = diag(d).
3. Along the fan-in dimensions of a Linear or convolution weight the matrix is scaled by
   sqrt(n / m): a sum over m inputs instead of n then keeps the output scale of its inputs, as in
   fan-in initialisation.

The matrices depend on shapes only: they are built once, when a block is replaced.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class FusionError(ValueError):
    """A neighbour's tensor cannot be fused into the replaced block's tensor."""


def resample_matrix(source_size: int, target_size: int, fan_in: bool) -> torch.Tensor:
    """Matrix (target_size, source_size) of the variance-preserving resampling described above."""
    if target_size == 1:
        positions = torch.tensor([(source_size - 1) / 2], dtype=torch.float64)
    else:
        positions = torch.arange(target_size, dtype=torch.float64) * (source_size - 1) / (target_size - 1)
    lower = positions.floor().long().clamp(max=source_size - 1)
    upper = (lower + 1).clamp(max=source_size - 1)
    fraction = positions - lower
    interpolation = torch.zeros(target_size, source_size, dtype=torch.float64)
    rows = torch.arange(target_size)
    interpolation[rows, lower] += 1 - fraction
    interpolation[rows, upper] += fraction
    row_scale = interpolation.norm(dim=1).reciprocal()
    matrix = row_scale[:, None] * interpolation + (1 - row_scale)[:, None] / source_size
    if fan_in:
        matrix = matrix * math.sqrt(source_size / target_size)
    return matrix


def fan_in_dims(owner: nn.Module, attr: str, ndim: int) -> set[int]:
    """Dimensions of `owner.attr` summed over in the layer's product (input channels, kernel)."""
    if attr != "weight" or ndim < 2:
        return set()
    if isinstance(owner, nn.Linear):
        return {1}
    if isinstance(owner, nn.modules.conv._ConvNd) and not owner.transposed:
        return set(range(1, ndim))
    return set()


def resample_plan(
    source_shape: torch.Size, target_shape: torch.Size, fan_in: set[int]
) -> list[tuple[int, torch.Tensor]]:
    """(dim, matrix) for each dimension where the source differs from the target."""
    if len(source_shape) != len(target_shape):
        raise FusionError(f"cannot resample a tensor of shape {tuple(source_shape)} to {tuple(target_shape)}")
    return [
        (dim, resample_matrix(source, target, dim in fan_in))
        for dim, (source, target) in enumerate(zip(source_shape, target_shape))
        if source != target
    ]


def apply_resample(tensor: torch.Tensor, plan: list[tuple[int, torch.Tensor]]) -> torch.Tensor:
    """Resample `tensor` along each planned dimension (differentiable)."""
    for dim, matrix in plan:
        tensor = torch.tensordot(matrix, tensor, dims=([1], [dim])).movedim(0, dim)
    return tensor
