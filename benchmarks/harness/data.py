"""The tensors a suite trains, tests and times on."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # suites.py imports the task layer, which holds its data as TensorData
    from .suites import SuiteSpec

EVAL_BATCH_SIZE = 500


@dataclass
class TensorData:
    """A suite's train and test images and labels, held on the CPU and moved a batch at a time."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_labels: int
    id2label: dict[int, str]
    description: str


def load_tensor_data(suite: SuiteSpec, data_dir: str | None = None) -> TensorData:
    """The suite's data as in-memory tensors: the sets are small, and a permutation per epoch is all
    a DataLoader would do here, without its per-batch collation cost."""
    from hf_replacement.commands.data import dataset_info, load_image_dataset, prepare_dataset, subsample

    raw = load_image_dataset(suite.dataset, data_dir=data_dir, seed=0)
    raw = subsample(raw, suite.max_train_samples, suite.max_test_samples, seed=0)
    num_labels, id2label = dataset_info(raw)
    prepared = prepare_dataset(raw, suite.image_size, suite.num_channels)
    tensors = {}
    for split in ("train", "test"):
        batch = prepared[split][:]
        tensors[split] = (
            torch.stack(list(batch["pixel_values"])), torch.as_tensor(batch["label"], dtype=torch.long)
        )
    description = (
        f"{suite.dataset}: {len(tensors['train'][1])} train / {len(tensors['test'][1])} test images "
        f"at {suite.image_size}x{suite.image_size}"
    )
    return TensorData(*tensors["train"], *tensors["test"], num_labels, id2label, description)


def timing_batch(
    suite: SuiteSpec, data: TensorData | None, batch_size: int, device: torch.device
) -> dict[str, torch.Tensor]:
    """The one batch memory and time are measured on: the first training images, or (no data set)
    random images and labels drawn with seed 0."""
    if data is not None:
        # Copies: a slice would keep, and the saved-tensor meter would count, the whole training set's storage.
        pixels, labels = data.train_x[:batch_size].clone(), data.train_y[:batch_size].clone()
    else:
        generator = torch.Generator().manual_seed(0)
        pixels = torch.randn(batch_size, suite.num_channels, suite.image_size, suite.image_size, generator=generator)
        labels = torch.randint(0, suite.num_labels, (batch_size,), generator=generator)
    return {"pixel_values": pixels.to(device), "labels": labels.to(device)}


def eval_batches(
    data: TensorData, device: torch.device, batch_size: int = EVAL_BATCH_SIZE
) -> Iterator[dict[str, torch.Tensor]]:
    """The test set in batches, as `evaluate_accuracy` takes them."""
    for start in range(0, len(data.test_y), batch_size):
        yield {
            "pixel_values": data.test_x[start:start + batch_size].to(device),
            "labels": data.test_y[start:start + batch_size],
        }
