"""Semantic segmentation with Replacement Learning: a SegFormer from a config, trained on Fashion-MNIST
items composed on a canvas, with `ReplacementTrainer`.

    python examples/semantic_segmentation.py --output-dir outputs/segmentation

A few minutes on 2 CPU cores, offline (see task_data.py: 56x56 canvases of two items, a pixel's
class is the background or its item's class, 11 classes). A four-stage SegFormer (MiT, depths
2-2-4-2) is trained from scratch with every 4th of its 10 blocks replaced, counted across the
stages (`replace_interval=4`); the blocks of different stages fuse by resampling. It prints the
mean IoU on held-out canvases (from Fashion-MNIST's test split), then saves, reloads with
`ReplacementModel.from_pretrained`, merges, and reloads the merged model as a plain
`SegformerForSemanticSegmentation` with identical logits. `--smoke`: a tiny run (tests).
"""

from __future__ import annotations

import argparse

import torch
from example_setup import example_parser, train
from round_trip import check_round_trip
from task_data import SEGMENTATION_LABELS, segmentation_samples
from transformers import SegformerConfig, SegformerForSemanticSegmentation

from hf_replacement import ReplacementConfig, get_replacement_model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = example_parser(__doc__.split("\n\n")[0], output_dir="outputs/segmentation", max_steps=500, lr=2e-3)
    parser.add_argument("--eval-size", type=int, default=256, help="held-out canvases for the mIoU")
    return parser.parse_args(argv)


def build_model(smoke: bool) -> SegformerForSemanticSegmentation:
    widths = [8, 16, 24, 32] if smoke else [32, 64, 128, 160]
    config = SegformerConfig(
        depths=[2, 2, 4, 2],
        hidden_sizes=widths,
        num_attention_heads=[1, 2, 4, 4],
        decoder_hidden_size=4 * widths[0],
        num_labels=len(SEGMENTATION_LABELS),
        id2label=dict(enumerate(SEGMENTATION_LABELS)),
        semantic_loss_ignore_index=-100,
    )
    return SegformerForSemanticSegmentation(config)


def mean_iou(model: torch.nn.Module, samples: list[dict], batch_size: int) -> tuple[float, list[float]]:
    """Mean over the classes of |prediction ∩ truth| / |prediction ∪ truth|, summed over all held-out pixels
    (logits upsampled to the canvas as the model's loss does); classes absent from both are skipped."""
    classes = len(SEGMENTATION_LABELS)
    confusion = torch.zeros(classes, classes, dtype=torch.long)
    model.eval()
    for start in range(0, len(samples), batch_size):
        batch = samples[start : start + batch_size]
        with torch.no_grad():
            logits = model(pixel_values=torch.stack([s["pixel_values"] for s in batch])).logits
        labels = torch.stack([s["labels"] for s in batch])
        logits = torch.nn.functional.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
        pairs = labels.flatten() * classes + logits.argmax(1).flatten()
        confusion += torch.bincount(pairs, minlength=classes * classes).view(classes, classes)
    intersection = confusion.diag().double()
    union = confusion.sum(0) + confusion.sum(1) - confusion.diag()
    ious = [float(i / u) for i, u in zip(intersection, union) if u > 0]
    return sum(ious) / len(ious), ious


def collate(samples: list[dict]) -> dict[str, torch.Tensor]:
    return {key: torch.stack([sample[key] for sample in samples]) for key in ("pixel_values", "labels")}


def main(argv: list[str] | None = None) -> float:
    args = parse_args(argv)
    if args.smoke:
        args.max_steps, args.batch_size, args.eval_size = 2, 2, 4
    torch.manual_seed(args.seed)
    train_samples = segmentation_samples(args.max_steps * args.batch_size, split="train", seed=args.seed)
    evaluation = segmentation_samples(args.eval_size, split="test", seed=args.seed)
    model = get_replacement_model(build_model(args.smoke), ReplacementConfig(replace_interval=args.replace_interval))
    model.print_trainable_parameters()
    trainer = train(model, args, train_samples, data_collator=collate)
    miou, ious = mean_iou(model, evaluation, args.batch_size)
    print(
        f"held-out mIoU: {miou:.3f} over {len(ious)} classes ({args.eval_size} canvases); background IoU {ious[0]:.3f}"
    )
    check_round_trip(
        trainer, {"pixel_values": collate(evaluation[:2])["pixel_values"]}, SegformerForSemanticSegmentation
    )
    return miou


if __name__ == "__main__":
    main()
