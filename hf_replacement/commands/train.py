"""The training loop behind `hf-replacement train`: Accelerate, one or many processes and nodes.

Shaped like Transformers' `run_image_classification_no_trainer.py`. Only the main process writes
files; every process computes the same thing on its shard of each batch.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import resource
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DataLoaderConfiguration, parse_flag_from_env, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..checkpoint import load_weights, share_weight_files, staged_directory, write_checkpoint
from ..config import ReplacementConfig
from ..hub import push_to_hub
from ..integrations.fsdp import (
    check_deepspeed_stage,
    gather_optimizer_state_dict,
    gather_state_dict,
    load_full_optimizer_state_dict,
    load_full_state_dict,
    shard_model,
)
from ..loading import load_image_classifier, load_pretrained_config
from ..model import ReplacementModel, coefficient_logs, get_replacement_model
from ..utils import count_parameters
from .data import (
    collate_fn,
    dataset_info,
    load_image_dataset,
    normalisation,
    prepare_dataset,
    subsample,
)
from .logs import get_logger
from .presets import PRESETS, build_preset_model
from .processing import PROCESSOR_NAME, build_image_processor
from .resume_check import apply_optimizer_changes, check_resume_settings, run_settings
from .run_lock import output_dir_lock
from .save_guard import guarded_save
from .training_state import check_resumable, load_training_state, save_training_state
from .training_steps import (
    DivergenceError,
    DivergenceMonitor,
    check_finite,
    evaluate_accuracy,
    make_optimizer,
    make_scheduler,
    train_step,
)

logger = get_logger(__name__)

RESULTS_NAME = "results.json"


@dataclass
class TrainingOptions:
    """Everything `hf-replacement train` accepts; the CLI flags map one to one (RepL's through `replacement`)."""

    model: str = "vit-mini"
    dataset: str = "digits"
    data_dir: str | None = None
    image_size: int | None = None
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    replacement: ReplacementConfig = field(default_factory=ReplacementConfig)
    baseline: bool = False
    mixed_precision: str = "no"
    fsdp: bool = False
    gradient_accumulation_steps: int = 1
    epochs: float = 10
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_ratio: float = 0.05
    seed: int = 0
    output_dir: str = "outputs/repl"
    resume_from: str | None = None
    checkpointing_steps: int | None = None
    stop_on_divergence: bool = False
    report_to: list[str] = field(default_factory=list)
    push_to_hub: bool = False
    hub_model_id: str | None = None
    hub_token: str | None = None


def build_model(
    options: TrainingOptions, num_labels: int, id2label: dict[int, str], image_size: int, num_channels: int
):
    """(model, its image processor or None): a preset from scratch, or a pretrained Hub/local model."""
    if options.model in PRESETS:
        return build_preset_model(options.model, num_labels, image_size, num_channels, id2label), None
    from transformers import AutoImageProcessor

    if not os.path.isdir(options.model) and "/" not in options.model:
        raise ValueError(
            f"--model {options.model!r} is not a preset, a local directory or a Hub id (user/name); "
            f"presets: {', '.join(sorted(PRESETS))}."
        )
    model = load_image_classifier(
        options.model,
        new_head=True,
        num_labels=num_labels,
        id2label=id2label,
        label2id={v: k for k, v in id2label.items()},
        ignore_mismatched_sizes=True,
    )
    try:
        image_processor = AutoImageProcessor.from_pretrained(options.model)
    except OSError as error:  # no preprocessor_config.json (e.g. merged by an earlier hf-replacement)
        logger.warning(
            f"--model {options.model} has no image processor ({str(error).strip().splitlines()[0][:200]}): "
            "normalising with mean 0.5 / std 0.5, what hf-replacement trained with before it saved processors.",
            main_process_only=True,
        )
        image_processor = None
    return model, image_processor


def _image_geometry(options: TrainingOptions, model_config: Any | None, sample_image) -> tuple[int, int]:
    if model_config is not None:
        size = getattr(model_config, "image_size", None) or options.image_size
        return int(options.image_size or size), int(getattr(model_config, "num_channels", 3))
    # Presets always take RGB, gray images replicated to 3 channels (as Transformers' image-classification
    # examples do): pipelines hand a model RGB images, so only an RGB model can be served by one.
    return int(options.image_size or max(sample_image.size)), 3


@dataclass
class _Progress:
    """Where training stands: optimizer updates done, the epoch, and batches of that epoch already seen."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0


def train(options: TrainingOptions) -> dict[str, Any]:
    """Train, evaluate, save and return the results (also written to `output_dir/results.json`).

    The output directory is owned by this run while it lasts (`run_lock`): a second run into it is refused.
    """
    _check_options(options)
    # Only rank 0 writes files (RANK is set by torchrun and accelerate launch before any process group exists).
    with output_dir_lock(options.output_dir, enabled=int(os.environ.get("RANK", "0")) == 0):
        try:
            return _train_owned(options)
        finally:
            # An Accelerator the caller builds next must not inherit this run's precision: Accelerate
            # would wrap the caller's model in this run's autocast without a word.
            _forget_previous_single_process_state()


def _train_owned(options: TrainingOptions) -> dict[str, Any]:
    _forget_previous_single_process_state()
    accelerator = _build_accelerator(options)
    set_seed(options.seed)

    raw = load_image_dataset(options.dataset, data_dir=options.data_dir, seed=options.seed)
    raw = subsample(raw, options.max_train_samples, options.max_eval_samples, seed=options.seed)
    _check_training_batches(len(raw["train"]), options.batch_size, accelerator.num_processes)
    image_size, num_channels = _image_geometry_of(options, raw)
    options = dataclasses.replace(options, image_size=image_size)  # checkpoints record the size trained at
    # Before the model is built: a checkpoint of another run, or flags it cannot honour, are refused.
    resume_changes = _check_resume(options, accelerator.num_processes) if options.resume_from else None
    model, image_processor = _build_model_and_processor(options, raw, num_channels)
    counts = {"total_params_unreplaced": count_parameters(model)[1]}
    if not options.baseline:
        model = get_replacement_model(model, options.replacement)
    counts["trainable_params"], counts["total_params"] = count_parameters(model)
    if options.fsdp:
        # Sharded before the optimizer is built: it must hold the sharded parameters.
        model = shard_model(model, **_fsdp_settings(options, accelerator))

    data = prepare_dataset(raw, image_size, num_channels, image_processor)
    train_loader = DataLoader(
        data["train"], batch_size=options.batch_size, shuffle=True, collate_fn=collate_fn, drop_last=True
    )
    eval_loader = DataLoader(data["test"], batch_size=options.batch_size, collate_fn=collate_fn)
    optimizer = make_optimizer(model, options.lr, options.weight_decay)
    if options.fsdp:  # FSDP has sharded the model: Accelerate would wrap it in DDP as well
        optimizer, train_loader, eval_loader = accelerator.prepare(optimizer, train_loader, eval_loader)
    else:
        model, optimizer, train_loader, eval_loader = accelerator.prepare(model, optimizer, train_loader, eval_loader)
    updates_per_epoch = math.ceil(len(train_loader) / options.gradient_accumulation_steps)
    total_updates = max(1, math.ceil(options.epochs * updates_per_epoch))
    # The prepared scheduler steps once per process on every update (Accelerate assumes the global
    # batch grew with the process count), so the schedule is laid out in those units.
    scheduler = make_scheduler(
        optimizer, total_updates, options.warmup_ratio, steps_per_update=accelerator.num_processes
    )
    scheduler = accelerator.prepare(scheduler)
    if options.report_to:
        accelerator.init_trackers("hf-replacement", config=_flat_config(options))

    progress = _Progress()
    if options.resume_from:
        progress = _resume(options, accelerator, model, optimizer, scheduler, resume_changes)
    if accelerator.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    divergence = DivergenceMonitor()
    step_times = _train_loop(
        options, accelerator, model, optimizer, scheduler, train_loader, image_processor, progress, total_updates,
        divergence,
    )  # fmt: skip

    accuracy = evaluate_loader(model, eval_loader, accelerator)
    results = _results(
        options, accelerator, accelerator.unwrap_model(model), accuracy, counts, progress.step, step_times
    ) | {"divergence": divergence.message}  # said again in the summary: a warning mid-run scrolls away
    if options.report_to:
        accelerator.log({"eval/accuracy": accuracy}, step=progress.step)
        accelerator.end_training()
    _save_outputs(options, accelerator, model, image_processor, results)
    return results


def _check_options(options: TrainingOptions) -> None:
    """Refuse, before anything starts, what the run could not do or save."""
    if options.mixed_precision == "fp16" and not torch.cuda.is_available():
        # Accelerate would train in fp32 and still record fp16.
        raise ValueError(
            "--mixed-precision fp16 needs a CUDA GPU, and none is available: use --mixed-precision bf16 "
            "(CPU autocast) or no."
        )
    _check_sharding(options)
    _check_output_dir(options.output_dir)


def _build_accelerator(options: TrainingOptions) -> Accelerator:
    accelerator = Accelerator(
        mixed_precision=options.mixed_precision,
        gradient_accumulation_steps=options.gradient_accumulation_steps,
        # Without a GPU a plain Accelerator under a multi-process launch trains N unsynchronised
        # copies: CPU mode makes it real DDP over gloo.
        cpu=not torch.cuda.is_available(),
        log_with=options.report_to or None,
        project_dir=options.output_dir,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=options.seed),
    )
    if options.fsdp and not torch.distributed.is_initialized():
        raise ValueError(
            "--fsdp shards the model across the processes of a distributed launch, and this is one process: "
            "run it under torchrun --nproc_per_node N or accelerate launch --multi_gpu --num_processes N."
        )
    return accelerator


def _image_geometry_of(options: TrainingOptions, raw: Any) -> tuple[int, int]:
    """(image size, channels) the run trains at."""
    pretrained_config = None
    if options.model not in PRESETS and (os.path.isdir(options.model) or "/" in options.model):
        pretrained_config = load_pretrained_config(options.model)
    return _image_geometry(options, pretrained_config, raw["train"][0]["image"])


def _build_model_and_processor(options: TrainingOptions, raw: Any, num_channels: int) -> tuple[torch.nn.Module, Any]:
    """(model, image processor): the model to train (at `options.image_size`), and what it is trained and
    evaluated on as a processor saved next to it (pipelines load it)."""
    num_labels, id2label = dataset_info(raw)
    model, pretrained_processor = build_model(options, num_labels, id2label, options.image_size, num_channels)
    image_processor = build_image_processor(options.image_size, num_channels, *normalisation(pretrained_processor))
    return model, image_processor


def _resume(
    options: TrainingOptions, accelerator: Accelerator, model, optimizer, scheduler, changes: dict[str, Any]
) -> _Progress:
    """Load the weights, optimizer, scheduler and RNG state of `--resume-from`, apply the `changes` it
    honours (`_check_resume`); return where it stood."""
    unwrapped = accelerator.unwrap_model(model)
    load_full_state_dict(unwrapped, load_weights(options.resume_from))
    saved, optimizer_state = load_training_state(options.resume_from, scheduler.scheduler)
    load_full_optimizer_state_dict(unwrapped, optimizer.optimizer, optimizer_state)
    apply_optimizer_changes(optimizer.optimizer, scheduler.scheduler, changes)
    logger.info(
        f"Resumed from {options.resume_from} at update {saved['step']} (epoch {saved['epoch']}).",
        main_process_only=True,
    )
    return _Progress(saved["step"], saved["epoch"], saved["batch_in_epoch"])


def _train_loop(
    options: TrainingOptions,
    accelerator: Accelerator,
    model,
    optimizer,
    scheduler,
    train_loader: DataLoader,
    image_processor: Any,
    progress: _Progress,
    total_updates: int,
    divergence: DivergenceMonitor,
) -> list[float]:
    """Train until `total_updates` (advancing `progress`); checkpoint and log on the way, `divergence`
    watching the loss. Returns each update's wall time."""
    step_times: list[float] = []
    # A context: the bar ends its line even when a save error or Ctrl-C ends the loop, so the one-line
    # message that follows starts a line of its own.
    with tqdm(
        total=total_updates, initial=progress.step, disable=not accelerator.is_local_main_process, desc="train"
    ) as progress_bar, logging_redirect_tqdm():  # a warning mid-run gets a line of its own
        while progress.step < total_updates:
            model.train()
            train_loader.set_epoch(progress.epoch)
            loader = train_loader
            if progress.batch_in_epoch:
                loader = _resumed_batches(accelerator.skip_first_batches(train_loader, progress.batch_in_epoch))
            started = time.perf_counter()
            for batch in loader:
                with accelerator.accumulate(model):
                    loss = train_step(model, optimizer, batch, scheduler=scheduler, backward=accelerator.backward)
                progress.batch_in_epoch += 1
                if not accelerator.sync_gradients:
                    continue
                _check_loss(accelerator, loss, progress.step + 1, divergence, options.stop_on_divergence)
                progress.step += 1
                step_times.append(time.perf_counter() - started)
                progress_bar.update(1)
                if options.report_to:
                    logs = {"train/loss": loss.item(), **coefficient_logs(accelerator.unwrap_model(model))}
                    accelerator.log(logs, step=progress.step)
                if options.checkpointing_steps and progress.step % options.checkpointing_steps == 0:
                    _save_checkpoint(
                        accelerator, model, optimizer, scheduler, image_processor, options, progress, len(train_loader)
                    )
                started = time.perf_counter()
                if progress.step >= total_updates:
                    break
            else:
                progress.epoch, progress.batch_in_epoch = progress.epoch + 1, 0
    return step_times


def _results(
    options: TrainingOptions,
    accelerator: Accelerator,
    unwrapped: torch.nn.Module,
    accuracy: float,
    counts: dict[str, int],
    updates: int,
    step_times: list[float],
) -> dict[str, Any]:
    """What `results.json` records."""
    replacement_config = None if options.baseline else options.replacement
    return {
        "accuracy": accuracy,
        "trainable_params": counts["trainable_params"],
        "total_params": counts["total_params"],
        "total_params_unreplaced": counts["total_params_unreplaced"],
        "method": "baseline" if options.baseline else "replacement",
        "replaced_blocks": getattr(unwrapped, "replaced_blocks", {}),
        "coefficients": coefficient_logs(unwrapped),
        # coefficient_init="fit": how well the fitted coefficients rebuilt each block's weights at conversion.
        "coefficient_fit": unwrapped.coefficient_fit_errors() if replacement_config is not None else {},
        "peak_memory_mb": _peak_memory_mb(accelerator),
        "median_step_seconds": statistics.median(step_times) if step_times else None,
        "updates": updates,
        "num_processes": accelerator.num_processes,
        "mixed_precision": accelerator.mixed_precision,
        "device": accelerator.device.type,
        "options": {k: v for k, v in dataclasses.asdict(options).items() if k != "replacement"} | {"hub_token": None},
        "replacement_config": replacement_config.to_dict() if replacement_config else None,
    }


def _save_outputs(
    options: TrainingOptions, accelerator: Accelerator, model, image_processor: Any, results: dict[str, Any]
) -> None:
    """Save the model, its image processor and the results to `output_dir` (and push them, if asked)."""
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    weights = gather_state_dict(unwrapped)  # every process takes part when the model is sharded
    if accelerator.is_main_process:
        with guarded_save("the final model", options.output_dir, kept=_FINAL_SAVE_KEPT):
            _save_final(unwrapped, weights, image_processor, results, options.output_dir)
        if options.push_to_hub:
            _push(_saved_model(options) if options.fsdp else unwrapped, image_processor, options, results)
    accelerator.wait_for_everyone()


# A RepL model's files and results.json are two atomic writes (a plain model's, Transformers' own writer):
# the model and results in the directory cannot be trusted to be this run's; checkpoints are untouched.
_FINAL_SAVE_KEPT = "the model and results.json there may be an earlier run's or incomplete, checkpoints are untouched"


def _save_final(model: torch.nn.Module, weights: dict, image_processor: Any, results: dict, output_dir: str) -> None:
    model.save_pretrained(output_dir, state_dict=weights)
    share_weight_files(output_dir)  # a --baseline model is saved by Transformers, its weights 0600
    write_checkpoint(
        output_dir,
        {
            PROCESSOR_NAME: image_processor.to_json_string(),
            RESULTS_NAME: json.dumps(results, indent=2, default=str, allow_nan=False),
        },
    )


def _check_loss(
    accelerator: Accelerator, loss: torch.Tensor, update: int, monitor: DivergenceMonitor, stop: bool
) -> None:
    """Stop at a NaN loss; report (or with `stop`, stop at) a loss diverging far above its start.

    Once per update (a device sync), on the loss averaged over the processes: every process must decide
    alike, or the others would wait in the next collective.
    """
    value = accelerator.reduce(loss, reduction="mean") if accelerator.num_processes > 1 else loss
    check_finite(value, update)
    message = monitor.observe(float(value), update)
    if message and stop:
        raise DivergenceError(
            f"{message}. Stopped at update {update} (--stop-on-divergence); checkpoints written before it are kept."
        )
    if message:
        logger.warning(f"{message}. Pass --stop-on-divergence to stop such a run.", main_process_only=True)


def _resumed_batches(loader: DataLoader) -> Iterator[dict[str, torch.Tensor]]:
    """`loader`'s batches, leaving the global torch RNG as restored from the checkpoint.

    Starting to iterate a loader draws its worker seed from the global RNG. The straight run drew
    it at the start of the epoch, before the checkpoint's RNG state was saved; a resumed run
    starting mid-epoch would draw it again and shift every later dropout mask.
    """
    state = torch.get_rng_state()
    batches = iter(loader)
    first = next(batches, None)
    torch.set_rng_state(state)
    if first is not None:
        yield first
        yield from batches


def _check_sharding(options: TrainingOptions) -> None:
    """Refuse, before anything starts, the parameter sharding a RepL model cannot train with."""
    if parse_flag_from_env("ACCELERATE_USE_FSDP"):
        raise ValueError(
            "Accelerate's FSDP (accelerate launch --use_fsdp, or an FSDP config) shards each block on its own, "
            "which a replaced block cannot read its neighbours from: launch without it and pass --fsdp to "
            "hf-replacement train, which groups each replaced block with its neighbours."
        )
    if parse_flag_from_env("ACCELERATE_USE_DEEPSPEED") and not options.baseline:
        from accelerate.utils import DeepSpeedPlugin

        check_deepspeed_stage(DeepSpeedPlugin().zero_stage)  # reads Accelerate's DeepSpeed settings
    if options.fsdp and options.mixed_precision == "fp16":
        raise ValueError(
            "--mixed-precision fp16 with --fsdp is not supported: fp16 loss scaling would skip steps per process, "
            "each seeing only its shard. Use --mixed-precision bf16."
        )


def _fsdp_settings(options: TrainingOptions, accelerator: Accelerator) -> dict[str, Any]:
    """`fully_shard`'s settings: one mesh over every process; bf16 compute with fp32 master weights and
    gradient reduction (`--mixed-precision bf16`)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy

    settings: dict[str, Any] = {"mesh": init_device_mesh(accelerator.device.type, (accelerator.num_processes,))}
    if options.mixed_precision == "bf16":
        settings["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return settings


def _saved_model(options: TrainingOptions) -> torch.nn.Module:
    """The model just saved to `output_dir`, loaded whole (a sharded model cannot be pushed as it is)."""
    if options.baseline:
        return load_image_classifier(options.output_dir)
    return ReplacementModel.from_pretrained(options.output_dir)


def _check_output_dir(directory: str) -> None:
    """Fail before training, not after it, when the results could not be saved."""
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ValueError(f"--output-dir {directory} is a file, not a directory: choose a directory.")
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as error:
        raise ValueError(
            f"--output-dir {directory} cannot be created ({error.strerror}): choose a writable directory."
        ) from None
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ValueError(f"--output-dir {directory} is not writable: choose a writable directory.")


def _check_training_batches(num_images: int, batch_size: int, num_processes: int) -> None:
    """The loader drops an incomplete last batch: with fewer images than one global batch nothing trains."""
    if num_images < batch_size * num_processes:
        raise ValueError(
            f"no training batch: {num_images} training images, but one update takes --batch-size {batch_size} "
            f"x {num_processes} process(es) = {batch_size * num_processes} images (incomplete batches are dropped). "
            "Lower --batch-size or train on more images."
        )


def _forget_previous_single_process_state() -> None:
    """Lets a second `train()`, or the caller's own Accelerator, in one Python process (a notebook, the
    tests) pick its own precision.

    Accelerate keeps its state process-wide and refuses a different `mixed_precision` later. Under
    a distributed launch the state belongs to the launcher and is left alone.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        AcceleratorState._reset_state(reset_partial_state=True)


