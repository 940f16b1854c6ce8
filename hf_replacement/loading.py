"""Loading models from disk or the Hub: safetensors only, and strict about every weight.

A plain Transformers image classifier (`load_image_classifier`), and the pieces of
`ReplacementModel.from_pretrained`: its keywords, the download, the base model built from the
saved config, the exact load (tied weights saved once).

Transformers only warns when a checkpoint's weights do not fit the model its `config.json`
builds, and goes on with randomly initialised ones; evaluating or merging such a model gives a
silently wrong answer. Here every missing, unexpected or mismatched weight is an error, except
the classification head when the caller asks for a new one (fine-tuning on other labels).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import torch
import transformers
from torch import nn
from transformers import (
    CONFIG_MAPPING,
    AutoConfig,
    AutoModelForImageClassification,
    GenerationConfig,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.initialization import no_init_weights

from .checkpoint import WEIGHTS_INDEX_NAME, WEIGHTS_NAME
from .config import CONFIG_NAME
from .hub import HubDownloadError, download_checkpoint, looks_like_repo_id

logger = logging.getLogger(__name__)

_COEFFICIENTS_PREFIX = "replacement_coefficients."

# Where a RepL checkpoint keeps its base model's config. Its `config.json` is a guard that makes
# Transformers' own loaders (AutoModel*, pipeline) stop with an error naming the right loader
# instead of building a randomly initialised model from the base config.
BASE_CONFIG_NAME = "base_config.json"
# Transformers names the model_type in its error and then advises updating Transformers, which never helps
# here: the model_type says so, for a process that has not imported hf_replacement (one that has gets
# GUARD_MESSAGE alone, see register_guard_with_transformers).
GUARD_MODEL_TYPE = (
    "hf-replacement RepL checkpoint, which no Transformers version loads (updating Transformers will not help): "
    "load it with hf_replacement.ReplacementModel.from_pretrained, or write a plain Transformers model with "
    "`hf-replacement merge`"
)
# The guard written before issue 25, still recognised.
_FORMER_GUARD_MODEL_TYPE = (
    "hf-replacement RepL checkpoint: load it with hf_replacement.ReplacementModel.from_pretrained, "
    "or write a plain Transformers model with `hf-replacement merge`"
)
GUARD_MESSAGE = (
    "This directory is an hf-replacement RepL checkpoint (replacement_config.json, base_config.json, "
    "model.safetensors), not a Transformers model: Transformers' loaders (AutoConfig, AutoModel*, pipeline) cannot "
    "build it. Load it with hf_replacement.ReplacementModel.from_pretrained(path), or write a plain Transformers "
    "model with `hf-replacement merge path MERGED_DIR` (or model.save_merged(MERGED_DIR)) and load MERGED_DIR "
    "with Transformers."
)


class _GuardConfig(PretrainedConfig):
    """The config class Transformers' AutoConfig finds for a RepL checkpoint's guard `config.json` once
    hf_replacement is imported: building it raises `GUARD_MESSAGE`, so the error says only what is true."""

    model_type = GUARD_MODEL_TYPE

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> PretrainedConfig:
        raise ValueError(GUARD_MESSAGE)


def register_guard_with_transformers() -> None:
    """Let Transformers' AutoConfig (hence AutoModel* and pipeline) recognise a RepL checkpoint's guard and
    stop with `GUARD_MESSAGE` instead of its advice to update Transformers. Called on import of the package."""
    for model_type in (GUARD_MODEL_TYPE, _FORMER_GUARD_MODEL_TYPE):
        if model_type not in CONFIG_MAPPING:
            CONFIG_MAPPING.register(model_type, _GuardConfig, exist_ok=True)

# The head every Transformers image classifier of this package's scope names `classifier`.
_HEAD_PREFIX = "classifier"


def load_pretrained_config(path: str | os.PathLike) -> PretrainedConfig:
    """`AutoConfig.from_pretrained(path)`, with one clear error when it cannot be had (offline, no such repo)."""
    if os.path.isfile(os.path.join(os.fspath(path), CONFIG_NAME)):
        raise ValueError(
            f"--model {os.fspath(path)} is a RepL checkpoint: write it as a plain Transformers model with "
            f"`hf-replacement merge {os.fspath(path)} MERGED_DIR` and pass --model MERGED_DIR (or load it in Python "
            "with ReplacementModel.from_pretrained)."
        )
    try:
        return AutoConfig.from_pretrained(os.fspath(path))
    except (OSError, ValueError) as error:
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ValueError(
            f"--model {os.fspath(path)}: its config could not be loaded ({first_line[:300]}). Check the local "
            "directory or Hub id, and the network connection (a Hub model needs the Hub, or its files in the cache)."
        ) from None


def _is_guard(config_path: str) -> bool:
    try:
        with open(config_path, encoding="utf-8") as stream:
            return json.load(stream).get("model_type") in (GUARD_MODEL_TYPE, _FORMER_GUARD_MODEL_TYPE)
    except (OSError, ValueError, AttributeError):
        return False


def load_image_classifier(path: str | os.PathLike, *, new_head: bool = False, **kwargs: Any) -> PreTrainedModel:
    """`AutoModelForImageClassification.from_pretrained(path, use_safetensors=True, **kwargs)`, strict.

    `new_head=True` allows a missing or resized classification head (it is trained from scratch).
    Raises `ValueError` naming what does not fit, and for a directory without safetensors weights.
    """
    path = os.fspath(path)
    if _is_guard(os.path.join(path, "config.json")):
        raise ValueError(
            f"{path} holds a RepL checkpoint but no {CONFIG_NAME}: restore {CONFIG_NAME} and load it with "
            "ReplacementModel.from_pretrained (or `hf-replacement merge`)."
        )
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


# The Transformers `from_pretrained` keywords that cannot apply to a saved RepL checkpoint, and why.
_REFUSED_KEYWORDS = {
    "use_safetensors": "only safetensors are ever loaded",
    "trust_remote_code": "no code is loaded from a checkpoint",
    "quantization_config": "quantizing a RepL model is not supported; merge it first",
}


def split_config_overrides(keywords: dict[str, Any], directory: str, model: nn.Module | None) -> dict[str, Any]:
    """The keywords of `keywords` that set attributes of the checkpoint's base config (`num_labels=5`,
    `id2label=...`), as Transformers' `from_pretrained` takes them; raises a `TypeError` for the others."""
    config = _read_base_config(directory) if model is None and _base_config_path(directory) else None
    overrides = {name: value for name, value in keywords.items() if config is not None and hasattr(config, name)}
    unknown = {name: value for name, value in keywords.items() if name not in overrides}
    if unknown:
        refuse_unsupported_keywords(unknown, config_overrides_possible=model is None)
    return overrides


