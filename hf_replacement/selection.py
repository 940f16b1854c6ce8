"""Which blocks to replace: by interval or an explicit list, validated against the model."""

from __future__ import annotations

import logging

from .blocks import Block
from .config import ReplacementConfig, ReplacementConfigError
from .planning import BlockPlan, plan_block
from .resampling import FusionError

logger = logging.getLogger(__name__)


def interval_indices(num_blocks: int, interval: int) -> list[int]:
    """Blocks k-1, 2k-1, ... that have a neighbour on each side."""
    return [index for index in range(interval - 1, num_blocks - 1, interval) if index > 0]


def select_blocks(blocks: list[Block], config: ReplacementConfig) -> list[BlockPlan]:
    """Plan the replacement of the blocks `config` selects; nothing is modified here."""
    count = len(blocks)
    if count < 3:
        raise ReplacementConfigError(
            f"The model has {count} block(s); RepL needs at least 3 (a replaced block between two neighbours)."
        )
    if config.replaced_blocks is not None:
        indices = sorted(config.replaced_blocks)
        out_of_range = [i for i in indices if not 1 <= i <= count - 2]
        if out_of_range:
            raise ReplacementConfigError(
                f"replaced_blocks={config.replaced_blocks} has {out_of_range} outside the valid range "
                f"1..{count - 2} (this model has {count} blocks; the first and last are never replaced)."
            )
        adjacent = [(i, j) for i, j in zip(indices, indices[1:]) if j == i + 1]
        if adjacent:
            raise ReplacementConfigError(
                f"replaced_blocks={config.replaced_blocks} has adjacent blocks {adjacent}: each replaced "
                "block needs two neighbours that are not replaced."
            )
        return [plan_block(blocks[i], blocks[i - 1], blocks[i + 1], config) for i in indices]

    indices = interval_indices(count, config.replace_interval)
    plans, skipped = [], []
    for index in indices:
        try:
            plans.append(plan_block(blocks[index], blocks[index - 1], blocks[index + 1], config))
        except FusionError as error:
            skipped.append(f"{index} ({error})")
    if skipped:
        logger.warning("Not replaced (chosen by replace_interval, cannot be fused): %s", "; ".join(skipped))
    if not plans:
        raise ReplacementConfigError(
            f"replace_interval={config.replace_interval} selects no block of this {count}-block model "
            f"(valid intervals: 2..{count - 1}{'; skipped: ' + '; '.join(skipped) if skipped else ''}). "
            "Use a smaller interval or replaced_blocks=[...]."
        )
    return plans


__all__ = ["interval_indices", "select_blocks"]
