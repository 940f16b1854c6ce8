"""Named model sizes for training from scratch (`--model vit-tiny`), scaled to the data's images.

Each preset is a Transformers config built for the data set at hand: image size, channels and
labels come from the data. Small images get a smaller patch (ViT/DeiT) or stem stride (ConvNeXt)
so a 28×28 Fashion-MNIST image still yields enough tokens / spatial positions.
"""

from __future__ import annotations

from collections.abc import Callable

import transformers
from transformers import PretrainedConfig, PreTrainedModel

_VIT_SIZES = {
    # name: (hidden size, layers, heads)
    "mini": (64, 8, 2),
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
}
_CONVNEXT_SIZES = {
    # name: (hidden sizes, depths)
    "mini": ([16, 32, 64, 128], [2, 2, 4, 2]),
    "tiny": ([96, 192, 384, 768], [3, 3, 9, 3]),
    "small": ([96, 192, 384, 768], [3, 3, 27, 3]),
    "base": ([128, 256, 512, 1024], [3, 3, 27, 3]),
}


class UnknownPresetError(ValueError):
    """`--model` names neither a preset, a local directory nor a Hub model."""


# The smallest image every preset takes: ConvNeXt's stem (stride 1 below 16 px) and 3 halvings leave 1 px.
MIN_IMAGE_SIZE = 8


def _vit_patch(image_size: int) -> int:
    return 16 if image_size >= 128 else 4 if image_size >= 16 else 2


def _vit_like(config_class: type[PretrainedConfig], size: str) -> Callable[..., PretrainedConfig]:
    hidden, layers, heads = _VIT_SIZES[size]

    def build(image_size: int, num_channels: int, **labels) -> PretrainedConfig:
        return config_class(
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            intermediate_size=4 * hidden,
            image_size=image_size,
            patch_size=_vit_patch(image_size),
            num_channels=num_channels,
            **labels,
        )

    return build


def _convnext(size: str) -> Callable[..., PretrainedConfig]:
    hidden_sizes, depths = _CONVNEXT_SIZES[size]

    def build(image_size: int, num_channels: int, **labels) -> PretrainedConfig:
        # Four stages halve the resolution three times after the stem: keep >= 1 pixel at the end.
        # At 16-63 px a stride-2 stem (28 px: 14, 7, 3, 1) costs a quarter of stride 1 per step
        # (ConvNeXt-tiny, batch 32, 2 CPU cores: 0.46 s against 1.93 s).
        return transformers.ConvNextConfig(
            hidden_sizes=hidden_sizes,
            depths=depths,
            num_channels=num_channels,
            image_size=image_size,
            patch_size=4 if image_size >= 64 else 2 if image_size >= 16 else 1,
            **labels,
        )

    return build


PRESETS: dict[str, tuple[Callable[..., PretrainedConfig], str]] = {
    **{f"vit-{s}": (_vit_like(transformers.ViTConfig, s), "ViTForImageClassification") for s in _VIT_SIZES},
    **{f"deit-{s}": (_vit_like(transformers.DeiTConfig, s), "DeiTForImageClassification") for s in _VIT_SIZES},
    **{f"convnext-{s}": (_convnext(s), "ConvNextForImageClassification") for s in _CONVNEXT_SIZES},
}


def build_preset_model(
    name: str, num_labels: int, image_size: int, num_channels: int, id2label: dict[int, str] | None = None
) -> PreTrainedModel:
    """A randomly initialised model of preset `name` for `num_labels` classes."""
    if name not in PRESETS:
        raise UnknownPresetError(
            f"Unknown preset {name!r}; choose one of {sorted(PRESETS)}, or a Hub id / local model directory."
        )
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(
            f"image size {image_size} is too small for preset {name!r}: presets take images of at least "
            f"{MIN_IMAGE_SIZE} px (ConvNeXt halves them three times); use --image-size {MIN_IMAGE_SIZE} or more."
        )
    build_config, architecture = PRESETS[name]
    id2label = id2label or {i: str(i) for i in range(num_labels)}
    config = build_config(
        image_size,
        num_channels,
        num_labels=num_labels,
        id2label=id2label,
        label2id={label: i for i, label in id2label.items()},
    )
    return getattr(transformers, architecture)(config)


__all__ = ["PRESETS", "UnknownPresetError", "build_preset_model"]
