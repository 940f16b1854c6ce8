"""Resumable suites: each finished piece of a run (a model's memory/time measurements, one training run) is
written atomically under `<output dir>/runs/` with the settings that made it and their digest; a later run of
the same suite reuses what is there and refuses what was made with other settings.

A suite that takes longer than one sitting (the `fashion-mnist-full` suite: hours on 2 CPU cores) is run by
starting the same command again after an interruption: finished pieces are skipped, the rest run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from typing import Any

import torch

from hf_replacement.checkpoint import atomic_write

from .errors import BenchmarkError
from .methods import METHODS
from .suites import SuiteSpec
from .tasks import CLASSIFICATION

logger = logging.getLogger(__name__)

RUNS_DIR = "runs"
# Suite fields that never change a training run's result: names and prose, which runs exist (models, methods,
# seeds are the record's own keys), and the memory/time measurement's settings.
NOT_TRAINING_SETTINGS = frozenset({
    "name", "summary", "notes", "models", "methods", "accuracy_methods", "seeds", "timing_batch_size",
    "timing_warmup_steps", "timing_rounds", "timing_steps_per_round", "inference_batch_size", "inference_rounds",
    "inference_calls_per_round", "requires_cuda", "compiled_methods", "compile_backend",
})
# Suite fields that never change the memory/time measurements (prose, which runs are trained, and how).
NOT_MEASUREMENT_SETTINGS = frozenset({
    "name", "summary", "notes", "models", "accuracy_methods", "seeds", "epochs", "warmup_ratio",
    "max_train_samples", "max_test_samples", "pretrain",
})


# Suite fields added after pieces were first recorded, with the default that reproduces those pieces: left out of
# the settings at that default, so that what was recorded before they existed keeps its digest.
LATER_FIELD_DEFAULTS: dict[str, Any] = {"task": CLASSIFICATION, "max_grad_norm": None}


def _suite_settings(suite: SuiteSpec, excluded: frozenset[str]) -> dict[str, Any]:
    """The suite's fields less `excluded`, and less those of `LATER_FIELD_DEFAULTS` at their default."""
    return {
        k: v for k, v in dataclasses.asdict(suite).items()
        if k not in excluded and not (k in LATER_FIELD_DEFAULTS and v == LATER_FIELD_DEFAULTS[k])
    }


def settings_digest(settings: dict[str, Any]) -> str:
    """A short digest of `settings` (JSON, keys sorted): equal settings, equal digest, on any machine."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def training_settings(
    suite: SuiteSpec, model_name: str, method: str, seed: int, data: str, device: torch.device
) -> dict[str, Any]:
    """Everything one training run's result depends on: the suite's training settings, the model, the method's
    definition (not only its name), the seed, the data (its description names the split and subsample) and the
    device type."""
    suite_settings = _suite_settings(suite, NOT_TRAINING_SETTINGS)
    return {
        **suite_settings, "model": model_name, "method": dataclasses.asdict(METHODS[method]), "seed": seed,
        "data": data, "device": device.type,
    }


def measurement_settings(
    suite: SuiteSpec, model_name: str, methods: list[str], device: torch.device
) -> dict[str, Any]:
    """Everything one model's memory/time measurements depend on: the suite's measurement settings, the model,
    the measured methods (interleaved together: the set matters) and their definitions, the device type."""
    suite_settings = _suite_settings(suite, NOT_MEASUREMENT_SETTINGS)
    return {
        **suite_settings, "model": model_name, "methods": list(methods),
        "method_definitions": {m: dataclasses.asdict(METHODS[m]) for m in methods}, "device": device.type,
    }


def _shown(value: Any, limit: int = 160) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _differences(recorded: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    keys = sorted(set(recorded) | set(wanted))
    return [
        f"{key}: {_shown(recorded.get(key, '<absent>'))} on disk, {_shown(wanted.get(key, '<absent>'))} now"
        for key in keys
        if json.dumps(recorded.get(key), sort_keys=True, default=str)
        != json.dumps(wanted.get(key), sort_keys=True, default=str)
    ]


class RunStore:
    """The finished pieces of a suite under `<output_dir>/runs/<model>/`: `measurements.json` and
    `<method>-seed<N>.json`, each `{"settings_digest", "settings", "result"}`, written atomically."""

    def __init__(self, output_dir: str | os.PathLike) -> None:
        self.directory = os.path.join(os.fspath(output_dir), RUNS_DIR)
        self.reused: list[str] = []  # the pieces `load` found finished (paths relative to the output dir)

    def path(self, model_name: str, piece: str) -> str:
        """Where a piece is kept: `piece` is "measurements" or "<method>-seed<N>"."""
        return os.path.join(self.directory, model_name, f"{piece}.json")

    def load(self, model_name: str, piece: str, settings: dict[str, Any]) -> dict[str, Any] | None:
        """The finished piece's result, None when it is not there; raise when it was made with other settings."""
        path = self.path(model_name, piece)
        if not os.path.isfile(path):
            return None
        with open(path, encoding="utf-8") as handle:
            record = json.load(handle)
        if record.get("settings_digest") != settings_digest(settings):
            differences = _differences(record.get("settings", {}), json.loads(json.dumps(settings, default=str)))
            raise BenchmarkError(
                f"{path} holds a result made with other settings ({'; '.join(differences) or 'digest differs'}). "
                "Rerun with the settings it was made with to continue that suite, or pass another --output-dir "
                f"(or delete {self.directory}) to start one with the new settings."
            )
        self.reused.append(os.path.relpath(path, os.path.dirname(self.directory)))
        return record["result"]

    def save(self, model_name: str, piece: str, settings: dict[str, Any], result: dict[str, Any]) -> None:
        """Record a finished piece (atomically: an interrupted write leaves the old file or none)."""
        path = self.path(model_name, piece)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        record = {"settings_digest": settings_digest(settings), "settings": settings, "result": result}
        atomic_write(path, json.dumps(record, indent=1, sort_keys=True, default=str) + "\n")


__all__ = [
    "LATER_FIELD_DEFAULTS", "RUNS_DIR", "RunStore", "measurement_settings", "settings_digest", "training_settings",
]
