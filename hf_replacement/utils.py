"""Small helpers every part of the package (and the benchmark harness) counts with."""

from __future__ import annotations

from torch import nn
from torch.distributed.fsdp import FSDPModule


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts of `module` as held in memory now (shared tensors once)."""
    parameters = list(module.parameters())  # nn.Module.parameters() already yields a shared tensor once
    return sum(p.numel() for p in parameters if p.requires_grad), sum(p.numel() for p in parameters)


def is_sharded(module: nn.Module) -> bool:
    """Whether FSDP2 (`fully_shard`) manages `module` or one of its submodules."""
    return any(isinstance(submodule, FSDPModule) for submodule in module.modules())


__all__ = ["count_parameters", "is_sharded"]
