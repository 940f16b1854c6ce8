"""What the worked examples share: their common flags and one `ReplacementTrainer` run.

Each example adds its task's flags, model, data and metric; the flags below and the training
settings (CPU, cosine schedule with a short warm-up, no intermediate saves) come from here, so the
three examples train the same way and a change to one is a change to all.
"""

from __future__ import annotations

import argparse
from typing import Any

from torch.utils.data import Dataset
from transformers import TrainingArguments

from hf_replacement import ReplacementModel, ReplacementTrainer


def example_parser(description: str, *, output_dir: str, max_steps: int, lr: float) -> argparse.ArgumentParser:
    """The flags every example takes, with that example's defaults."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--output-dir", default=output_dir)
    parser.add_argument("--max-steps", type=int, default=max_steps)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=lr)
    parser.add_argument("--replace-interval", type=int, default=4, help="replace one block in k (the paper: 4)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="a tiny model and run, to check the example works")
    return parser


def train(
    model: ReplacementModel,
    args: argparse.Namespace,
    train_dataset: Dataset,
    *,
    eval_dataset: Dataset | None = None,
    data_collator: Any = None,
    **training_settings: Any,
) -> ReplacementTrainer:
    """Train `model` for `args.max_steps` updates; `training_settings` override the shared `TrainingArguments`."""
    settings: dict[str, Any] = {
        "use_cpu": True,
        "max_steps": args.max_steps,
        "per_device_train_batch_size": args.batch_size,
        "per_device_eval_batch_size": args.batch_size,
        "learning_rate": args.lr,
        "lr_scheduler_type": "cosine",
        "warmup_steps": min(20, args.max_steps // 10),
        "logging_steps": max(1, args.max_steps // 10),
        "save_strategy": "no",
        "report_to": [],
        "seed": args.seed,
        "disable_tqdm": True,
    }
    training_args = TrainingArguments(args.output_dir, **{**settings, **training_settings})
    trainer = ReplacementTrainer(
        model=model,
        args=training_args,
        coefficient_logging_steps=training_args.logging_steps,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=data_collator,
    )
    trainer.train()
    return trainer
