"""The compared methods and how each turns the plain preset into the model it trains."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hf_replacement import (
    ReplacementConfig,
    ReplacementModel,
    find_blocks,
    find_chains,
    get_replacement_model,
    merge_peft_and_replacement,
    prepare_peft_config,
)
from hf_replacement.commands.presets import build_preset_model
from hf_replacement.config import DEFAULT_COEFFICIENT_INIT, FIT
from hf_replacement.loading import load_image_classifier
from hf_replacement.selection import select_blocks
from hf_replacement.utils import count_parameters

from .baselines import apply_stochastic_depth, build_narrow_model, remove_stochastic_depth, skippable_blocks
from .errors import BenchmarkError
from .tasks import TASK_MODELS


@dataclass(frozen=True)
class Method:
    """One way of training: `kind` is bp, repl, drop, freeze, sd, narrow or lora; `interval` the k of RepL's
    blocks (for sd and narrow: the repl-k / drop-k whose cost they match); `surrogate` what a replaced block
    computes (`ReplacementConfig.surrogate`); `coefficient_init` RepL's initial (a, b) or "fit";
    `fixed_coefficients`: the coefficients kept at their initial value, not trained; `lora`: LoRA on top of
    RepL (PEFT on the kept blocks, `prepare_peft_config`)."""

    name: str
    kind: str
    interval: int | None = None
    recompute: bool = False
    surrogate: str = "block"
    coefficient_init: tuple[float, float] | str = DEFAULT_COEFFICIENT_INIT
    fixed_coefficients: bool = False
    lora: bool = False

    def describe(self) -> str:
        """What the method trains, in one line (the README's table)."""
        text = KIND_DESCRIPTIONS[self.kind].format(k=self.interval) + SURROGATE_DESCRIPTIONS.get(self.surrogate, "")
        if self.fixed_coefficients:
            text += (f", its coefficients fixed at a={self.coefficient_init[0]:g}, b={self.coefficient_init[1]:g} "
                     "(not trained): each replaced block reuses its previous neighbour's weights, plain "
                     "cross-layer sharing (ALBERT-style tying)")
        if self.coefficient_init == FIT:
            text += ', its coefficients fitted to the (pretrained) weights at conversion (`coefficient_init="fit"`)'
        if self.lora:
            text += "; then LoRA as `lora` on the kept blocks, the coefficients and classifier trained fully"
        return text + (", the replaced blocks' activations recomputed in backward" if self.recompute else "")


# What each kind of method does to the plain model, `{k}` its interval.
KIND_DESCRIPTIONS = {
    "bp": "ordinary training: back-propagation through the whole plain model",
    "repl": "Replacement Learning, one block in {k} replaced (`replace_interval={k}`)",
    "drop": "the blocks `repl-k{k}` replaces deleted: a shallower model, the ablation RepL must beat",
    "freeze": "the blocks `repl-k{k}` replaces kept at their initial weights, not trained",
    "sd": "stochastic depth on the plain model: in training each block skipped with probability p (one draw per "
          "block and batch, the kept residual branch scaled by 1/(1-p)), p chosen so the expected number of "
          "executed blocks equals `drop-k{k}`'s; inference runs every block, unscaled",
    "narrow": "the plain model at the same depth, narrowed (all widths by one factor, heads kept) to the width "
              "whose parameter count is closest to `repl-k{k}`'s trainable count",
    "lora": "PEFT LoRA (r=8) on the attention q/v projections (ViT/DeiT) or the pointwise layers (ConvNeXt), "
            "the classifier trained fully",
}
SURROGATE_DESCRIPTIONS = {
    "mlp": ", each computing a lighter surrogate (`surrogate=\"mlp\"`): its MLP sub-block only, the token mixer "
           "(attention; ConvNeXt's depthwise conv) skipped",
    "half": ", each computing a lighter surrogate (`surrogate=\"half\"`): its MLP sub-block at half its hidden width, "
            "the token mixer skipped",
}

METHODS: dict[str, Method] = {
    "bp": Method("bp", "bp"),
    "repl-k4": Method("repl-k4", "repl", 4),
    "repl-k3": Method("repl-k3", "repl", 3),
    "repl-k4-mlp": Method("repl-k4-mlp", "repl", 4, surrogate="mlp"),
    "repl-k4-half": Method("repl-k4-half", "repl", 4, surrogate="half"),
    "repl-k4-recompute": Method("repl-k4-recompute", "repl", 4, recompute=True),
    "repl-k3-recompute": Method("repl-k3-recompute", "repl", 3, recompute=True),
    "drop-k4": Method("drop-k4", "drop", 4),
    "drop-k3": Method("drop-k3", "drop", 3),
    "freeze-k4": Method("freeze-k4", "freeze", 4),
    "freeze-k3": Method("freeze-k3", "freeze", 3),
    "tie-k4": Method("tie-k4", "repl", 4, coefficient_init=(1.0, 0.0), fixed_coefficients=True),
    "sd": Method("sd", "sd", 4),
    "narrow": Method("narrow", "narrow", 4),
    "repl-k4-fit": Method("repl-k4-fit", "repl", 4, coefficient_init=FIT),
    "lora": Method("lora", "lora"),
    "lora-repl-k4-fit": Method("lora-repl-k4-fit", "repl", 4, coefficient_init=FIT, lora=True),
}
METHOD_ALIASES = {"repl": "repl-k4", "drop": "drop-k4", "freeze": "freeze-k4", "baseline": "bp"}
DEFAULT_METHODS = (
    "bp", "repl-k4", "repl-k4-mlp", "repl-k4-half", "repl-k3", "repl-k4-recompute", "drop-k4", "drop-k3", "freeze-k4",
    "lora",
)
# The equal-cost baselines RepL must beat besides dropping its blocks: plain tying, stochastic depth at drop-k4's
# expected depth, a plain model narrowed to repl-k4's trainable parameters.
BASELINE_METHODS = ("tie-k4", "sd", "narrow")
# Fine-tuning a pretrained model (the transfer suite): RepL with and without fitted coefficients.
TRANSFER_METHODS = ("bp", "repl-k4", "repl-k4-fit", "drop-k4", "lora", "lora-repl-k4-fit")

# The replaced blocks whose forward FLOPs the benchmark compares across methods (repl-k4 and its surrogates).
FLOPS_INTERVAL = 4

LORA_RANK = 8
# PEFT has no default LoRA targets for v5 ViT (DESIGN.md §3): name them per architecture.
LORA_TARGETS = {"vit": ["q_proj", "v_proj"], "deit": ["q_proj", "v_proj"], "convnext": ["pwconv1", "pwconv2"]}
LORA_FROM_SCRATCH_NOTE = (
    "from scratch: LoRA adapts a random, frozen network (shown for parameter/memory/time comparison "
    "only; its accuracy says nothing about LoRA fine-tuning of a pretrained model)"
)


def resolve_methods(names: Sequence[str]) -> list[str]:
    """Canonical method names, aliases resolved and duplicates dropped; raise on an unknown name."""
    resolved: list[str] = []
    for raw in names:
        for name in (part.strip() for part in raw.split(",")):
            if not name:
                continue
            name = METHOD_ALIASES.get(name, name)
            if name not in METHODS:
                raise BenchmarkError(
                    f"Unknown method {name!r}; choose from {', '.join(METHODS)} (aliases: {METHOD_ALIASES})."
                )
            if name not in resolved:
                resolved.append(name)
    if not resolved:
        raise BenchmarkError("No method given.")
    return resolved


@dataclass
class MethodModel:
    """The module a method trains, and what the method did to the plain model."""

    method: Method
    model: nn.Module
    num_blocks: int  # blocks of the plain model
    affected_blocks: list[int]  # replaced / dropped / frozen block indices (forward order)
    plain_params: int  # parameters of the plain model before the method was applied
    details: dict[str, Any] = dataclasses.field(default_factory=dict)  # e.g. sd's p, narrow's widths


def replacement_of(model: nn.Module) -> ReplacementModel | None:
    """The RepL model `model` is or wraps (a PeftModel on a ReplacementModel), else None."""
    if isinstance(model, ReplacementModel):
        return model
    get_base_model = getattr(model, "get_base_model", None)
    inner = get_base_model() if callable(get_base_model) else None
    return inner if isinstance(inner, ReplacementModel) else None


def replaced_block_indices(model: nn.Module, interval: int) -> list[int]:
    """The blocks RepL with `replace_interval=interval` replaces in `model` (planned, nothing changed)."""
    plans = select_blocks(find_chains(model), ReplacementConfig(replace_interval=interval))
    return [plan.block.index for plan in plans]


def drop_blocks(model: nn.Module, indices: Sequence[int]) -> nn.Module:
    """Delete blocks `indices` (forward order) from their `nn.ModuleList`s, in place; return the model.

    HF ViT, DeiT and ConvNeXt iterate their `layers` lists (Transformers 5.23; tested), so the
    forward runs the remaining blocks. The config's `num_hidden_layers` / `depths` are updated so
    `save_pretrained` writes a model that loads back with its new depth.
    """
    blocks = find_blocks(model)
    doomed = set(indices)
    if not doomed <= {block.index for block in blocks}:
        raise BenchmarkError(
            f"drop_blocks: {sorted(doomed)} are not all block indices of this {len(blocks)}-block model."
        )
    # Group the blocks by their container, keeping container order (ConvNeXt: one list per stage).
    containers: dict[str, list[int]] = {}
    for block in blocks:
        parent, _, position = block.name.rpartition(".")
        containers.setdefault(parent, [])
        if block.index in doomed:
            containers[parent].append(int(position))
    for parent, positions in containers.items():
        container = model.get_submodule(parent)
        if len(positions) == len(container):
            raise BenchmarkError(f"drop_blocks would empty {parent}; choose fewer blocks.")
        for position in sorted(positions, reverse=True):  # ModuleList renumbers after each delete
            del container[position]
        # A decoder's blocks index its key/value cache by `layer_idx` (GPT-2, Llama): number the kept ones afresh.
        for new_index, block in enumerate(container):
            for module in block.modules():
                if isinstance(getattr(module, "layer_idx", None), int):
                    module.layer_idx = new_index
    config = getattr(model, "config", None)
    depths = getattr(config, "depths", None)
    if isinstance(depths, (list, tuple)) and len(depths) == len(containers):
        config.depths = [len(model.get_submodule(parent)) for parent in containers]
    elif isinstance(getattr(config, "num_hidden_layers", None), int) and len(containers) == 1:
        config.num_hidden_layers = sum(len(model.get_submodule(parent)) for parent in containers)
    # Otherwise (DETR: backbone stages, encoder and decoder under one config) the config keeps the old depths:
    # what is saved does not load back at the new depth, which no benchmark measurement needs.
    return model


def freeze_blocks(model: nn.Module, indices: Sequence[int]) -> nn.Module:
    """Stop training blocks `indices`: `requires_grad=False` on their parameters (kept at initialisation)."""
    blocks = find_blocks(model)
    for index in indices:
        for parameter in blocks[index].module.parameters():
            parameter.requires_grad_(False)
    return model


def apply_lora(model: nn.Module, rank: int = LORA_RANK) -> nn.Module:
    """PEFT LoRA on the architecture's projections; the classifier is trained fully (`modules_to_save`).
    On a RepL model the replaced blocks are left out and the coefficients trained (`prepare_peft_config`)."""
    from peft import LoraConfig, get_peft_model

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in LORA_TARGETS:
        raise BenchmarkError(
            f"No LoRA target modules known for model type {model_type!r} (known: {sorted(LORA_TARGETS)})."
        )
    config = LoraConfig(
        r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=LORA_TARGETS[model_type],
        modules_to_save=["classifier"],
    )
    if isinstance(model, ReplacementModel):
        config = prepare_peft_config(model, config)
    return get_peft_model(model, config)


def build_method_model(
    method: Method | str,
    model_name: str,
    num_labels: int,
    image_size: int,
    num_channels: int,
    seed: int,
    id2label: dict[int, str] | None = None,
    pretrained: str | None = None,
) -> MethodModel:
    """The plain preset (or task model, `tasks.TASK_MODELS`) built with `seed` (identical for every method),
    then changed by `method`.

    `pretrained`: a directory holding this preset's weights trained on another task (`transfer.pretrain`);
    its weights replace the random ones, all but the classification head, which stays the seeded random
    head for `num_labels` classes.
    """
    method = METHODS[method] if isinstance(method, str) else method
    if pretrained is not None and method.kind == "narrow":
        raise BenchmarkError(
            f"{method.name} builds a new, narrower model: no pretrained weights exist at its width, so it cannot "
            f"fine-tune from {pretrained}. Leave it out of a transfer suite (it is a from-scratch baseline)."
        )
    torch.manual_seed(seed)
    if model_name in TASK_MODELS:  # a task's model: its config fixes its labels and input size
        model = TASK_MODELS[model_name]()
    else:
        model = build_preset_model(model_name, num_labels, image_size, num_channels, id2label)
    if pretrained is not None:
        load_body(model, pretrained)
    return apply_method(method, model)


def load_body(model: nn.Module, directory: str) -> None:
    """Load every weight of the Transformers model saved in `directory` but the classification head into
    `model` (strict otherwise). Read through Transformers, which maps the saved key names to the current ones."""
    saved = load_image_classifier(directory).state_dict()
    weights = {key: value for key, value in saved.items() if not key.startswith("classifier.")}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [key for key in missing if not key.startswith("classifier.")]
    if missing or unexpected:
        raise BenchmarkError(
            f"{directory} does not hold this model's weights (missing {missing[:5]}, unexpected {unexpected[:5]}); "
            "delete it to pretrain again."
        )


def apply_method(method: Method, model: nn.Module) -> MethodModel:
    """Turn the plain `model` into what `method` trains (in place where it can)."""
    num_blocks = len(find_blocks(model))
    plain_params = count_parameters(model)[1]
    affected: list[int] = []
    details: dict[str, Any] = {}
    if method.kind in ("drop", "freeze", "repl", "sd"):
        affected = replaced_block_indices(model, method.interval)
    if method.kind == "repl":
        config = ReplacementConfig(
            replace_interval=method.interval,
            recompute_replaced=method.recompute,
            surrogate=method.surrogate,
            coefficient_init=method.coefficient_init,
        )
        model = get_replacement_model(model, config)
        if method.fixed_coefficients:
            model.replacement_coefficients.requires_grad_(False)
        if method.lora:
            model = apply_lora(model)
    elif method.kind == "drop":
        model = drop_blocks(model, affected)
    elif method.kind == "freeze":
        model = freeze_blocks(model, affected)
    elif method.kind == "sd":
        # Uniform over the blocks that can be skipped: the expected number skipped equals what drop-k drops.
        # `affected` stays empty: no block is singled out.
        details["drop_probability"] = len(affected) / len(skippable_blocks(model))
        model = apply_stochastic_depth(model, details["drop_probability"])
        affected = []
    elif method.kind == "narrow":
        model, details = build_narrow_model(model, repl_trainable_params(model, method.interval))
    elif method.kind == "lora":
        model = apply_lora(model)
    return MethodModel(method, model, num_blocks, affected, plain_params, details)


def repl_trainable_params(model: nn.Module, interval: int) -> int:
    """Trainable parameters of `model` under RepL with `replace_interval=interval` (counted on a copy)."""
    replaced = get_replacement_model(copy.deepcopy(model), ReplacementConfig(replace_interval=interval))
    return count_parameters(replaced)[0]


def inference_model(built: MethodModel) -> nn.Module:
    """The model deployed after training: RepL and LoRA merged into the plain architecture."""
    model = built.model
    if built.method.lora:
        return merge_peft_and_replacement(model)
    if isinstance(model, ReplacementModel) or built.method.kind == "lora":
        return model.merge_and_unload()
    if built.method.kind == "sd":
        return remove_stochastic_depth(model)
    return model

