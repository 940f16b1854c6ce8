"""PEFT adapters on top of a RepL model: the adapter config, and the merge of both into a plain model.

PEFT gives a model no say in where an adapter goes or what else is trained: both come from the
adapter config alone. `prepare_peft_config` adds the two things a RepL model needs to it:

- the replaced blocks are left out (`exclude_modules`): their weights exist only inside a forward,
  so there is nothing to put an adapter on, and nothing to merge one into;
- the coefficients are trained and saved with the adapter (`modules_to_save`); PEFT freezes
  everything else. The replaced blocks read them through PEFT's wrapper, so they use the trained copy.

Both land in the saved `adapter_config.json`: `PeftModel.from_pretrained(repl_model, adapter_dir)`
rebuilds the same model.
"""

from __future__ import annotations

import copy
import logging
import re

from peft import PeftConfig, PeftModel, PeftType
from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils.constants import INCLUDE_LINEAR_LAYERS_SHORTHAND
from torch import nn

from ..model import ReplacementModel

logger = logging.getLogger(__name__)

COEFFICIENTS_MODULE = "replacement_coefficients"
# PEFT names a module by its path from the model it is given: the ReplacementModel, whose base model is `base_model`.
_BASE_MODEL_PREFIX = "base_model."

# The PEFT methods whose merge through `merge_peft_and_replacement` is tested to give the PeftModel's
# outputs (tests/test_ecosystem.py); `prepare_peft_config` refuses the others before any training.
MERGEABLE_PEFT_TYPES = (
    PeftType.LORA, PeftType.LOHA, PeftType.LOKR, PeftType.IA3, PeftType.OFT, PeftType.FOURIERFT
)


def prepare_peft_config(model: ReplacementModel, peft_config: PeftConfig) -> PeftConfig:
    """A copy of `peft_config` for `peft.get_peft_model(model, ...)` on the RepL model `model`.

    The replaced blocks are added to `exclude_modules` (logged once, naming the blocks the target
    modules match) and the coefficients to `modules_to_save`. The PEFT methods that adapt modules, have
    these two fields and are tested to merge exactly (`MERGEABLE_PEFT_TYPES`: LoRA, LoHa, LoKr, IA³, OFT,
    FourierFT) are accepted; others are refused here, before any training.
    """
    if not isinstance(model, ReplacementModel):
        raise TypeError(
            f"prepare_peft_config needs the ReplacementModel that get_peft_model will wrap, got {type(model).__name__}."
        )
    missing = [field for field in ("exclude_modules", "modules_to_save") if not hasattr(peft_config, field)]
    if missing:
        raise TypeError(
            f"{type(peft_config).__name__} has no {' or '.join(missing)}: only PEFT methods that adapt modules "
            "(LoRA, LoHa, LoKr, IA³, ...) can leave the replaced blocks out and train the coefficients."
        )
    _refuse_unmergeable(peft_config)
    blocks = model.replaced_blocks
    if not blocks:
        raise ValueError(
            "This RepL model has no replaced blocks (its replacement is deferred, or it was merged): call "
            "model.replace_blocks() first, or put PEFT on the plain model."
        )
    config = copy.deepcopy(peft_config)
    skipped = [index for index, name in sorted(blocks.items()) if _targets_match_inside(model, config, name)]
    ours = re.escape(_BASE_MODEL_PREFIX) + f"(?:{'|'.join(re.escape(name) for name in blocks.values())})(?:\\..*)?"
    config.exclude_modules = _either(config.exclude_modules, ours)
    modules_to_save = list(config.modules_to_save or [])
    config.modules_to_save = modules_to_save + [COEFFICIENTS_MODULE] * (COEFFICIENTS_MODULE not in modules_to_save)
    if skipped:
        logger.warning(
            "PEFT adapters are not put on the replaced blocks %s, which the target modules match: their weights "
            "are synthesized from their neighbours in each forward. Their coefficients (%s) are trained and saved "
            "with the adapter instead.",
            ", ".join(f"{index} ({blocks[index]})" for index in skipped),
            COEFFICIENTS_MODULE,
        )
    return config


def _refuse_unmergeable(peft_config: PeftConfig) -> None:
    method = getattr(peft_config, "peft_type", None)
    if method not in MERGEABLE_PEFT_TYPES:
        supported = ", ".join(str(peft_type.value) for peft_type in MERGEABLE_PEFT_TYPES)
        raise ValueError(
            f"peft_type={getattr(method, 'value', method)!r} ({type(peft_config).__name__}) is not supported on a RepL "
            f"model: only {supported} are tested to merge exactly with the replacement (merge_peft_and_replacement). "
            "Use one of those, or merge the RepL model first (repl_model.merge_and_unload()) and put this method on "
            "the plain model."
        )
    if getattr(peft_config, "layer_replication", None):
        raise ValueError(
            f"layer_replication={peft_config.layer_replication} would duplicate blocks of a RepL model, whose replaced "
            "blocks are synthesized from their neighbours (and PEFT cannot merge replicated layers): leave it unset."
        )


def _targets_match_inside(model: ReplacementModel, config: PeftConfig, block_name: str) -> bool:
    """Whether `config`'s target modules match a module of the block `block_name` (as PEFT would match them)."""
    targets = getattr(config, "target_modules", None)
    for name, module in model.base_model.get_submodule(block_name).named_modules(prefix=block_name):
        if targets is None:  # PEFT picks them by model type later: assume it picks some here
            return True
        if targets == INCLUDE_LINEAR_LAYERS_SHORTHAND:
            if isinstance(module, nn.Linear):
                return True
        elif check_target_module_exists(config, _BASE_MODEL_PREFIX + name):
            return True
    return False


def _either(exclude_modules: str | list[str] | set[str] | None, pattern: str) -> str:
    """A regular expression (PEFT full-matches a string `exclude_modules`) for what `exclude_modules`
    excludes or `pattern` matches. PEFT excludes a module whose name is in a list, or ends with "." and one."""
    if not exclude_modules:
        return pattern
    if not isinstance(exclude_modules, str):
        exclude_modules = r"(?:.*\.)?(?:" + "|".join(re.escape(name) for name in sorted(exclude_modules)) + ")"
    return f"(?:{exclude_modules})|(?:{pattern})"


def merge_peft_and_replacement(peft_model: PeftModel) -> nn.Module:
    """Merge the adapter and the replacement of `peft_model` (PEFT on a RepL model): the plain base model,
    with the outputs of `peft_model`.

    The order matters, and this is the right one: the replaced blocks are materialized first, from
    their neighbours' weights without the adapter, as they were synthesized; then the adapter is
    merged. All or nothing: the merge runs on a copy (memory for a second model while it runs), so
    `peft_model` is unchanged, whether the merge completes or raises.
    """
    replacement_model = peft_model.get_base_model() if isinstance(peft_model, PeftModel) else None
    if not isinstance(replacement_model, ReplacementModel):
        raise TypeError(
            "merge_peft_and_replacement needs a PeftModel made by get_peft_model on a ReplacementModel, got "
            f"{type(peft_model).__name__}{f' of {type(replacement_model).__name__}' if replacement_model else ''}."
        )
    for config in peft_model.peft_config.values():  # an adapter loaded from disk never met prepare_peft_config
        _refuse_unmergeable(config)
    merged = copy.deepcopy(peft_model)
    merged_replacement_model = merged.get_base_model()
    merged_replacement_model.merge_and_unload()
    merged.merge_and_unload()
    return merged_replacement_model.base_model


__all__ = ["COEFFICIENTS_MODULE", "MERGEABLE_PEFT_TYPES", "merge_peft_and_replacement", "prepare_peft_config"]
