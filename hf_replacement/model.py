"""`ReplacementModel`: the PEFT-style wrapper, and `get_replacement_model`."""

from __future__ import annotations

import copy
import dataclasses
import functools
import gc
import json
import logging
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from .blocks import Block, Chain, find_chains
from .checkpoint import (
    WEIGHTS_NAME,
    load_weights,
    remove_other_weight_files,
    share_weight_files,
    weight_files,
    write_checkpoint,
)
from .config import CONFIG_NAME, FIT, FORMAT_VERSION, LEGACY_FORMAT_VERSION, ReplacementConfig
from .fitting import CoefficientFit
from .hub import CardFacts, push_to_hub
from .layer import ReplacementCoefficients, apply_plan, is_replaced, materialize
from .loading import (
    BASE_CONFIG_NAME,
    GUARD_MODEL_TYPE,
    build_base_model,
    checkpoint_dtype,
    download_replacement_checkpoint,
    generation_config_files,
    load_exact,
    load_generation_config,
    refuse_weights_only_directory,
    resolve_dtype,
    single_device,
    split_config_overrides,
    without_tied_copies,
)
from .planning import BlockPlan
from .reporting import POOR_FIT_RELATIVE_ERROR, describe_fit_errors, describe_parameters
from .selection import select_blocks
from .synthesis import replacement_state, synthesize
from .utils import count_parameters, is_sharded

logger = logging.getLogger(__name__)

LOG_PREFIX = "replacement/"


