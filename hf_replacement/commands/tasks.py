"""Which Transformers Auto class loads a saved model, and which pipeline task serves it.

Read from Transformers' own registries, never from a list of our own: the Auto classes' architecture
mappings (`MODEL_FOR_*_MAPPING_NAMES`: model type -> class names) and the pipeline task registry
(`transformers.pipelines.SUPPORTED_TASKS`: task -> the Auto classes its pipeline loads), so an
architecture Transformers adds is named correctly without a change here.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping

from ..loading import BASE_CONFIG_NAME

# What `hf-replacement evaluate` measures.
EVALUATED_TASK = "image-classification"

# Transformers' example script (examples/pytorch/...) that trains and evaluates each task with the Trainer,
# for the tasks that have one; it runs a RepL model with ReplacementTrainer (docs/trainer.md).
EXAMPLE_SCRIPTS = {
    "text-generation": "language-modeling/run_clm.py",
    "fill-mask": "language-modeling/run_mlm.py",
    "text-classification": "text-classification/run_classification.py",
    "token-classification": "token-classification/run_ner.py",
    "image-segmentation": "semantic-segmentation/run_semantic_segmentation.py",
    "object-detection": "object-detection/run_object_detection.py",
    "audio-classification": "audio-classification/run_audio_classification.py",
    "automatic-speech-recognition": "speech-recognition/run_speech_recognition_ctc.py",
}


@dataclasses.dataclass(frozen=True)
class ModelTask:
    """What serves one saved architecture: `auto_class` loads it (None: only its own class does), and the
    pipeline tasks that take it, in the registry's order (the first is Transformers' main task for it)."""

    architecture: str
    auto_class: str | None
    pipeline_tasks: tuple[str, ...]

    @property
    def pipeline_task(self) -> str | None:
        return self.pipeline_tasks[0] if self.pipeline_tasks else None

    def how_to_load(self, directory: str) -> str:
        """One line for the user: the loader and the main pipeline task of a plain model saved in `directory`."""
        loader = f"loads with {self.auto_class or f'transformers.{self.architecture}'}"
        if self.pipeline_task is None:
            return f"{loader}; no Transformers pipeline task takes a {self.architecture}"
        return f'{loader}; serves pipeline("{self.pipeline_task}", model="{directory}")'


def saved_architecture(directory: str) -> tuple[str, str] | None:
    """(model type, architecture class name) of a RepL checkpoint (its `base_config.json`) or of a plain
    Transformers model directory (its `config.json`); None when no readable config names a Transformers model
    type and class (a RepL checkpoint's guard `config.json` included: the loaders name that problem)."""
    from transformers import CONFIG_MAPPING

    base_config = os.path.join(directory, BASE_CONFIG_NAME)
    config_path = base_config if os.path.isfile(base_config) else os.path.join(directory, "config.json")
    try:
        with open(config_path, encoding="utf-8") as stream:
            config = json.load(stream)
        architectures = config.get("architectures") or []
        model_type = config.get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
    if not (architectures and isinstance(architectures[0], str) and model_type in CONFIG_MAPPING):
        return None
    if not CONFIG_MAPPING[model_type].__module__.startswith("transformers."):  # hf_replacement's registered guard
        return None
    return model_type, architectures[0]


def _mapping_names() -> dict[int, Mapping[str, str | tuple[str, ...]]]:
    """Each Auto class's mapping (by identity) -> its `*_MAPPING_NAMES` (model type -> class names).

    The names are read, not the lazy mapping's values: those would import every model class."""
    from transformers.models.auto import modeling_auto

    return {
        id(getattr(modeling_auto, name.removesuffix("_NAMES"))): getattr(modeling_auto, name)
        for name in dir(modeling_auto)
        if name.endswith("_MAPPING_NAMES") and hasattr(modeling_auto, name.removesuffix("_NAMES"))
    }


def _loads(names: Mapping[str, str | tuple[str, ...]] | None, model_type: str, architecture: str) -> bool:
    classes = (names or {}).get(model_type, ())
    return architecture in ((classes,) if isinstance(classes, str) else classes)


def model_task(model_type: str, architecture: str) -> ModelTask:
    """The Auto class and pipeline tasks for `architecture` (a class of Transformers model type `model_type`).

    The Auto class is the one the first serving pipeline task loads it with; for an architecture no pipeline
    takes, the most specific Auto class that loads it (the one whose mapping names fewest model types, so
    AutoModelForSeq2SeqLM rather than AutoModelForPreTraining for T5).
    """
    from transformers.models.auto import modeling_auto
    from transformers.pipelines import SUPPORTED_TASKS

    names = _mapping_names()
    # `_model_mapping` is the Auto class's lazy mapping, as Transformers' own pipelines read it (no public accessor).
    auto_classes = [getattr(modeling_auto, name) for name in dir(modeling_auto) if name.startswith("AutoModel")]
    loaders = [
        auto_class
        for auto_class in auto_classes
        if _loads(names.get(id(getattr(auto_class, "_model_mapping", None))), model_type, architecture)
    ]
    tasks, task_loaders = [], []
    for task, spec in SUPPORTED_TASKS.items():
        serving = [auto_class for auto_class in spec.get("pt", ()) if auto_class in loaders]
        if serving:
            tasks.append(task)
            task_loaders.extend(serving)
    if task_loaders:
        auto_class = task_loaders[0]
    elif loaders:
        auto_class = min(loaders, key=lambda loader: len(names[id(loader._model_mapping)]))
    else:
        auto_class = None
    return ModelTask(architecture, auto_class.__name__ if auto_class else None, tuple(tasks))


def checkpoint_task(directory: str) -> ModelTask | None:
    """`model_task` of the architecture saved in `directory`; None when its config names none."""
    saved = saved_architecture(directory)
    return model_task(*saved) if saved else None


def refuse_unevaluated_task(directory: str) -> None:
    """Raise a `ValueError` naming the task and what evaluates it, unless `directory` holds an image classifier.

    Reads the saved config only, so a checkpoint of another task is refused before any model or data is loaded.
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

    saved = saved_architecture(directory)
    if saved is None or _loads(MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES, *saved):
        return
    task = model_task(*saved)
    what = f"a {task.architecture} ({task.pipeline_task or task.auto_class or 'no Transformers task'})"
    script = EXAMPLE_SCRIPTS.get(task.pipeline_task or "")
    example = (
        f"Transformers' example script examples/pytorch/{script}"
        if script
        else "the Transformers example script of its task (examples/pytorch/)"
    )
    raise ValueError(
        f"{directory} holds {what}; `hf-replacement evaluate` measures {EVALUATED_TASK} accuracy only. Evaluate it "
        f"with {example} (--do_eval, with ReplacementTrainer in place of Trainer: docs/trainer.md), or in Python "
        "with ReplacementTrainer(model=ReplacementModel.from_pretrained(DIR), args=..., eval_dataset=..., "
        "compute_metrics=...).evaluate(); a merged model (`hf-replacement merge`) evaluates as any Transformers model."
    )


__all__ = ["EVALUATED_TASK", "ModelTask", "checkpoint_task", "model_task", "refuse_unevaluated_task"]
