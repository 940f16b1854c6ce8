"""The learnable coefficients of the replaced blocks, one module holding them all."""

from __future__ import annotations

import torch
from torch import nn


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

    # PEFT's generic unload (IA³, LoHa, LoKr) copies `weight` from each `modules_to_save` module it puts back:
    # this module has none to copy.
    weight = None

    def forward(self) -> ReplacementCoefficients:
        """The module holding the coefficients in use: this one. A module put in its place forwards the
        call to the module in use: PEFT's `ModulesToSaveWrapper` (`modules_to_save`) to its active copy,
        or to this original while adapters are disabled. The replaced blocks read their coefficients so."""
        return self

    def rows(self, index: int) -> nn.Parameter:
        """Block `index`'s (2, K) coefficients."""
        return self._parameters[str(index)]

    def remove_all(self) -> None:
        """Drop every block's coefficients (the blocks were materialized: nothing reads them any more)."""
        self._parameters.clear()


__all__ = ["ReplacementCoefficients"]
