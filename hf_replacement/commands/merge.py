"""`hf-replacement merge`: write a RepL checkpoint as a plain Transformers model, with its processing files."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil

from ..checkpoint import staged_directory
from ..config import CONFIG_NAME
from ..model import ReplacementModel
from .tasks import ModelTask, checkpoint_task

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class MergeResult:
    """What `merge_checkpoint` wrote: the task of the merged model (None when its config names no Transformers
    architecture) and the processing files carried over from the checkpoint (paths relative to it)."""

    output_dir: str
    task: ModelTask | None
    processing_files: tuple[str, ...]


def _tokenizer_vocabulary_files(directory: str) -> set[str]:
    """The vocabulary files (`vocab.json`, `merges.txt`, `tokenizer.model`, ...) of the tokenizer class that the
    directory's `tokenizer_config.json` names, as that class declares them (`vocab_files_names`)."""
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name
    from transformers.tokenization_utils_base import TOKENIZER_CONFIG_FILE

    try:
        with open(os.path.join(directory, TOKENIZER_CONFIG_FILE), encoding="utf-8") as stream:
            class_name = json.load(stream).get("tokenizer_class")
    except (OSError, ValueError, AttributeError):
        return set()
    tokenizer_class = tokenizer_class_from_name(class_name) if isinstance(class_name, str) else None
    names = getattr(tokenizer_class, "vocab_files_names", None) or {}
    return {name for name in names.values() if isinstance(name, str)}


def processing_files(directory: str) -> list[str]:
    """Every file in `directory` that Transformers' processing classes load, under their own file names: tokenizer
    (config, special tokens, added tokens, `tokenizer.json` and the vocabulary files of its class), image processor /
    feature extractor, video processor, processor, chat templates, generation config. Paths relative to `directory`."""
    from transformers.tokenization_utils_base import (
        ADDED_TOKENS_FILE,
        FULL_TOKENIZER_FILE,
        SPECIAL_TOKENS_MAP_FILE,
        TOKENIZER_CONFIG_FILE,
    )
    from transformers.utils import (
        AUDIO_TOKENIZER_NAME,
        FEATURE_EXTRACTOR_NAME,
        GENERATION_CONFIG_NAME,
        IMAGE_PROCESSOR_NAME,
        PROCESSOR_NAME,
        VIDEO_PROCESSOR_NAME,
    )
    from transformers.utils.hub import CHAT_TEMPLATE_DIR, CHAT_TEMPLATE_FILE, LEGACY_PROCESSOR_CHAT_TEMPLATE_FILE

    names = {
        TOKENIZER_CONFIG_FILE, SPECIAL_TOKENS_MAP_FILE, ADDED_TOKENS_FILE, FULL_TOKENIZER_FILE,
        IMAGE_PROCESSOR_NAME, FEATURE_EXTRACTOR_NAME, VIDEO_PROCESSOR_NAME, PROCESSOR_NAME, AUDIO_TOKENIZER_NAME,
        CHAT_TEMPLATE_FILE, LEGACY_PROCESSOR_CHAT_TEMPLATE_FILE, GENERATION_CONFIG_NAME,
    } | _tokenizer_vocabulary_files(directory)  # fmt: skip
    found = [name for name in names if os.path.isfile(os.path.join(directory, name))]
    templates = os.path.join(directory, CHAT_TEMPLATE_DIR)
    if os.path.isdir(templates):
        found += [os.path.join(CHAT_TEMPLATE_DIR, name) for name in os.listdir(templates)]
    return sorted(found)


def merge_checkpoint(directory: str, output_dir: str) -> MergeResult:
    """Write a RepL checkpoint as a plain Transformers model (loads without hf_replacement) with every processing
    file of the checkpoint (`processing_files`), so that its Auto class and pipeline load it as saved.

    A generation config saved with the checkpoint replaces the one `save_pretrained` derives from the model config.
    The model is written to a temporary directory and renamed into place: a failed merge leaves no half model.
    """
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory} is not a checkpoint directory (written by train or save_pretrained).")
    if not os.path.isfile(os.path.join(directory, CONFIG_NAME)):
        raise ValueError(f"{directory} is already a plain model (no {CONFIG_NAME}); nothing to merge.")
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ValueError(f"{output_dir} is a file, not a directory; choose a new output directory.")
    if os.path.exists(output_dir) and os.listdir(output_dir):
        raise ValueError(f"{output_dir} exists and is not empty; choose a new output directory.")
    model = ReplacementModel.from_pretrained(directory)
    carried = processing_files(directory)
    with staged_directory(output_dir) as staging:  # a failed save leaves no half-written model under the name
        model.merge_and_unload().save_pretrained(staging)
        for name in carried:
            os.makedirs(os.path.dirname(os.path.join(staging, name)), exist_ok=True)
            shutil.copyfile(os.path.join(directory, name), os.path.join(staging, name))
    task = checkpoint_task(output_dir)
    if not carried:
        logger.warning(
            "%s has no processing files (tokenizer, image processor, feature extractor, processor): save the one "
            "the model was trained with into %s (`.save_pretrained(%r)`), or pass it to pipeline(%r, ...) yourself.",
            directory,
            output_dir,
            output_dir,
            task.pipeline_task if task and task.pipeline_task else "TASK",
        )
    return MergeResult(output_dir, task, tuple(carried))


__all__ = ["MergeResult", "merge_checkpoint", "processing_files"]
