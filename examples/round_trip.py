"""The end of every worked example: save -> `ReplacementModel.from_pretrained` -> merge -> plain Transformers class.

`check_round_trip` saves the trained RepL model as the trainer saves it, reloads it, merges the
reloaded copy into a plain model, saves that with `save_pretrained` and reloads it with the plain
Transformers class; each model's outputs on the same inputs must equal the trained model's exactly
(the merged weights are the very tensors the replaced blocks synthesize).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from hf_replacement import ReplacementModel, ReplacementTrainer


def output_tensors(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors of a model's output (`logits`, `pred_boxes`, ...) in evaluation mode."""
    model.eval()
    with torch.no_grad():
        outputs = model(**inputs)
    return {name: value for name, value in outputs.items() if torch.is_tensor(value)}


def check_round_trip(trainer: ReplacementTrainer, inputs: dict[str, torch.Tensor], plain_class: Any) -> str:
    """Save, reload, merge, reload as `plain_class`; assert identical outputs; return the merged directory."""
    output_dir = trainer.args.output_dir
    expected = output_tensors(trainer.replacement_model, inputs)
    checkpoint_dir, merged_dir = os.path.join(output_dir, "final"), os.path.join(output_dir, "merged")
    trainer.save_model(checkpoint_dir)
    reloaded = ReplacementModel.from_pretrained(checkpoint_dir)
    results = {"ReplacementModel.from_pretrained": output_tensors(reloaded, inputs)}
    reloaded.merge_and_unload().save_pretrained(merged_dir)
    plain = plain_class.from_pretrained(merged_dir)
    results[f"{plain_class.__name__}.from_pretrained"] = output_tensors(plain, inputs)
    for name, outputs in results.items():
        assert outputs.keys() == expected.keys(), f"{name}: outputs {sorted(outputs)}, expected {sorted(expected)}"
        for key, value in outputs.items():
            assert torch.equal(value, expected[key]), f"{name}: {key} differs from the trained model's"
    print(f"round trip: {checkpoint_dir} (RepL) -> {merged_dir} ({plain_class.__name__}): identical outputs")
    return merged_dir


__all__ = ["check_round_trip", "output_tensors"]
