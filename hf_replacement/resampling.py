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

How it is computed. R has two non-zeros per row (entries `lower` and `upper = lower + 1`, weights
1 - f and f), so M·x needs no dense matrix: row i of the result is

    w_lower[i]·x[lower[i]] + w_upper[i]·x[upper[i]] + w_mean[i]·mean(x)

with w_lower = s·d·(1 - f), w_upper = s·d·f, w_mean = s·(1 - d), s the fan-in scale: two gathers
and a mean, O(m·rest) instead of the dense O(m·n·rest) product (along dimension 0, where the entries
are rows, one `embedding_bag`: each result row a weighted bag of two source rows, written once; the
transposed Mᵀ·g likewise, each source row a bag of the targets it feeds). `resample_matrix` builds the
dense M from the same table, and that dense product is still used where it is faster and its matrix
small (`DimResample.dense`).

The tables depend on shapes only: they are built once, when a block is replaced, and kept as
buffers of the replaced block so that they follow it across devices and dtypes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

# A resampling step is applied as one dense matrix product while it costs at most DENSE_LIMIT
# multiply-adds (m·n·other) and its matrix has at most DENSE_TABLE_LIMIT entries, else in the
# structured form. Measured on the 2-core CPU (fp32, forward + transposed): the structured form costs
# a floor of ~30 µs (about ten ATen calls) per step; below it dense wins by up to 4x (a vector or a
# 7x7 kernel of a few hundred channels); beyond ~1M multiply-adds, or a 512x256 matrix on a vector,
# structured is as fast or faster (15-80x on a ConvNeXt-T stage-3 MLP weight). The table limit keeps
# the matrices, held as buffers of every replaced block, from eating the memory RepL saves
# (32 KB per fp32 table; a 256x128 matrix would save ~15 µs a step).
DENSE_LIMIT = 2**20
DENSE_TABLE_LIMIT = 2**13


class FusionError(ValueError):
    """A neighbour's tensor cannot be fused into the replaced block's tensor."""


