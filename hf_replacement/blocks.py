"""Find a model's blocks: its repeated residual units, as one or more chains in forward order.

A *chain* is a run of blocks that replace each other's neighbours: the stages of one backbone form
one chain (a replaced block may take a neighbour across a stage boundary, resampled), while an
encoder and a decoder, or a backbone and a detector's transformer, are separate chains. A replaced
block's neighbours always come from its own chain.

Discovery finds two kinds of block lists, at any depth of the model (a task model's backbone included):
- lists of Transformers' block class (`GradientCheckpointingLayer`), innermost level (Swin's blocks,
  not its stages);
- in a Transformers sub-model without such blocks (ConvNeXt, ResNet: a backbone inside UperNet or
  DETR), the lists whose lengths are the depths its own config declares (`depths`, or
  `num_hidden_layers`).
Lists of one block class whose paths differ only in a stage number (`stages.0.layers`,
`stages.1.layers`) form one chain; other lists are chains of their own. Chains are numbered in
module order and blocks across them: block indices are global. `ReplacementConfig.block_path`
names the lists for any other model.

Checkpoints written before chains existed (config `format_version` 1) discover as they did then
(`legacy=True`): one list of blocks, so they load with the neighbours they were trained with.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass

from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer

# A number between dots in a module path: the stage a list belongs to.
_STAGE_NUMBER = re.compile(r"(?<=\.)\d+(?=\.|$)")
# A chain given by the dotted paths of its `nn.ModuleList`s, in forward order.
ChainPaths = tuple[str, ...]


class BlockDiscoveryError(ValueError):
    """The model's blocks could not be found, or `block_path` does not point at them."""


@dataclass(frozen=True)
class Block:
    """A block of the model: `index` in forward order across the whole model, `name` its module
    path, `chain` the number of the chain it belongs to."""

    index: int
    name: str
    module: nn.Module
    chain: int = 0


@dataclass(frozen=True)
class Chain:
    """Blocks that may be each other's neighbours; `name` is its list's path (`*` for a stage number)."""

    name: str
    paths: ChainPaths
    blocks: tuple[Block, ...]


def find_chains(
    model: nn.Module, block_path: str | list[str | list[str]] | None = None, *, legacy: bool = False
) -> list[Chain]:
    """Return the model's chains of blocks, blocks numbered globally in forward order.

    `block_path`: one container path (one chain), or a list of chains, each a path or a list of
    paths (one chain across several lists, e.g. the stages of a backbone).
    """
    if block_path is not None:
        chains = [tuple(_container_path(model, path) for path in paths) for paths in normalize_block_path(block_path)]
    elif legacy:
        chains = [_legacy_discover(model)]
    else:
        chains = _discover(model)
    result, index = [], 0
    for number, paths in enumerate(chains):
        blocks = []
        for path in paths:
            for key, child in model.get_submodule(path).named_children():
                blocks.append(Block(index, f"{path}.{key}", child, number))
                index += 1
        name = _chain_name(paths)
        if any(chain.name == name for chain in result):  # two chains of one stage pattern, given in block_path
            name = "+".join(paths)
        result.append(Chain(name, paths, tuple(blocks)))
    return result


def find_blocks(
    model: nn.Module, block_path: str | list[str | list[str]] | None = None, *, legacy: bool = False
) -> list[Block]:
    """Return the model's blocks in forward order, all chains together (see `find_chains`)."""
    return [block for chain in find_chains(model, block_path, legacy=legacy) for block in chain.blocks]


def normalize_block_path(block_path: str | list[str | list[str]]) -> list[ChainPaths]:
    """`block_path` as a list of chains, each a tuple of container paths."""
    if isinstance(block_path, str):
        return [(block_path,)]
    return [(entry,) if isinstance(entry, str) else tuple(entry) for entry in block_path]


def _container_path(model: nn.Module, path: str) -> str:
    try:
        container = model.get_submodule(path)
    except AttributeError as error:
        raise BlockDiscoveryError(
            f"block_path={path!r} does not exist in {type(model).__name__}: {error}. "
            "Give the dotted path of the nn.ModuleList holding the blocks (see print(model))."
        ) from None
    if not isinstance(container, (nn.ModuleList, nn.Sequential)):
        raise BlockDiscoveryError(
            f"block_path={path!r} points at a {type(container).__name__}, not an nn.ModuleList "
            "or nn.Sequential of blocks."
        )
    return path


def _chain_name(paths: ChainPaths) -> str:
    return paths[0] if len(paths) == 1 else _STAGE_NUMBER.sub("*", paths[0])