class ReplacementModel(nn.Module):
    """A model trained with Replacement Learning.

    Wraps `base_model` (a Transformers model, or any `nn.Module` with `block_path`) whose selected
    blocks synthesize their weights from their neighbours. `forward` takes the base model's
    arguments; `state_dict()` is the compact checkpoint (no replaced-block weights) plus the
    coefficients under `replacement_coefficients.<block index>`. With `defer_replacement=True` the
    config is checked now but the blocks stay whole until `replace_blocks()` (a warm-up phase).
    With `coefficient_init="fit"` the coefficients are fitted to each block's weights when it is
    replaced: here, or in `replace_blocks()` from the weights trained until then.
    """

    def __init__(
        self, base_model: nn.Module, replacement_config: ReplacementConfig, *, defer_replacement: bool = False
    ) -> None:
        super().__init__()
        if not isinstance(replacement_config, ReplacementConfig):
            raise TypeError(
                f"replacement_config must be a ReplacementConfig, got {type(replacement_config).__name__}: "
                "build one with ReplacementConfig(**options) (or ReplacementConfig.from_dict(data))."
            )
        replacement_config.validate()  # fields may have been changed since the config was built
        _refuse_peft_modules(base_model)
        if isinstance(base_model, ReplacementModel) or any(is_replaced(m) for m in base_model.modules()):
            raise ValueError("This model already has replaced blocks; call get_replacement_model on a plain model.")
        refuse_submodule(base_model)
        # A checkpoint of format_version 1 was built before chains: it is found and selected as it was then.
        self._legacy = replacement_config.format_version == LEGACY_FORMAT_VERSION
        chains = find_chains(base_model, replacement_config.block_path, legacy=self._legacy)
        plans = select_blocks(chains, replacement_config, legacy=self._legacy)
        # Registered before base_model: PEFT's unload visits modules in this order (see PeftMergeHook).
        self.peft_merge_hook = PeftMergeHook(self)
        self.base_model = base_model
        self.replacement_config = replacement_config
        self.replacement_coefficients = ReplacementCoefficients()
        self._chains = chains
        self._blocks = [block for chain in chains for block in chain.blocks]
        # What a checkpoint records: these blocks, also while the replacement is deferred.
        self._selected = sorted(plan.block.index for plan in plans)
        self._num_unreplaced_parameters = sum(p.numel() for p in base_model.parameters())
        self._coefficient_fits: dict[int, CoefficientFit] = {}
        # `defer_replacement`: the config is validated now, the blocks are replaced by `replace_blocks()`
        # later (ReplacementTrainer's `replacement_start_step`: train ordinarily first).
        if not defer_replacement:
            self._replace_planned(plans)
        # Trainer keeps the dataset columns named in forward's signature: show it the base model's.
        self.forward = functools.wraps(base_model.forward)(functools.partial(ReplacementModel.forward, self))

    def forward(self, *args: Any, labels: Any = None, **kwargs: Any) -> Any:
        # `labels` is named because Trainer finds the label names in the *class*'s forward signature;
        # without it, evaluation computes no loss and returns no label_ids.
        if labels is not None:
            kwargs["labels"] = labels
        if self.replaced_blocks:
            _refuse_merged_adapters(self)
        return self.base_model(*args, **kwargs)

    def replace_blocks(self) -> dict[int, str]:
        """Replace the selected blocks now, in a model built with `defer_replacement=True` (or merged).

        The blocks' own parameters are freed and `replacement_coefficients` gains one parameter per
        replaced block: an optimizer built earlier must drop the former and take the latter
        (`ReplacementTrainer(replacement_start_step=...)` does this). Returns `replaced_blocks`.
        """
        if self.replaced_blocks:
            raise ValueError(f"Blocks {sorted(self.replaced_blocks)} are already replaced.")
        _refuse_peft_modules(self)
        if is_sharded(self):
            raise ValueError(
                "This model is sharded with FSDP: replacing blocks now would free weights FSDP manages. Replace "
                "them before sharding (replace_blocks(), then hf_replacement.shard_model)."
            )
        # Planned again here, not at construction: the model may have moved device or dtype since.
        self._replace_planned(select_blocks(self._chains, self.replacement_config, legacy=self._legacy))
        return self.replaced_blocks

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if name == "replacement_coefficients" and "_blocks" in self.__dict__:
            # PEFT's modules_to_save puts a wrapper holding a trainable copy here (and the copy on unload):
            # the replaced blocks read their coefficients through whatever module holds this name.
            for block in self._blocks:
                state = replacement_state(block.module)
                if state is not None:
                    state.coefficients = value

    def _replace_planned(self, plans: list[BlockPlan], initial: dict[int, torch.Tensor] | None = None) -> None:
        """Carry the plans out; `initial`: coefficients by block index to start from (a checkpoint's), not fitted."""
        self._coefficient_fits = {}
        for plan in plans:
            fit = apply_plan(plan, self.replacement_coefficients, (initial or {}).get(plan.block.index))
            if fit is not None:
                self._coefficient_fits[plan.block.index] = fit
        if self._coefficient_fits:
            _log_fit_errors(self.coefficient_fit_errors())

    def coefficient_fit_errors(self) -> dict[int, dict[str, float]]:
        """How well the fitted initial coefficients (`coefficient_init="fit"`) rebuild each replaced
        block's own weights, by block index: `relative_error` ||w - ŵ|| / ||w||, and
        `default_relative_error`, the same with a = b = 0.5. Empty without a fit, and for a model
        loaded with `from_pretrained` (its coefficients come from the checkpoint)."""
        return {
            index: {"relative_error": fit.relative_error, "default_relative_error": fit.default_relative_error}
            for index, fit in sorted(self._coefficient_fits.items())
        }

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    @property
    def config(self) -> Any:
        """The base model's Transformers config."""
        return getattr(self.base_model, "config", None)

    @property
    def generation_config(self) -> Any:
        """The base model's generation config: the one its `generate` reads, set here too (Seq2SeqTrainer sets it)."""
        return getattr(self.base_model, "generation_config", None)

    @generation_config.setter
    def generation_config(self, value: Any) -> None:
        self.base_model.generation_config = value

    @property
    def replaced_blocks(self) -> dict[int, str]:
        """Replaced block index (forward order) -> module name in the base model."""
        return {block.index: block.name for block in self._blocks if is_replaced(block.module)}

    @property
    def num_blocks(self) -> int:
        return len(self._blocks)

    @property
    def chains(self) -> dict[str, list[int]]:
        """Chain name (its list's path, `*` for a stage number) -> its block indices, in forward order.
        A replaced block's neighbours are the blocks before and after it in its chain."""
        return {chain.name: [block.index for block in chain.blocks] for chain in self._chains}

    def get_chains(self) -> list[Chain]:
        """The base model's chains of blocks (`blocks.find_chains`' result)."""
        return list(self._chains)

    def recorded_config(self) -> ReplacementConfig:
        """The config a checkpoint saves: this one with the chains (`block_path`) and the selected blocks
        (`replaced_blocks`) written out, so the checkpoint loads with the same blocks whatever later
        versions of the discovery and of `replace_interval` would choose."""
        return dataclasses.replace(
            self.replacement_config,
            block_path=[list(chain.paths) for chain in self._chains],
            replaced_blocks=list(self._selected),
            format_version=FORMAT_VERSION,
        )

    def get_blocks(self) -> list[Block]:
        """Every block of the base model in forward order, replaced or not (`find_blocks`' result)."""
        return list(self._blocks)

    def get_coefficients(self) -> dict[str, dict[str, torch.Tensor]]:
        """Block name -> {"a": ..., "b": ...}; scalars for "block" granularity, else one entry per column."""
        names = self.replaced_blocks
        result = {}
        for key, parameter in self.replacement_coefficients().named_parameters():
            a, b = parameter.detach().clone()
            if replacement_state(self._blocks[int(key)].module).granularity == "block":
                a, b = a[0], b[0]
            result[names[int(key)]] = {"a": a, "b": b}
        return result

    def synthesized_weights(self, block_index: int) -> dict[str, torch.Tensor]:
        """The weights a replaced block uses now, by parameter name (detached)."""
        block = self._blocks[block_index]
        if not is_replaced(block.module):
            raise ValueError(f"block {block_index} ({block.name}) is not replaced; replaced: {self.replaced_blocks}")
        with torch.no_grad():
            values = synthesize(block.module)
        return {tensor.name: value for tensor, value in zip(replacement_state(block.module).tensors, values)}

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """Transformers' `num_parameters`, the coefficients included (as `get_nb_trainable_parameters` counts them)."""
        base = self.base_model.num_parameters(only_trainable=only_trainable, exclude_embeddings=exclude_embeddings)
        coefficients = [p for p in self.replacement_coefficients.parameters() if p.requires_grad or not only_trainable]
        return base + sum(p.numel() for p in coefficients)

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable parameters, all parameters) as held in memory now."""
        return count_parameters(self)

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        # A user-facing report, like PEFT's print_trainable_parameters.
        print(
            describe_parameters(
                trainable,
                total,
                list(self.replaced_blocks),
                self.num_blocks,
                self._num_unreplaced_parameters,
                self.coefficient_fit_errors(),
            )
        )

    def merge_and_unload(self) -> nn.Module:
        """Write each replaced block's synthesized weights into it and return the plain base model."""
        _refuse_sharded(self, "merge")
        for block in self._blocks:
            if is_replaced(block.module):
                materialize(block.module)
        for module in self.replacement_coefficients.modules():  # also the copies a PEFT wrapper holds
            if isinstance(module, ReplacementCoefficients):
                module.remove_all()
        self._coefficient_fits = {}
        return self.base_model

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        is_main_process: bool = True,
        state_dict: dict[str, torch.Tensor] | None = None,
        *,
        safe_serialization: bool = True,
        max_shard_size: int | str | None = None,
        push_to_hub: bool = False,
        save_function: Callable[..., Any] | None = None,
        **push_kwargs: Any,
    ) -> None:
        """Write `replacement_config.json`, the base config (`base_config.json`, with a guard `config.json`
        that stops Transformers' own loaders) and the compact weights.

        The weights are `model.safetensors`, or with `max_shard_size` (e.g. "2GB") shards and
        `model.safetensors.index.json`, as Transformers writes them. All files are written to temporary
        names first and renamed into place only once every file is complete, so a failed save leaves an
        earlier checkpoint in the directory intact. `push_to_hub=True` then pushes the checkpoint
        (`repo_id=`, default the directory's name, and `push_to_hub`'s other keywords). Only the main process
        (`is_main_process=True`) writes. `save_function` (`accelerator.save` in Transformers' no-trainer
        scripts) is accepted and not called, as by Transformers' safetensors save: safetensors writes the weights.
        """
        del save_function  # see the docstring: Transformers v5 does not call it either
        if not safe_serialization:
            raise ValueError(
                "safe_serialization=False would write a pickle (pytorch_model.bin): hf_replacement saves "
                "safetensors only. Drop the argument."
            )
        if push_kwargs and not push_to_hub:
            raise TypeError(
                f"save_pretrained got unexpected keyword arguments {sorted(push_kwargs)}; it takes state_dict, "
                "max_shard_size, push_to_hub and, with push_to_hub=True, push_to_hub's keywords."
            )
        if _holds_peft_modules(self):
            raise ValueError(
                "This RepL model holds PEFT adapters: save the adapter with peft_model.save_pretrained(dir) (the RepL "
                "checkpoint saved before get_peft_model is its base), or merge both first: "
                "hf_replacement.merge_peft_and_replacement(peft_model).save_pretrained(dir)."
            )
        if state_dict is None and is_sharded(self):
            raise ValueError(
                "This model is sharded with FSDP: its state_dict() holds each process's shards. Gather it on every "
                "process with hf_replacement.gather_state_dict(model) and pass it: "
                "model.save_pretrained(directory, state_dict=..., is_main_process=<rank 0>)."
            )
        if is_main_process:
            files: dict[str, Any] = {CONFIG_NAME: self.recorded_config().to_json_string()}
            if self.config is not None and hasattr(self.config, "to_json_string"):
                config = copy.deepcopy(self.config)  # the architecture to rebuild, without touching the live config
                config.architectures = [type(self.base_model).__name__]
                config.dtype = str(_base_model_dtype(self)).removeprefix("torch.")  # as Transformers v5 records it
                files[BASE_CONFIG_NAME] = config.to_json_string()
                files["config.json"] = _GUARD_CONFIG
            files.update(generation_config_files(self.base_model))
            weights = without_tied_copies(self.state_dict() if state_dict is None else state_dict)[0]
            files.update(weight_files(weights, max_shard_size))
            write_checkpoint(save_directory, files)
            remove_other_weight_files(save_directory, files)
        if push_to_hub and is_main_process:
            repo_id = push_kwargs.pop("repo_id", None) or os.path.basename(os.path.abspath(save_directory))
            self.push_to_hub(repo_id, **push_kwargs)

    def save_merged(self, save_directory: str | os.PathLike) -> None:
        """Save the merged plain Transformers model (`merge_and_unload` of a copy); this model is unchanged."""
        _refuse_sharded(self, "merge")
        plain = copy.deepcopy(self).merge_and_unload()
        if not hasattr(plain, "save_pretrained"):
            raise TypeError(
                f"a merged save needs a Transformers base model; {type(plain).__name__} has no save_pretrained."
            )
        plain.save_pretrained(save_directory)
        share_weight_files(save_directory)

    def card_facts(self) -> CardFacts:
        """What the model card reports: architecture, parameter counts, replaced blocks and coefficients."""
        trainable, total = self.get_nb_trainable_parameters()
        coefficients = self.get_coefficients()
        blocks = tuple(
            {"index": index, "name": name, "a": coefficients[name]["a"], "b": coefficients[name]["b"]}
            for index, name in sorted(self.replaced_blocks.items())
        )
        return CardFacts(
            architecture=type(self.base_model).__name__,
            config=self.config,
            trainable_params=trainable,
            total_params=total,
            unreplaced_params=self._num_unreplaced_parameters,
            granularity=self.replacement_config.coefficient_granularity,
            replaced_blocks=blocks,
            num_blocks=self.num_blocks,
            is_replacement=True,
        )

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        token: str | bool | None = None,
        commit_message: str | None = None,
        merged: bool = False,
        **kwargs: Any,
    ) -> str:
        """Push the compact RepL checkpoint (or with `merged=True` the plain merged Transformers model)
        and its model card to the Hub; return the commit URL. See `hf_replacement.hub.push_to_hub`
        for `revision`, `results`, `base_model`, `datasets` and `image_processor` (uploaded with the model,
        for pipelines); raises `hub.HubPushError` on failure."""
        return push_to_hub(
            self, repo_id, private=private, token=token, commit_message=commit_message, merged=merged, **kwargs
        )

    @classmethod
    def from_pretrained(
        cls,
        pretrained_path: str | os.PathLike,
        model: nn.Module | None = None,
        revision: str | None = None,
        token: str | bool | None = None,
        *,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        subfolder: str = "",
        dtype: torch.dtype | str | None = None,
        torch_dtype: torch.dtype | str | None = None,
        device_map: str | int | torch.device | dict[str, Any] | None = None,
        attn_implementation: str | None = None,
        low_cpu_mem_usage: bool | None = None,
        ignore_mismatched_sizes: bool = False,
        replacement_config: ReplacementConfig | None = None,
        **config_overrides: Any,
    ) -> ReplacementModel:
        """Load a RepL checkpoint written by `save_pretrained`, from a directory or a Hub repo id.

        `model` is a fresh instance of the base architecture; when omitted it is built from the
        checkpoint's `base_config.json` (a Transformers model), with any `config_overrides` set on its
        config (`num_labels=5, id2label=..., label2id=...`; with `ignore_mismatched_sizes=True` the weights
        that no longer fit, the classifier, are initialised anew, as in Transformers). A `pretrained_path`
        that is no local directory but looks like "user/repo" is downloaded (JSON, safetensors and the card
        only) at `revision`, with `token`, into `cache_dir` (or only from the cache: `local_files_only`).
        `subfolder`: the checkpoint's folder. `dtype` (`torch_dtype`, its older name; default "auto", as in
        Transformers v5): the base model's dtype, "auto" for the one it was saved in; the coefficients stay
        fp32. `device_map`: one device for the whole model. `attn_implementation`: "eager", "sdpa", ...
        `low_cpu_mem_usage` is accepted: the weights are always built uninitialised and loaded once.
        `replacement_config` loads a directory of weights only (a plain Trainer's or `accelerator.save_model`'s).
        """
        del low_cpu_mem_usage  # always the case here
        dtype = resolve_dtype(dtype, torch_dtype)
        device = single_device(device_map)
        directory = os.path.join(os.fspath(pretrained_path), subfolder) if subfolder else os.fspath(pretrained_path)
        if not os.path.isdir(directory) and not os.path.isdir(os.fspath(pretrained_path)):
            directory = download_replacement_checkpoint(
                os.fspath(pretrained_path), subfolder, revision, token, cache_dir, local_files_only
            )
        if not os.path.isdir(directory):
            raise FileNotFoundError(
                f"{directory} is not a directory holding a RepL checkpoint ({CONFIG_NAME}, {WEIGHTS_NAME})."
            )
        config_overrides = split_config_overrides(config_overrides, directory, model)
        if replacement_config is None:
            refuse_weights_only_directory(directory)
            replacement_config = ReplacementConfig.from_json_file(os.path.join(directory, CONFIG_NAME))
        if model is None:
            model = build_base_model(directory, config_overrides)
        state_dict = load_weights(directory)
        # A checkpoint saved before a deferred replacement (`replacement_start_step`) has no
        # coefficients yet: it loads as a model whose replacement is still deferred.
        deferred = not any(key.startswith("replacement_coefficients.") for key in state_dict)
        replacement_model = cls(model, replacement_config, defer_replacement=True)
        if not deferred:
            # The coefficients start from the checkpoint's (no fit to the freshly built model's weights). A
            # deferred checkpoint keeps "fit", which `replace_blocks()` applies to the weights it has then.
            prefix = "replacement_coefficients."
            initial = {int(key[len(prefix) :]): value for key, value in state_dict.items() if key.startswith(prefix)}
            plans = select_blocks(replacement_model.get_chains(), replacement_config, legacy=replacement_model._legacy)
            replacement_model._replace_planned(plans, initial)
        load_exact(replacement_model, state_dict, directory, ignore_mismatched_sizes)
        load_generation_config(model, directory)
        if attn_implementation is not None:
            if not hasattr(model, "set_attn_implementation"):
                raise TypeError(f"attn_implementation needs a Transformers base model, got {type(model).__name__}.")
            model.set_attn_implementation(attn_implementation)
        if dtype in (None, "auto"):
            dtype = checkpoint_dtype(state_dict)
        replacement_model.to(device=device, dtype=dtype)  # the coefficients stay fp32
        return replacement_model.eval()  # like Transformers' from_pretrained; call .train() to train


