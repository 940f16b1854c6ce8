"""Presets scale to the data's images: enough tokens / positions, never a stage of zero pixels."""

from __future__ import annotations

import pytest
import torch

from hf_replacement.commands.presets import UnknownPresetError, build_preset_model


@pytest.mark.parametrize(
    ("image_size", "stem_output", "last_stage"),
    # stride 1 below 16 px, 2 up to 63 px (28 px: 14, 7, 3, 1), 4 from 64 px as in the original model
    [(8, 8, 1), (16, 8, 1), (28, 14, 1), (63, 31, 3), (64, 16, 2), (224, 56, 7)],
)
def test_convnext_preset_keeps_every_stage_at_least_one_pixel(
    image_size: int, stem_output: int, last_stage: int
) -> None:
    model = build_preset_model("convnext-mini", num_labels=3, image_size=image_size, num_channels=1).eval()
    with torch.no_grad():
        outputs = model(torch.randn(1, 1, image_size, image_size), output_hidden_states=True)
    assert outputs.hidden_states[0].shape[-1] == stem_output
    assert outputs.hidden_states[-1].shape[-1] == last_stage
    assert outputs.logits.shape == (1, 3)


@pytest.mark.parametrize(("image_size", "tokens"), [(8, 16), (28, 49), (224, 196)])
def test_vit_preset_patch_gives_enough_tokens(image_size: int, tokens: int) -> None:
    model = build_preset_model("vit-mini", num_labels=3, image_size=image_size, num_channels=1).eval()
    with torch.no_grad():
        outputs = model(torch.randn(1, 1, image_size, image_size), output_hidden_states=True)
    assert outputs.hidden_states[-1].shape[1] == tokens + 1  # and the [CLS] token


def test_unknown_preset_names_the_choices() -> None:
    with pytest.raises(UnknownPresetError, match="Unknown preset 'vit-huge'; choose one of .*'convnext-mini'"):
        build_preset_model("vit-huge", num_labels=3, image_size=8, num_channels=1)
