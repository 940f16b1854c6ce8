"""FSDP2 for RepL models: shard so that each replaced block and its neighbours are one unit; gather and load
full state dicts across the shards.

A replaced block reads its neighbours' weights on every forward (and its backward writes their
gradients). Under FSDP2 a module's weights are whole only while its own unit is gathered, so a
replaced block in a unit of its own reads sharded neighbours and fails ("got mixed torch.Tensor and
DTensor"). `shard_model` puts each replaced block, its previous and its next block into one unit
(`fully_shard` of a list of modules), merging groups that share a block; every other block is a
unit of its own; the root unit holds the rest (embeddings, head, norms, the coefficients).

The gather and load helpers work on sharded and unsharded models alike, so one training loop
serves both. Call them on every process: on a sharded model they are collectives.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard

from ..blocks import Block, find_blocks
from ..model import ReplacementModel
from ..synthesis import replacement_state
from ..utils import is_sharded

logger = logging.getLogger(__name__)


def sharding_units(model: nn.Module, block_path: str | None = None) -> list[list[Block]]:
    """The blocks of each FSDP unit `shard_model` makes, in forward order (the root unit not included).

    A replaced block forms one unit with its neighbours; units that share a block are merged (with
    `replace_interval=2` a chain of blocks becomes one unit). Every other block is a unit of its own.
    """
    blocks = model.get_blocks() if isinstance(model, ReplacementModel) else find_blocks(model, block_path)
    spans = sorted(
        (state.plan.previous.index, state.plan.next.index)
        for block in blocks
        if (state := replacement_state(block.module)) is not None
    )
    unit_of = list(range(len(blocks)))  # each block's unit, named by its first block
    for previous, following in spans:
        first = unit_of[previous]
        for member in range(first, following + 1):
            unit_of[member] = first
    units: dict[int, list[Block]] = {}
    for block in blocks:
        units.setdefault(unit_of[block.index], []).append(block)
    return list(units.values())


def shard_model(model: nn.Module, *, block_path: str | None = None, **fully_shard_kwargs: Any) -> nn.Module:
    """Shard `model` in place with FSDP2 (`torch.distributed.fsdp.fully_shard`) and return it.

    `model`: a `ReplacementModel` whose blocks are replaced (replace them before sharding), or a plain
    Transformers model (each block its own unit; `block_path` as in `ReplacementConfig` where blocks
    cannot be discovered). The units are those of `sharding_units`, then the root.
    `fully_shard_kwargs` (`mesh`, `reshard_after_forward`, `mp_policy`, `offload_policy`, ...) go to
    every `fully_shard` call; the root takes them without `reshard_after_forward` (FSDP's default
    keeps the root gathered between forward and backward, as Accelerate does). Needs an initialized
    process group (`torchrun`, `accelerate launch`) unless `mesh` is given. Build the optimizer
    after sharding: the parameters become sharded `DTensor`s.
    """
    if is_sharded(model):
        raise ValueError("This model is already sharded with FSDP; shard_model takes an unsharded model.")
    if isinstance(model, ReplacementModel) and not model.replaced_blocks:
        raise ValueError(
            "This ReplacementModel has no replaced block (its replacement is deferred, or it was merged): "
            "replacing blocks after sharding would leave FSDP managing freed weights. Call "
            "model.replace_blocks() before shard_model; replacement_start_step cannot be combined with FSDP."
        )
    if fully_shard_kwargs.get("mesh") is None and not torch.distributed.is_initialized():
        raise ValueError(
            "shard_model needs a process group: launch with torchrun or accelerate launch and call "
            "torch.distributed.init_process_group() first (gloo on CPU, nccl on CUDA), or pass mesh=."
        )
    units = sharding_units(model, block_path)
    for unit in units:
        modules = [block.module for block in unit]
        fully_shard(modules if len(modules) > 1 else modules[0], **fully_shard_kwargs)
    fully_shard(model, **{key: value for key, value in fully_shard_kwargs.items() if key != "reshard_after_forward"})
    logger.info(
        "FSDP units: %s, then the root.",
        ", ".join("+".join(str(block.index) for block in unit) for unit in units),
    )
    return model


def check_deepspeed_stage(zero_stage: int | None) -> None:
    """Refuse DeepSpeed ZeRO-3 for a RepL model: it gathers each module's parameters only while that module
    runs, so a replaced block would read its neighbours' partitioned (empty) weights. ZeRO-1 and 2 keep
    whole parameters and are not refused."""
    if zero_stage == 3:
        raise ValueError(
            "DeepSpeed ZeRO-3 partitions the parameters per module, and a replaced block reads its neighbours' "
            "weights, which ZeRO-3 has not gathered for it: RepL cannot train under it. Shard with FSDP2 instead "
            "(hf-replacement train --fsdp, hf_replacement.shard_model, or TrainingArguments(fsdp=..., "
            "fsdp_config={'version': 2})), or use ZeRO stage 1 or 2."
        )


_FULL_ON_CPU = StateDictOptions(full_state_dict=True, cpu_offload=True)


def gather_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's full state dict (the keys of an unsharded `state_dict()`), on the CPU.

    Sharded: gathered from every process (call it on all of them); rank 0 gets the tensors, the
    others an empty dict. Unsharded: `model.state_dict()` on every process.
    Save with `model.save_pretrained(directory, state_dict=...)` on the main process.
    """
    if not is_sharded(model):
        return model.state_dict()
    return get_model_state_dict(model, options=_FULL_ON_CPU)


def load_full_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Load a full state dict (every process passes the whole of it); each process keeps its shard."""
    if not is_sharded(model):
        model.load_state_dict(state_dict)
        return
    set_model_state_dict(model, state_dict, options=StateDictOptions(full_state_dict=True))


def gather_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's full state in `torch.optim.Optimizer.state_dict()`'s layout (parameters by number).

    The same layout as the unsharded model's optimizer, so a checkpoint is the same whether it was
    written sharded or not. Sharded: call on every process; rank 0 gets the state, the others `{}`.
    """
    if not is_sharded(model):
        return optimizer.state_dict()
    by_name = get_optimizer_state_dict(model, optimizer, options=_FULL_ON_CPU)
    if not by_name:
        return {}
    numbers: dict[str, int] = {}
    groups = []
    for group in by_name["param_groups"]:
        groups.append({**group, "params": [numbers.setdefault(name, len(numbers)) for name in group["params"]]})
    return {"state": {numbers[name]: state for name, state in by_name["state"].items()}, "param_groups": groups}


def load_full_optimizer_state_dict(
    model: nn.Module, optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]
) -> None:
    """Load what `gather_optimizer_state_dict` returned (every process passes the whole of it)."""
    if not is_sharded(model):
        optimizer.load_state_dict(state_dict)
        return
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    ordered = [names[id(parameter)] for group in optimizer.param_groups for parameter in group["params"]]
    by_name = {
        "state": {ordered[int(number)]: state for number, state in state_dict["state"].items()},
        "param_groups": [
            {**group, "params": [ordered[number] for number in group["params"]]} for group in state_dict["param_groups"]
        ],
    }
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))


__all__ = [
    "check_deepspeed_stage",
    "gather_optimizer_state_dict",
    "gather_state_dict",
    "load_full_optimizer_state_dict",
    "load_full_state_dict",
    "shard_model",
    "sharding_units",
]
