"""Find a model's blocks: its repeated residual units, numbered in forward order.

Discovery reads the depth the model's config declares (`depths` for staged models such as ConvNeXt,
Swin and ResNet, `num_hidden_layers` for ViT-like encoders) and picks the class of module whose
homogeneous containers have exactly those lengths. That survives attribute renames between
Transformers versions (v5 moved ViT's `encoder.layer` to `layers`) without a table of paths.
`ReplacementConfig.block_path` covers any other model whose blocks live in one `nn.ModuleList`.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer


class BlockDiscoveryError(ValueError):
    """The model's blocks could not be found, or `block_path` does not point at them."""


@dataclass(frozen=True)
class Block:
    """A block of the model: `index` in forward order across the whole model, `name` its module path."""

    index: int
    name: str
    module: nn.Module


def find_blocks(model: nn.Module, block_path: str | None = None) -> list[Block]:
    """Return the model's blocks in forward order."""
    if block_path is not None:
        named = _blocks_at_path(model, block_path)
    else:
        named = _discover(model)
    return [Block(index, name, module) for index, (name, module) in enumerate(named)]


def _blocks_at_path(model: nn.Module, block_path: str) -> list[tuple[str, nn.Module]]:
    try:
        container = model.get_submodule(block_path)
    except AttributeError as error:
        raise BlockDiscoveryError(
            f"block_path={block_path!r} does not exist in {type(model).__name__}: {error}. "
            "Give the dotted path of the nn.ModuleList holding the blocks (see print(model))."
        ) from None
    if not isinstance(container, (nn.ModuleList, nn.Sequential)):
        raise BlockDiscoveryError(
            f"block_path={block_path!r} points at a {type(container).__name__}, not an nn.ModuleList "
            "or nn.Sequential of blocks."
        )
    return [(f"{block_path}.{key}", child) for key, child in container.named_children()]


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


def _discover(model: nn.Module) -> list[tuple[str, nn.Module]]:
    by_class = _homogeneous_containers(model)
    depths = _declared_depths(model)
    matches = [
        containers
        for containers in by_class.values()
        if depths is not None and [len(c) for _, c in containers] == depths
    ]
    if not matches:
        # No config to read: fall back to Transformers' marker class for blocks, innermost level.
        matches = [
            containers
            for cls, containers in by_class.items()
            if issubclass(cls, GradientCheckpointingLayer) and not _contains_nested_block(containers)
        ]
    if len(matches) != 1:
        found = "none" if not matches else f"{len(matches)} candidate block lists"
        raise BlockDiscoveryError(
            f"Could not find the blocks of {type(model).__name__} ({found}; config depths {depths}). "
            "Pass ReplacementConfig(block_path='<dotted path of the nn.ModuleList of blocks>')."
        )
    return [(f"{name}.{key}", child) for name, container in matches[0] for key, child in container.named_children()]


def _contains_nested_block(containers: list[tuple[str, nn.Module]]) -> bool:
    return any(
        isinstance(inner, GradientCheckpointingLayer) and inner is not block
        for _, container in containers
        for block in container
        for inner in block.modules()
    )
