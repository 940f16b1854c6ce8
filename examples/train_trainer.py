"""Train a ViT with Replacement Learning on scikit-learn's digits, with `ReplacementTrainer` (a Transformers Trainer).

    python examples/train_trainer.py --output-dir outputs/trainer-digits --epochs 30

About a minute on 2 CPU cores (no download: the digits ship with scikit-learn). A `vit-mini`
(8 blocks, 64 wide) trained from scratch on the 8x8 images; with `--replace-interval 4`, block 3
synthesizes its weights from blocks 2 and 4. The run evaluates every epoch, keeps the best
checkpoint, and leaves:

    <output-dir>/checkpoint-*/   Trainer checkpoints; each loads with ReplacementModel.from_pretrained
    <output-dir>/final/          the best model, a RepL checkpoint (trainer.save_model)
    <output-dir>/merged/         the same model as a plain ViTForImageClassification, with its image
                                 processor: pipeline("image-classification", model=<output-dir>/merged)

`--start-step N` trains the full model for N steps first, then replaces the blocks (see
docs/trainer.md). `--report-to tensorboard` sends the coefficient curves to TensorBoard.
"""

from __future__ import annotations

import argparse
import os

import torch
from transformers import EvalPrediction, TrainingArguments, ViTForImageClassification

from hf_replacement import ReplacementConfig, ReplacementModel, ReplacementTrainer
from hf_replacement.commands.data import collate_fn, load_image_dataset, prepare_dataset
from hf_replacement.commands.presets import build_preset_model
from hf_replacement.commands.processing import build_image_processor


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default="outputs/trainer-digits")
    parser.add_argument("--epochs", type=float, default=30)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--replace-interval", type=int, default=4, help="replace every k-th block (the paper: 4)")
    parser.add_argument("--start-step", type=int, default=None, help="train the full model this many steps first")
    parser.add_argument("--report-to", nargs="*", default=[], help="e.g. tensorboard, wandb")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def accuracy(prediction: EvalPrediction) -> dict[str, float]:
    return {"accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    # The launcher's data path: `image` + `label` columns, transformed lazily to `pixel_values`; the gray
    # digits as RGB, as pipelines give them, and the processor that reproduces the transform saved with every model.
    data = prepare_dataset(load_image_dataset("digits", seed=args.seed), image_size=8, num_channels=3)
    train, test = data["train"], data["test"]
    base = build_preset_model("vit-mini", num_labels=10, image_size=8, num_channels=3)
    # With --start-step the blocks are replaced by the trainer at that step, not now.
    model = ReplacementModel(
        base, ReplacementConfig(replace_interval=args.replace_interval), defer_replacement=args.start_step is not None
    )

    steps_per_epoch = -(-len(train) // args.batch_size)
    training_args = TrainingArguments(
        output_dir=args.output_dir,
        num_train_epochs=args.epochs,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=256,
        learning_rate=args.lr,
        weight_decay=0.05,
        warmup_steps=0.05,
        lr_scheduler_type="cosine",
        eval_strategy="epoch",
        save_strategy="epoch",
        save_total_limit=2,
        load_best_model_at_end=True,
        metric_for_best_model="accuracy",
        logging_steps=steps_per_epoch,
        report_to=args.report_to,
        seed=args.seed,
        data_seed=args.seed,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        disable_tqdm=True,
    )
    # Coefficients are logged once per epoch here (the default, every step, suits TensorBoard/W&B
    # better than this console).
    trainer = ReplacementTrainer(
        model=model,
        args=training_args,
        train_dataset=train,
        eval_dataset=test,
        data_collator=collate_fn,
        processing_class=build_image_processor(image_size=8, num_channels=3),
        compute_metrics=accuracy,
        replacement_start_step=args.start_step,
        merge_at_end=True,
        coefficient_logging_steps=steps_per_epoch,
    )
    trainer.train()

    metrics = trainer.evaluate()  # the best model (load_best_model_at_end)
    final_dir = os.path.join(args.output_dir, "final")
    trainer.save_model(final_dir)

    reloaded = ReplacementModel.from_pretrained(final_dir)
    merged = ViTForImageClassification.from_pretrained(trainer.merged_dir)
    images = torch.stack(test[:]["pixel_values"])
    with torch.no_grad():
        agree = reloaded(pixel_values=images).logits.argmax(-1) == merged.eval()(pixel_values=images).logits.argmax(-1)
    _, total = model.get_nb_trainable_parameters()
    unreplaced = sum(p.numel() for p in merged.parameters())
    coefficients = ", ".join(
        f"{name}: a={c['a'].mean():.3f} b={c['b'].mean():.3f}" for name, c in model.get_coefficients().items()
    )
    print(
        f"test accuracy: {metrics['eval_accuracy']:.4f} "
        f"(best of {trainer.state.num_train_epochs} epochs: {trainer.state.best_model_checkpoint})"
    )
    print(f"replaced blocks: {sorted(model.replaced_blocks)} of {model.num_blocks}; coefficients: {coefficients}")
    print(
        f"parameters: {total:,d} trained ({unreplaced:,d} in the merged model, "
        f"{100 * (1 - total / unreplaced):.1f}% fewer)"
    )
    print(f"RepL checkpoint: {final_dir} (ReplacementModel.from_pretrained)")
    print(
        f"merged model:    {trainer.merged_dir} (ViTForImageClassification.from_pretrained; "
        f"same predictions on {int(agree.sum())}/{len(agree)} test images)"
    )


if __name__ == "__main__":
    main()
