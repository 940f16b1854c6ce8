"""What a RepL model reports to people, formatted: the parameter line of `print_trainable_parameters`
and the fitted coefficients' reconstruction errors (`coefficient_init="fit"`).

Plain formatting from numbers: it knows nothing of the model, so the launcher formats the errors it
read back from `results.json` the same way.
"""

from __future__ import annotations

from typing import Any

# A block whose fitted coefficients leave more than this share of its weights' norm unexplained is warned
# about: converting it loses most of what it held.
POOR_FIT_RELATIVE_ERROR = 0.9


def describe_fit_errors(errors: dict[Any, dict[str, float]]) -> str:
    """`coefficient_fit_errors()` (or its JSON form) in one line: "block 3: 0.412 (a=b=0.5: 0.951), ..."."""
    return ", ".join(
        f"block {index}: {error['relative_error']:.3f} (a=b=0.5: {error['default_relative_error']:.3f})"
        for index, error in errors.items()
    )


def describe_parameters(
    trainable: int,
    total: int,
    replaced: list[int],
    num_blocks: int,
    unreplaced: int,
    fit_errors: dict[int, dict[str, float]],
) -> str:
    """`print_trainable_parameters`' line: counts, replaced blocks, the saving against the unreplaced model."""
    saved = 1 - total / unreplaced
    fits = f" || fitted init, relative error: {describe_fit_errors(fit_errors)}" if fit_errors else ""
    return (
        f"trainable params: {trainable:,d} || all params: {total:,d} || "
        f"trainable%: {100 * trainable / total:.4f} || replaced blocks: {', '.join(map(str, replaced))} "
        f"(of {num_blocks}) || unreplaced model: {unreplaced:,d} params ({100 * saved:.2f}% fewer now){fits}"
    )


__all__ = ["POOR_FIT_RELATIVE_ERROR", "describe_fit_errors", "describe_parameters"]