def _resample_table(source_size: int, target_size: int, fan_in: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(index, weights) of the resampling M: index (2, m) holds `lower`, `upper`; weights (3, m) holds
    `w_lower`, `w_upper`, `w_mean` (float64), as in the module docstring."""
    if target_size == 1:
        positions = torch.tensor([(source_size - 1) / 2], dtype=torch.float64)
    else:
        positions = torch.arange(target_size, dtype=torch.float64) * (source_size - 1) / (target_size - 1)
    lower = positions.floor().long().clamp(max=source_size - 1)
    upper = (lower + 1).clamp(max=source_size - 1)
    fraction = positions - lower
    # ||R_i||: where lower == upper (the last entry, or n == 1) the fraction is 0, so this is 1 there too.
    row_scale = ((1 - fraction) ** 2 + fraction**2).rsqrt()
    scale = math.sqrt(source_size / target_size) if fan_in else 1.0
    weights = torch.stack([scale * row_scale * (1 - fraction), scale * row_scale * fraction, scale * (1 - row_scale)])
    return torch.stack([lower, upper]), weights


# The transposed resampling is gathered (one gather per slot, every source entry taking up to `slots`
# target entries) while that reads no more than TRANSPOSED_GATHER_LIMIT times the entries of the
# scatter form (two index_add_ over the target): the gathers write contiguous blocks and need no
# zeroed result, where index_add_ along an inner dimension is a scatter, several times slower.
TRANSPOSED_GATHER_LIMIT = 3


def _transposed_table(
    index: torch.Tensor, weights: torch.Tensor, source_size: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(index, weights), each (slots, n): the targets each source entry feeds and their weights
    (`w_lower`, `w_upper` of those targets), padded with weight 0; None where too many slots."""
    targets = torch.arange(index.shape[1]).repeat(2)
    sources, entry_weights = index.reshape(-1), weights[:2].reshape(-1)
    counts = torch.bincount(sources, minlength=source_size)
    slots = int(counts.max())
    if slots * source_size > TRANSPOSED_GATHER_LIMIT * 2 * index.shape[1]:
        return None
    order = torch.argsort(sources, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    slot_of = torch.arange(len(sources)) - starts[sources[order]]
    # Padding reads the source's nearest target with weight 0: a finite gradient adds exactly 0.
    nearest = torch.searchsorted(index[0].contiguous(), torch.arange(source_size)).clamp(max=index.shape[1] - 1)
    transposed_index = nearest.repeat(slots, 1)
    transposed_weights = torch.zeros(slots, source_size, dtype=weights.dtype)
    transposed_index[slot_of, sources[order]] = targets[order]
    transposed_weights[slot_of, sources[order]] = entry_weights[order]
    return transposed_index, transposed_weights


def _kept_dim_shape(shape: torch.Size, dim: int) -> list[int]:
    kept = list(shape)
    kept[dim] = 1
    return kept


def resample_matrix(source_size: int, target_size: int, fan_in: bool) -> torch.Tensor:
    """Matrix (target_size, source_size), float64, of the variance-preserving resampling described above."""
    index, weights = _resample_table(source_size, target_size, fan_in)
    matrix = (weights[2] / source_size)[:, None].repeat(1, source_size)
    rows = torch.arange(target_size)
    matrix.index_put_((rows, index[0]), weights[0], accumulate=True)
    matrix.index_put_((rows, index[1]), weights[1], accumulate=True)
    return matrix


@dataclass(frozen=True)
class DimResample:
    """The resampling of dimension `dim` from `source_size` to `target_size` entries.

    `tables()` are the constant tensors it needs (kept as buffers by the caller); `apply` computes
    M·x along `dim` and `apply_transposed` Mᵀ·g (the gradient of `apply`). Neither records autograd
    history: they run inside `layer`'s synthesis function, which has its own backward.
    """

    dim: int
    source_size: int
    target_size: int
    fan_in: bool
    dense: bool
    ndim: int  # of the tensors it applies to: the weights are stored ready to broadcast along `dim`

    @property
    def key(self) -> str:
        """Names the tables: equal for every step with the same tables."""
        form = "dense" if self.dense else f"rank{self.ndim}dim{self.dim}"
        return f"{self.source_size}to{self.target_size}{'_fan_in' if self.fan_in else ''}_{form}"

    def matrix(self) -> torch.Tensor:
        """The step as a dense float64 matrix (target_size, source_size): the reference's form."""
        return resample_matrix(self.source_size, self.target_size, self.fan_in)

    def tables(self, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """Dense: the matrix. Structured along dimension 0: the pairs (`lower`, `upper`) as bags of two
        rows, (m, 2), their weights (m, 2) and `w_mean`; along another dimension: index (2, m) and
        weights (3, m, ...) ready to broadcast. Then, if gathered, the transposed table: index and
        weights (n, slots), one bag of rows per source entry."""
        if self.dense:  # backward multiplies by a transposed view: BLAS reads it as is, no copy kept
            return (resample_matrix(self.source_size, self.target_size, self.fan_in).to(dtype),)
        index, weights = _resample_table(self.source_size, self.target_size, self.fan_in)
        transposed = _transposed_table(index, weights, self.source_size)
        broadcast = (1,) * (self.ndim - 1 - self.dim)
        if self.dim == 0:
            tables = (
                index.T.contiguous(),
                weights[:2].T.to(dtype).contiguous(),
                weights[2].to(dtype).view(-1, *broadcast),
            )
        else:
            tables = (index, weights.to(dtype).view(3, -1, *broadcast))
        if transposed is None:
            return tables
        return *tables, transposed[0].T.contiguous(), transposed[1].T.to(dtype).contiguous()

    def apply(
        self, tensor: torch.Tensor, tables: Sequence[torch.Tensor], scale: torch.Tensor | None = None
    ) -> torch.Tensor:
        """M·x along `dim`, times `scale` (a 0-dim coefficient) if given: folded into the small table,
        it costs no pass over the result."""
        if self.dense:
            return _matrix_along(tables[0] if scale is None else tables[0] * scale, tensor, self.dim)
        if self.dim == 0:
            return self._apply_rows(tensor, tables, scale)
        weights = tables[1] if scale is None else tables[1] * scale
        (lower, upper), (w_lower, w_upper, w_mean) = tables[0].unbind(), weights.unbind()
        result = tensor.index_select(self.dim, lower).mul_(w_lower)
        result.addcmul_(tensor.index_select(self.dim, upper), w_upper)
        return result.addcmul_(tensor.mean(self.dim, keepdim=True), w_mean)

    def _apply_rows(
        self, tensor: torch.Tensor, tables: Sequence[torch.Tensor], scale: torch.Tensor | None
    ) -> torch.Tensor:
        """Along dimension 0 each result row is a weighted bag of two source rows: `embedding_bag` writes
        it in one pass (an index_select, a scale and a multiply-add would make three), then the mean term."""
        pairs, weights, w_mean = tables[:3]
        if scale is not None:
            weights, w_mean = weights * scale, w_mean * scale
        rows = torch.nn.functional.embedding_bag(
            pairs, tensor.reshape(self.source_size, -1), mode="sum", per_sample_weights=weights
        )
        result = rows.view(self.target_size, *tensor.shape[1:])
        return result.addcmul_(tensor.mean(0, keepdim=True), w_mean)

    def apply_transposed(self, grad: torch.Tensor, tables: Sequence[torch.Tensor]) -> torch.Tensor:
        if self.dense:
            return _matrix_along(tables[0].T, grad, self.dim)
        source_shape = list(grad.shape)
        source_shape[self.dim] = self.source_size
        if self.dim == 0:
            (lower, upper), (w_lower, w_upper), w_mean = tables[0].T, tables[1].T, tables[2]
            broadcast = (-1, *(1,) * (grad.ndim - 1))
            w_lower, w_upper = w_lower.reshape(broadcast), w_upper.reshape(broadcast)
        else:
            (lower, upper), (w_lower, w_upper, w_mean) = tables[0].unbind(), tables[1].unbind()
        if len(tables) > 2 + (self.dim == 0):  # gathered: no zeroed tensor, no scatter
            result = self._transposed_gather(grad, tables[-2:], source_shape)
        else:
            result = grad.new_zeros(source_shape)
            result.index_add_(self.dim, lower, grad * w_lower)
            result.index_add_(self.dim, upper, grad * w_upper)
        # The mean term: every source entry receives sum_i w_mean[i]·grad[i] / n, a batched
        # vector-matrix product over `dim` (no temporary the size of `grad`); over the last dimension
        # one matrix-vector product (the batched form runs one tiny product per row: 15x slower).
        before = math.prod(grad.shape[: self.dim])
        if self.dim == grad.ndim - 1:
            mean_term = torch.mv(grad.reshape(before, self.target_size), w_mean.reshape(-1))
        else:
            mean_term = torch.matmul(w_mean.reshape(-1), grad.reshape(before, self.target_size, -1))
        return result.add_(mean_term.view(_kept_dim_shape(grad.shape, self.dim)), alpha=1 / self.source_size)

    def _transposed_gather(
        self, grad: torch.Tensor, tables: Sequence[torch.Tensor], source_shape: list[int]
    ) -> torch.Tensor:
        """Mᵀ·g without the mean term: each source entry a bag of the targets it feeds (its slots), one
        `embedding_bag` over rows. Along another dimension than 0 the gradient is moved to make it the
        rows and the result moved back: two copies, where a gather per slot along an inner dimension
        reads single values with a stride (measured 1.4-1.8x slower on ConvNeXt-T's stage-boundary MLP weights)."""
        index, weights = tables
        moved = grad.movedim(self.dim, 0)
        # contiguous: a reshape keeps the moved view's strides where it can, and bags of strided rows are slow
        rows = torch.nn.functional.embedding_bag(
            index, moved.reshape(self.target_size, -1).contiguous(), mode="sum", per_sample_weights=weights
        )
        if self.dim == 0:
            return rows.view(source_shape)
        return rows.view(self.source_size, *moved.shape[1:]).movedim(0, self.dim).contiguous()


@dataclass(frozen=True)
class DimNarrow:
    """Keep the first `target_size` of `source_size` entries along `dim`: how a lighter surrogate
    (`surrogates.py`) takes a neighbour's hidden units. The same interface as `DimResample`; no tables.

    `apply` returns a view of its input, so it only runs as a term's first step, on a neighbour's
    tensor that the synthesis never scales in place (a narrowed term has fewer entries: `Term.shrinks`).
    """

    dim: int
    source_size: int
    target_size: int

    def matrix(self) -> torch.Tensor:
        return torch.eye(self.target_size, self.source_size, dtype=torch.float64)

    def tables(self, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        return ()

    def apply(self, tensor: torch.Tensor, tables: Sequence[torch.Tensor]) -> torch.Tensor:
        return tensor.narrow(self.dim, 0, self.target_size)

    def apply_transposed(self, grad: torch.Tensor, tables: Sequence[torch.Tensor]) -> torch.Tensor:
        source_shape = list(grad.shape)
        source_shape[self.dim] = self.source_size
        result = grad.new_zeros(source_shape)
        result.narrow(self.dim, 0, self.target_size).copy_(grad)
        return result


# A step of a term's way from a neighbour's tensor to the replaced block's.
Step = DimResample | DimNarrow


def _matrix_along(matrix: torch.Tensor, tensor: torch.Tensor, dim: int) -> torch.Tensor:
    """matrix (m, n) applied along `dim` (size n) of `tensor`: one matrix product with `dim` moved first."""
    if dim == 0:  # the common case (channels), without the two no-op movedim calls
        return (matrix @ tensor.reshape(tensor.shape[0], -1)).view(matrix.shape[0], *tensor.shape[1:])
    moved = tensor.movedim(dim, 0)
    product = matrix @ moved.reshape(moved.shape[0], -1)
    return product.view(matrix.shape[0], *moved.shape[1:]).movedim(0, dim)


def fan_in_dims(owner: nn.Module, attr: str, ndim: int) -> set[int]:
    """Dimensions of `owner.attr` summed over in the layer's product (input channels, kernel)."""
    if attr != "weight" or ndim < 2:
        return set()
    if isinstance(owner, nn.Linear):
        return {1}
    if isinstance(owner, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):  # transposed convolutions are not among them
        return set(range(1, ndim))
    return set()


def resample_plan(source_shape: torch.Size, target_shape: torch.Size, fan_in: set[int]) -> tuple[DimResample, ...]:
    """The resampling of each dimension where the source differs from the target, cheapest order first.

    The steps commute (each acts on its own dimension), so the order is free; the cost is not. A
    structured step along an inner dimension gathers with a stride and costs several times a step
    along dimension 0 (contiguous rows), in proportion to the tensor it writes. So the tensor is
    shrunk first (downsampling steps, dimension 0 first) and grown last (upsampling steps,
    innermost first, dimension 0 last): inner-dimension work runs on the smallest tensor. On a
    ConvNeXt-T stage-boundary MLP weight (1536x384 to 3072x768) this halves the inner-dimension
    work of forward and backward. Each step is dense or structured by its cost at the size the
    earlier steps leave and by the size of its matrix (`DENSE_LIMIT`, `DENSE_TABLE_LIMIT`).
    """
    if len(source_shape) != len(target_shape):
        raise FusionError(f"cannot resample a tensor of shape {tuple(source_shape)} to {tuple(target_shape)}")
    differing = [dim for dim, target in enumerate(target_shape) if source_shape[dim] != target]
    grows = {dim: target_shape[dim] > source_shape[dim] for dim in differing}
    shape = list(source_shape)
    steps = []
    for dim in sorted(differing, key=lambda dim: (grows[dim], -dim if grows[dim] else dim)):
        source, target = shape[dim], target_shape[dim]
        other = math.prod(shape) // source
        dense = source * target * other <= DENSE_LIMIT and source * target <= DENSE_TABLE_LIMIT
        steps.append(DimResample(dim, source, target, dim in fan_in, dense, len(shape)))
        shape[dim] = target
    return tuple(steps)
