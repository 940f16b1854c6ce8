"""The plain-model baselines RepL is compared with at equal cost: stochastic depth at drop-k's expected depth
(`sd`) and a narrower model at RepL's trainable parameter count (`narrow`)."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from hf_replacement import find_blocks

from .errors import BenchmarkError


class StochasticDepthMixin:
    """Swapped in front of a residual block's class: in training the whole block is skipped (its output is its
    input) with probability `drop_probability`, one draw per call, i.e. per block and batch, which saves the
    block's compute; a kept block's residual branch, `output - input`, is scaled by 1 / (1 - p) so that its
    expectation is the unscaled branch, and inference (eval mode) runs the block as it is. This is stochastic
    depth (Huang et al., 2016) with the inverted scaling of timm's `DropPath`, dropping for the whole batch as
    the original did (per-sample masks would run every block and save no time)."""

    drop_probability: float

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not self.training or self.drop_probability == 0:
            return super().forward(hidden_states, *args, **kwargs)
        # A CPU draw from the global generator: seeded with the run, no device synchronisation.
        if float(torch.rand(())) < self.drop_probability:
            return hidden_states
        output = super().forward(hidden_states, *args, **kwargs)
        return hidden_states + (output - hidden_states) / (1 - self.drop_probability)


_STOCHASTIC_DEPTH_CLASSES: dict[type, type] = {}  # block class -> its stochastic-depth subclass
_ORIGINAL_CLASSES: dict[type, type] = {}  # and back


def _stochastic_depth_class(cls: type) -> type:
    if cls not in _STOCHASTIC_DEPTH_CLASSES:
        swapped = type(f"StochasticDepth{cls.__name__}", (StochasticDepthMixin, cls), {})
        _STOCHASTIC_DEPTH_CLASSES[cls], _ORIGINAL_CLASSES[swapped] = swapped, cls
    return _STOCHASTIC_DEPTH_CLASSES[cls]


def skippable_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks of `model` whose output has their input's shape, so that skipping one passes its input on: all
    but those with a projection shortcut (a ResNet stage's first block changes channels and resolution)."""
    return [
        block.module for block in find_blocks(model)
        if isinstance(getattr(block.module, "shortcut", None), (nn.Identity, type(None)))
    ]


def apply_stochastic_depth(model: nn.Module, drop_probability: float) -> nn.Module:
    """Give every skippable block of `model` (`skippable_blocks`) stochastic depth with `drop_probability`, in
    place (weights and state-dict keys unchanged: the blocks' classes are swapped, as RepL swaps a replaced
    block's); return the model."""
    if not 0 <= drop_probability < 1:
        raise BenchmarkError(
            f"drop_probability={drop_probability} is outside [0, 1): a block must run with a non-zero probability."
        )
    for module in skippable_blocks(model):
        if not isinstance(module, StochasticDepthMixin):
            module.__class__ = _stochastic_depth_class(type(module))
        module.drop_probability = drop_probability
    return model


def remove_stochastic_depth(model: nn.Module) -> nn.Module:
    """The plain model back (blocks' classes restored), in place: what is deployed after training."""
    for module in model.modules():
        if isinstance(module, StochasticDepthMixin):
            module.__class__ = _ORIGINAL_CLASSES[type(module)]
            del module.drop_probability
    return model


