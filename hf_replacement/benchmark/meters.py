"""Instruments that count what a training step holds and does: state bytes, saved activations, synthesis calls."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from .. import layer as replacement_layer


@contextlib.contextmanager
def patched(owner: Any, name: str, value: Any) -> Iterator[None]:
    """`owner.name` is `value` inside the block: how the meters see the calls layer.py makes."""
    original = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, original)


def _tensor_bytes(tensors: Sequence[torch.Tensor]) -> int:
    seen: set[int] = set()
    total = 0
    for tensor in tensors:
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        total += tensor.numel() * tensor.element_size()
    return total


def state_memory(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Exact bytes of parameters, buffers, gradients and optimizer state, read from the tensors."""
    parameters = list(model.parameters())
    optimizer_tensors = [value for state in optimizer.state.values() for value in state.values() if torch.is_tensor(value)]
    result = {
        "parameters": _tensor_bytes(parameters),
        "buffers": _tensor_bytes(list(model.buffers())),
        "gradients": _tensor_bytes([p.grad for p in parameters if p.grad is not None]),
        "optimizer": _tensor_bytes(optimizer_tensors),
    }
    result["total"] = sum(result.values())
    return result


class SavedTensorMeter:
    """Bytes autograd keeps for backward while the meter is active, each storage counted once.

    Parameters (and anything in `exclude`) are left out: they are counted as state. A tensor saved
    twice, or two views of one storage (an op saving its output that the next op saves as input),
    count once. A replaced block under `recompute_replaced=True` runs inside a non-reentrant
    checkpoint whose own saved-tensor hooks take over (only the innermost hooks apply), so what it
    would have saved is not counted; what the checkpoint keeps instead, its inputs, is counted by
    wrapping the `checkpoint` function layer.py calls.
    """

    def __init__(self, exclude: Sequence[torch.Tensor] = ()) -> None:
        self._exclude = {t.untyped_storage().data_ptr() for t in exclude}
        self._storages: dict[int, int] = {}
        self._stack = contextlib.ExitStack()

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.layout == torch.strided and tensor.device.type != "meta":
            storage = tensor.untyped_storage()
            pointer = storage.data_ptr()
            if pointer and pointer not in self._exclude:
                self._storages[pointer] = storage.nbytes()
        return tensor

    @property
    def bytes(self) -> int:
        return sum(self._storages.values())

    def __enter__(self) -> "SavedTensorMeter":
        original_checkpoint = replacement_layer.checkpoint

        def counting_checkpoint(function: Callable, *args: Any, **kwargs: Any) -> Any:
            for value in (*args, *kwargs.values()):
                if torch.is_tensor(value):
                    self._pack(value)
            return original_checkpoint(function, *args, **kwargs)

        self._stack.enter_context(patched(replacement_layer, "checkpoint", counting_checkpoint))
        self._stack.enter_context(torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor))
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._stack.close()


class SynthesisCounter:
    """Counts `layer.synthesize` calls (a recompute calls it again in backward)."""

    def __init__(self) -> None:
        self.calls = 0

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        original = replacement_layer.synthesize

        def counted(module: nn.Module) -> list[torch.Tensor]:
            self.calls += 1
            return original(module)

        with patched(replacement_layer, "synthesize", counted):
            yield
