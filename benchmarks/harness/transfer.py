"""Transfer suites: pretrain each model on a source task (cached), then measure each method's conversion on it.

The suite trains its own pretrained checkpoints (nothing is downloaded): the preset, seed 0, trained
on the source data set with the suite's `PretrainSpec`, saved with `save_pretrained` under
`<output dir>/pretrained/<model>/` beside `pretraining.json`, which records the settings it was
trained with. A later run with the same settings reuses it; other settings train it again.

Before any fine-tuning step, each method's conversion of the pretrained model (RepL with
(0.5, 0.5) or fitted coefficients, dropped blocks, LoRA) is evaluated on the source task's test
set: what the conversion keeps of what the model learnt. Fine-tuning on the target task is the
ordinary training of `training.train_run`, started from the pretrained weights with a new head.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

import torch

from hf_replacement.checkpoint import staged_directory
from hf_replacement.commands.presets import build_preset_model
from hf_replacement.commands.training_steps import evaluate_accuracy
from hf_replacement.loading import load_image_classifier

from .data import TensorData, eval_batches
from .methods import METHODS, apply_method, replacement_of
from .suites import SuiteSpec
from .training import train_model

logger = logging.getLogger(__name__)

PRETRAINED_DIR = "pretrained"
RECORD_NAME = "pretraining.json"


def source_suite(suite: SuiteSpec) -> SuiteSpec:
    """The suite as its pretraining runs: the source data set and the `PretrainSpec`'s training settings."""
    spec = suite.pretrain
    return dataclasses.replace(
        suite,
        dataset=spec.dataset,
        epochs=spec.epochs,
        max_train_samples=spec.max_train_samples,
        max_test_samples=spec.max_test_samples,
        batch_size=spec.batch_size,
        lr=spec.lr,
        warmup_ratio=spec.warmup_ratio,
        pretrain=None,
    )


def pretrain(
    suite: SuiteSpec, model_name: str, data: TensorData, output_dir: str, device: torch.device
) -> tuple[str, dict[str, Any]]:
    """(directory of the pretrained `model_name`, its record): trained now on `data` with `source_suite(suite)`,
    or reused from an earlier run with the same settings."""
    directory = os.path.join(output_dir, PRETRAINED_DIR, model_name)
    settings = {
        "model": model_name,
        "image_size": suite.image_size,
        "num_channels": suite.num_channels,
        "pretrain": dataclasses.asdict(suite.pretrain),
        "data": data.description,
    }
    record_path = os.path.join(directory, RECORD_NAME)
    if os.path.isfile(record_path):
        with open(record_path, encoding="utf-8") as handle:
            record = json.load(handle)
        if record.get("settings") == settings:
            logger.info("%s: reusing the pretrained checkpoint in %s", model_name, directory)
            return directory, {**record, "cached": True}
        logger.info("%s: %s was pretrained with other settings: pretraining again", model_name, directory)
    torch.manual_seed(0)
    model = build_preset_model(model_name, data.num_labels, suite.image_size, suite.num_channels, data.id2label)
    run = train_model(source_suite(suite), model, 0, data, device)
    record = {
        "settings": settings,
        "source_accuracy": run["accuracy"],
        "accuracy_per_epoch": run["accuracy_per_epoch"],
        "train_loss_per_epoch": run["train_loss_per_epoch"],
        "train_seconds": run["train_seconds"],
        "steps": run["steps"],
    }
    with staged_directory(directory) as staging:  # the checkpoint and its record appear together
        model.save_pretrained(staging)
        with open(os.path.join(staging, RECORD_NAME), "w", encoding="utf-8") as handle:
            json.dump(record, handle, indent=1)
    logger.info("%s: pretrained to %.4f source accuracy in %.0f s", model_name, run["accuracy"], run["train_seconds"])
    return directory, {**record, "cached": False}


def accuracy_after_conversion(
    method: str, directory: str, data: TensorData, device: torch.device
) -> dict[str, Any]:
    """Source-task test accuracy of the pretrained model right after `method`'s conversion (no training step),
    and for a fitted RepL conversion how well its coefficients rebuild each replaced block's weights."""
    model = load_image_classifier(directory)
    converted = apply_method(METHODS[method], model).model.to(device).eval()
    accuracy = evaluate_accuracy(converted, eval_batches(data, device))
    result: dict[str, Any] = {"source_accuracy_after_conversion": accuracy}
    replacement = replacement_of(converted)
    if replacement is not None and replacement.coefficient_fit_errors():
        result["coefficient_fit"] = {str(k): v for k, v in replacement.coefficient_fit_errors().items()}
    return result
