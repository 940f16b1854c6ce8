"""The tasks a suite trains (`SuiteSpec.task`): per task its models, data, batches and held-out metric.

Image classification (the default) is the presets on an image data set, scored by accuracy. The other tasks
use the task models and data of the worked examples (`examples/task_data.py`, imported, not copied): tiny
configs built here, each model's own loss, and the metric on held-out data:

- `causal-lm`: GPT-2 on the standard library's `.py` files as UTF-8 bytes (every 10th file held out), perplexity
  per byte on the held-out files: exp of the mean negative log-likelihood of every predicted byte (lower is better).
- `semantic-segmentation`: SegFormer on 56x56 canvases of two Fashion-MNIST items (11 classes with the
  background), mIoU on canvases from Fashion-MNIST's test split (`task_metrics.mean_iou`).
- `object-detection`: DETR with a Transformers ResNet backbone on the same canvases (10 classes), mAP@0.5 on
  held-out canvases (`task_metrics.mean_average_precision`): each of DETR's queries is one detection, its class
  the most probable one ("no object" excluded), its score that probability.

A task's data is held as `TensorData` (canvases as uint8, masks, byte blocks, a detection's targets as a
(n, items, 5) tensor of class and box): `Task.batch` makes the model's inputs from an index of it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from hf_replacement.commands.idx_files import FASHION_MNIST_DIR, FASHION_MNIST_LABELS
from hf_replacement.commands.training_steps import evaluate_accuracy

from .data import TensorData, eval_batches, load_tensor_data
from .errors import BenchmarkError
from .task_metrics import confusion_matrix, mean_average_precision, mean_iou

if TYPE_CHECKING:
    from .suites import SuiteSpec

CLASSIFICATION = "image-classification"
CANVAS_SIZE = 56  # task_data's 2 x 2 grid of 28 px cells
BLOCK_BYTES = 64  # bytes per causal-LM sample
HALF_NOT_DEFINED = ("the lighter surrogate 'half' is defined for the blocks of ViT/DeiT, BEiT, DINOv2, Swin, ConvNeXt "
                    "(V2) and ResNet only (hf_replacement.surrogates), {which}; RepL with the whole block (repl-k4) is "
                    "measured instead")


@dataclass(frozen=True)
class Metric:
    """A task's held-out metric. Results keep it under the `accuracy` keys (`accuracy_mean`, ...) whatever it is."""

    name: str
    higher_is_better: bool
    percent: bool  # shown x100 (a fraction), else as it is
    description: str

    def format(self, value: float) -> str:
        """A value as the tables show it: percent, or the metric's own unit."""
        return f"{100 * value:.1f}" if self.percent else f"{value:.3f}"

    def difference(self, difference: float, spread: float | None = None) -> str:
        """A difference of two values (and a spread), in the unit the tables show: percentage points, or the
        metric's own unit."""
        if self.percent:
            return f"{100 * difference:+.1f}" + (f" ± {100 * spread:.1f}" if spread is not None else "") + " pts"
        return f"{difference:+.3f}" + (f" ± {spread:.3f}" if spread is not None else "")

    def gain(self, difference: float) -> float:
        """`difference` (one value less another) signed so that positive means better."""
        return difference if self.higher_is_better else -difference


Precision = Any  # a context manager factory (device.autocast)