def _base_model_dtype(model: ReplacementModel) -> torch.dtype:
    """The dtype of the base model's floating-point weights (the kept ones: the coefficients are fp32)."""
    for parameter in model.base_model.parameters():
        if parameter.is_floating_point():
            return parameter.dtype
    return torch.float32


class PeftMergeHook(nn.Module):
    """Makes `peft_model.merge_and_unload()` on a RepL model keep its outputs.

    PEFT's unload visits the model's modules in order and lets any module that has
    `unload_and_optionally_merge_module` unload itself; this one comes before the base model, so it runs
    before any adapter is merged into a replaced block's neighbours. It materializes the replaced blocks
    from the neighbours as they are (without the adapter), as `merge_peft_and_replacement` does; the
    adapter is merged after. It holds no weights; PEFT puts it back in its place.
    """

    weight = None  # PEFT's generic `_replace_module` copies `weight` from the module it puts back

    def __init__(self, model: ReplacementModel) -> None:
        super().__init__()
        self.__dict__["_model"] = model  # not a submodule: the model holds this hook

    def unload_and_optionally_merge_module(
        self, merge: bool, safe_merge: bool = False, adapter_names: list[str] | None = None
    ) -> PeftMergeHook:
        model = self.__dict__["_model"]
        if merge and model.replaced_blocks:
            logger.info(
                "PEFT merge on a RepL model: the replaced blocks %s are materialized first, from their neighbours "
                "without the adapter (as hf_replacement.merge_peft_and_replacement does).",
                sorted(model.replaced_blocks),
            )
            model.merge_and_unload()
        return self


