"""Load a saved checkpoint (RepL or plain) and measure its accuracy: `hf-replacement evaluate`."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from ..config import CONFIG_NAME
from ..loading import load_image_classifier
from ..model import ReplacementModel
from .processing import load_saved_image_processor, square_size
from .tasks import refuse_unevaluated_task


def load_checkpoint(directory: str) -> nn.Module:
    """A RepL checkpoint (has `replacement_config.json`) or a plain Transformers model directory."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(
            f"{directory} is not a checkpoint directory (written by train, save_pretrained or merge)."
        )
    if os.path.isfile(os.path.join(directory, CONFIG_NAME)):
        return ReplacementModel.from_pretrained(directory)
    return load_image_classifier(directory).eval()


def evaluate_checkpoint(
    directory: str,
    dataset: str,
    data_dir: str | None = None,
    batch_size: int = 64,
    max_eval_samples: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Accuracy of the checkpoint on the data set's test split (one process).

    An image classifier only: a checkpoint of another task is refused before anything is loaded, with a message
    naming what evaluates it (`tasks.refuse_unevaluated_task`).

    The images are prepared as in training: at the size and with the normalisation of the image processor
    saved with the checkpoint, else at the config's image size with mean 0.5 / std 0.5.
    """
    from accelerate import Accelerator
    from torch.utils.data import DataLoader

    from .data import collate_fn, dataset_info, load_image_dataset, prepare_dataset, subsample
    from .train import evaluate_loader

    refuse_unevaluated_task(directory)
    model = load_checkpoint(directory)
    config = model.config
    image_processor = load_saved_image_processor(directory)
    image_size = square_size(image_processor) or int(config.image_size)
    raw = subsample(load_image_dataset(dataset, data_dir=data_dir, seed=seed), None, max_eval_samples, seed=seed)
    check_labels_match(directory, config, dataset, *dataset_info(raw))
    data = prepare_dataset(raw, image_size, int(config.num_channels), image_processor)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    model, loader = accelerator.prepare(model, DataLoader(data["test"], batch_size=batch_size, collate_fn=collate_fn))
    accuracy = evaluate_loader(model, loader, accelerator)
    return {"checkpoint": directory, "dataset": dataset, "accuracy": accuracy, "samples": len(data["test"])}


def check_labels_match(directory: str, config: Any, dataset: str, num_labels: int, id2label: dict[int, str]) -> None:
    """Refuse a data set whose classes are not the model's: its accuracy would be a number about nothing."""
    model_labels = int(config.num_labels)
    if num_labels != model_labels:
        raise ValueError(
            f"{directory} predicts {model_labels} classes, but --dataset {dataset} has {num_labels}: the accuracy "
            "would compare unrelated labels. Evaluate on the data set the model was trained on (or one with the same "
            "classes)."
        )
    names = {int(index): str(name) for index, name in (getattr(config, "id2label", None) or {}).items()}
    # Models saved without label names carry Transformers' placeholders (LABEL_0, ...): nothing to compare.
    if names and any(name != f"LABEL_{index}" for index, name in names.items()):
        differing = [index for index in range(num_labels) if names.get(index) != str(id2label[index])]
        if differing:
            first = differing[0]
            raise ValueError(
                f"{directory} and --dataset {dataset} name their classes differently (class {first}: "
                f"{names.get(first)!r} in the model, {id2label[first]!r} in the data; {len(differing)} of "
                f"{num_labels} differ): evaluate on the data set the model was trained on."
            )

