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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

from .blocks import Block
from .config import ReplacementConfig
from .fusion import DimResample, FusionError, fan_in_dims, resample_plan

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
class _Term:
    """One neighbour's part of a synthesized tensor: coefficient row `row` times the resampled tensor.

    `resample` holds each step and the positions of its tables in `_ReplacementState.table_names`.
    """

    row: int  # 0: `a`, the previous neighbour; 1: `b`, the next one
    output: int  # the synthesized tensor it is part of
    resample: tuple[tuple[DimResample, tuple[int, ...]], ...]
    shrinks: bool  # the neighbour's tensor has more entries than the synthesized one


@dataclass(frozen=True)
class _Program:
    """How to build a replaced block's tensors; static, the same at every call (no tensors, no modules).

    An output (synthesized tensor) is the sum of one or two adjacent terms, previous neighbour first.
    """

    terms: tuple[_Term, ...]
    widths: tuple[int, ...]  # coefficient columns of each output
    coefficient_shapes: tuple[tuple[int, ...], ...]  # () or (C, 1, ...) ("channel"), per output
    # "block" granularity: every output uses column 0, the paper's one (a, b) per block.
    shared_coefficients: bool
    firsts: tuple[int, ...]  # each output's first term
    seconds: tuple[int, ...]  # the second term of each output that has two ...
    paired: tuple[int, ...]  # ... and those outputs
    # Terms resampled to a larger tensor with a scalar coefficient, which commutes with the resampling
    # M: backward maps the gradient back to the neighbour's (smaller) shape first, where <Mᵀg, p> =
    # <g, M p> is the coefficient's gradient, so the larger resampled tensor is not saved and forward
    # scales it in place.
    source_side: tuple[int, ...]
    target_side: tuple[int, ...]  # the rest: scaled, dot product with the resampled tensor, mapped back
    kept: tuple[int, ...]  # the resampled target-side terms, whose resampled tensors backward needs


def _make_program(
    terms: list[_Term], widths: list[int], coefficient_shapes: list[tuple[int, ...]], shared_coefficients: bool
) -> _Program:
    firsts, seconds, paired = [], [], []
    for position, term in enumerate(terms):
        if position and terms[position - 1].output == term.output:
            seconds.append(position)
            paired.append(term.output)
        else:
            firsts.append(position)
    source_side = [
        i for i, term in enumerate(terms) if term.resample and not term.shrinks and coefficient_shapes[term.output] == ()
    ]
    target_side = [i for i in range(len(terms)) if i not in source_side]
    return _Program(
        tuple(terms), tuple(widths), tuple(coefficient_shapes), shared_coefficients,
        tuple(firsts), tuple(seconds), tuple(paired),
        tuple(source_side), tuple(target_side), tuple(i for i in target_side if terms[i].resample),
    )


@dataclass(frozen=True)
class _SynthesizedTensor:
    """One parameter tensor of the replaced block: where it goes and what it was."""

    name: str
    owner: nn.Module
    attr: str
    requires_grad: bool


@dataclass
class _ReplacementState:
    index: int
    previous_index: int
    next_index: int
    coefficients: ReplacementCoefficients
    tensors: tuple[_SynthesizedTensor, ...]
    program: _Program
    # (submodule, attribute) of each term's neighbour tensor, in `program.terms` order.
    neighbours: tuple[tuple[nn.Module, str], ...]
    table_names: tuple[str, ...]
    detach_neighbors: bool
    recompute: bool


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