@contextlib.contextmanager
def full_depth(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, every stochastic-depth block of `model` runs (p = 0): memory is measured at the depth a
    run must provision for, the step where no block is skipped. A model without stochastic depth is unchanged."""
    blocks = [module for module in model.modules() if isinstance(module, StochasticDepthMixin)]
    probabilities = [block.drop_probability for block in blocks]
    for block in blocks:
        block.drop_probability = 0.0
    try:
        yield model
    finally:
        for block, probability in zip(blocks, probabilities):
            block.drop_probability = probability


def _width_fields(config: Any) -> tuple[str, list[int]]:
    """The config field holding the model's widths and their values: ConvNeXt's per-stage `hidden_sizes`, or a
    transformer's `hidden_size` (its MLP width, `intermediate_size` or GPT-2's `n_inner`, follows at the same ratio)."""
    if isinstance(getattr(config, "hidden_sizes", None), (list, tuple)):
        return "hidden_sizes", list(config.hidden_sizes)
    if isinstance(getattr(config, "hidden_size", None), int) and hasattr(config, "num_attention_heads"):
        return "hidden_size", [config.hidden_size]
    raise BenchmarkError(
        f"narrow: no width field known for model type {getattr(config, 'model_type', None)!r} "
        "(handled: ConvNeXt's hidden_sizes, a transformer's hidden_size with num_attention_heads)."
    )


def narrowed_config(config: Any, width: int) -> Any:
    """`config` with its first width set to `width` and every other width scaled by the same factor.

    A transformer keeps its number of heads (narrower heads), so `width` must be a multiple of it; its MLP
    keeps its ratio to the hidden size. ConvNeXt's stage widths keep their ratios to the first stage's.
    """
    field, widths = _width_fields(config)
    narrowed = copy.deepcopy(config)
    if field == "hidden_sizes":
        narrowed.hidden_sizes = [max(1, round(w * width / widths[0])) for w in widths]
        heads = getattr(config, "num_attention_heads", None)
        if isinstance(heads, (list, tuple)) and any(w % h for w, h in zip(narrowed.hidden_sizes, heads)):
            # SegFormer: a stage of width w with h heads attends over h * (w // h) features, not w.
            raise BenchmarkError(
                f"narrow: stage widths {narrowed.hidden_sizes} are not all multiples of the stages' heads "
                f"{list(heads)}; a model with attention heads per stage cannot be narrowed by one factor."
            )
        return narrowed
    if width % config.num_attention_heads:
        raise BenchmarkError(f"narrow: width {width} is not a multiple of the {config.num_attention_heads} heads.")
    mlp = _mlp_field(config)
    narrowed.hidden_size = width
    if getattr(config, mlp) is not None:  # GPT-2's n_inner=None is 4 x the hidden size: it follows by itself
        setattr(narrowed, mlp, round(getattr(config, mlp) * width / widths[0]))
    return narrowed


def _mlp_field(config: Any) -> str:
    """A transformer config's MLP width field: `intermediate_size`, or GPT-2's `n_inner`."""
    for name in ("intermediate_size", "n_inner"):
        if hasattr(config, name):
            return name
    raise BenchmarkError(
        f"narrow: no MLP width field known for model type {getattr(config, 'model_type', None)!r} (handled: "
        "intermediate_size, GPT-2's n_inner); a model with several widths (DETR's d_model, FFN and backbone) "
        "cannot be narrowed by one factor here."
    )


def _parameter_count(model_class: type, config: Any) -> int:
    # Built on the meta device: shapes only, no memory, no initialisation cost (ViT-B size in milliseconds).
    with torch.device("meta"):
        return sum(p.numel() for p in model_class(config).parameters())


def narrow_width(model: nn.Module, target_params: int) -> tuple[int, int]:
    """The first width (see `narrowed_config`) whose model has the parameter count closest to `target_params`
    (the smaller width on a tie), and that count. Counts grow with width, so a binary search finds it."""
    field, widths = _width_fields(model.config)
    step = model.config.num_attention_heads if field == "hidden_size" else 1
    candidates = list(range(step, widths[0] + 1, step))

    def count(width: int) -> int:
        return _parameter_count(type(model), narrowed_config(model.config, width))

    low, high = 0, len(candidates) - 1  # the first candidate whose count reaches the target
    while low < high:
        middle = (low + high) // 2
        if count(candidates[middle]) >= target_params:
            high = middle
        else:
            low = middle + 1
    options = [(width, count(width)) for width in candidates[max(0, low - 1):low + 1]]
    return min(options, key=lambda option: (abs(option[1] - target_params), option[0]))


def build_narrow_model(model: nn.Module, target_params: int) -> tuple[nn.Module, dict[str, Any]]:
    """A new plain model of `model`'s class and depth, narrowed to about `target_params` parameters and
    initialised from the current RNG state; and what was chosen (widths, target and actual counts)."""
    width, params = narrow_width(model, target_params)
    config = narrowed_config(model.config, width)
    field, _ = _width_fields(config)
    narrow = type(model)(config)
    details = {"width_field": field, "widths": getattr(config, field), "target_params": target_params,
               "params": params}
    if field == "hidden_size":
        details[_mlp_field(config)] = getattr(config, _mlp_field(config))
    return narrow, details
