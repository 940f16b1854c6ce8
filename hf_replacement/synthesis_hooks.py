"""Observing synthesis: `register_synthesis_hook` calls a function at every synthesis of a replaced
block's weights (the benchmark harness counts them so), without patching the library."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from torch import nn
from torch.utils.hooks import RemovableHandle

# An OrderedDict, as torch's own hook registries: RemovableHandle keeps a weak reference to it.
_SYNTHESIS_HOOKS: OrderedDict[int, Callable[[nn.Module], None]] = OrderedDict()


def register_synthesis_hook(hook: Callable[[nn.Module], None]) -> RemovableHandle:
    """Call `hook(block)` at every synthesis of a replaced block's weights; `handle.remove()` stops it.

    A training step synthesizes once per replaced block in forward, and once more in backward: to
    rebuild the weights its layers saved (`saved_tensor_hooks.py`), or, instead, when the block is
    recomputed (`recompute_replaced=True` or gradient checkpointing).
    """
    handle = RemovableHandle(_SYNTHESIS_HOOKS)
    _SYNTHESIS_HOOKS[handle.id] = hook
    return handle


def call_synthesis_hooks(block: nn.Module) -> None:
    """Called by `synthesis.synthesize` for every synthesis; nothing to do (one check) without hooks."""
    if _SYNTHESIS_HOOKS:
        for hook in tuple(_SYNTHESIS_HOOKS.values()):
            hook(block)


__all__ = ["register_synthesis_hook"]
