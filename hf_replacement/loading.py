"""Loading a plain Transformers image classifier: safetensors only, and strict about its weights.

Transformers only warns when a checkpoint's weights do not fit the model its `config.json`
builds, and goes on with randomly initialised ones; evaluating or merging such a model gives a
silently wrong answer. Here every missing, unexpected or mismatched weight is an error, except
the classification head when the caller asks for a new one (fine-tuning on other labels).
"""

from __future__ import annotations

import os
from typing import Any

from transformers import AutoConfig, AutoModelForImageClassification, PretrainedConfig, PreTrainedModel

from .config import CONFIG_NAME

# The head every Transformers image classifier of this package's scope names `classifier`.
_HEAD_PREFIX = "classifier"


def load_pretrained_config(path: str | os.PathLike) -> PretrainedConfig:
    """`AutoConfig.from_pretrained(path)`, with one clear error when it cannot be had (offline, no such repo)."""
    try:
        return AutoConfig.from_pretrained(os.fspath(path))
    except (OSError, ValueError) as error:
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ValueError(
            f"--model {os.fspath(path)}: its config could not be loaded ({first_line[:300]}). Check the local "
            "directory or Hub id, and the network connection (a Hub model needs the Hub, or its files in the cache)."
        ) from None


def load_image_classifier(path: str | os.PathLike, *, new_head: bool = False, **kwargs: Any) -> PreTrainedModel:
    """`AutoModelForImageClassification.from_pretrained(path, use_safetensors=True, **kwargs)`, strict.

    `new_head=True` allows a missing or resized classification head (it is trained from scratch).
    Raises `ValueError` naming what does not fit, and for a directory without safetensors weights.
    """
    path = os.fspath(path)
    try:
        model, info = AutoModelForImageClassification.from_pretrained(
            path, use_safetensors=True, output_loading_info=True, **kwargs
        )
    except OSError as error:  # no safetensors file, no such repo, offline
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ValueError(
            f"{path}: no Transformers image classifier with safetensors weights could be loaded ({first_line[:300]}). "
            "Only safetensors weights are loaded (no pickle): convert a pytorch_model.bin with "
            "`model.save_pretrained(dir)` in a trusted session."
        ) from None
    missing = sorted(info["missing_keys"])
    unexpected = sorted(info["unexpected_keys"])
    mismatched = sorted(key for key, *_ in info["mismatched_keys"])
    if new_head:
        missing = [key for key in missing if not key.startswith(_HEAD_PREFIX)]
        mismatched = [key for key in mismatched if not key.startswith(_HEAD_PREFIX)]
    if any(key.startswith(("base_model.", "replacement_coefficients.")) for key in unexpected):
        raise ValueError(
            f"{path} holds the weights of a RepL checkpoint (keys 'base_model.*') but no {CONFIG_NAME}: "
            f"restore {CONFIG_NAME} and load it with ReplacementModel.from_pretrained (or `hf-replacement merge`)."
        )
    if missing or unexpected or mismatched:
        raise ValueError(
            f"{path}: its weights do not fit the model its config.json describes (missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, other shape {mismatched[:5]}); the checkpoint is incomplete or from "
            "another model."
        )
    return model


__all__ = ["load_image_classifier", "load_pretrained_config"]
