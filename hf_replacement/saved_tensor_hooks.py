"""Synthesized weights that autograd saves for backward: kept as a recipe, rebuilt in backward.

A layer saves its weight for the gradient of its input (Linear, convolution, a norm's scale and
shift, a layer scale). A replaced block's weights are synthesized, so autograd would keep them from
the block's forward to its backward: a block's worth of weights per replaced block, the memory RepL
frees in the first place. While a replaced block runs its forward, `saved_weight_hooks` installs
saved-tensor hooks that store, for a saved tensor that is (a view of) one of the block's synthesized
weights, which weight and which view; the first unpack in backward synthesizes the block's weights
once more, without autograd, for all its views (freed when the last is unpacked). Gradients are the
same, bit for bit: the synthesis is deterministic and its inputs, the neighbours and coefficients,
are checked unchanged since forward.

Every other saved tensor goes to the saved-tensor hooks active around the block (a memory meter,
`save_on_cpu`), or is kept with its version checked at unpack, as autograd does without hooks.
Nothing is installed inside a checkpoint (`recompute_replaced=True`, gradient checkpointing), which
keeps none of the block's tensors anyway, nor while backward runs (a reentrant checkpoint's
recompute, consumed at once), under `torch.compile` or where saved-tensor hooks are disabled.
Under autocast a Linear or convolution saves the low-precision copy of its weight, as in a plain
model, and that copy is kept; only the weights used in their own dtype (norms, layer scales) are
rebuilt.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .synthesis import replacement_state, synthesize


class _WeightView:
    """What is saved instead of a view of a synthesized weight: the weight's position and the view."""

    __slots__ = ("index", "size", "stride", "offset")

    def __init__(self, index: int, tensor: torch.Tensor) -> None:
        self.index, self.size, self.stride, self.offset = index, tensor.size(), tensor.stride(), tensor.storage_offset()


class _Kept:
    """Any other saved tensor, with its version at saving: hooks switch autograd's in-place check off."""

    __slots__ = ("tensor", "version")

    def __init__(self, tensor: torch.Tensor) -> None:
        # Detached: holding the tensor itself would make a reference cycle with its grad_fn.
        self.tensor, self.version = tensor.detach(), tensor._version


class _Delegated:
    """Any other saved tensor, as the saved-tensor hooks active around the block packed it."""

    __slots__ = ("packed",)

    def __init__(self, packed: Any) -> None:
        self.packed = packed


class SavedWeightHooks:
    """One forward of one replaced block: the hooks, installed for that forward, and what they share:
    the synthesized weights' storages, the count of views saved, the weights rebuilt for backward."""

    def __init__(self, module: nn.Module, weights: Sequence[torch.Tensor], outer: tuple | None) -> None:
        self.module = module
        self.outer = outer
        self.weights = weights  # during the forward
        self.layouts = [(w.stride(), w.storage_offset()) for w in weights]
        self.storages = {}  # data pointer of each weight's storage -> (weight position, dtype)
        for i, w in enumerate(weights):
            pointer = w.untyped_storage().data_ptr() if type(w) is torch.Tensor else 0
            if pointer:  # none without elements or on the meta device: those are kept as they are
                self.storages[pointer] = (i, w.dtype)
        self.inputs = [(t, t._version) for t in _synthesis_inputs(module)]
        self.saved = 0  # views packed
        self.unpacked = 0  # views unpacked since the weights were last rebuilt
        self.rebuilt: list[torch.Tensor] | None = None
        self.weight_versions = [w._version for w in weights]
        self.changed_in_forward = False
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)

    def install(self) -> None:
        """At the start of the block's forward."""
        self.hooks.__enter__()

    def uninstall(self) -> None:
        """At the end of the block's forward (also when it raised)."""
        self.hooks.__exit__(None, None, None)
        # A weight changed in place after a layer saved it: an error in backward, as autograd's check makes it.
        self.changed_in_forward = [w._version for w in self.weights] != self.weight_versions
        # Only the recipes remain; and no reference cycle through the hooks' bound methods.
        self.weights, self.hooks = (), None

    @property
    def _index(self) -> int:
        return replacement_state(self.module).index

    def pack(self, tensor: torch.Tensor) -> Any:
        if type(tensor) is torch.Tensor and tensor.layout == torch.strided:
            found = self.storages.get(tensor.untyped_storage().data_ptr())
            if found is not None and found[1] == tensor.dtype:
                self.saved += 1
                return _WeightView(found[0], tensor)
        if self.outer is not None:
            return _Delegated(self.outer[0](tensor))
        return _Kept(tensor)

    def unpack(self, packed: Any) -> torch.Tensor:
        if type(packed) is _Delegated:
            return self.outer[1](packed.packed)
        if type(packed) is _Kept:
            if packed.tensor._version != packed.version:
                raise RuntimeError(
                    "one of the variables needed for gradient computation has been modified by an inplace "
                    f"operation: a tensor of shape {list(packed.tensor.shape)} saved by replaced block {self._index} "
                    f"is at version {packed.tensor._version}; expected version {packed.version} instead."
                )
            return packed.tensor
        weight = self._rebuilt_weights()[packed.index]
        self.unpacked += 1
        if self.unpacked >= self.saved:  # the last view saved: free the weights (rebuilt again if asked again)
            self.rebuilt, self.unpacked = None, 0
        return weight.as_strided(packed.size, packed.stride, packed.offset)

    def _rebuilt_weights(self) -> list[torch.Tensor]:
        if self.changed_in_forward:
            raise RuntimeError(f"Replaced block {self._index}: its forward changed a synthesized weight in place.")
        current = _synthesis_inputs(self.module)
        if any(now is not then or now._version != version for now, (then, version) in zip(current, self.inputs)):
            raise RuntimeError(
                f"Replaced block {self._index}: its coefficients or a neighbour's weight changed between forward "
                "and backward, so the weights its backward needs cannot be rebuilt. Run backward before changing "
                "the weights (optimizer.step() after loss.backward())."
            )
        if self.rebuilt is None:
            with torch.no_grad():
                rebuilt = synthesize(self.module)
            # The forward's program on the forward's inputs: same values, same layout for the saved views.
            if [(w.stride(), w.storage_offset()) for w in rebuilt] != self.layouts:
                raise RuntimeError(f"Replaced block {self._index}: weights rebuilt with another layout.")
            self.rebuilt = rebuilt
        return self.rebuilt


def _synthesis_inputs(module: nn.Module) -> list[torch.Tensor]:
    """What a replaced block's synthesis reads: its coefficients and each term's neighbour tensor."""
    state = replacement_state(module)
    return [
        state.coefficient_rows(),
        *(getattr(owner, attr) for owner, attr in state.neighbours),
    ]


def saved_weight_hooks(module: nn.Module, weights: Sequence[torch.Tensor]) -> SavedWeightHooks | None:
    """Hooks for the forward of the replaced block `module` with its synthesized `weights`: installed,
    autograd saves recipes for them instead of the tensors (see the module docstring). None where
    that does not apply."""
    if not replacement_state(module).rebuild_saved_weights or not _hooks_apply():
        return None
    outer = torch._C._autograd._top_saved_tensors_default_hooks(False)
    if outer is not None and getattr(outer[0], "__module__", None) == "torch.utils.checkpoint":
        return None  # a checkpoint keeps none of the block's tensors
    return SavedWeightHooks(module, weights, outer)


def _hooks_apply() -> bool:
    return (
        torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
        and torch._C._autograd._saved_tensors_hooks_is_enabled()
        and torch._C._current_graph_task_id() == -1  # not inside backward (a reentrant checkpoint's recompute)
    )
