"""What `--resume-from` honours: each training flag a checkpoint fixes, compared with the saved run.

A resumed run restores the optimizer, the schedule and the position in the data; a flag that
contradicts them would otherwise be dropped without a word (the optimizer state carries the old
learning rate). Each flag is either refused, naming the saved value, or applied and said.
The model, `--baseline` and the RepL flags are compared by `training_state.check_resumable`.
docs/cli.md holds this table for users.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from .training_state import TrainingStateError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResumeRule:
    flag: str
    applied: bool  # True: the new value is used from the resumed update on; False: the resume is refused
    reason: str


_DATA = "the checkpoint's position in the epoch and the data order belong to the saved run's data"
_SCHEDULE = "the cosine schedule and the position in it are laid out over the saved run's updates"
RESUME_RULES: dict[str, ResumeRule] = {
    "dataset": ResumeRule("--dataset", False, _DATA),
    "max_train_samples": ResumeRule("--max-train-samples", False, _DATA),
    "seed": ResumeRule("--seed", False, _DATA),
    "image_size": ResumeRule("--image-size", False, "the weights were trained at the saved run's resolution"),
    "global_batch": ResumeRule(
        "the global batch (--batch-size x processes x --gradient-accumulation-steps)", False, _SCHEDULE
    ),
    "gradient_accumulation_steps": ResumeRule("--gradient-accumulation-steps", False, _SCHEDULE),
    "epochs": ResumeRule("--epochs", False, _SCHEDULE),
    "warmup_ratio": ResumeRule("warmup_ratio", False, _SCHEDULE),
    "mixed_precision": ResumeRule(
        "--mixed-precision", False, "the optimizer state was computed in the saved run's precision"
    ),
    "batch_size": ResumeRule(
        "--batch-size", True, "the same global batch split over another number of processes"
    ),
    "lr": ResumeRule("--lr", True, "the schedule goes on from the same position, scaled to the new peak rate"),
    "weight_decay": ResumeRule("--weight-decay", True, "AdamW's decay from the resumed update on"),
}


def run_settings(options: Any, num_processes: int) -> dict[str, Any]:
    """The training settings a checkpoint records (`options`: `TrainingOptions`, image size resolved)."""
    global_batch = options.batch_size * num_processes * options.gradient_accumulation_steps
    settings = {name: getattr(options, name) for name in RESUME_RULES if name != "global_batch"}
    return settings | {"global_batch": global_batch}


def check_resume_settings(checkpoint: str, saved: dict[str, Any] | None, now: dict[str, Any]) -> dict[str, Any]:
    """Refuse the flags a resume cannot honour; return {name: new value} of those it applies, each logged."""
    if saved is None:
        logger.warning(
            "--resume-from %s was saved by an older hf_replacement that did not record its training settings: "
            "--lr, --epochs, --batch-size and the other training flags are not compared with its run.",
            checkpoint,
        )
        return {}
    changed = [name for name in RESUME_RULES if name in saved and saved[name] != now[name]]
    refused = [name for name in changed if not RESUME_RULES[name].applied]
    if refused:
        details = "; ".join(
            f"{RESUME_RULES[name].flag} {now[name]} (the saved run: {saved[name]}): {RESUME_RULES[name].reason}"
            for name in refused
        )
        raise TrainingStateError(
            f"--resume-from {checkpoint} cannot honour {details}. Resume with the saved run's values, or start a "
            "new run (docs/cli.md lists what a resume honours)."
        )
    for name in changed:
        logger.warning(
            "--resume-from %s: %s %s (the saved run: %s) is applied: %s.",
            checkpoint, RESUME_RULES[name].flag, now[name], saved[name], RESUME_RULES[name].reason,
        )  # fmt: skip
    return {name: now[name] for name in changed}


def apply_optimizer_changes(
    optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR, changes: dict[str, Any]
) -> None:
    """Apply a changed `lr` / `weight_decay` to an optimizer and schedule restored from a checkpoint.

    The schedule multiplies each group's base rate by a factor of the update, so replacing the base
    rate and rescaling the current rate continues the schedule at the same position at the new peak:
    the rates equal those of a run started with the new `lr`, at the same update.
    """
    if "lr" in changes:
        new = float(changes["lr"])
        for group in optimizer.param_groups:
            group["lr"] = group["lr"] * new / group["initial_lr"]
            group["initial_lr"] = new
        scheduler.base_lrs = [new] * len(optimizer.param_groups)
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    if "weight_decay" in changes:
        for group in optimizer.param_groups:
            group["weight_decay"] = float(changes["weight_decay"])


__all__ = ["RESUME_RULES", "ResumeRule", "apply_optimizer_changes", "check_resume_settings", "run_settings"]
