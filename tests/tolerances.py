"""Tolerances derived from the computation, not from the digits one machine printed.

Two fp32 computations of the same value that sum in another order (another kernel: AVX2 or AVX-512,
another blocking, another thread count; a gather and a mean instead of a matrix product) differ by
rounding. Summing n terms, the rounding error grows like eps * sqrt(n) times the magnitude of the
values (random-walk bound; the worst case, eps * n, is never approached by blocked kernels). A result
that passes through several reductions (a network) accumulates the error of each: its reduction length
is the sum of theirs. So a comparison allows

    atol = FACTOR * eps_fp32 * sqrt(reduction length) * scale,    scale = max |expected|

and no relative tolerance of its own: the scale is the magnitude of the whole tensor, so elements near
zero (where rounding of the large ones lands) are not held to a tighter bound than the rest.
A real defect (a wrong coefficient, neighbour, resampling or gradient path) moves values by a sizeable
fraction of the scale, orders of magnitude above this bound.
"""

from __future__ import annotations

import math

import torch
from torch import nn

FP32_EPS = torch.finfo(torch.float32).eps
# Four standard deviations of the random-walk rounding error: a sum in another order stays inside.
FACTOR = 4.0


def fp32_atol(scale: float | torch.Tensor, reduction_length: int) -> float:
    """The absolute tolerance for fp32 values of magnitude `scale` made by `reduction_length` summed terms."""
    if isinstance(scale, torch.Tensor):
        scale = scale.detach().abs().max().item() if scale.numel() else 0.0
    return FACTOR * FP32_EPS * math.sqrt(max(reduction_length, 1)) * float(scale)


def reduction_length(model: nn.Module) -> int:
    """The summed length of the reductions an output or a gradient of `model` goes through.

    A weight of shape (out, in, *kernel) sums in * prod(kernel) products per output in forward (its
    fan-in) and `out` per input gradient in backward (its fan-out); a forward and backward chain them.
    """
    lengths = [p[0].numel() + p.shape[0] for p in model.parameters() if p.ndim >= 2]
    return sum(lengths)


def assert_fp32_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    length: int,
    scale: float | torch.Tensor | None = None,
    msg: str | None = None,
) -> None:
    """`actual` equals `expected` up to the rounding of `length` summed fp32 terms at `scale` (default:
    max |expected|)."""
    atol = fp32_atol(expected if scale is None else scale, length)
    torch.testing.assert_close(actual, expected, rtol=0, atol=atol, msg=msg)


def assert_gradients_close(
    actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], length: int
) -> None:
    """Every gradient equal up to rounding, each at the scale of the largest gradient of the backward that
    made it: a tensor whose true gradient is ~0 (a key bias under softmax) holds only rounding noise of
    the backward's magnitude, not of its own."""
    assert actual.keys() == expected.keys()
    scale = max((g.abs().max().item() for g in expected.values() if g.numel()), default=0.0)
    for name in expected:
        assert_fp32_close(actual[name], expected[name], length, scale=scale, msg=name)
