"""The data of the worked examples: real images and text every machine here has, no download.

Images: Fashion-MNIST items (28x28, ten clothing classes; Debian's `dataset-fashion-mnist` puts the
IDX files in /usr/share/datasets/fashion-mnist, read with numpy) composed on a larger black canvas,
each item in its own cell of a grid so that none hides another.

- **Segmentation** (`segmentation_samples`): the mask of an item is its own pixels brighter than
  `ITEM_THRESHOLD`; a pixel's class is 0 (background) or 1 + the item's Fashion-MNIST class.
- **Detection** (`detection_samples`): an item's box is the extent of those pixels; the targets are in
  the DETR family's format: `{"class_labels": (k,), "boxes": (k, 4) normalised (cx, cy, w, h)}`.

Text (`stdlib_text`, `byte_blocks`): the source and docstrings of the Python standard library
(`sysconfig.get_paths()["stdlib"]`), read in sorted file order; a fixed share of the files is held out
for evaluation. Tokens are UTF-8 bytes (a 256-entry vocabulary, nothing to train or download): a
model's perplexity is per byte.

Training and evaluation samples come from Fashion-MNIST's own train and test splits; the same
`seed` gives the same samples on every machine.

The benchmark's task suites import this module as `examples.task_data` (benchmarks/harness/tasks.py), so
that the examples and the suites train on the same data: it imports only the library, never a sibling script.
"""

from __future__ import annotations

import os
import sysconfig

import numpy as np
import torch

from hf_replacement.commands.idx_files import FASHION_MNIST_DIR, FASHION_MNIST_LABELS, read_idx

ITEM_SIZE = 28
ITEM_THRESHOLD = 32  # of 255: the faint fringe of an item counts as background
SEGMENTATION_LABELS = ["background", *FASHION_MNIST_LABELS]
BYTE_VOCABULARY_SIZE = 256
_SPLIT_FILES = {"train": "train", "test": "t10k"}


def fashion_items(split: str = "train", data_dir: str = FASHION_MNIST_DIR) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST's `split` ("train": 60,000 items, "test": 10,000): images (n, 28, 28) uint8, labels (n,)."""
    if split not in _SPLIT_FILES:
        raise ValueError(f"split={split!r} is not a Fashion-MNIST split: use 'train' or 'test'.")
    prefix = os.path.join(data_dir, _SPLIT_FILES[split])
    if not os.path.exists(f"{prefix}-images-idx3-ubyte.gz"):
        raise FileNotFoundError(
            f"No Fashion-MNIST files in {data_dir}: install them with `sudo apt-get install dataset-fashion-mnist`."
        )
    return read_idx(f"{prefix}-images-idx3-ubyte.gz", 3), read_idx(f"{prefix}-labels-idx1-ubyte.gz", 1)


