"""Resumable training state in safetensors + JSON only (no pickle, unlike `torch.save`).

A training checkpoint directory holds the model checkpoint (`save_pretrained`) plus
`training_state.safetensors` (optimizer tensors, RNG states) and `training_state.json` (step,
epoch, optimizer hyper-parameters, scheduler state).
"""

from __future__ import annotations

import json
import os
import random
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .checkpoint import write_checkpoint

STATE_TENSORS = "training_state.safetensors"
STATE_JSON = "training_state.json"


class TrainingStateError(ValueError):
    """A training checkpoint cannot be resumed from."""


def save_training_state(
    directory: str, optimizer: torch.optim.Optimizer, scheduler: Any, progress: dict[str, int]
) -> None:
    """Write the optimizer, scheduler, RNG states and `progress` (step, epoch, ...) atomically."""
    optimizer_state = optimizer.state_dict()
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
        "progress": progress,
        "optimizer_param_groups": optimizer_state["param_groups"],
        "optimizer_scalars": scalars,
        "scheduler": scheduler.state_dict(),
        "rng_python": random.getstate(),
        "rng_numpy": [numpy_state[0], int(numpy_state[2]), int(numpy_state[3]), float(numpy_state[4])],
    }
    write_checkpoint(directory, {STATE_TENSORS: tensors, STATE_JSON: json.dumps(metadata, indent=2)})


def load_training_state(directory: str, optimizer: torch.optim.Optimizer, scheduler: Any) -> dict[str, int]:
    """Restore what `save_training_state` wrote; return its `progress`."""
    json_path, tensor_path = os.path.join(directory, STATE_JSON), os.path.join(directory, STATE_TENSORS)
    if not (os.path.isfile(json_path) and os.path.isfile(tensor_path)):
        raise TrainingStateError(
            f"{directory} is not a training checkpoint ({STATE_JSON} and {STATE_TENSORS} missing); "
            "pass a checkpoint-<step> directory written with --checkpointing-steps."
        )
    try:
        with open(json_path, encoding="utf-8") as handle:
            metadata = json.load(handle)
        tensors = load_file(tensor_path)
    except (ValueError, OSError, SafetensorError) as error:
        raise TrainingStateError(f"{directory} holds a corrupt training state ({error}).") from None
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    for index, values in metadata["optimizer_scalars"].items():
        state.setdefault(int(index), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": metadata["optimizer_param_groups"]})
    scheduler.load_state_dict(metadata["scheduler"])
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    name, position, has_gauss, gauss = metadata["rng_numpy"]
    np.random.set_state((name, tensors["rng.numpy"].numpy().astype(np.uint32), position, has_gauss, gauss))
    version, internal, gauss_next = metadata["rng_python"]
    random.setstate((version, tuple(internal), gauss_next))
    return metadata["progress"]
