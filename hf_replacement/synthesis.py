"""Synthesis: a replaced block's parameter tensors built from its neighbours, `a·p(prev) + b·p(next)`.

`synthesize` is the fast path every forward uses: all of a block's tensors in one autograd node
(`_Synthesis`) driven by a static `Program` compiled once per block. `reference.py` holds the same
values written as the paper's formula in plain autograd, the reference the tests hold this to;
`synthesis_hooks.py` lets a caller observe every synthesis (the benchmark counts them).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from .coefficients import ReplacementCoefficients
from .planning import BlockPlan
from .resampling import DimResample, Step
from .synthesis_hooks import call_synthesis_hooks


@dataclass(frozen=True)
class Term:
    """One neighbour's part of a synthesized tensor: coefficient row `row` times the resampled tensor.

    `resample` holds each step and the positions of its tables in `ReplacementState.table_names`.
    """

    row: int  # 0: `a`, the previous neighbour; 1: `b`, the next one
    output: int  # the synthesized tensor it is part of
    resample: tuple[tuple[Step, tuple[int, ...]], ...]
    shrinks: bool  # the neighbour's tensor has more entries than the synthesized one


@dataclass(frozen=True)
class Program:
    """How to build a replaced block's tensors; static, the same at every call (no tensors, no modules).

    An output (synthesized tensor) is the sum of one or two adjacent terms, previous neighbour first.
    """

    terms: tuple[Term, ...]
    widths: tuple[int, ...]  # coefficient columns of each output
    coefficient_shapes: tuple[tuple[int, ...], ...]  # () or (C, 1, ...) ("channel"), per output
    # "block" granularity: every output uses column 0, the paper's one (a, b) per block.
    shared_coefficients: bool
    firsts: tuple[int, ...]  # each output's first term
    seconds: tuple[int, ...]  # the second term of each output that has two ...
    paired: tuple[int, ...]  # ... and those outputs
    # Terms resampled to a larger tensor with a scalar coefficient, which commutes with the resampling
    # M: backward maps the gradient back to the neighbour's (smaller) shape first, where <Mᵀg, p> =
    # <g, M p> is the coefficient's gradient, so backward needs no resampled tensor.
    source_side: tuple[int, ...]
    # The rest: scaled, mapped back; the coefficient's gradient is a dot product with the resampled
    # tensor, which backward resamples again rather than keep one the size of the synthesized tensor.
    target_side: tuple[int, ...]
    # How forward writes each output from its first term (every output is in exactly one):
    plain: tuple[int, ...]  # not resampled: one product with the neighbour's tensor
    folded: tuple[int, ...]  # a 0-dim coefficient folded into the last step, a `DimResample`, of its resampling
    scaled_in_place: tuple[int, ...]  # resampled into a fresh tensor, then scaled in place
    narrowed: tuple[int, ...]  # only narrowed, a view of the neighbour's tensor: scaled into a fresh one


def compile_program(
    terms: list[Term], widths: list[int], coefficient_shapes: list[tuple[int, ...]], shared_coefficients: bool
) -> Program:
    firsts, seconds, paired = [], [], []
    for position, term in enumerate(terms):
        if position and terms[position - 1].output == term.output:
            seconds.append(position)
            paired.append(term.output)
        else:
            firsts.append(position)
    source_side = [
        i
        for i, term in enumerate(terms)
        if term.resample and not term.shrinks and coefficient_shapes[term.output] == ()
    ]
    target_side = [i for i in range(len(terms)) if i not in source_side]
    plain, folded, scaled_in_place, narrowed = [], [], [], []
    for output, i in enumerate(firsts):
        steps = [step for step, _ in terms[i].resample]
        if not steps:
            plain.append(output)
        elif coefficient_shapes[output] == () and isinstance(steps[-1], DimResample):
            folded.append(output)
        elif any(isinstance(step, DimResample) for step in steps):
            scaled_in_place.append(output)
        else:
            narrowed.append(output)
    return Program(
        tuple(terms),
        tuple(widths),
        tuple(coefficient_shapes),
        shared_coefficients,
        tuple(firsts),
        tuple(seconds),
        tuple(paired),
        tuple(source_side),
        tuple(target_side),
        plain=tuple(plain),
        folded=tuple(folded),
        scaled_in_place=tuple(scaled_in_place),
        narrowed=tuple(narrowed),
    )


@dataclass(frozen=True)
class SynthesizedTensor:
    """One parameter tensor of the replaced block: where it goes and what it was."""

    name: str
    owner: nn.Module
    attr: str
    requires_grad: bool


@dataclass
class ReplacementState:
    """What a replaced block holds to rebuild its weights: the plan, the coefficients' owner, the
    compiled program and where each term's neighbour tensor lives."""

    plan: BlockPlan
    granularity: str
    # `coefficients.ReplacementCoefficients` (parameter `str(index)`, shape (2, K)), or a module put in its place
    # that answers a call with the one in use (PEFT's `ModulesToSaveWrapper`); see `coefficient_rows`.
    coefficients: nn.Module
    tensors: tuple[SynthesizedTensor, ...]
    program: Program
    # (submodule, attribute) of each term's neighbour tensor, in `program.terms` order.
    neighbours: tuple[tuple[nn.Module, str], ...]
    table_names: tuple[str, ...]
    detach_neighbors: bool
    recompute: bool
    # A lighter surrogate (`surrogates.py`): what the block computes instead of its own forward, and
    # the block's parameters it does not use (freed, never synthesized; zero or identity when merged).
    surrogate: Callable[..., Any] | None = None
    unused: tuple[SynthesizedTensor, ...] = ()
    # Autograd saves a recipe instead of each synthesized weight a layer saves, and backward rebuilds
    # them (`saved_tensor_hooks.py`); False keeps the weights from forward to backward.
    rebuild_saved_weights: bool = True

    @property
    def index(self) -> int:
        return self.plan.block.index

    def coefficient_rows(self) -> torch.Tensor:
        """This block's (2, K) coefficients, from the module holding the coefficients in use."""
        holder = self.coefficients
        if not isinstance(holder, ReplacementCoefficients):
            # A wrapper holding copies (PEFT's modules_to_save): reading the original it wraps would
            # silently use untrained coefficients; its call returns the active copy.
            holder = holder()
        return holder.rows(self.index)


