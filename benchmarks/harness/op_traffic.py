"""The bytes and time of each ATen op a computation runs: what its op sequence must move, however fast each op.

Each op of a composed computation reads its tensor arguments and writes its results, so the
computation moves at least the sum of those bytes (its op traffic). One fused kernel would move only
the computation's compulsory bytes (`bandwidth.synthesis_traffic`), so compulsory / op traffic is the
largest fraction of the streaming bandwidth this sequence of ops can reach even if every op ran at the
triad's speed: its ceiling. A measured fraction near the ceiling says the ops are fast and the sequence
is the limit; far below it, the ops themselves are slow (gathers, page faults, per-call overhead).

Bytes of a tensor: its distinct elements (a broadcast dimension, stride 0, counts once) times the
element size. Views move nothing and are not counted; nor is allocating an uninitialised tensor
(`empty`). An in-place op reads and writes its result (`copy_`, `fill_`, `zero_` only write it); an `out=`
tensor is only written.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .device import synchronize

# Ops that only allocate: they write nothing (the first touch of their memory is paid by whoever writes it).
_ALLOCATING = frozenset({"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"})
# In-place ops that overwrite their first argument without reading it.
_OVERWRITING = frozenset({"copy_", "fill_", "zero_"})


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes of `tensor`'s distinct elements: a broadcast (stride-0) dimension counts once."""
    distinct = math.prod(size for size, stride in zip(tensor.shape, tensor.stride()) if stride != 0)
    return distinct * tensor.element_size()


def _bytes(values: Any) -> int:
    return sum(tensor_bytes(t) for t in tree_leaves(values) if isinstance(t, torch.Tensor))


def _traffic(name: str, args: tuple, kwargs: dict, result: Any) -> tuple[int, int]:
    """(read, written) bytes of one call of op `name`. Every tensor argument is read but an `out=` one and the first
    argument of `copy_`, `fill_`, `zero_`. Written: the `out=` tensor; for an in-place op (ATen's names end with `_`)
    its first argument, which it also returns; else the results."""
    inputs = {key: value for key, value in kwargs.items() if key != "out"}
    read = _bytes((args[1:] if name in _OVERWRITING else args, inputs))
    if "out" in kwargs:
        return read, _bytes(kwargs["out"])
    if name.endswith("_"):
        return read, _bytes(args[0])
    return read, _bytes(result)


@dataclasses.dataclass
class OpRecord:
    """One op's total over a metered computation."""

    calls: int = 0
    bytes: int = 0
    seconds: float = 0.0


class OpTrafficMeter(TorchDispatchMode):
    """Records, per ATen op (by name), its calls, the bytes it read and wrote, and its seconds.

    Used as a context manager around the computation; the time includes the meter's own small cost per
    call, so it ranks the ops rather than timing the computation (time that without the meter). On CUDA
    each op is waited for (`synchronize`), so its time is the kernel's, not its launch's.
    """

    def __init__(self, device: torch.device | None = None) -> None:
        super().__init__()
        self.device = device or torch.device("cpu")
        self.ops: dict[str, OpRecord] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        synchronize(self.device)
        started = time.perf_counter()
        result = func(*args, **kwargs)
        synchronize(self.device)
        seconds = time.perf_counter() - started
        name = func.overloadpacket.__name__
        if func.is_view or name in _ALLOCATING:
            return result
        read, written = _traffic(name, args, kwargs, result)
        record = self.ops.setdefault(name, OpRecord())
        record.calls += 1
        record.bytes += read + written
        record.seconds += seconds
        return result

    @property
    def total_bytes(self) -> int:
        return sum(record.bytes for record in self.ops.values())

    def heaviest(self, count: int) -> list[dict[str, Any]]:
        """The `count` ops that took the most time: name, calls, MB moved, ms."""
        ranked = sorted(self.ops.items(), key=lambda item: -item[1].seconds)[:count]
        return [
            {"op": name, "calls": r.calls, "mb": r.bytes / 1e6, "ms": 1e3 * r.seconds} for name, r in ranked
        ]


__all__ = ["OpRecord", "OpTrafficMeter", "tensor_bytes"]
