"""Which blocks to replace: by interval (in each chain) or an explicit list, validated against the model.

A replaced block's neighbours are the blocks before and after it in its own chain (`blocks.Chain`):
never the first or last block of a chain, never two adjacent blocks of one chain.
"""

from __future__ import annotations

import logging

from .blocks import Block, Chain
from .config import ReplacementConfig, ReplacementConfigError
from .planning import BlockPlan, plan_block
from .resampling import FusionError

logger = logging.getLogger(__name__)


def interval_indices(num_blocks: int, interval: int) -> list[int]:
    """Blocks k-1, 2k-1, ... that have a neighbour on each side (positions in one chain)."""
    return [index for index in range(interval - 1, num_blocks - 1, interval) if index > 0]


def chain_targets(num_blocks: int, interval: int) -> list[int]:
    """The positions `replace_interval` aims at in a chain of `num_blocks`: k-1, 2k-1, ... with a
    neighbour on each side; a chain with none of those but at least max(3, k/2) blocks long, its middle."""
    targets = interval_indices(num_blocks, interval)
    if not targets and num_blocks >= max(3, (interval + 1) // 2):
        targets = [num_blocks // 2]
    return targets


def select_blocks(chains: list[Chain], config: ReplacementConfig, *, legacy: bool = False) -> list[BlockPlan]:
    """Plan the replacement of the blocks `config` selects; nothing is modified here.

    `legacy`: a checkpoint of format_version 1 (one chain; `replace_interval` skipped the blocks it
    aimed at that cannot be replaced instead of moving to a neighbour), selected as it was then.
    """
    count = sum(len(chain.blocks) for chain in chains)
    if count < 3:
        raise ReplacementConfigError(
            f"The model has {count} block(s); RepL needs at least 3 (a replaced block between two neighbours)."
        )
    if config.replaced_blocks is not None:
        return _explicit_plans(chains, config)
    if legacy:
        return _legacy_interval_plans(chains[0].blocks, config)
    plans, skipped = [], []
    for chain in _targeted_chains(chains, config):
        chain_plans, chain_skipped = _chain_interval_plans(chain.blocks, config)
        plans += chain_plans
        skipped += chain_skipped
    if skipped:
        logger.warning("Not replaced (chosen by replace_interval, cannot be fused): %s", "; ".join(skipped))
    if not plans:
        lengths = {chain.name: len(chain.blocks) for chain in chains}
        reasons = "; skipped: " + "; ".join(skipped) if skipped else ""
        raise ReplacementConfigError(
            f"replace_interval={config.replace_interval} selects no block of this {count}-block model (chains and "
            f"their lengths: {lengths}; a chain needs at least max(3, k/2) blocks{reasons}). "
            "Use a smaller interval or replaced_blocks=[...]."
        )
    return plans


def _targeted_chains(chains: list[Chain], config: ReplacementConfig) -> list[Chain]:
    if config.target_chains is None:
        return chains
    chosen = [
        chain
        for chain in chains
        if any(chain.name == target or chain.name.startswith(f"{target}.") for target in config.target_chains)
    ]
    if not chosen:
        raise ReplacementConfigError(
            f"target_chains={config.target_chains} names none of this model's chains {[c.name for c in chains]}: "
            "give chain names or their leading part (e.g. 'backbone'), or None for every chain."
        )
    return chosen


def _chain_interval_plans(blocks: tuple[Block, ...], config: ReplacementConfig) -> tuple[list[BlockPlan], list[str]]:
    """One chain: each target, or when it cannot be replaced (a ResNet stage's first block has a
    shortcut its neighbours lack) the nearest block within max(1, (k-1)//2) that can and is not next to one
    chosen."""
    plans: list[BlockPlan] = []
    skipped = []
    reach = max(1, (config.replace_interval - 1) // 2)
    for target in chain_targets(len(blocks), config.replace_interval):
        nearest = sorted(
            range(max(1, target - reach), min(len(blocks) - 2, target + reach) + 1),
            key=lambda position: (abs(position - target), position),
        )
        errors = []
        for position in nearest:
            if any(abs(position - plan.block.index + blocks[0].index) <= 1 for plan in plans):
                continue
            try:
                plans.append(plan_block(blocks[position], blocks[position - 1], blocks[position + 1], config))
                break
            except FusionError as error:
                errors.append(str(error))
        else:
            skipped.append(f"{blocks[target].index} ({errors[0] if errors else 'its neighbours are replaced'})")
    return plans, skipped


def _legacy_interval_plans(blocks: tuple[Block, ...], config: ReplacementConfig) -> list[BlockPlan]:
    plans, skipped = [], []
    for index in interval_indices(len(blocks), config.replace_interval):
        try:
            plans.append(plan_block(blocks[index], blocks[index - 1], blocks[index + 1], config))
        except FusionError as error:
            skipped.append(f"{index} ({error})")
    if skipped:
        logger.warning("Not replaced (chosen by replace_interval, cannot be fused): %s", "; ".join(skipped))
    if not plans:
        raise ReplacementConfigError(
            f"replace_interval={config.replace_interval} selects no block of this {len(blocks)}-block model "
            f"(valid intervals: 2..{len(blocks) - 1}{'; skipped: ' + '; '.join(skipped) if skipped else ''}). "
            "Use a smaller interval or replaced_blocks=[...]."
        )
    return plans


def _explicit_plans(chains: list[Chain], config: ReplacementConfig) -> list[BlockPlan]:
    where = {block.index: (chain, position) for chain in chains for position, block in enumerate(chain.blocks)}
    indices = sorted(config.replaced_blocks)
    valid = [block.index for chain in chains for block in chain.blocks[1:-1]]
    out_of_range = [i for i in indices if i not in where or not 0 < where[i][1] < len(where[i][0].blocks) - 1]
    if out_of_range:
        ends = [(chain.blocks[0].index, chain.blocks[-1].index) for chain in chains]
        raise ReplacementConfigError(
            f"replaced_blocks={config.replaced_blocks} has {out_of_range} outside the valid range "
            f"{_ranges(valid)} (this model has {len(where)} blocks in chains {ends} (first, last); the first and "
            "last of each chain are never replaced)."
        )
    adjacent = [(i, j) for i, j in zip(indices, indices[1:]) if j == i + 1 and where[i][0] is where[j][0]]
    if adjacent:
        raise ReplacementConfigError(
            f"replaced_blocks={config.replaced_blocks} has adjacent blocks {adjacent}: each replaced "
            "block needs two neighbours that are not replaced."
        )
    plans = []
    for index in indices:
        chain, position = where[index]
        plans.append(plan_block(chain.blocks[position], chain.blocks[position - 1], chain.blocks[position + 1], config))
    return plans


def _ranges(indices: list[int]) -> str:
    """[1, 2, 3, 6, 7] -> "1..3, 6..7"."""
    runs: list[list[int]] = []
    for index in indices:
        if runs and index == runs[-1][-1] + 1:
            runs[-1].append(index)
        else:
            runs.append([index])
    return ", ".join(f"{run[0]}..{run[-1]}" if len(run) > 1 else str(run[0]) for run in runs)


__all__ = ["chain_targets", "interval_indices", "select_blocks"]