def _refuse_sharded(model: ReplacementModel, action: str) -> None:
    if is_sharded(model):
        raise ValueError(
            f"This model is sharded with FSDP: {action} a whole model instead. Save it (gather_state_dict on every "
            "process, save_pretrained(directory, state_dict=...) on the main one) and "
            f"{action} ReplacementModel.from_pretrained(directory)."
        )


def _log_fit_errors(errors: dict[int, dict[str, float]]) -> None:
    logger.info("Fitted initial coefficients, relative reconstruction error: %s", describe_fit_errors(errors))
    poor = [index for index, error in errors.items() if error["relative_error"] > POOR_FIT_RELATIVE_ERROR]
    if poor:
        logger.warning(
            "coefficient_init=%r: the neighbours explain little of block(s) %s (relative error above %s): these "
            "replaced blocks start far from the weights they had, whatever the coefficients.",
            FIT,
            poor,
            POOR_FIT_RELATIVE_ERROR,
        )


# See loading.GUARD_MODEL_TYPE: Transformers reads `model_type` first and names it in its error.
_GUARD_CONFIG = json.dumps({"model_type": GUARD_MODEL_TYPE, "architectures": ["ReplacementModel"]}, indent=2) + "\n"


def coefficient_logs(model: nn.Module) -> dict[str, float]:
    """`replacement/a/block_<i>`, `replacement/b/block_<i>`: each replaced block's coefficients (means).

    Empty for a model without replaced blocks, so a baseline run logs the same way. On a model
    sharded with FSDP every process must call it (the coefficients are gathered).
    """
    if not isinstance(model, ReplacementModel):
        return {}
    # A forward without backward (evaluation) leaves FSDP's root unit gathered, its parameters the
    # compute copies (bf16 under mixed precision): read the fp32 shards instead.
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
    logs = {}
    for index, parameter in model.replacement_coefficients().named_parameters():
        if isinstance(parameter, DTensor):  # sharded with FSDP: every process takes part
            parameter = parameter.full_tensor()
        a, b = parameter.detach().float().mean(dim=1).tolist()
        logs[f"{LOG_PREFIX}a/block_{index}"] = a
        logs[f"{LOG_PREFIX}b/block_{index}"] = b
    return logs


