"""Small helpers every part of the package (and the benchmark harness) counts with."""

from __future__ import annotations

from torch import nn


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts of `module` as held in memory now (shared tensors once)."""
    parameters = list(module.parameters())  # nn.Module.parameters() already yields a shared tensor once
    return sum(p.numel() for p in parameters if p.requires_grad), sum(p.numel() for p in parameters)


__all__ = ["count_parameters"]