# The instance attribute holding a replaced block's state: read and written only through the two
# functions below (`layer.py` attaches and removes it, every other module reads it).
_STATE_ATTRIBUTE = "_replacement"


def replacement_state(module: nn.Module) -> ReplacementState | None:
    """The state `layer.apply_plan` attached to a replaced block; None for any other module.

    The one way to read a replaced block's plan, coefficients and program.
    """
    return vars(module).get(_STATE_ATTRIBUTE)


def set_replacement_state(module: nn.Module, state: ReplacementState | None) -> None:
    """Attach `state` to `module` (a block being replaced), or remove it (None: the block is materialized)."""
    if state is None:
        delattr(module, _STATE_ATTRIBUTE)
    else:
        setattr(module, _STATE_ATTRIBUTE, state)


def _state_of(module: nn.Module) -> ReplacementState:
    state = replacement_state(module)
    if state is None:
        raise ValueError(f"{type(module).__name__} is not a replaced block: it has no weights to synthesize.")
    return state


def synthesize(module: nn.Module) -> list[torch.Tensor]:
    """The replaced block `module`'s parameter tensors, `a·p(prev) + b·p(next)`, in `state.tensors`
    order, with autograd into the coefficients and (unless detached) both neighbours."""
    call_synthesis_hooks(module)
    state = _state_of(module)
    coefficients = state.coefficient_rows()
    sources = [getattr(owner, attr) for owner, attr in state.neighbours]
    if state.detach_neighbors:
        sources = [source.detach() for source in sources]
    tables = [getattr(module, name) for name in state.table_names]
    return list(_apply_synthesis(state.program, coefficients, *sources, *tables))