@dataclass(frozen=True)
class Task:
    """What a suite of this task trains: `models` (name -> builder; classification: the presets), the metric,
    `not_applicable` (method -> why it cannot apply to this task's models: refused by the suite check),
    `untrainable` (method -> how it runs but fails to train this task's model, measured: its metric is no
    baseline to judge RepL's against, so the verdict does not)."""

    name: str
    metric: Metric
    input_name: str  # the model's input: pixel_values or input_ids
    input_size: int | None  # the fixed sample size (canvas side, bytes per block); None: the suite's image_size
    models: Mapping[str, Callable[[], nn.Module]]
    load: Callable[[SuiteSpec, str | None], TensorData]
    batch: Callable[[torch.Tensor, torch.Tensor, torch.device], dict[str, Any]]
    evaluate: Callable[[nn.Module, TensorData, torch.device, Precision], float]
    not_applicable: Mapping[str, str] = field(default_factory=dict)
    untrainable: Mapping[str, str] = field(default_factory=dict)


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """`model` in eval mode without gradients within the block, its training mode restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _classification_batch(x: torch.Tensor, y: torch.Tensor, device: torch.device) -> dict[str, Any]:
    return {"pixel_values": x.to(device), "labels": y.to(device)}


def _classification_metric(model: nn.Module, data: TensorData, device: torch.device, precision: Precision) -> float:
    return evaluate_accuracy(model, eval_batches(data, device), precision=precision)


# --- causal language modelling ---------------------------------------------------------------------------------

def build_gpt2_tiny() -> nn.Module:
    """An 8-block GPT-2, 128 wide, on the 256 byte values (tied input and output embeddings)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from examples.task_data import BYTE_VOCABULARY_SIZE

    config = GPT2Config(vocab_size=BYTE_VOCABULARY_SIZE, n_positions=BLOCK_BYTES, n_embd=128, n_layer=8, n_head=4,
                        bos_token_id=10, eos_token_id=10, pad_token_id=0)
    return GPT2LMHeadModel(config)


def _load_text(suite: SuiteSpec, data_dir: str | None) -> TensorData:
    from examples.task_data import byte_blocks, stdlib_text

    if data_dir is not None:
        raise BenchmarkError(f"--data-dir {data_dir}: the text of task {suite.task!r} is this Python's standard "
                             "library, read where it is installed; leave --data-dir out.")

    split = {}
    for name, count in (("train", suite.max_train_samples), ("test", suite.max_test_samples)):
        blocks = byte_blocks(stdlib_text(name, max_bytes=count * BLOCK_BYTES), BLOCK_BYTES)
        split[name] = torch.stack([block["input_ids"] for block in blocks])
    description = (f"the standard library's .py files as bytes (every 10th file held out): {len(split['train'])} train "
                   f"/ {len(split['test'])} held-out blocks of {BLOCK_BYTES} bytes")
    return TensorData(split["train"], split["train"], split["test"], split["test"], 0, {}, description)


def _text_batch(x: torch.Tensor, y: torch.Tensor, device: torch.device) -> dict[str, Any]:
    return {"input_ids": x.to(device), "labels": y.to(device)}  # the model shifts the labels


def perplexity(model: nn.Module, data: TensorData, device: torch.device, precision: Precision,
               batch_size: int = 256) -> float:
    """exp(mean negative log-likelihood per predicted byte) over the held-out blocks (all of one length, so the
    mean of the blocks' mean losses weighted by their count is the mean over bytes)."""
    total, count = 0.0, 0
    with evaluating(model), precision:
        for start in range(0, len(data.test_x), batch_size):
            batch = _text_batch(data.test_x[start:start + batch_size], data.test_y[start:start + batch_size], device)
            total += float(model(**batch).loss) * len(batch["input_ids"])
            count += len(batch["input_ids"])
    return math.exp(total / count)


# --- canvases: segmentation and detection ---------------------------------------------------------------------

def build_segformer_tiny() -> nn.Module:
    """A four-stage SegFormer (MiT, depths 2-2-4-2, widths 32-64-128-160): 10 blocks across the stages."""
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    from examples.task_data import SEGMENTATION_LABELS

    config = SegformerConfig(depths=[2, 2, 4, 2], hidden_sizes=[32, 64, 128, 160], num_attention_heads=[1, 2, 4, 4],
                             decoder_hidden_size=128, num_labels=len(SEGMENTATION_LABELS),
                             id2label=dict(enumerate(SEGMENTATION_LABELS)), semantic_loss_ignore_index=-100)
    return SegformerForSemanticSegmentation(config)


def build_detr_tiny() -> nn.Module:
    """DETR (64 wide, 4 encoder and 4 decoder layers, 8 queries) on a ResNet backbone (depths 1-1-2-1, trained):
    three chains of blocks, the backbone's stages, the encoder and the decoder."""
    from transformers import DetrConfig, DetrForObjectDetection, ResNetConfig

    backbone = ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 2, 1],
                            out_features=["stage4"])
    config = DetrConfig(use_timm_backbone=False, use_pretrained_backbone=False, backbone_config=backbone, d_model=64,
                        encoder_layers=4, decoder_layers=4, encoder_attention_heads=4, decoder_attention_heads=4,
                        encoder_ffn_dim=128, decoder_ffn_dim=128, num_queries=8, dropout=0.0,
                        num_labels=len(FASHION_MNIST_LABELS), id2label=dict(enumerate(FASHION_MNIST_LABELS)))
    model = DetrForObjectDetection(config)
    # DETR freezes its backbone but the stages its name check spares ("stage.1", ...), which never match a
    # Transformers ResNet's parameter names ("stages.1...", Transformers 5.23): the whole backbone would stay at
    # its random initialisation. Trained from scratch here, every backbone weight trains.
    model.model.backbone.requires_grad_(True)
    return model


