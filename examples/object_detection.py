"""Object detection with Replacement Learning: DETR with a Transformers ResNet backbone, built from a
config and trained on Fashion-MNIST items composed on a canvas, with `ReplacementTrainer`.

    python examples/object_detection.py --output-dir outputs/detection

A few minutes on 2 CPU cores, offline (see task_data.py: 56x56 canvases of two items, each boxed by
the extent of its pixels, 10 classes). A DETR (ResNet backbone, 4 encoder and 4 decoder layers,
8 queries) is trained from scratch with RepL in its three chains of blocks, each replacing about one
block in `replace_interval`: the ResNet backbone's stages (fused across stage boundaries), the
transformer encoder and the transformer decoder. It prints the box accuracy on held-out canvases
(Fashion-MNIST's test split): the share of items that one of the image's most confident predictions
finds with the right class and IoU >= 0.5. Then it saves, reloads with
`ReplacementModel.from_pretrained`, merges, and reloads the merged model as a plain
`DetrForObjectDetection` with identical logits and boxes. `--smoke`: a tiny run (tests).
"""

from __future__ import annotations

import argparse

import torch
from example_setup import example_parser, train
from round_trip import check_round_trip
from task_data import box_iou, detection_samples
from transformers import DetrConfig, DetrForObjectDetection, ResNetConfig
from transformers.image_transforms import center_to_corners_format

from hf_replacement import ReplacementConfig, get_replacement_model
from hf_replacement.commands.idx_files import FASHION_MNIST_LABELS

IOU_THRESHOLD = 0.5


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = example_parser(__doc__.split("\n\n")[0], output_dir="outputs/detection", max_steps=2000, lr=1e-3)
    parser.add_argument("--eval-size", type=int, default=256, help="held-out canvases for the box accuracy")
    return parser.parse_args(argv)


def build_model(smoke: bool) -> DetrForObjectDetection:
    width = 32 if smoke else 64
    backbone = ResNetConfig(
        embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 2, 1], out_features=["stage4"]
    )
    config = DetrConfig(
        use_timm_backbone=False,
        use_pretrained_backbone=False,
        backbone_config=backbone,
        d_model=width,
        encoder_layers=4,
        decoder_layers=4,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=2 * width,
        decoder_ffn_dim=2 * width,
        num_queries=8,
        dropout=0.0,
        num_labels=len(FASHION_MNIST_LABELS),
        id2label=dict(enumerate(FASHION_MNIST_LABELS)),
    )
    model = DetrForObjectDetection(config)
    # DETR freezes its backbone except parameters named "stage.1".."stage.3", which no Transformers ResNet
    # parameter matches ("stages.N"): trained from scratch, the backbone would stay random. Every weight trains.
    model.model.backbone.requires_grad_(True)
    return model


def collate(samples: list[dict]) -> dict:
    return {"pixel_values": torch.stack([s["pixel_values"] for s in samples]), "labels": [s["labels"] for s in samples]}


def box_accuracy(model: torch.nn.Module, samples: list[dict], batch_size: int) -> float:
    """Share of the held-out items found by one of the image's k most confident predictions (k: its number of
    items) with the item's class and IoU >= IOU_THRESHOLD; a prediction's confidence is its best class's
    probability ("no object", DETR's last class, excluded)."""
    found = total = 0
    model.eval()
    for start in range(0, len(samples), batch_size):
        batch = collate(samples[start : start + batch_size])
        with torch.no_grad():
            outputs = model(pixel_values=batch["pixel_values"])
        scores, classes = outputs.logits.softmax(-1)[..., :-1].max(-1)
        for image_scores, image_classes, boxes, target in zip(scores, classes, outputs.pred_boxes, batch["labels"]):
            chosen = image_scores.topk(len(target["class_labels"])).indices
            iou = box_iou(center_to_corners_format(boxes[chosen]), center_to_corners_format(target["boxes"]))
            hits = (iou >= IOU_THRESHOLD) & (image_classes[chosen][:, None] == target["class_labels"][None, :])
            found += int(hits.any(0).sum())
            total += len(target["class_labels"])
    return found / total


def main(argv: list[str] | None = None) -> float:
    args = parse_args(argv)
    if args.smoke:
        args.max_steps, args.batch_size, args.eval_size = 2, 2, 4
    torch.manual_seed(args.seed)
    train_samples = detection_samples(args.max_steps * args.batch_size, split="train", seed=args.seed)
    evaluation = detection_samples(args.eval_size, split="test", seed=args.seed)
    model = get_replacement_model(build_model(args.smoke), ReplacementConfig(replace_interval=args.replace_interval))
    print(f"replaced blocks: {model.replaced_blocks}")
    model.print_trainable_parameters()
    trainer = train(
        model,
        args,
        train_samples,
        data_collator=collate,
        lr_scheduler_type="linear",
        weight_decay=1e-4,
        max_grad_norm=0.1,  # DETR's own clipping
    )
    accuracy = box_accuracy(model, evaluation, args.batch_size)
    print(f"held-out box accuracy (class and IoU >= {IOU_THRESHOLD}): {accuracy:.3f} ({args.eval_size} canvases)")
    check_round_trip(trainer, {"pixel_values": collate(evaluation[:2])["pixel_values"]}, DetrForObjectDetection)
    return accuracy


if __name__ == "__main__":
    main()