def apply_plan(plan: BlockPlan, coefficients: ReplacementCoefficients, config: ReplacementConfig) -> None:
    """Free the block's parameters and make it synthesize them from its neighbours."""
    module = plan.block.module
    device = next(module.parameters()).device
    initial = torch.tensor(config.coefficient_init, dtype=torch.float32, device=device)
    coefficients.register_parameter(
        str(plan.block.index), nn.Parameter(initial[:, None].repeat(1, plan.num_columns))
    )
    tensors, terms, widths, shapes, neighbours, table_names = [], [], [], [], [], []
    for output, tensor in enumerate(plan.tensors):
        owner_name, _, attr = tensor.name.rpartition(".")
        owner = module.get_submodule(owner_name)
        tensors.append(_SynthesizedTensor(tensor.name, owner, attr, owner._parameters[attr].requires_grad))
        for row, (neighbour, steps) in enumerate(((plan.previous.module, tensor.previous), (plan.next.module, tensor.next))):
            if steps is None:
                continue
            source = neighbour.get_parameter(tensor.name)
            resample = tuple((step, _register_tables(module, step, source, table_names)) for step in steps)
            terms.append(_Term(row, output, resample, shrinks=source.numel() > math.prod(tensor.shape)))
            neighbours.append((neighbour.get_submodule(owner_name), attr))
        width = _coefficient_width(config.coefficient_granularity, tensor.shape)
        widths.append(max(width, 1))
        # "channel": one coefficient per output channel, broadcast over the other dimensions; a 0-dim
        # tensor has one coefficient and keeps its shape.
        per_channel = config.coefficient_granularity == "channel" and len(tensor.shape) > 0
        shapes.append((width,) + (1,) * (len(tensor.shape) - 1) if per_channel else ())
    for tensor in tensors:
        del tensor.owner._parameters[tensor.attr]
    module._replacement = _ReplacementState(
        index=plan.block.index,
        previous_index=plan.previous.index,
        next_index=plan.next.index,
        coefficients=coefficients,
        tensors=tuple(tensors),
        program=_make_program(terms, widths, shapes, shared_coefficients=config.coefficient_granularity == "block"),
        neighbours=tuple(neighbours),
        table_names=tuple(table_names),
        detach_neighbors=config.detach_neighbors,
        recompute=config.recompute_replaced,
    )
    module.__class__ = _replaced_class(type(module))


def _register_tables(module: nn.Module, step: DimResample, source: torch.Tensor, table_names: list[str]) -> tuple[int, ...]:
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


def synthesize(module: nn.Module) -> list[torch.Tensor]:
    """The replaced block's parameter tensors, `a·p(prev) + b·p(next)`, in `state.tensors` order."""
    state: _ReplacementState = module._replacement
    coefficients = state.coefficients._parameters[str(state.index)]
    sources = [owner._parameters[attr] for owner, attr in state.neighbours]
    if state.detach_neighbors:
        sources = [source.detach() for source in sources]
    tables = [module._buffers[name] for name in state.table_names]
    return list(_Synthesis.apply(state.program, coefficients, *sources, *tables))