def _canvases(split: str, count: int, data_dir: str | None) -> tuple[torch.Tensor, list[list[tuple[int, int, int]]]]:
    """`count` canvases of Fashion-MNIST's `split` (its files in `data_dir`, default the Debian package's) as uint8
    (the model's input is made per batch), and their items."""
    from examples.task_data import compose_canvases

    canvases, placements = compose_canvases(count, split=split, seed=0, data_dir=data_dir or FASHION_MNIST_DIR)
    return torch.from_numpy(canvases), placements


def _load_segmentation(suite: SuiteSpec, data_dir: str | None) -> TensorData:
    from examples.task_data import SEGMENTATION_LABELS, segmentation_mask

    split = {}
    for name, count in (("train", suite.max_train_samples), ("test", suite.max_test_samples)):
        canvases, placements = _canvases(name, count, data_dir)
        masks = [torch.from_numpy(segmentation_mask(c, p)) for c, p in zip(canvases.numpy(), placements)]
        split[name] = (canvases, torch.stack(masks))
    description = _canvas_description("segmentation", split)
    return TensorData(*split["train"], *split["test"], len(SEGMENTATION_LABELS), {}, description)


def _load_detection(suite: SuiteSpec, data_dir: str | None) -> TensorData:
    from examples.task_data import detection_target

    split = {}
    for name, count in (("train", suite.max_train_samples), ("test", suite.max_test_samples)):
        canvases, placements = _canvases(name, count, data_dir)
        targets = [detection_target(c, p) for c, p in zip(canvases.numpy(), placements)]
        # Every canvas holds the same number of items: one (n, items, 5) tensor of class and box.
        split[name] = (canvases, torch.stack([
            torch.cat([t["class_labels"][:, None].float(), t["boxes"]], dim=1) for t in targets
        ]))
    description = _canvas_description("detection", split)
    return TensorData(*split["train"], *split["test"], len(FASHION_MNIST_LABELS), {}, description)


