"""The replaced block: its parameters are freed and synthesized from its neighbours on every forward.

A replaced block keeps its module, its class (a subclass is swapped in, so `isinstance` checks,
Transformers' gradient checkpointing, attention masks, drop-path and buffers behave as before) and
its buffers, but its parameters are deleted. The synthesis runs inside the block's `forward`, so a
gradient-checkpointing recompute rebuilds the weights from the coefficients and the neighbours
instead of reusing stale ones. Nor does autograd keep them for backward: it keeps a recipe, and
backward synthesizes them again (`saved_tensor_hooks.py`).

Why a class swap and instance-dict writes rather than composition (a wrapper module holding the
block): the block must stay the same object at the same path, of a subclass of its own class, so
that Transformers' code that walks or type-checks the model (gradient checkpointing's
`GradientCheckpointingLayer`, attention-mask and output handling, `_no_split_modules`, PEFT's target
matching, FSDP's unit boundaries) and every state-dict key stay as they are; a wrapper would rename
the keys and hide the class. The synthesized weights are written into the owners' `__dict__`,
where `Module.__setattr__` would put a plain tensor anyway, so that the block's own forward reads
`self.weight` unchanged (and skipping `__setattr__`'s checks saves ~1 µs a tensor). This module is the
only one that swaps classes or writes a module's `__dict__`; others read a block's state through
`synthesis.replacement_state` (the state itself is attached with `synthesis.set_replacement_state`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .coefficients import ReplacementCoefficients
from .config import FIT
from .fitting import CoefficientFit, fit_coefficients
from .planning import BlockPlan, coefficient_width
from .resampling import DimResample
from .saved_tensor_hooks import saved_weight_hooks
from .surrogates import merged_value, skipped_value
from .synthesis import (
    Program,
    ReplacementState,
    SynthesizedTensor,
    Term,
    compile_program,
    replacement_state,
    set_replacement_state,
    synthesize,
)

RESAMPLE_BUFFER_PREFIX = "replacement_resample_"


def apply_plan(
    plan: BlockPlan, coefficients: ReplacementCoefficients, initial: torch.Tensor | None = None
) -> CoefficientFit | None:
    """Free the block's parameters and make it synthesize them from its neighbours.

    The coefficients start from `initial` when given (a checkpoint's, shape (2, plan.num_columns)),
    else from `plan.coefficient_init`; with "fit" they are fitted to the block's weights first, and the
    fit is returned (else None).
    """
    module = plan.block.module
    fit = None
    if initial is not None:
        initial = _checked_initial(plan, initial)
    elif plan.coefficient_init == FIT:
        fit = fit_coefficients(plan, plan.granularity)
        initial = fit.coefficients
    else:
        device = next(module.parameters()).device
        pair = torch.tensor(plan.coefficient_init, dtype=torch.float32, device=device)
        initial = pair[:, None].repeat(1, plan.num_columns)
    coefficients.register_parameter(str(plan.block.index), nn.Parameter(initial))
    tensors = tuple(_tensor_of(module, tensor.name) for tensor in plan.tensors)
    program, neighbours, table_names = _compile(plan, tensors)
    # A surrogate's unused tensors (its token mixer) go as well: neither kept nor synthesized.
    unused = tuple(_tensor_of(module, name) for name, _ in plan.unused)
    for tensor in tensors + unused:
        delattr(tensor.owner, tensor.attr)  # the parameter itself, not the class's attribute
        _explain_freed_parameter(tensor.owner, tensor.attr, plan, f"{plan.block.name}.{tensor.name}")
    state = ReplacementState(
        plan=plan,
        granularity=plan.granularity,
        coefficients=coefficients,
        tensors=tensors,
        program=program,
        neighbours=neighbours,
        table_names=table_names,
        detach_neighbors=plan.detach_neighbors,
        recompute=plan.recompute,
        surrogate=plan.surrogate.forward if plan.surrogate is not None else None,
        unused=unused,
    )
    set_replacement_state(module, state)
    module.__class__ = _swapped_class(ReplacedBlockMixin, type(module))
    return fit


def _checked_initial(plan: BlockPlan, initial: torch.Tensor) -> torch.Tensor:
    if tuple(initial.shape) != (2, plan.num_columns):
        raise ValueError(
            f"The coefficients given for block {plan.block.index} ({plan.block.name}) have shape "
            f"{tuple(initial.shape)}; its plan needs (2, {plan.num_columns}) (coefficient_granularity="
            f"{plan.granularity!r}). Were they saved from another model or replacement config?"
        )
    device = next(plan.block.module.parameters()).device
    return initial.detach().to(device=device, dtype=torch.float32).clone()


def _compile(
    plan: BlockPlan, tensors: tuple[SynthesizedTensor, ...]
) -> tuple[Program, tuple[tuple[nn.Module, str], ...], tuple[str, ...]]:
    """The block's synthesis program, each term's neighbour tensor (owner, attribute) and the names of the
    resampling tables it registers as buffers of the block."""
    module = plan.block.module
    terms, widths, shapes, neighbours, table_names = [], [], [], [], []
    for output, (tensor, synthesized) in enumerate(zip(plan.tensors, tensors)):
        for row, (neighbour, steps) in enumerate(
            ((plan.previous.module, tensor.previous), (plan.next.module, tensor.next))
        ):
            if steps is None:
                continue
            source = neighbour.get_parameter(tensor.name)
            resample = tuple((step, _register_tables(module, step, source, table_names)) for step in steps)
            terms.append(Term(row, output, resample, shrinks=source.numel() > math.prod(tensor.shape)))
            owner_name = tensor.name.rpartition(".")[0]
            neighbours.append((neighbour.get_submodule(owner_name), synthesized.attr))
        width = coefficient_width(plan.granularity, tensor.shape)
        widths.append(max(width, 1))
        # "channel": one coefficient per output channel, broadcast over the other dimensions; a 0-dim
        # tensor has one coefficient and keeps its shape.
        per_channel = plan.granularity == "channel" and len(tensor.shape) > 0
        shapes.append((width,) + (1,) * (len(tensor.shape) - 1) if per_channel else ())
    program = compile_program(terms, widths, shapes, shared_coefficients=plan.granularity == "block")
    return program, tuple(neighbours), tuple(table_names)


def _tensor_of(module: nn.Module, name: str) -> SynthesizedTensor:
    owner_name, _, attr = name.rpartition(".")
    owner = module.get_submodule(owner_name)
    return SynthesizedTensor(name, owner, attr, owner.get_parameter(attr).requires_grad)


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


class FreedParametersMixin:
    """Mixed in front of the class of a module whose parameters a replacement freed: reading one
    outside a forward raises an `AttributeError` that says why and what to read instead."""

    _freed_parameters: dict[str, str]  # attribute -> the error message

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            message = self.__dict__.get("_freed_parameters", {}).get(name)
            if message is None:
                raise
            raise AttributeError(message) from None

    def __reduce_ex__(self, protocol: int) -> tuple:
        # The class is made at run time (`_swapped_class`) and pickle cannot find it by name: pickle the
        # module's own class instead, and make the swapped class again on load (copy.deepcopy too).
        reduced = super().__reduce_ex__(protocol)
        return (_new_swapped_module, type(self).__bases__, *reduced[2:])


def _explain_freed_parameter(owner: nn.Module, attr: str, plan: BlockPlan, full_name: str) -> None:
    index = plan.block.index
    message = (
        f"{full_name} does not exist between forwards: block {index} ({plan.block.name}) is replaced, its weights "
        f"are synthesized from blocks {plan.previous.index} and {plan.next.index} inside each forward "
        f"(ReplacementModel.synthesized_weights({index}) gives them). To add PEFT adapters to a RepL model, build "
        "the adapter config with hf_replacement.prepare_peft_config(model, config): it leaves the replaced blocks "
        "out and trains the coefficients with the adapter."
    )
    if owner is not plan.block.module and not isinstance(owner, FreedParametersMixin):  # the block is swapped below
        owner.__class__ = _swapped_class(FreedParametersMixin, type(owner))
    owner.__dict__.setdefault("_freed_parameters", {})[attr] = message


class ReplacedBlockMixin(FreedParametersMixin):
    """Mixed in front of a block's own class: synthesize the weights, run the block, drop them."""

    def forward(self, *args, **kwargs):
        if replacement_state(self).recompute and torch.is_grad_enabled():
            return checkpoint(self._forward_with_synthesized_weights, *args, use_reentrant=False, **kwargs)
        return self._forward_with_synthesized_weights(*args, **kwargs)

    def _forward_with_synthesized_weights(self, *args, **kwargs):
        surrogate = replacement_state(self).surrogate
        with _synthesized_weights_attached(self):
            if surrogate is not None:  # a lighter surrogate (surrogates.py) instead of the block's own forward
                return surrogate(self, *args, **kwargs)
            return super().forward(*args, **kwargs)

    def extra_repr(self) -> str:
        state = replacement_state(self)
        computes = state.plan.surrogate.describe() if state.plan.surrogate is not None else "the whole block"
        return (
            f"replaced: weights = a·block {state.plan.previous.index} + b·block {state.plan.next.index}; "
            f"computes {computes}"
        )

    def __repr__(self) -> str:
        # Submodules such as nn.Linear read their weights in extra_repr: show the synthesized ones, and
        # (shapes only) the ones a surrogate does not use.
        state = replacement_state(self)
        unused = state.unused
        for tensor, (_, shape) in zip(unused, state.plan.unused):
            tensor.owner.__dict__[tensor.attr] = torch.empty(shape, device="meta")
        try:
            with torch.no_grad(), _synthesized_weights_attached(self):
                return super().__repr__()
        finally:
            for tensor in unused:
                del tensor.owner.__dict__[tensor.attr]


@contextlib.contextmanager
def _synthesized_weights_attached(module: nn.Module) -> Iterator[None]:
    tensors = replacement_state(module).tensors
    weights = synthesize(module)
    # A plain tensor under a free name is what Module.__setattr__ stores in the instance dict, and
    # where `owner.weight` finds it; writing it there directly skips the checks (~1 µs a tensor).
    for tensor, value in zip(tensors, weights):
        tensor.owner.__dict__[tensor.attr] = value
    # Autograd keeps recipes for these weights, not the weights (None where that does not apply). Not
    # a second `with` in forward: Dynamo cannot resume a graph break under two.
    hooks = saved_weight_hooks(module, weights)
    if hooks is not None:
        hooks.install()
    try:
        yield
    finally:
        if hooks is not None:
            hooks.uninstall()
        # The weights are rebuilt on the next call; keeping them would hold a block's worth of memory.
        for tensor in tensors:
            del tensor.owner.__dict__[tensor.attr]


_SWAPPED_CLASSES: dict[tuple[type, type], type] = {}
_SWAPPED_NAME_PREFIXES = {ReplacedBlockMixin: "Replaced", FreedParametersMixin: "Synthesized"}


def _swapped_class(mixin: type, cls: type) -> type:
    if (mixin, cls) not in _SWAPPED_CLASSES:
        name = f"{_SWAPPED_NAME_PREFIXES[mixin]}{cls.__name__}"
        _SWAPPED_CLASSES[mixin, cls] = type(name, (mixin, cls), {"__module__": cls.__module__})
    return _SWAPPED_CLASSES[mixin, cls]


def _new_swapped_module(mixin: type, cls: type) -> nn.Module:
    """An empty module of `cls` with `mixin` in front, its state set by pickle afterwards."""
    swapped = _swapped_class(mixin, cls)
    return swapped.__new__(swapped)


def is_replaced(module: nn.Module) -> bool:
    return isinstance(module, ReplacedBlockMixin)


@torch.no_grad()
def materialize(module: nn.Module) -> None:
    """Turn a replaced block back into an ordinary block holding its synthesized weights."""
    state = replacement_state(module)
    if state is None:
        raise ValueError(f"{type(module).__name__} is not a replaced block: there is nothing to materialize.")
    values = [
        merged_value(value.detach(), plan.block_shape) for plan, value in zip(state.plan.tensors, synthesize(module))
    ]
    # A surrogate's skipped tensors get values that make the plain block compute the surrogate.
    values += [skipped_value(module, name, shape, values[0]) for name, shape in state.plan.unused]
    for tensor, value in zip(state.tensors + state.unused, values):
        tensor.owner.register_parameter(tensor.attr, nn.Parameter(value.clone(), requires_grad=tensor.requires_grad))
    for owner in {id(tensor.owner): tensor.owner for tensor in state.tensors + state.unused}.values():
        del owner.__dict__["_freed_parameters"]
        if owner is not module:
            owner.__class__ = type(owner).__bases__[1]
    for name in [b for b, _ in module.named_buffers(recurse=False) if b.startswith(RESAMPLE_BUFFER_PREFIX)]:
        delattr(module, name)
    module.__class__ = type(module).__bases__[1]
    set_replacement_state(module, None)


__all__ = ["ReplacementCoefficients", "apply_plan", "is_replaced", "materialize"]