def compose_canvases(
    count: int, grid: int = 2, items_per_canvas: int = 2, split: str = "train", seed: int = 0,
    data_dir: str = FASHION_MNIST_DIR,
) -> tuple[np.ndarray, list[list[tuple[int, int, int]]]]:
    """`count` canvases of `grid` x `grid` cells of 28 px, each holding `items_per_canvas` random items
    (Fashion-MNIST's IDX files read from `data_dir`).

    Returns the canvases (count, 28 * grid, 28 * grid) uint8 and, per canvas, its items as
    (Fashion-MNIST class, top, left) in pixels.
    """
    if not 1 <= items_per_canvas <= grid * grid:
        raise ValueError(f"items_per_canvas={items_per_canvas} must be between 1 and grid * grid = {grid * grid}.")
    images, labels = fashion_items(split, data_dir)
    rng = np.random.default_rng(seed)
    size = ITEM_SIZE * grid
    canvases = np.zeros((count, size, size), dtype=np.uint8)
    placements: list[list[tuple[int, int, int]]] = []
    for canvas, cells in zip(canvases, (rng.permutation(grid * grid)[:items_per_canvas] for _ in range(count))):
        items = []
        for cell, item in zip(cells, rng.integers(0, len(images), items_per_canvas)):
            top, left = (cell // grid) * ITEM_SIZE, (cell % grid) * ITEM_SIZE
            canvas[top : top + ITEM_SIZE, left : left + ITEM_SIZE] = images[item]
            items.append((int(labels[item]), int(top), int(left)))
        placements.append(items)
    return canvases, placements


def pixel_values(canvases: np.ndarray) -> torch.Tensor:
    """Canvases as a model's input: 3 channels (the gray repeated), scaled to [-1, 1]."""
    gray = torch.from_numpy(canvases).float().div(127.5).sub(1.0)
    return gray.unsqueeze(1).expand(-1, 3, -1, -1).contiguous()


def segmentation_mask(canvas: np.ndarray, items: list[tuple[int, int, int]]) -> np.ndarray:
    """A canvas's (H, W) int64 mask: 0 for the background, 1 + c where an item of class c has pixels brighter than
    `ITEM_THRESHOLD`. `items`: the canvas's placements from `compose_canvases`."""
    mask = np.zeros(canvas.shape, dtype=np.int64)
    for label, top, left in items:
        cell = (slice(top, top + ITEM_SIZE), slice(left, left + ITEM_SIZE))
        mask[cell][canvas[cell] > ITEM_THRESHOLD] = label + 1
    return mask


def detection_target(canvas: np.ndarray, items: list[tuple[int, int, int]]) -> dict[str, torch.Tensor]:
    """A canvas's target in DETR's format: each item's class and the extent of its pixels brighter than
    `ITEM_THRESHOLD`, normalised (cx, cy, w, h)."""
    size = canvas.shape[0]
    boxes = []
    for _, top, left in items:
        rows, columns = np.nonzero(canvas[top : top + ITEM_SIZE, left : left + ITEM_SIZE] > ITEM_THRESHOLD)
        y0, y1 = top + rows.min(), top + rows.max() + 1
        x0, x1 = left + columns.min(), left + columns.max() + 1
        boxes.append([(x0 + x1) / 2 / size, (y0 + y1) / 2 / size, (x1 - x0) / size, (y1 - y0) / size])
    return {
        "class_labels": torch.tensor([label for label, _, _ in items], dtype=torch.long),
        "boxes": torch.tensor(boxes, dtype=torch.float32),
    }


def box_iou(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU of corner-format boxes (x0, y0, x1, y1): (n, 4) and (m, 4) give (n, m)."""
    top_left = torch.maximum(first[:, None, :2], second[None, :, :2])
    bottom_right = torch.minimum(first[:, None, 2:], second[None, :, 2:])
    intersection = (bottom_right - top_left).clamp(min=0).prod(-1)
    areas = [(boxes[:, 2:] - boxes[:, :2]).clamp(min=0).prod(-1) for boxes in (first, second)]
    return intersection / (areas[0][:, None] + areas[1][None, :] - intersection)


def segmentation_samples(count: int, split: str = "train", seed: int = 0, **layout: int) -> list[dict]:
    """`{"pixel_values": (3, H, W), "labels": (H, W) int64}` per canvas; label 0 is the background,
    1 + c an item of Fashion-MNIST class c (`SEGMENTATION_LABELS`). `layout`: `compose_canvases`'s."""
    canvases, placements = compose_canvases(count, split=split, seed=seed, **layout)
    return [
        {"pixel_values": image, "labels": torch.from_numpy(segmentation_mask(canvas, items))}
        for canvas, image, items in zip(canvases, pixel_values(canvases), placements)
    ]


def detection_samples(count: int, split: str = "train", seed: int = 0, **layout: int) -> list[dict]:
    """`{"pixel_values": (3, H, W), "labels": {"class_labels", "boxes"}}` per canvas (DETR's target format,
    `detection_target`)."""
    canvases, placements = compose_canvases(count, split=split, seed=seed, **layout)
    return [
        {"pixel_values": image, "labels": detection_target(canvas, items)}
        for canvas, image, items in zip(canvases, pixel_values(canvases), placements)
    ]


def stdlib_text(split: str = "train", max_bytes: int | None = None, held_out_every: int = 10) -> bytes:
    """The standard library's `.py` files, concatenated in sorted path order (UTF-8 bytes).

    Every `held_out_every`-th file is the "test" split, the others "train": the two never share a file.
    `max_bytes` stops reading once that many bytes are collected.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split={split!r} is not a split of the text: use 'train' or 'test'.")
    root = sysconfig.get_paths()["stdlib"]
    paths = sorted(
        os.path.join(directory, name)
        for directory, subdirectories, names in os.walk(root)
        if "site-packages" not in directory and "test" not in os.path.relpath(directory, root).split(os.sep)
        for name in names
        if name.endswith(".py")
    )
    chosen = [path for index, path in enumerate(paths) if (index % held_out_every == 0) == (split == "test")]
    collected: list[bytes] = []
    total = 0
    for path in chosen:
        with open(path, "rb") as handle:
            collected.append(handle.read())
        total += len(collected[-1])
        if max_bytes is not None and total >= max_bytes:
            break
    return b"".join(collected)[:max_bytes]


def byte_blocks(text: bytes, length: int) -> list[dict]:
    """Causal-LM samples: consecutive `length`-byte blocks, `labels` = `input_ids` (the model shifts them)."""
    tokens = torch.frombuffer(bytearray(text[: len(text) // length * length]), dtype=torch.uint8).long()
    return [{"input_ids": block, "labels": block.clone()} for block in tokens.view(-1, length)]


def decode(token_ids: torch.Tensor | list[int]) -> str:
    """Byte tokens back to text (bytes that are no valid UTF-8 are shown as U+FFFD)."""
    return bytes(int(token) for token in token_ids).decode("utf-8", errors="replace")


__all__ = [
    "BYTE_VOCABULARY_SIZE",
    "ITEM_THRESHOLD",
    "SEGMENTATION_LABELS",
    "box_iou",
    "byte_blocks",
    "compose_canvases",
    "decode",
    "detection_samples",
    "detection_target",
    "fashion_items",
    "pixel_values",
    "segmentation_mask",
    "segmentation_samples",
    "stdlib_text",
]