class _Synthesis(torch.autograd.Function):
    """All of a replaced block's tensors in one autograd node: resampling, then `a·p + b·q`.

    One node instead of about five per tensor (slice, view, cast, two multiplies, an add, the
    resampling), batched `torch._foreach_*` kernels and no per-op autograd bookkeeping: for the
    small tensors of a block, per-op overhead, not arithmetic, is what synthesis spends its time on;
    for large ones, memory traffic, hence the in-place scaling of fresh resampled tensors.
    Inputs: the program, the (2, K) fp32 coefficients, each term's neighbour tensor, then the
    resampling tables. Not twice differentiable.
    """

    @staticmethod
    def forward(ctx, program: _Program, coefficients: torch.Tensor, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        sources, tables = inputs[: len(program.terms)], inputs[len(program.terms):]
        with _autocast_disabled(coefficients.device.type):
            factors = _term_coefficients(program, coefficients.to(sources[0].dtype))
            products = [_resample(source, term, tables) for source, term in zip(sources, program.terms)]
            kept = [products[i] for i in program.kept] if ctx.needs_input_grad[1] else []
            if program.source_side:  # fresh resampled tensors that backward does not need: scaled in place
                torch._foreach_mul_([products[i] for i in program.source_side], [factors[i] for i in program.source_side])
            if program.target_side:
                scaled = torch._foreach_mul([products[i] for i in program.target_side], [factors[i] for i in program.target_side])
                for i, product in zip(program.target_side, scaled):
                    products[i] = product
            # Two products and a sum, rounded as the plain formula a·p + b·q is (addcmul's fused
            # multiply-add would round differently, by an ulp).
            outputs = [products[i] for i in program.firsts]
            if program.seconds:
                torch._foreach_add_([outputs[i] for i in program.paired], [products[i] for i in program.seconds])
        ctx.program = program
        ctx.num_tables = len(tables)
        ctx.save_for_backward(coefficients, *sources, *tables, *kept)
        return tuple(outputs)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        program: _Program = ctx.program
        terms = program.terms
        coefficients, *saved = ctx.saved_tensors
        sources, tables = saved[: len(terms)], saved[len(terms): len(terms) + ctx.num_tables]
        resampled = dict(zip(program.kept, saved[len(terms) + ctx.num_tables:]))
        need_sources = ctx.needs_input_grad[2: 2 + len(terms)]
        need_coefficients = ctx.needs_input_grad[1]
        source_grads: list[torch.Tensor | None] = [None] * len(terms)
        dots: list[torch.Tensor | None] = [None] * len(terms)  # every one set when need_coefficients
        with _autocast_disabled(coefficients.device.type):
            factors = _term_coefficients(program, coefficients.to(grads[0].dtype))
            # Source side: map the gradient back to the neighbour's shape, dot product there, scale in place.
            for i in program.source_side:
                if need_sources[i] or need_coefficients:
                    grad = _resample_transposed(grads[terms[i].output], terms[i], tables)
                    if need_coefficients:
                        dots[i] = _row_dots(grad, sources[i], 1)
                    if need_sources[i]:
                        source_grads[i] = grad
            wanted = [i for i in program.source_side if need_sources[i]]
            if wanted:
                torch._foreach_mul_([source_grads[i] for i in wanted], [factors[i] for i in wanted])
            # Target side: scale, then map back (a per-channel coefficient does not commute with resampling).
            wanted = [i for i in program.target_side if need_sources[i]]
            if wanted:
                scaled = torch._foreach_mul([grads[terms[i].output] for i in wanted], [factors[i] for i in wanted])
                for i, grad in zip(wanted, scaled):
                    source_grads[i] = _resample_transposed(grad, terms[i], tables)
            coefficient_grad = None
            if need_coefficients:
                for i in program.target_side:
                    used = resampled.get(i, sources[i])
                    dots[i] = _row_dots(grads[terms[i].output], used, program.widths[terms[i].output])
                coefficient_grad = _coefficient_grad(program, dots).to(coefficients.dtype)
        return (None, coefficient_grad, *source_grads, *([None] * ctx.num_tables))


def _term_coefficients(program: _Program, rows: torch.Tensor) -> list[torch.Tensor]:
    """Each term's coefficient: a 0-dim tensor, or (C, 1, ...) for "channel" granularity."""
    if program.shared_coefficients:
        shared = rows[:, 0].unbind()
        return [shared[term.row] for term in program.terms]
    pieces = (rows[0].split(program.widths), rows[1].split(program.widths))
    return [pieces[term.row][term.output].view(program.coefficient_shapes[term.output]) for term in program.terms]


def _resample(source: torch.Tensor, term: _Term, tables: Sequence[torch.Tensor]) -> torch.Tensor:
    for step, positions in term.resample:
        source = step.apply(source, [tables[p] for p in positions])
    return source


def _resample_transposed(grad: torch.Tensor, term: _Term, tables: Sequence[torch.Tensor]) -> torch.Tensor:
    for step, positions in reversed(term.resample):
        grad = step.apply_transposed(grad, [tables[p] for p in positions])
    return grad


def _coefficient_grad(program: _Program, dots: list[torch.Tensor | None]) -> torch.Tensor:
    """d loss / d coefficients, (2, K), from each term's dot products (one per coefficient column)."""
    pieces: list[list[torch.Tensor | None]] = [[None] * len(program.widths), [None] * len(program.widths)]
    for term, dot in zip(program.terms, dots):
        pieces[term.row][term.output] = dot
    rows = []
    for row in pieces:
        present = [piece for piece in row if piece is not None]
        if program.shared_coefficients:
            rows.append(torch.cat(present).sum().view(1) if present else dots[0].new_zeros(1))
        else:
            rows.append(torch.cat([
                piece if piece is not None else dots[0].new_zeros(width)
                for piece, width in zip(row, program.widths)
            ]))
    return torch.stack(rows)


def _row_dots(grad: torch.Tensor, source: torch.Tensor, rows: int) -> torch.Tensor:
    """(rows,): dot products of `grad` and `source` split into `rows` equal rows, accumulated in fp32 or better."""
    if grad.dtype in (torch.float32, torch.float64):
        if rows == 1:
            return torch.mv(grad.reshape(1, -1), source.reshape(-1))
        return torch.bmm(grad.reshape(rows, 1, -1), source.reshape(rows, -1, 1)).view(rows)
    # CPU BLAS has no fast bf16/fp16 product (measured ~50x slower than fp32): multiply, sum in fp32.
    return (grad * source).reshape(rows, -1).sum(1, dtype=torch.float32)


def _autocast_disabled(device_type: str) -> contextlib.AbstractContextManager:
    """Synthesize in the parameters' dtype, as a plain model's weights are: autocast would run the
    resampling products in bf16 and give weights of another dtype than the parameters they replace."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


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