def refuse_unsupported_keywords(keywords: dict[str, Any], *, config_overrides_possible: bool = True) -> None:
    """Raise a `TypeError` naming every keyword of `keywords` and why it cannot be honoured."""
    if not keywords:
        return
    reasons = [f"{name} ({_REFUSED_KEYWORDS[name]})" for name in sorted(keywords) if name in _REFUSED_KEYWORDS]
    others = [name for name in sorted(keywords) if name not in _REFUSED_KEYWORDS]
    if others:
        where = (
            "is no attribute of the checkpoint's base config either" if config_overrides_possible
            else "would override the config, but model= was given: build that model with the config you want"
        )
        reasons.append(f"{', '.join(others)} (unknown keyword, and {where})")
    raise TypeError(
        f"ReplacementModel.from_pretrained does not take {'; '.join(reasons)}. It takes model, revision, token, "
        "cache_dir, local_files_only, subfolder, dtype (torch_dtype), device_map, attn_implementation, "
        "low_cpu_mem_usage, ignore_mismatched_sizes, replacement_config and base config attributes (num_labels=...)."
    )


def resolve_dtype(dtype: torch.dtype | str | None, torch_dtype: torch.dtype | str | None) -> torch.dtype | str | None:
    if dtype is not None and torch_dtype is not None:
        raise TypeError("give dtype or torch_dtype (its older name), not both.")
    dtype = dtype if dtype is not None else torch_dtype
    if isinstance(dtype, str) and dtype != "auto":
        resolved = getattr(torch, dtype, None)
        if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
            raise ValueError(f"dtype={dtype!r} is not a floating-point torch dtype (e.g. 'bfloat16') or 'auto'.")
        return resolved
    return dtype


def single_device(device_map: str | int | torch.device | dict[str, Any] | None) -> torch.device | None:
    """A RepL block reads its neighbours' weights: the model lives on one device."""
    if isinstance(device_map, dict) and set(device_map) == {""}:
        device_map = device_map[""]
    if device_map is None:
        return None
    if isinstance(device_map, (int, torch.device)) or (
        isinstance(device_map, str) and device_map not in ("auto", "balanced", "balanced_low_0", "sequential")
    ):
        return torch.device(device_map)
    raise ValueError(
        f"device_map={device_map!r} would split the model across devices, but a replaced block reads its "
        "neighbours' weights on every forward: give one device (e.g. device_map='cuda:0')."
    )