def evaluate_loader(model: torch.nn.Module, loader: DataLoader, accelerator: Accelerator) -> float:
    """Top-1 accuracy over the whole evaluation set, gathered across processes."""
    batches = tqdm(loader, disable=not accelerator.is_local_main_process, desc="eval", leave=False)
    return evaluate_accuracy(model, batches, gather=accelerator.gather_for_metrics)


def _peak_memory_mb(accelerator: Accelerator) -> float:
    if accelerator.device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS (KiB on Linux)


def _flat_config(options: TrainingOptions) -> dict[str, Any]:
    return {
        k: (v if isinstance(v, (int, float, str, bool)) else str(v))
        for k, v in dataclasses.asdict(options).items()
        if k != "hub_token"
    }


def _save_checkpoint(
    accelerator, model, optimizer, scheduler, image_processor, options, progress: _Progress, batches_per_epoch: int
) -> None:
    step, epoch, batch_in_epoch = progress.step, progress.epoch, progress.batch_in_epoch
    if batch_in_epoch >= batches_per_epoch:
        epoch, batch_in_epoch = epoch + 1, 0
    directory = os.path.join(options.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{step}")
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    # Whole tensors, as an unsharded run saves them (every process takes part when the model is sharded).
    weights = gather_state_dict(unwrapped)
    optimizer_state = gather_optimizer_state_dict(unwrapped, optimizer.optimizer)
    if accelerator.is_main_process:
        # A checkpoint appears whole, or not at all; a full disk or Ctrl-C on the way is one line.
        with guarded_save(f"checkpoint-{step}", options.output_dir), staged_directory(directory) as staging:
            unwrapped.save_pretrained(staging, state_dict=weights)
            image_processor.save_pretrained(staging)  # `merge` carries it over to the plain model
            saved_progress = {"step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch}
            run, settings = _run_identity(options), run_settings(options, accelerator.num_processes)
            save_training_state(staging, optimizer_state, scheduler.scheduler, saved_progress, run, settings)
    accelerator.wait_for_everyone()


def _check_resume(options: TrainingOptions, num_processes: int) -> dict[str, Any]:
    """Refuse a checkpoint of another run, or flags it cannot honour; return the changes it applies
    (`resume_check`)."""
    saved_settings = check_resumable(options.resume_from, _run_identity(options))
    return check_resume_settings(options.resume_from, saved_settings, run_settings(options, num_processes))


def _run_identity(options: TrainingOptions) -> dict[str, Any]:
    """What a resumed run must share with the run that saved the checkpoint."""
    replacement = None if options.baseline else options.replacement.to_dict()
    return {"model": options.model, "baseline": options.baseline, "replacement": replacement}


def _push(model: torch.nn.Module, image_processor: Any, options: TrainingOptions, results: dict[str, Any]) -> None:
    repo_id = options.hub_model_id or os.path.basename(os.path.abspath(options.output_dir))
    push_to_hub(
        model,
        repo_id,
        token=options.hub_token,
        results=results,
        datasets=[options.dataset],
        image_processor=image_processor,
    )