def _homogeneous_containers(model: nn.Module) -> dict[type, list[tuple[str, nn.Module]]]:
    """Containers whose children all share one class, grouped by that class, in module order."""
    by_class: dict[type, list[tuple[str, nn.Module]]] = defaultdict(list)
    for name, module in model.named_modules():
        if not isinstance(module, (nn.ModuleList, nn.Sequential)) or len(module) == 0:
            continue
        classes = {type(child) for child in module}
        if len(classes) == 1:
            by_class[classes.pop()].append((name, module))
    return by_class


def _declared_depths(model: nn.Module) -> list[int] | None:
    config = getattr(model, "config", None)
    depths = getattr(config, "depths", None)
    if isinstance(depths, (list, tuple)) and depths and all(isinstance(d, int) for d in depths):
        return list(depths)
    layers = getattr(config, "num_hidden_layers", None)
    return [layers] if isinstance(layers, int) else None


def _discover(model: nn.Module) -> list[ChainPaths]:
    by_class = _homogeneous_containers(model)
    candidates: dict[type, dict[str, nn.Module]] = defaultdict(dict)
    for cls, containers in by_class.items():
        if issubclass(cls, GradientCheckpointingLayer):
            candidates[cls].update(containers)
    # Sub-models whose blocks are not Transformers' block class (ConvNeXt, ResNet, also as a task model's
    # backbone; MaskFormer-Swin and Hiera, whose *stages* are that class): the lists whose lengths are
    # the depths their own config declares, unless lists of Transformers blocks match those depths.
    for owner_name, owner in model.named_modules():
        depths = _declared_depths(owner)
        if not isinstance(owner, PreTrainedModel) or depths is None:
            continue
        prefix = f"{owner_name}." if owner_name else ""
        matches = {
            cls: inside
            for cls, containers in by_class.items()
            if (inside := [(name, c) for name, c in containers if name.startswith(prefix)])
            and [len(container) for _, container in inside] == depths
            and any(True for _ in inside[0][1][0].children())  # a block holds layers; a list of Linear is no chain
        }
        if not any(issubclass(cls, GradientCheckpointingLayer) for cls in matches):
            for cls, inside in matches.items():
                candidates[cls].update(inside)
    # Innermost level only: Swin's stages hold its blocks, a ConvNeXt stage list its layer lists.
    innermost = {
        cls: containers
        for cls, containers in candidates.items()
        if not any(
            isinstance(inner, other) and inner is not block
            for other in candidates
            if other is not cls
            for container in containers.values()
            for block in container
            for inner in block.modules()
        )
    }
    if not innermost:
        raise BlockDiscoveryError(
            f"Could not find the blocks of {type(model).__name__} (no list of Transformers blocks, and no list "
            f"whose lengths are the depths a config declares: {_declared_depths(model)}). Pass "
            "ReplacementConfig(block_path='<dotted path of the nn.ModuleList of blocks>'), or a list of them."
        )
    chains: dict[tuple[type, str], list[str]] = defaultdict(list)
    for cls, containers in innermost.items():
        for name in containers:
            chains[cls, _STAGE_NUMBER.sub("*", name)].append(name)
    order = {name: position for position, (name, _) in enumerate(model.named_modules())}
    return sorted((tuple(paths) for paths in chains.values()), key=lambda paths: order[paths[0]])


def _legacy_discover(model: nn.Module) -> ChainPaths:
    """Discovery before chains (format_version 1): one list, matched by the top config's depths, else
    every innermost list of Transformers blocks together."""
    by_class = _homogeneous_containers(model)
    depths = _declared_depths(model)
    matches = [
        containers
        for containers in by_class.values()
        if depths is not None and [len(c) for _, c in containers] == depths
    ]
    if not matches:
        matches = [
            containers
            for cls, containers in by_class.items()
            if issubclass(cls, GradientCheckpointingLayer) and not _contains_nested_block(containers)
        ]
    if len(matches) != 1:
        found = "none" if not matches else f"{len(matches)} candidate block lists"
        raise BlockDiscoveryError(
            f"Could not find the blocks of {type(model).__name__} as format_version 1 did ({found}; config depths "
            f"{depths}). Set block_path in the checkpoint's replacement_config.json to the list it was trained with."
        )
    return tuple(name for name, _ in matches[0])


def _contains_nested_block(containers: list[tuple[str, nn.Module]]) -> bool:
    return any(
        isinstance(inner, GradientCheckpointingLayer) and inner is not block
        for _, container in containers
        for block in container
        for inner in block.modules()
    )


__all__ = ["Block", "BlockDiscoveryError", "Chain", "find_blocks", "find_chains", "normalize_block_path"]