def _canvas_description(task: str, split: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> str:
    return (f"Fashion-MNIST {task} canvases ({CANVAS_SIZE}x{CANVAS_SIZE}, two items; test canvases from its test "
            f"split): {len(split['train'][0])} train / {len(split['test'][0])} held-out, seed 0")


def _pixels(canvases: torch.Tensor, device: torch.device) -> torch.Tensor:
    from examples.task_data import pixel_values

    return pixel_values(canvases.numpy()).to(device)


def _segmentation_batch(x: torch.Tensor, y: torch.Tensor, device: torch.device) -> dict[str, Any]:
    return {"pixel_values": _pixels(x, device), "labels": y.to(device)}


def _detection_batch(x: torch.Tensor, y: torch.Tensor, device: torch.device) -> dict[str, Any]:
    targets = [{"class_labels": t[:, 0].long().to(device), "boxes": t[:, 1:].to(device)} for t in y]
    return {"pixel_values": _pixels(x, device), "labels": targets}


def segmentation_miou(model: nn.Module, data: TensorData, device: torch.device, precision: Precision,
                      batch_size: int = 128) -> float:
    """mIoU over the held-out canvases: logits upsampled to the canvas (bilinear, as the model's loss does)."""
    classes = model.config.num_labels
    confusion = torch.zeros(classes, classes, dtype=torch.long)
    with evaluating(model), precision:
        for start in range(0, len(data.test_x), batch_size):
            labels = data.test_y[start:start + batch_size]
            logits = model(pixel_values=_pixels(data.test_x[start:start + batch_size], device)).logits.float()
            logits = nn.functional.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
            confusion += confusion_matrix(logits.argmax(1).cpu(), labels, classes)
    return mean_iou(confusion)[0]


def detection_map(model: nn.Module, data: TensorData, device: torch.device, precision: Precision,
                  batch_size: int = 128) -> float:
    """mAP@0.5 over the held-out canvases, every query a detection (boxes compared in normalised corners)."""
    from transformers.image_transforms import center_to_corners_format

    detections, truths = [], []
    with evaluating(model), precision:
        for start in range(0, len(data.test_x), batch_size):
            outputs = model(pixel_values=_pixels(data.test_x[start:start + batch_size], device))
            scores, classes = outputs.logits.float().softmax(-1)[..., :-1].max(-1)
            boxes = center_to_corners_format(outputs.pred_boxes.float())
            detections += [(s.cpu(), c.cpu(), b.cpu()) for s, c, b in zip(scores, classes, boxes)]
            truths += [(t[:, 0].long(), center_to_corners_format(t[:, 1:]))
                       for t in data.test_y[start:start + batch_size]]
    return mean_average_precision(detections, truths)[0]


TASKS: dict[str, Task] = {
    CLASSIFICATION: Task(
        CLASSIFICATION, Metric("accuracy", True, True, "top-1 accuracy on the test images"), "pixel_values", None,
        {}, lambda suite, data_dir: load_tensor_data(suite, data_dir), _classification_batch, _classification_metric,
    ),
    "causal-lm": Task(
        "causal-lm",
        Metric("perplexity", False, False, "perplexity per byte on the held-out files (lower is better)"),
        "input_ids", BLOCK_BYTES, {"gpt2-tiny": build_gpt2_tiny}, _load_text, _text_batch, perplexity,
        not_applicable={
            "repl-k4-half": HALF_NOT_DEFINED.format(which="not for GPT-2's"),
        },
    ),
    "semantic-segmentation": Task(
        "semantic-segmentation",
        Metric("mIoU", True, True, "mean IoU over the 11 classes (background included), intersections and unions "
                                   "accumulated over all held-out pixels"),
        "pixel_values", CANVAS_SIZE, {"segformer-tiny": build_segformer_tiny}, _load_segmentation,
        _segmentation_batch, segmentation_miou,
        not_applicable={
            "repl-k4-half": HALF_NOT_DEFINED.format(which="not for SegFormer's"),
            "narrow": "narrowing all stage widths by one factor (baselines.narrowed_config) gives widths that are "
                      "not multiples of the stages' heads (1-2-4-4), which it refuses",
        },
    ),
    "object-detection": Task(
        "object-detection",
        Metric("mAP@0.5", True, True, "VOC all-point mAP at IoU 0.5 over the classes in the held-out ground truth"),
        "pixel_values", CANVAS_SIZE, {"detr-tiny": build_detr_tiny}, _load_detection, _detection_batch,
        detection_map,
        not_applicable={
            "repl-k4-half": HALF_NOT_DEFINED.format(which="not for DETR's encoder and decoder layers (its ResNet "
                                                                  "backbone's blocks have it)"),
            "narrow": "DETR has no single width: its `d_model`, its FFN widths and its backbone's stage widths would "
                      "all have to shrink by one factor, which baselines.narrowed_config does not do (it refuses)",
        },
        untrainable={
            "sd": "skipping 3 of DETR's 10 skippable blocks per batch on average did not train it (mAP@0.5 1.0 ± "
                  "0.9 over 3 seeds; the suite's notes give the runs): the mAP of a model that did not train is "
                  "no baseline",
        },
    ),
}
ACCURACY = TASKS[CLASSIFICATION].metric
TASK_MODELS: dict[str, Callable[[], nn.Module]] = {
    name: builder for task in TASKS.values() for name, builder in task.models.items()
}


def task_of(suite: SuiteSpec | dict[str, Any]) -> Task:
    """The task of a suite (a `SuiteSpec` or its dict in results.json: results from before tasks classify)."""
    name = suite.get("task", CLASSIFICATION) if isinstance(suite, dict) else suite.task
    return TASKS[name]


__all__ = [
    "ACCURACY", "CLASSIFICATION", "TASKS", "TASK_MODELS", "Metric", "Task", "build_detr_tiny", "build_gpt2_tiny",
    "build_segformer_tiny", "detection_map", "perplexity", "segmentation_miou", "task_of",
]
