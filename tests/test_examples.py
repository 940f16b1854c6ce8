"""The worked examples in examples/: their data (task_data.py) and a tiny run of each (`--smoke`).

A smoke run trains two steps, prints its metric and ends with the round trip the example asserts
itself (save -> ReplacementModel.from_pretrained -> merge -> the plain class, identical outputs).
"""

from __future__ import annotations

import importlib
import math
import os
import sys

import numpy as np
import pytest
import torch

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
sys.path.insert(0, EXAMPLES)  # the examples import their sibling modules (task_data, round_trip) by name

task_data = importlib.import_module("task_data")
needs_fashion_mnist = pytest.mark.skipif(
    not os.path.isdir(task_data.FASHION_MNIST_DIR), reason="apt-get install dataset-fashion-mnist"
)


@needs_fashion_mnist
def test_masks_and_boxes_come_from_the_items_pixels():
    canvases, placements = task_data.compose_canvases(6, grid=2, items_per_canvas=2, split="test", seed=3)
    segmentation = task_data.segmentation_samples(6, split="test", seed=3, grid=2, items_per_canvas=2)
    detection = task_data.detection_samples(6, split="test", seed=3, grid=2, items_per_canvas=2)
    for canvas, items, mask_sample, box_sample in zip(canvases, placements, segmentation, detection):
        mask, target = mask_sample["labels"].numpy(), box_sample["labels"]
        assert [label for label, _, _ in items] == target["class_labels"].tolist()
        assert (mask > 0).sum() == (canvas > task_data.ITEM_THRESHOLD).sum()  # each item pixel once, no overlap
        for (label, top, left), box in zip(items, target["boxes"].tolist()):
            cell = (slice(top, top + 28), slice(left, left + 28))
            assert set(np.unique(mask[cell])) <= {0, label + 1}
            rows, columns = np.nonzero(mask == label + 1)
            size = canvas.shape[0]
            # The box is the tight extent of the item's mask, as (cx, cy, w, h) over the canvas size.
            expected = [
                (columns.min() + columns.max() + 1) / 2 / size,
                (rows.min() + rows.max() + 1) / 2 / size,
                (columns.max() + 1 - columns.min()) / size,
                (rows.max() + 1 - rows.min()) / size,
            ]
            assert np.allclose(box, expected, rtol=0, atol=np.finfo(np.float32).eps)


def test_text_splits_share_no_file_and_bytes_round_trip():
    train, test = task_data.stdlib_text("train", max_bytes=200_000), task_data.stdlib_text("test", max_bytes=200_000)
    assert len(train) == len(test) == 200_000 and train[:5000] != test[:5000]
    blocks = task_data.byte_blocks(test, 64)
    assert len(blocks) == 200_000 // 64
    assert all(torch.equal(block["input_ids"], block["labels"]) for block in blocks)
    assert b"".join(bytes(block["input_ids"].tolist()) for block in blocks) == test[: len(blocks) * 64]
    assert task_data.decode(blocks[0]["input_ids"]) == test[:64].decode("utf-8", errors="replace")
    with pytest.raises(ValueError, match="use 'train' or 'test'"):
        task_data.stdlib_text("validation")


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, low, high",
    [
        pytest.param("semantic_segmentation", 0.0, 1.0, marks=needs_fashion_mnist, id="semantic_segmentation"),  # mIoU
        pytest.param("object_detection", 0.0, 1.0, marks=needs_fashion_mnist, id="object_detection"),  # box accuracy
        pytest.param(
            "causal_language_modeling", 1.0, 256.0 * math.e, id="causal_language_modeling"
        ),  # perplexity per byte, near uniform after 2 steps
    ],
)
def test_example_smoke_run_ends_with_an_identical_plain_model(tmp_path, capsys, name, low, high):
    example = importlib.import_module(name)
    metric = example.main(["--smoke", "--output-dir", str(tmp_path)])
    assert low <= metric <= high
    printed = capsys.readouterr().out
    assert "identical outputs" in printed
    assert os.path.isfile(tmp_path / "merged" / "config.json") and os.path.isfile(
        tmp_path / "final" / "base_config.json"
    )


@pytest.mark.parametrize("smoke", [True, False])
def test_detection_example_trains_every_backbone_weight(smoke):
    """DETR freezes a ResNet backbone by parameter names a Transformers ResNet does not use: left alone, the
    example's backbone would stay at its random initialisation."""
    model = importlib.import_module("object_detection").build_model(smoke)
    frozen = [name for name, parameter in model.named_parameters() if not parameter.requires_grad]
    assert frozen == []
