"""Tiny random-init models of every supported architecture, built in the tests (never from the Hub)."""

from __future__ import annotations

import torch
import transformers
from torch import nn

IMAGE_SIZE = 16
NUM_LABELS = 3

_VIT_LIKE = dict(
    hidden_size=16,
    num_hidden_layers=6,
    num_attention_heads=2,
    intermediate_size=32,
    image_size=IMAGE_SIZE,
    patch_size=4,
    num_labels=NUM_LABELS,
)
_STAGED = dict(num_labels=NUM_LABELS, image_size=IMAGE_SIZE)

# name -> (model class name, config class name, config kwargs)
ARCHITECTURES = {
    "vit": ("ViTForImageClassification", "ViTConfig", _VIT_LIKE),
    "deit": ("DeiTForImageClassification", "DeiTConfig", _VIT_LIKE),
    "deit-teacher": ("DeiTForImageClassificationWithTeacher", "DeiTConfig", _VIT_LIKE),
    "beit": ("BeitForImageClassification", "BeitConfig", dict(_VIT_LIKE, use_relative_position_bias=True)),
    "dinov2": ("Dinov2ForImageClassification", "Dinov2Config", _VIT_LIKE),
    "convnext": (
        "ConvNextForImageClassification",
        "ConvNextConfig",
        dict(_STAGED, hidden_sizes=[4, 8, 16, 32], depths=[2, 2, 3, 2], patch_size=1),
    ),
    "convnextv2": (
        "ConvNextV2ForImageClassification",
        "ConvNextV2Config",
        dict(_STAGED, hidden_sizes=[4, 8, 16, 32], depths=[2, 2, 3, 2], patch_size=1),
    ),
    "swin": (
        "SwinForImageClassification",
        "SwinConfig",
        dict(_STAGED, embed_dim=8, depths=[2, 2, 2, 2], num_heads=[1, 2, 2, 4], window_size=2, patch_size=1),
    ),
    "resnet": (
        "ResNetForImageClassification",
        "ResNetConfig",
        dict(num_labels=NUM_LABELS, embedding_size=8, hidden_sizes=[8, 16, 16, 32], depths=[2, 2, 2, 2]),
    ),
    "custom": (None, None, None),
}


class ResidualMLPBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 2 * width)
        self.fc2 = nn.Linear(2 * width, width)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm(hidden))))


class CustomModel(nn.Module):
    """A model the discovery does not know: its blocks need `block_path="trunk.blocks"`."""

    def __init__(self, width: int = 12, depth: int = 6) -> None:
        super().__init__()
        self.stem = nn.Linear(3 * IMAGE_SIZE * IMAGE_SIZE, width)
        self.trunk = nn.Module()
        self.trunk.blocks = nn.ModuleList(ResidualMLPBlock(width) for _ in range(depth))
        self.head = nn.Linear(width, NUM_LABELS)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = self.stem(pixel_values.flatten(1))
        for block in self.trunk.blocks:
            hidden = block(hidden)
        return self.head(hidden)


def build(name: str, seed: int = 0, **config_overrides) -> nn.Module:
    torch.manual_seed(seed)
    model_class, config_class, kwargs = ARCHITECTURES[name]
    if model_class is None:
        return CustomModel()
    config = getattr(transformers, config_class)(**{**kwargs, **config_overrides})
    model = getattr(transformers, model_class)(config)
    _perturb_constants(model)
    return model.eval()


def _perturb_constants(model: nn.Module) -> None:
    """Give norms, biases and layer scales random values: a ones/zeros init would hide fusion bugs."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))


def block_path(name: str) -> str | None:
    return "trunk.blocks" if name == "custom" else None


def logits(output) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.logits


def inputs(batch: int = 2, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
