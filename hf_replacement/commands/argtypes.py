"""argparse value types shared by the `hf-replacement` sub-commands: one clear message per bad value."""

from __future__ import annotations

import argparse
import math


def _bounded(text: str, parse: type, low: float, strict: bool) -> int | float:
    kind = "an integer" if parse is int else "a number"
    try:
        value = parse(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {kind}") from None
    above_low = value > low if strict else value >= low
    if not (above_low and value < math.inf):
        bound = f"{'an integer' if parse is int else 'a finite number'} {'>' if strict else '>='} {low}"
        raise argparse.ArgumentTypeError(f"{value} must be {bound}")
    return value


def positive_int(text: str) -> int:
    return _bounded(text, int, 1, strict=False)


def positive_float(text: str) -> float:
    return _bounded(text, float, 0, strict=True)


def non_negative_float(text: str) -> float:
    return _bounded(text, float, 0, strict=False)


def block_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of block indices, e.g. 3,7") from None


def chain_names(text: str) -> list[str]:
    """Comma-separated chain names (or their leading parts), e.g. `backbone` or `model.encoder,model.backbone`."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"{text!r} names no chain: give chain names, e.g. backbone")
    return names


def coefficient_init(text: str) -> tuple[float, float] | str:
    """`fit`, or two numbers `a,b` (e.g. 0.5,0.5)."""
    if text.strip().lower() == "fit":
        return "fit"
    parts = text.split(",")
    try:
        if len(parts) == 2:
            return float(parts[0]), float(parts[1])
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"{text!r} is neither 'fit' nor two numbers a,b, e.g. 0.5,0.5")


__all__ = ["block_list", "chain_names", "coefficient_init", "non_negative_float", "positive_float", "positive_int"]