def _holds_peft_modules(model: nn.Module) -> bool:
    return any(type(module).__module__.startswith("peft.") for module in model.modules())


def _refuse_merged_adapters(model: ReplacementModel) -> None:
    """PEFT's `merge_adapter()` adds the adapter into the weights the replaced blocks are synthesized from,
    which changes those blocks without a word: stop the forward instead. PEFT's tuner layers list their
    merged adapters in `merged_adapters`; only the replaced blocks' neighbours are scanned (the synthesis
    reads nothing else), which keeps this off the cost of a whole-model walk on every forward."""
    sources = []
    for index in model.replaced_blocks:
        plan = replacement_state(model._blocks[index].module).plan
        sources += [plan.previous.module, plan.next.module]
    if any(getattr(module, "merged_adapters", None) for source in sources for module in source.modules()):
        raise ValueError(
            "An adapter is merged into this RepL model's weights (peft_model.merge_adapter()): the replaced blocks "
            f"{sorted(model.replaced_blocks)} would be synthesized from the merged neighbours, which changes their "
            "outputs. Call peft_model.unmerge_adapter() and run unmerged, or merge for good with "
            "peft_model.merge_and_unload() or hf_replacement.merge_peft_and_replacement(peft_model)."
        )


def _refuse_peft_modules(model: nn.Module) -> None:
    if _holds_peft_modules(model):
        raise ValueError(
            "This model holds PEFT modules (a PeftModel or LoRA layers): replacing its blocks would silently drop "
            "the replaced blocks' base and adapter weights. Apply RepL to the plain model first, then PEFT on top: "
            "get_peft_model(repl_model, hf_replacement.prepare_peft_config(repl_model, peft_config))."
        )


