"""Lighter surrogates: what a replaced block computes instead of its whole forward (`ReplacementConfig.surrogate`).

`surrogate="block"` (the default, the 2024 reading of RepL) runs the block's own forward with all of its
weights synthesized. The 2026 paper instead describes "a lightweight computing layer" built from the
neighbours' parameters. Here a lighter surrogate is a *part* of the block, so that it keeps the block's
residual path, output shape and submodules (norms, layer scale, drop path), and so that a plain
model of the same architecture can hold it (`merge_and_unload`):

- `"mlp"`: the token mixer (self-attention; ConvNeXt's depthwise convolution) is skipped, the
  channel MLP sub-block runs with its norm, layer scale and drop path. Merged, the token mixer's
  parameters are zero (an attention branch that adds exactly zero) or an identity kernel.
- `"half"`: as `"mlp"`, with the MLP's first half of hidden units only (the rest are zero when
  merged); ResNet, which has no separate token mixer, runs its bottleneck (or basic block) at half
  its inner width.

Each family below lists its token mixer's parameters (not used: freed and never synthesized) and
the dimensions along which the MLP's hidden units run (narrowed by `"half"`: the synthesized tensor
is built from the leading half of the neighbours' tensors, `fusion.DimNarrow`). The forward runs
with the used tensors' synthesized values attached, as the block's own forward does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .config import SURROGATES, ReplacementConfigError

try:  # how Transformers v5 records per-layer outputs (output_attentions=True): read to report a stand-in
    from transformers.utils.output_capturing import _active_collector
except ImportError:  # another Transformers: no stand-in is reported
    _active_collector = None


@dataclass(frozen=True)
class Family:
    """The blocks of one architecture, and how its lighter surrogates are computed."""

    name: str
    classes: tuple[str, ...]  # qualified class names, "module.Class", matched along the block's MRO
    surrogates: tuple[str, ...]
    forward: Callable[..., Any]  # (block, *the block's forward arguments) -> the block's output
    mixer: tuple[str, ...] = ()  # parameter names (or their submodules' names) of the token mixer
    hidden: dict[str, tuple[int, ...]] = field(default_factory=dict)  # parameter -> dims of hidden units
    # (block, *forward arguments) -> the attention probabilities the skipped token mixer reports as, for
    # `output_attentions=True`; None where the block reports its attention in its own output (Swin) or has none.
    attention: Callable[..., torch.Tensor] | None = None

    def uses(self, name: str) -> bool:
        return not any(name == prefix or name.startswith(prefix + ".") for prefix in self.mixer)

    def shape(self, surrogate: str, name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape of parameter `name` in `surrogate`: its leading half along the hidden units for "half"."""
        if surrogate != "half":
            return tuple(shape)
        dims = self.hidden.get(name, ())
        return tuple(half_width(size) if dim in dims else size for dim, size in enumerate(shape))