def download_replacement_checkpoint(
    repo_id: str, subfolder: str, revision: str | None, token: str | bool | None,
    cache_dir: str | os.PathLike | None, local_files_only: bool,
) -> str:  # fmt: skip
    if not looks_like_repo_id(repo_id):
        raise FileNotFoundError(
            f"{repo_id} is not a directory holding a RepL checkpoint ({CONFIG_NAME}, {WEIGHTS_NAME}) nor a Hub id."
        )
    try:
        folder = download_checkpoint(
            repo_id, revision=revision, token=token, cache_dir=cache_dir, local_files_only=local_files_only
        )
    except HubDownloadError as error:
        raise HubDownloadError(f"{repo_id} is no local directory; as a Hub repo: {error}", error.status_code) from None
    directory = os.path.join(folder, subfolder) if subfolder else folder
    if not os.path.isfile(os.path.join(directory, CONFIG_NAME)):
        raise FileNotFoundError(
            f"Hub repo {repo_id}{f' (subfolder {subfolder})' if subfolder else ''} has no {CONFIG_NAME}: it is not a "
            "RepL checkpoint. A merged model loads with transformers.AutoModelForImageClassification.from_pretrained."
        )
    return directory


def _base_config_path(directory: str) -> str | None:
    for name in (BASE_CONFIG_NAME, "config.json"):  # checkpoints written before base_config.json held it in config.json
        path = os.path.join(directory, name)
        if os.path.isfile(path) and not _is_guard(path):
            return path
    return None


def _read_base_config(directory: str) -> PretrainedConfig:
    config_path = _base_config_path(directory)
    if config_path is None:
        raise FileNotFoundError(
            f"{os.path.join(directory, BASE_CONFIG_NAME)} is missing, and the checkpoint's model cannot be built "
            "without it: restore it from the saved run, or pass model=<a fresh instance of the base architecture> "
            "to ReplacementModel.from_pretrained for a model that is not a Transformers model."
        )
    try:
        with open(config_path, encoding="utf-8") as stream:
            data = json.load(stream)
        return CONFIG_MAPPING[data["model_type"]].from_dict(data)
    except (OSError, ValueError, KeyError, TypeError) as error:
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ValueError(f"{config_path} is not a readable Transformers config ({first_line[:200]}).") from None


def build_base_model(directory: str, config_overrides: dict[str, Any] | None = None) -> nn.Module:
    """The base model a RepL checkpoint's base config describes (with `config_overrides` set on the config,
    in their order, as Transformers sets `from_pretrained`'s config keywords), its weights left uninitialised."""
    config = _read_base_config(directory)
    for name, value in (config_overrides or {}).items():
        setattr(config, name, value)
    architectures = getattr(config, "architectures", None) or []
    # Only a model class is built: an arbitrary transformers attribute (AutoModel, pipeline) is never called.
    model_class = getattr(transformers, architectures[0], None) if architectures else None
    if not (isinstance(model_class, type) and issubclass(model_class, PreTrainedModel)):
        raise ValueError(
            f"{_base_config_path(directory)} names no Transformers model class in 'architectures' ({architectures}); "
            "it should name the base model's class, e.g. ['ViTForImageClassification']."
        )
    with no_init_weights():  # every weight is loaded from the checkpoint just after
        model = model_class(config)
    model.tie_weights()  # as from_pretrained does: tied copies were saved once
    return model


def checkpoint_dtype(state_dict: dict[str, torch.Tensor]) -> torch.dtype:
    """The dtype a checkpoint was saved in (what `dtype="auto"` loads it as): that of its first floating-point
    weight, the coefficients (always fp32) aside. The weights rather than the config's `dtype`, which
    `base_config.json` records too: a `model=` given by the caller has a config of its own, and checkpoints
    written before the dtype was recorded hold `"dtype": null`."""
    for key, tensor in state_dict.items():
        if tensor.is_floating_point() and not key.startswith(_COEFFICIENTS_PREFIX):
            return tensor.dtype
    return torch.float32


def refuse_weights_only_directory(directory: str) -> None:
    """Explain a directory that holds a RepL model's weights but no `replacement_config.json`: what wrote it
    (a plain `transformers.Trainer`, `accelerator.save_model`) and how to load it."""
    if os.path.isfile(os.path.join(directory, CONFIG_NAME)):
        return
    has_weights = any(os.path.isfile(os.path.join(directory, name)) for name in (WEIGHTS_NAME, WEIGHTS_INDEX_NAME))
    if not has_weights:
        raise FileNotFoundError(
            f"{directory} holds no RepL checkpoint: neither {CONFIG_NAME} nor {WEIGHTS_NAME} is there. Save one with "
            "ReplacementModel.save_pretrained (or ReplacementTrainer)."
        )
    writer = (
        "a plain transformers.Trainer (training_args.bin is there)"
        if os.path.isfile(os.path.join(directory, "training_args.bin"))
        else "accelerator.save_model, a plain transformers.Trainer or safetensors.save_file"
    )
    raise FileNotFoundError(
        f"{directory} holds weights ({WEIGHTS_NAME}) but no {CONFIG_NAME}: it was written by {writer}, which saves "
        "a ReplacementModel's state dict only. Load it with ReplacementModel.from_pretrained(directory, "
        "model=<a fresh base model>, replacement_config=<the ReplacementConfig it was trained with>), or train "
        "with hf_replacement.ReplacementTrainer / save with model.save_pretrained, which write the whole checkpoint."
    )