class _Synthesis(torch.autograd.Function):
    """All of a replaced block's tensors in one autograd node: resampling, then `a·p + b·q`.

    One node instead of about five per tensor (slice, view, cast, two multiplies, an add, the
    resampling), batched `torch._foreach_*` kernels and no per-op autograd bookkeeping: for the
    small tensors of a block, per-op overhead, not arithmetic, is what synthesis spends its time on;
    for large ones, memory traffic and first touches of fresh memory, hence one fresh tensor per
    result and everything else accumulated into it (`_synthesized_values`).
    Inputs: the program, the (2, K) fp32 coefficients, each term's neighbour tensor, then the
    resampling tables. Not twice differentiable.
    """

    @staticmethod
    def forward(ctx, program: Program, coefficients: torch.Tensor, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        sources, tables = inputs[: len(program.terms)], inputs[len(program.terms) :]
        with _autocast_disabled(coefficients.device.type):
            outputs = _synthesized_values(program, coefficients, sources, tables)
        ctx.program = program
        ctx.num_tables = len(tables)
        ctx.save_for_backward(coefficients, *sources, *tables)
        return tuple(outputs)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        program: Program = ctx.program
        terms = program.terms
        coefficients, *saved = ctx.saved_tensors
        sources, tables = saved[: len(terms)], saved[len(terms) :]
        need_sources = ctx.needs_input_grad[2 : 2 + len(terms)]
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
                    resampled = _resample(sources[i], terms[i], tables)
                    dots[i] = _row_dots(grads[terms[i].output], resampled, program.widths[terms[i].output])
                coefficient_grad = _coefficient_grad(program, dots).to(coefficients.dtype)
        return (None, coefficient_grad, *source_grads, *([None] * ctx.num_tables))


# Dynamo before torch 2.13 traces `_Synthesis` into a graph whose backward gives the coefficients and the
# neighbours no gradient (measured on 2.11: zero gradients, forward exact, no warning); 2.13 and 2.14 trace it
# correctly, into the one graph. Before 2.13 it runs outside the graph: a graph break per replaced block.
_apply_synthesis = _Synthesis.apply if torch.__version__ >= "2.13" else torch.compiler.disable(_Synthesis.apply)


def _synthesized_values(
    program: Program, coefficients: torch.Tensor, sources: Sequence[torch.Tensor], tables: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """The synthesized tensors. Each is written once by its first term's product and the second term is
    accumulated into it in place (`addcmul_`): no product of the size of the result is ever a temporary,
    and each fresh tensor of that size is one more first touch of memory the allocator may have just mapped.
    A resampled neighbour is scaled inside its last resampling step (a 0-dim coefficient folded into the
    step's small table) or in place, never copied."""
    factors = _term_coefficients(program, coefficients.to(sources[0].dtype))
    firsts, terms = program.firsts, program.terms
    outputs: list[torch.Tensor | None] = [None] * len(firsts)
    for output in program.folded:
        i = firsts[output]
        outputs[output] = _resample(sources[i], terms[i], tables, scale=factors[i])
    for output in program.scaled_in_place:
        outputs[output] = _resample(sources[firsts[output]], terms[firsts[output]], tables)
    for output in program.narrowed:
        i = firsts[output]
        outputs[output] = _resample(sources[i], terms[i], tables) * factors[i]
    if program.plain:
        products = torch._foreach_mul(
            [sources[firsts[o]] for o in program.plain], [factors[firsts[o]] for o in program.plain]
        )
        for output, product in zip(program.plain, products):
            outputs[output] = product
    if program.scaled_in_place:
        torch._foreach_mul_(
            [outputs[o] for o in program.scaled_in_place], [factors[firsts[o]] for o in program.scaled_in_place]
        )
    if program.seconds:
        torch._foreach_addcmul_(
            [outputs[o] for o in program.paired],
            [_resample(sources[i], program.terms[i], tables) for i in program.seconds],
            [factors[i] for i in program.seconds],
        )
    return outputs


def _term_coefficients(program: Program, rows: torch.Tensor) -> list[torch.Tensor]:
    """Each term's coefficient: a 0-dim tensor, or (C, 1, ...) for "channel" granularity."""
    if program.shared_coefficients:
        shared = rows[:, 0].unbind()
        return [shared[term.row] for term in program.terms]
    pieces = (rows[0].split(program.widths), rows[1].split(program.widths))
    return [pieces[term.row][term.output].view(program.coefficient_shapes[term.output]) for term in program.terms]


def _resample(
    source: torch.Tensor, term: Term, tables: Sequence[torch.Tensor], scale: torch.Tensor | None = None
) -> torch.Tensor:
    """The term's neighbour tensor resampled; times `scale`, folded into the last step (a `DimResample`), if given."""
    last = len(term.resample) - 1
    for position, (step, positions) in enumerate(term.resample):
        step_tables = [tables[p] for p in positions]
        if scale is not None and position == last:
            source = step.apply(source, step_tables, scale)
        else:
            source = step.apply(source, step_tables)
    return source


def _resample_transposed(grad: torch.Tensor, term: Term, tables: Sequence[torch.Tensor]) -> torch.Tensor:
    for step, positions in reversed(term.resample):
        grad = step.apply_transposed(grad, [tables[p] for p in positions])
    return grad


def _coefficient_grad(program: Program, dots: list[torch.Tensor | None]) -> torch.Tensor:
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
            rows.append(
                torch.cat(
                    [
                        piece if piece is not None else dots[0].new_zeros(width)
                        for piece, width in zip(row, program.widths)
                    ]
                )
            )
    return torch.stack(rows)


def _row_dots(grad: torch.Tensor, source: torch.Tensor, rows: int) -> torch.Tensor:
    """(rows,): dot products of `grad` and `source` split into `rows` equal rows, accumulated in fp32 or better."""
    if grad.dtype in (torch.float32, torch.float64):
        if rows == 1:
            return torch.mv(grad.reshape(1, -1), source.reshape(-1))
        # Not a batched (1, n)·(n, 1) product: bmm runs one tiny product per row (measured 3x slower).
        return torch.linalg.vecdot(grad.reshape(rows, -1), source.reshape(rows, -1))
    # CPU BLAS has no fast bf16/fp16 product (measured ~50x slower than fp32): multiply, sum in fp32.
    return (grad * source).reshape(rows, -1).sum(1, dtype=torch.float32)


def _autocast_disabled(device_type: str) -> contextlib.AbstractContextManager:
    """Synthesize in the parameters' dtype, as a plain model's weights are: autocast would run the
    resampling products in bf16 and give weights of another dtype than the parameters they replace."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


__all__ = [
    "ReplacementState",
    "SynthesizedTensor",
    "replacement_state",
    "synthesize",
]