def _sub_model_class_names() -> set[str]:
    """Transformers' base models and backbones: the classes that also live inside task models."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_BACKBONE_MAPPING_NAMES, MODEL_MAPPING_NAMES

    names: set[str] = set()
    for value in (*MODEL_MAPPING_NAMES.values(), *MODEL_FOR_BACKBONE_MAPPING_NAMES.values()):
        names.update([value] if isinstance(value, str) else value)
    return names


def _parent(module: nn.Module) -> tuple[nn.Module, str] | None:
    """The module holding `module` as a submodule, and under which name; None for a top-level module.

    Walks the garbage collector's referrers: an owner refers to its `_modules` dict directly, or through
    its instance `__dict__`. A `ReplacementModel` wrapping `module` (a merged model its former wrapper
    still holds) does not count.
    """
    for referrer in gc.get_referrers(module):
        if not isinstance(referrer, dict):
            continue
        attribute = next((key for key, value in referrer.items() if value is module), None)
        if attribute is None:
            continue
        candidates = gc.get_referrers(referrer)
        candidates += [owner for holder in candidates if isinstance(holder, dict) for owner in gc.get_referrers(holder)]
        for owner in candidates:
            if isinstance(owner, nn.Module) and owner._modules is referrer and not isinstance(owner, ReplacementModel):
                return owner, attribute
    return None


def refuse_submodule(model: nn.Module) -> None:
    """Refuse to convert a Transformers base model or backbone that is a submodule of another model
    (`upernet.backbone`): the coefficients would live outside the outer model, which would neither
    train nor save them, and its `save_pretrained` would write no replaced block.

    Only those classes are checked: finding a module's owner walks the garbage collector's objects
    (a fraction of a second), too slow to pay on every conversion.
    """
    if type(model).__name__ not in _sub_model_class_names():
        return
    names, outer = [], model
    while (found := _parent(outer)) is not None:
        outer, name = found
        names.insert(0, name)
    if not names:
        return
    path = ".".join(names)
    raise ValueError(
        f"This {type(model).__name__} is the submodule {path!r} of a {type(outer).__name__}: converted alone, its "
        f"RepL coefficients would not be among the {type(outer).__name__}'s parameters (an optimizer over them never "
        "trains them) and its save_pretrained would write neither them nor the replaced blocks. Convert the whole "
        f"model instead: get_replacement_model(outer_model, ReplacementConfig(target_chains=[{path!r}])) replaces "
        f"blocks only in the chains under {path!r} (ReplacementModel.chains lists them), and trains, saves and "
        "merges the whole task model."
    )


def get_replacement_model(model: nn.Module, config: ReplacementConfig | None = None) -> ReplacementModel:
    """Replace the blocks `config` selects in `model` and return the wrapping `ReplacementModel`."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"get_replacement_model needs an nn.Module, got {type(model).__name__}.")
    return ReplacementModel(model, config if config is not None else ReplacementConfig())


__all__ = ["LOG_PREFIX", "ReplacementModel", "coefficient_logs", "get_replacement_model"]
