"""Resumable training state in safetensors + JSON only (no pickle, unlike `torch.save`).

A training checkpoint directory holds the model checkpoint (`save_pretrained`) plus
`training_state.safetensors` (optimizer tensors, RNG states) and `training_state.json` (step,
epoch, optimizer hyper-parameters, scheduler state).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..checkpoint import WEIGHTS_NAME, write_checkpoint

logger = logging.getLogger(__name__)

STATE_TENSORS = "training_state.safetensors"
STATE_JSON = "training_state.json"


class TrainingStateError(ValueError):
    """A training checkpoint cannot be resumed from."""


def save_training_state(
    directory: str,
    optimizer_state: dict[str, Any],
    scheduler: Any,
    progress: dict[str, int],
    run: dict[str, Any],
    settings: dict[str, Any] | None = None,
) -> None:
    """Write the optimizer state, the scheduler, RNG states and `progress` (step, epoch, ...) atomically.

    `optimizer_state`: `torch.optim.Optimizer.state_dict()`'s layout (a sharded model's gathered by
    `sharding.gather_optimizer_state_dict`). `run` (model, method, RepL config) and the digest of the
    directory's weights are recorded, so a resume can refuse another run's checkpoint, or one whose
    weights were replaced by another save. `settings` (`resume_check.run_settings`): the training flags a
    resume compares with its own.
    """
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, state in optimizer_state["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{index}.{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    numpy_state = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(numpy_state[1].astype(np.int64))
    metadata = {
        "run": run,
        "settings": settings,
        "weights_sha256": weights_digest(directory),
        "progress": progress,
        "optimizer_param_groups": optimizer_state["param_groups"],
        "optimizer_scalars": scalars,
        "scheduler": scheduler.state_dict(),
        "rng_python": random.getstate(),
        "rng_numpy": [numpy_state[0], int(numpy_state[2]), int(numpy_state[3]), float(numpy_state[4])],
    }
    write_checkpoint(directory, {STATE_TENSORS: tensors, STATE_JSON: json.dumps(metadata, indent=2)})


def weights_digest(directory: str) -> str:
    """SHA-256 of the directory's `model.safetensors`."""
    digest = hashlib.sha256()
    with open(os.path.join(directory, WEIGHTS_NAME), "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_resumable(directory: str, run: dict[str, Any]) -> dict[str, Any] | None:
    """Refuse, before anything is loaded, a checkpoint of another run or one whose parts disagree.

    Returns the training settings the checkpoint recorded (None from an older hf_replacement).
    """
    metadata = _read_metadata(directory)
    if "run" not in metadata:
        logger.warning("%s was saved by an older hf_replacement: its settings and parts are not checked.", directory)
        return None
    saved_run = metadata["run"]
    if saved_run != run:
        differences = [
            f"{key}: {saved_run.get(key)!r} there, {run.get(key)!r} now"
            for key in sorted(set(saved_run) | set(run))
            if saved_run.get(key) != run.get(key)
        ]
        raise TrainingStateError(
            f"--resume-from {directory} was saved by a run with other settings ({'; '.join(differences)}): "
            "resume with the same --model, RepL flags and --baseline, or start a new run."
        )
    if metadata.get("weights_sha256") != weights_digest(directory):
        raise TrainingStateError(
            f"--resume-from {directory}: its {WEIGHTS_NAME} is not the one its training state was saved with "
            "(the checkpoint mixes two saves); resume from another checkpoint."
        )
    return metadata.get("settings")


def _read_metadata(directory: str) -> dict[str, Any]:
    json_path = os.path.join(directory, STATE_JSON)
    if not all(os.path.isfile(os.path.join(directory, name)) for name in (WEIGHTS_NAME, STATE_JSON, STATE_TENSORS)):
        raise TrainingStateError(
            f"{directory} is not a training checkpoint ({WEIGHTS_NAME}, {STATE_JSON} and {STATE_TENSORS} needed); "
            "pass a checkpoint-<step> directory written with --checkpointing-steps."
        )
    try:
        with open(json_path, encoding="utf-8") as handle:
            metadata = json.load(handle)
    except (ValueError, OSError) as error:
        raise TrainingStateError(f"{json_path} is corrupt ({error}).") from None
    if not isinstance(metadata, dict):
        raise TrainingStateError(f"{json_path} is corrupt (not a JSON object).")
    return metadata


def load_training_state(directory: str, scheduler: Any) -> tuple[dict[str, int], dict[str, Any]]:
    """Restore the scheduler and RNG states `save_training_state` wrote; return its `progress` and the
    optimizer state (`Optimizer.load_state_dict`'s layout) for the caller to load."""
    metadata = _read_metadata(directory)
    try:
        tensors = load_file(os.path.join(directory, STATE_TENSORS))
    except (ValueError, OSError, SafetensorError) as error:
        raise TrainingStateError(f"{directory} holds a corrupt training state ({error}).") from None
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    for index, values in metadata["optimizer_scalars"].items():
        state.setdefault(int(index), {}).update(values)
    scheduler.load_state_dict(metadata["scheduler"])
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    name, position, has_gauss, gauss = metadata["rng_numpy"]
    np.random.set_state((name, tensors["rng.numpy"].numpy().astype(np.uint32), position, has_gauss, gauss))
    version, internal, gauss_next = metadata["rng_python"]
    random.setstate((version, tuple(internal), gauss_next))
    return metadata["progress"], {"state": state, "param_groups": metadata["optimizer_param_groups"]}
