"""Merge a saved RepL checkpoint into a plain Transformers model: `hf-replacement merge`."""

from __future__ import annotations

import logging
import os
import shutil

from ..checkpoint import staged_directory
from ..config import CONFIG_NAME
from ..model import ReplacementModel
from .evaluation import load_checkpoint
from .processing import PROCESSOR_NAME

logger = logging.getLogger(__name__)


def merge_checkpoint(directory: str, output_dir: str) -> None:
    """Write a RepL checkpoint as a plain Transformers model (loads without hf_replacement), with the
    checkpoint's image processor (`preprocessor_config.json`, which pipelines load) when it has one."""
    if os.path.exists(output_dir) and os.listdir(output_dir):
        raise ValueError(f"{output_dir} exists and is not empty; choose a new output directory.")
    model = load_checkpoint(directory)
    if not isinstance(model, ReplacementModel):
        raise ValueError(f"{directory} is already a plain model (no {CONFIG_NAME}); nothing to merge.")
    with staged_directory(output_dir) as staging:  # a failed save leaves no half-written model under the name
        model.merge_and_unload().save_pretrained(staging)
        processor_file = os.path.join(directory, PROCESSOR_NAME)
        if os.path.isfile(processor_file):
            shutil.copyfile(processor_file, os.path.join(staging, PROCESSOR_NAME))
        else:
            logger.warning(
                "%s has no %s (saved before hf-replacement wrote image processors): give pipelines an "
                "image_processor yourself.",
                directory,
                PROCESSOR_NAME,
            )