def half_width(size: int) -> int:
    return max(1, size // 2)


def _vit_mlp(block: nn.Module, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """ViT, DeiT: x + dropout(mlp(layernorm_after(x))), the block's second residual branch."""
    return hidden_states + block.dropout(block.mlp(block.layernorm_after(hidden_states)))


def _beit_mlp(block: nn.Module, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """BEiT: x + drop_path(lambda_2 · dropout(mlp(layernorm_after(x)))); lambda_2 is 1.0 without layer scale."""
    branch = block.lambda_2 * block.dropout(block.mlp(block.layernorm_after(hidden_states)))
    return block.drop_path(branch) + hidden_states


def _dinov2_mlp(block: nn.Module, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """DINOv2: x + drop_path(layer_scale2(mlp(norm2(x)))), the MLP a GELU MLP or a SwiGLU."""
    return block.drop_path(block.layer_scale2(block.mlp(block.norm2(hidden_states)))) + hidden_states


def _swin_mlp(
    block: nn.Module, hidden_states: torch.Tensor, input_dimensions: tuple[int, int], *args: Any, **kwargs: Any
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Swin: x + dropout(mlp(layernorm_after(x))), returned as the layer returns it, with the stand-in
    attention weights when they are recorded (a Swin stage reports its last block's attention)."""
    output = hidden_states + block.dropout(block.mlp(block.layernorm_after(hidden_states)))
    always_partition = args[0] if args else kwargs.get("always_partition", False)
    if not attentions_requested():
        return output, None
    return output, _swin_merged_attention(block, hidden_states, input_dimensions, always_partition)


def attentions_requested() -> bool:
    """Whether Transformers is recording attention weights now (`output_attentions=True` on the model)."""
    collected = _active_collector.get() if _active_collector is not None else None
    return bool(collected) and "attentions" in collected


def _uniform_attention(block: nn.Module, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """The attention a merged ViT-like block computes where the surrogate skips it: its query and key weights
    are zero, so every position attends to every position equally, 1/sequence length."""
    heads = _attention_heads(block)
    batch, length = hidden_states.shape[:2]
    return hidden_states.new_full((batch, heads, length, length), 1.0 / length)


def _attention_heads(block: nn.Module) -> int:
    return next(m.num_attention_heads for m in block.attention.modules() if hasattr(m, "num_attention_heads"))


def _swin_merged_attention(
    block: nn.Module, hidden_states: torch.Tensor, input_dimensions: tuple[int, int], always_partition: bool
) -> torch.Tensor:
    """The attention weights a merged Swin block computes where the surrogate skips it: zero query, key and
    relative position bias leave only the shifted-window mask, so each position attends equally within its
    region of the window (uniformly without a shift), shaped as SwinLayer reports them."""
    if not always_partition:
        block.set_shift_and_window_size(input_dimensions)
    window = int(block.window_size)
    height, width = (-(-size // window) * window for size in input_dimensions)  # padded to whole windows
    windows = (height // window) * (width // window)
    heads = _attention_heads(block)
    scores = hidden_states.new_zeros(hidden_states.shape[0], windows, heads, window * window, window * window)
    mask = block.get_attn_mask(height, width, dtype=hidden_states.dtype, device=hidden_states.device)
    if mask is not None:
        scores = scores + mask[None, :, None]
    return scores.softmax(dim=-1).view(-1, heads, window * window, window * window)


def _convnext_mlp(block: nn.Module, features: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """ConvNeXt (V1, V2) without its depthwise convolution: x + drop_path(γ · pwconv2(act(pwconv1(LN(x))))),
    channels last inside, with V2's global response norm (GRN) after the activation."""
    hidden = block.pwconv1(block.layernorm(features.permute(0, 2, 3, 1)))
    hidden = block.act(hidden)
    grn = getattr(block, "grn", None)
    if grn is not None:
        hidden = _global_response_norm(grn, hidden, block.pwconv2.in_features)
    hidden = block.pwconv2(hidden)
    scale = getattr(block, "layer_scale_parameter", None)
    if scale is not None:
        hidden = scale * hidden
    return features + block.drop_path(hidden.permute(0, 3, 1, 2))


def _global_response_norm(grn: nn.Module, hidden: torch.Tensor, width: int) -> torch.Tensor:
    """ConvNeXt V2's GRN on the first hidden units of a block `width` units wide.

    GRN divides each unit's spatial norm by the mean norm over all units. The units "half" leaves
    out are silent (exactly zero) in the merged block, so the mean is over `width` units, as there.
    """
    if hidden.shape[-1] == width:
        return grn(hidden)
    norms = torch.linalg.vector_norm(hidden, ord=2, dim=(1, 2), keepdim=True)
    normalized = norms / (norms.sum(dim=-1, keepdim=True) / width + 1e-6)
    return grn.weight * (hidden * normalized) + grn.bias + hidden


def _resnet_narrow(block: nn.Module, hidden_state: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """ResNet (bottleneck or basic): the block's convolutions at their synthesized (narrower) widths,
    each BatchNorm on its leading channels (running statistics updated in place there)."""
    residual = block.shortcut(hidden_state)
    for conv_layer in block.layer:
        hidden_state = conv_layer.convolution(hidden_state)
        hidden_state = _normalize_with_leading_statistics(conv_layer.normalization, hidden_state)
        hidden_state = conv_layer.activation(hidden_state)
    return block.activation(hidden_state + residual)


def _normalize_with_leading_statistics(norm: nn.Module, hidden_state: torch.Tensor) -> torch.Tensor:
    """`norm` (a BatchNorm) on a narrower input: it sees only its first channels' running statistics.

    The statistics are views of its buffers handed to `torch.func.functional_call`, so training mode
    updates the leading entries of the buffers in place and leaves the others as they are.
    """
    width = hidden_state.shape[1]
    if width == norm.num_features:
        return norm(hidden_state)
    leading = {
        name: buffer[:width]
        for name, buffer in norm.named_buffers(recurse=False)
        if name in ("running_mean", "running_var") and buffer is not None
    }
    return torch.func.functional_call(norm, leading, (hidden_state,), strict=False)


_LINEAR_MLP = {"mlp.fc1.weight": (0,), "mlp.fc1.bias": (0,), "mlp.fc2.weight": (1,)}
_SWIGLU_MLP = {
    "mlp.gate_proj.weight": (0,), "mlp.gate_proj.bias": (0,), "mlp.up_proj.weight": (0,), "mlp.up_proj.bias": (0,),
    "mlp.down_proj.weight": (1,),
}
_CONVNEXT_MLP = {"pwconv1.weight": (0,), "pwconv1.bias": (0,), "pwconv2.weight": (1,)}
_BATCH_NORM = ("normalization.weight", "normalization.bias")
_TRANSFORMERS = "transformers.models."

FAMILIES = (
    Family(
        "ViT/DeiT",
        (f"{_TRANSFORMERS}vit.modeling_vit.ViTLayer", f"{_TRANSFORMERS}deit.modeling_deit.DeiTLayer"),
        ("mlp", "half"), _vit_mlp, ("attention", "layernorm_before"), _LINEAR_MLP, _uniform_attention,
    ),
    Family(
        "BEiT", (f"{_TRANSFORMERS}beit.modeling_beit.BeitLayer",), ("mlp", "half"), _beit_mlp,
        ("attention", "layernorm_before", "lambda_1", "relative_position_bias"), _LINEAR_MLP, _uniform_attention,
    ),
    Family(
        "DINOv2", (f"{_TRANSFORMERS}dinov2.modeling_dinov2.Dinov2Layer",), ("mlp", "half"), _dinov2_mlp,
        ("norm1", "attention", "layer_scale1"), {**_LINEAR_MLP, **_SWIGLU_MLP}, _uniform_attention,
    ),
    Family(
        "Swin", (f"{_TRANSFORMERS}swin.modeling_swin.SwinLayer",), ("mlp", "half"), _swin_mlp,
        ("attention", "layernorm_before"), _LINEAR_MLP,
    ),
    Family(
        "ConvNeXt", (f"{_TRANSFORMERS}convnext.modeling_convnext.ConvNextLayer",), ("mlp", "half"), _convnext_mlp,
        ("dwconv",), _CONVNEXT_MLP,
    ),
    Family(
        "ConvNeXt V2", (f"{_TRANSFORMERS}convnextv2.modeling_convnextv2.ConvNextV2Layer",), ("mlp", "half"),
        _convnext_mlp, ("dwconv",), {**_CONVNEXT_MLP, "grn.weight": (3,), "grn.bias": (3,)},
    ),
    Family(
        "ResNet (bottleneck)", (f"{_TRANSFORMERS}resnet.modeling_resnet.ResNetBottleNeckLayer",), ("half",),
        _resnet_narrow,
        hidden={
            "layer.0.convolution.weight": (0,), **{f"layer.0.{n}": (0,) for n in _BATCH_NORM},
            "layer.1.convolution.weight": (0, 1), **{f"layer.1.{n}": (0,) for n in _BATCH_NORM},
            "layer.2.convolution.weight": (1,),
        },
    ),
    Family(
        "ResNet (basic)", (f"{_TRANSFORMERS}resnet.modeling_resnet.ResNetBasicLayer",), ("half",), _resnet_narrow,
        hidden={
            "layer.0.convolution.weight": (0,), **{f"layer.0.{n}": (0,) for n in _BATCH_NORM},
            "layer.1.convolution.weight": (1,),
        },
    ),
)


def family_of(module: nn.Module) -> Family | None:
    """The family of a block (or of a replaced block: its class derives from the block's)."""
    for cls in type(module).__mro__:
        qualified = f"{cls.__module__}.{cls.__qualname__}"
        for family in FAMILIES:
            if qualified in family.classes:
                return family
    return None


@dataclass(frozen=True)
class Surrogate:
    """A lighter surrogate chosen for one block: `name` ("mlp" or "half") of the block's `family`.

    The plan carries it (`planning.BlockPlan.surrogate`; None for "block", the block's own forward), so
    the replaced block, the merge and the repr use the family looked up once, at planning.
    """

    name: str
    family: Family

    def uses(self, parameter: str) -> bool:
        """Whether the surrogate computes with this parameter of the block (else it is freed, never synthesized)."""
        return self.family.uses(parameter)

    def shape(self, parameter: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The part of the parameter the surrogate uses: its leading hidden units for "half"."""
        return self.family.shape(self.name, parameter, shape)

    def forward(self, block: nn.Module, *args: Any, **kwargs: Any) -> Any:
        output = self.family.forward(block, *args, **kwargs)
        if self.family.attention is not None and attentions_requested():
            _report_attention(block, self.family, self.family.attention(block, *args, **kwargs))
        return output

    def describe(self) -> str:
        """One line for a replaced block's repr."""
        family = self.family
        mixer = f"{', '.join(family.mixer)} skipped" if family.mixer else "nothing skipped"
        width = "half of the hidden units" if self.name == "half" else "all hidden units"
        return f"surrogate {self.name!r} ({mixer}; {width})"


def _report_attention(block: nn.Module, family: Family, stand_in: torch.Tensor) -> None:
    """Give Transformers' recording hooks on the skipped token mixer the stand-in, so that `attentions[i]`
    stays layer i's entry (the mixer never ran, so its hooks did not fire)."""
    for name in family.mixer:
        mixer = getattr(block, name, None)
        if not isinstance(mixer, nn.Module):
            continue
        for module in mixer.modules():
            for hook in list(module._forward_hooks.values()):
                if getattr(hook, "__module__", None) == _active_collector_module:
                    hook(module, (stand_in,), stand_in)


_active_collector_module = "transformers.utils.output_capturing"


def surrogate_for(module: nn.Module, surrogate: str, block_name: str) -> Surrogate | None:
    """The lighter surrogate `surrogate` of the block `block_name`; None for "block" (its own forward).

    Raises `ReplacementConfigError` naming the families that have `surrogate` when this block's has not.
    """
    if surrogate == "block":
        return None
    if surrogate not in SURROGATES:
        raise ReplacementConfigError(f"surrogate={surrogate!r} is invalid: choose one of {SURROGATES}.")
    family = family_of(module)
    if family is None or surrogate not in family.surrogates:
        supporting = ", ".join(f.name for f in FAMILIES if surrogate in f.surrogates)
        kind = f"{family.name} blocks" if family is not None else f"{type(module).__name__} blocks"
        raise ReplacementConfigError(
            f"surrogate={surrogate!r} is not available for {kind} ({block_name}): it is defined for "
            f"{supporting}. Use surrogate='block' (the whole block with synthesized weights), or another "
            f"surrogate this family has: {('block',) + (family.surrogates if family else ())}."
        )
    return Surrogate(surrogate, family)


def merged_value(value: torch.Tensor, block_shape: tuple[int, ...] | None) -> torch.Tensor:
    """A synthesized tensor in the block's own shape: its leading entries, the rest (unused hidden units) zero."""
    if block_shape is None or tuple(value.shape) == tuple(block_shape):
        return value
    merged = value.new_zeros(block_shape)
    merged[tuple(slice(0, size) for size in value.shape)] = value
    return merged


def skipped_value(module: nn.Module, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """The value a merged block gives a parameter its surrogate skips, so the skipped part changes nothing.

    Zero for a token mixer that adds to the residual stream (attention: its output projection
    and layer scale are zero, so its branch adds exactly zero); ConvNeXt's depthwise convolution
    sits on the path itself, so it becomes the identity: 1 at each kernel's centre, zero bias.
    """
    value = like.new_zeros(shape)
    owner_name, _, attr = name.rpartition(".")
    owner = module.get_submodule(owner_name)
    if isinstance(owner, nn.Conv2d) and attr == "weight" and owner.groups == owner.out_channels == owner.in_channels:
        value[(slice(None), 0, *(size // 2 for size in shape[2:]))] = 1
    return value