# Transformers' name for a generating model's generation settings (`GenerationConfig`).
GENERATION_CONFIG_NAME = "generation_config.json"


def generation_config_files(model: nn.Module) -> dict[str, str]:
    """`generation_config.json` of a model that generates, as Transformers' `save_pretrained` writes it: with the
    RepL checkpoint, so that its loaded model and its merged model generate with the settings it was saved with."""
    generation_config = getattr(model, "generation_config", None)
    can_generate = getattr(model, "can_generate", None)
    if generation_config is None or not (callable(can_generate) and can_generate()):
        return {}
    return {GENERATION_CONFIG_NAME: generation_config.to_json_string()}


def load_generation_config(model: nn.Module, directory: str) -> None:
    """Give `model` the checkpoint's `generation_config.json` (saved by `save_pretrained` or a Trainer run), as
    Transformers' `from_pretrained` does; a model without one keeps the settings derived from its config."""
    if getattr(model, "generation_config", None) is None:
        return
    if os.path.isfile(os.path.join(directory, GENERATION_CONFIG_NAME)):
        model.generation_config = GenerationConfig.from_pretrained(directory)


def without_tied_copies(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], set[str]]:
    """The state dict with each tied tensor (sharing another's memory, e.g. GPT-2's `lm_head.weight`)
    kept once, under its first name, as Transformers saves it; and the names left out."""
    first_names: dict[tuple, str] = {}
    kept, tied = {}, set()
    for key, tensor in state_dict.items():
        identity = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.shape, tensor.stride())
        if tensor.numel() and identity in first_names:
            tied.add(key)
            continue
        first_names[identity] = key
        kept[key] = tensor
    return kept, tied


def load_exact(
    model: nn.Module, state_dict: dict[str, torch.Tensor], path: str, ignore_mismatched_sizes: bool = False
) -> list[str]:
    """Load `state_dict` into `model`: every weight must fit, except with `ignore_mismatched_sizes` a base
    model weight of another shape (a new head), which is left out and initialised as Transformers does.
    Returns the keys left out."""
    # A freshly built model ties its weights itself: the tied copies are left out on both sides.
    expected, tied = without_tied_copies(model.state_dict())
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong_shape = sorted(k for k in set(expected) & set(state_dict) if expected[k].shape != state_dict[k].shape)
    reinitialised = [] if any(k.startswith(_COEFFICIENTS_PREFIX) for k in wrong_shape) else wrong_shape
    if missing or unexpected or (wrong_shape and not (ignore_mismatched_sizes and reinitialised)):
        advice = (
            " To train a new head on another label set, pass ignore_mismatched_sizes=True with the new num_labels."
            if wrong_shape and not ignore_mismatched_sizes else ""
        )
        raise ValueError(
            f"{path} does not match the model built from its configs: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, wrong shape {wrong_shape[:5]}. Was it saved from another model "
            f"or replacement config?{advice}"
        )
    state_dict = {key: value for key, value in state_dict.items() if key not in reinitialised}
    result = model.load_state_dict(state_dict, strict=False)
    assert set(result.missing_keys) == tied | set(reinitialised) and not result.unexpected_keys, result
    if reinitialised:
        _initialise(model, reinitialised)
    return reinitialised


def _initialise(model: nn.Module, keys: list[str]) -> None:
    """Initialise the modules owning `keys` with their Transformers model's `_init_weights`, as Transformers'
    `from_pretrained` does for weights it did not load (a head of another size)."""
    owners = {key.rpartition(".")[0] for key in keys}
    transformers_models = [module for module in model.modules() if isinstance(module, PreTrainedModel)]
    if not transformers_models:
        raise ValueError(f"ignore_mismatched_sizes needs a Transformers base model to initialise {sorted(keys)[:5]}.")
    with torch.no_grad():
        for owner in sorted(owners):
            transformers_models[0]._init_weights(model.get_submodule(owner))
    logger.warning(
        "Weights %s were not loaded from the checkpoint (ignore_mismatched_sizes=True, another shape) and are newly "
        "initialised: train them before use.",
        sorted(keys),
    )


__all__ = ["BASE_CONFIG_NAME", "load_image_classifier", "load_pretrained_config"]
