"""`ReplacementTrainer`: the Transformers `Trainer` for a `ReplacementModel`.

A plain `Trainer` saves a model that is not a `PreTrainedModel` as a bare state dict, writes
Transformers' generic card and knows nothing of the coefficients. The overrides below make every
save a RepL checkpoint, every card hf_replacement's, and report the coefficients; the
`ReplacementCallback` the trainer owns acts on the training events (`replacement_start_step`,
`merge_at_end`, checkpoint pushes). See docs/trainer.md.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
from peft import PeftModel
from torch import nn
from transformers import (
    Seq2SeqTrainer,
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.utils import can_return_loss, find_labels, logging

from ..hub import render_model_card
from ..model import LOG_PREFIX, ReplacementModel, coefficient_logs
from ..utils import is_sharded
from .fsdp import check_deepspeed_stage, gather_state_dict, shard_model
from .peft import merge_peft_and_replacement

logger = logging.get_logger(__name__)

MERGED_DIR_NAME = "merged"
# Timings the Trainer logs with every evaluation: noise in a model card's results.
_SPEED_METRICS = ("_runtime", "_per_second")
_COEFFICIENTS_PREFIX = "replacement_coefficients."
_MIGRATION = (
    "build the trainer as ReplacementTrainer(model=..., args=..., replacement_start_step=..., merge_at_end=..., "
    "coefficient_logging_steps=...) from hf_replacement instead of Trainer; it creates its own ReplacementCallback."
)


class ReplacementCallback(TrainerCallback):
    """The RepL options of a `ReplacementTrainer` and the training events it acts on.

    `ReplacementTrainer` creates one from its keyword options (or takes the one given in its
    `callbacks`); it works in no other trainer. The options are `ReplacementTrainer`'s, without
    the `replacement_` prefix for `start_step`.
    """

    def __init__(
        self,
        trainer: Any = None,
        *,
        start_step: int | None = None,
        merge_at_end: bool = False,
        coefficient_logging_steps: int = 1,
    ) -> None:
        if trainer is not None:  # the form before ReplacementTrainer: ReplacementCallback(trainer, ...)
            raise TypeError(f"ReplacementCallback(trainer, ...) is no longer supported: {_MIGRATION}")
        if start_step is not None and (
            isinstance(start_step, bool) or not isinstance(start_step, int) or start_step < 0
        ):
            raise ValueError(f"replacement_start_step={start_step!r} is invalid: give a step number >= 0, or None.")
        if (
            isinstance(coefficient_logging_steps, bool)
            or not isinstance(coefficient_logging_steps, int)
            or (coefficient_logging_steps < 0)
        ):
            raise ValueError(
                f"coefficient_logging_steps={coefficient_logging_steps!r} is invalid: give an integer >= 0 (0: off)."
            )
        self.start_step = start_step
        self.merge_at_end = merge_at_end
        self.coefficient_logging_steps = coefficient_logging_steps
        self._trainer: ReplacementTrainer | None = None

    @property
    def trainer(self) -> ReplacementTrainer | None:
        """The `ReplacementTrainer` that owns this callback (None until one is built with it)."""
        return self._trainer

    def bind(self, trainer: ReplacementTrainer) -> None:
        """Called by the `ReplacementTrainer` built with this callback; a callback serves one trainer."""
        if self._trainer is not None and self._trainer is not trainer:
            raise ValueError("This ReplacementCallback belongs to another ReplacementTrainer: create one per trainer.")
        self._trainer = trainer

    def _bound_trainer(self) -> ReplacementTrainer:
        if self._trainer is None:
            raise TypeError(f"ReplacementCallback only works inside the ReplacementTrainer that owns it: {_MIGRATION}")
        return self._trainer

    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self._bound_trainer()  # a plain Trainer(..., callbacks=[ReplacementCallback()]) fails here, at construction

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        trainer = self._bound_trainer()  # e.g. trainer.add_callback(ReplacementCallback()) on a plain Trainer
        if trainer.replacement_model.replaced_blocks:
            trainer.log_replacement()
        elif state.is_world_process_zero:
            logger.info("RepL: training the full model until step %d, then replacing blocks.", self.start_step)

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        trainer = self._bound_trainer()
        # `>=` with the check: a run resumed past start_step was replaced when its checkpoint loaded.
        due = self.start_step is not None and state.global_step >= self.start_step
        if due and not trainer.replacement_model.replaced_blocks:
            trainer.replace_blocks()

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        # When the Trainer logs this step (should_log), the coefficients join its log (ReplacementTrainer.log);
        # otherwise they are logged on their own, which leaves should_log as it is (False).
        if not control.should_log:
            trainer = self._bound_trainer()
            logs = trainer.coefficient_logs_due()
            if logs:
                trainer.log(logs)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.merge_at_end:
            self._bound_trainer().save_merged_model()

    def on_push_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        # A checkpoint push (during training) uploads output_dir after copying only the checkpoint's
        # config.json and weights there: save the whole RepL checkpoint and our card first.
        # `push_to_hub()` after training saves and writes the card itself.
        trainer = self._bound_trainer()
        if trainer.is_in_train and state.is_world_process_zero:
            trainer.save_checkpoint_for_push()


class ReplacementTrainer(Trainer):
    """A `Trainer` for a `ReplacementModel`: takes `Trainer`'s arguments, plus these options.

    Args:
        replacement_start_step: train the full model for this many optimizer steps, then replace
            the blocks (the model must be built with `defer_replacement=True`; single process only).
            `None` (default): the model is replaced from the start.
        merge_at_end: when training ends, write the merged plain Transformers model and the
            processing class to `<output_dir>/merged` (`merged_dir`); the trainer keeps the RepL model.
        coefficient_logging_steps: log `replacement/a/block_<i>` and `replacement/b/block_<i>` to
            every reporter every this many optimizer steps (default 1; 0: never).
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        args: TrainingArguments | None = None,
        data_collator: Callable | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        model_init: Callable[..., nn.Module] | None = None,
        compute_loss_func: Callable | None = None,
        compute_metrics: Callable | None = None,
        callbacks: list[TrainerCallback | type[TrainerCallback]] | None = None,
        optimizers: tuple[torch.optim.Optimizer | None, Any] = (None, None),
        optimizer_cls_and_kwargs: tuple[type[torch.optim.Optimizer], dict[str, Any]] | None = None,
        preprocess_logits_for_metrics: Callable | None = None,
        *,
        replacement_start_step: int | None = None,
        merge_at_end: bool = False,
        coefficient_logging_steps: int = 1,
    ) -> None:
        callbacks, callback = _own_callback(
            callbacks,
            ReplacementCallback(
                start_step=replacement_start_step,
                merge_at_end=merge_at_end,
                coefficient_logging_steps=coefficient_logging_steps,
            ),
        )
        _check_arguments(callback.start_step, model, model_init, optimizers[0])
        args = args if args is not None else TrainingArguments(output_dir="tmp_trainer")  # the Trainer's default
        _check_training_arguments(args, generates=isinstance(self, Seq2SeqTrainer))
        if args.ddp_find_unused_parameters is None:
            # Every parameter of a RepL model takes part in every forward (the replaced blocks' own are
            # freed): the Trainer's default for a non-PreTrainedModel, True, only costs an extra pass.
            args.ddp_find_unused_parameters = False
        if args.remove_unused_columns and any(_has_lazy_transform(d) for d in (train_dataset, eval_dataset)):
            # The transform reads columns the model's forward does not take (`image`): the Trainer would
            # remove them. Transformers' own image-classification example asks for this setting.
            logger.info("RepL: a data set has a lazy transform (with_transform): remove_unused_columns=False.")
            args.remove_unused_columns = False
        callback.bind(self)
        self.replacement_callback = callback
        self.merged_dir: str | None = None
        self._coefficients_logged_at = -1
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            model_init=model_init,
            compute_loss_func=compute_loss_func,
            compute_metrics=compute_metrics,
            callbacks=[*callbacks, callback],
            optimizers=optimizers,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
            # Given only when set: Seq2SeqTrainer's __init__ (ReplacementSeq2SeqTrainer) does not take it.
            **({"optimizer_cls_and_kwargs": optimizer_cls_and_kwargs} if optimizer_cls_and_kwargs else {}),
        )
        model = _check_model(self.model, callback.start_step)  # model_init's model too
        self._describe_base_model(model)
        if callback.start_step is not None:
            if self.args.world_size > 1:
                raise NotImplementedError(
                    "replacement_start_step is supported in single-process training only: replacing blocks changes "
                    "the set of parameters after DDP has wrapped the model. Train replaced from the start instead."
                )
            # Resuming (or loading the best model) from a checkpoint on the other side of the switch.
            model.register_load_state_dict_pre_hook(_match_checkpoint_replacement)
        if self.is_fsdp_enabled and not is_sharded(model):
            self.model = self.model_wrapped = _shard_with_plugin(model, self.accelerator)
        if self.args.push_to_hub and self.args.hub_token and self.is_world_process_zero():
            logger.warning(
                "RepL: TrainingArguments.hub_token is pickled into training_args.bin, which the Trainer uploads "
                "to the Hub with every push: log in with `hf auth login` or set HF_TOKEN instead."
            )

    @property
    def replacement_model(self) -> ReplacementModel:
        """The `ReplacementModel` being trained (unwrapped; the base model of a PEFT model built on one)."""
        return _replacement_model_of(self.accelerator.unwrap_model(self.model, keep_torch_compile=False))

    @property
    def peft_model(self) -> PeftModel | None:
        """The PEFT model being trained when the trainer was given one (LoRA, ... on a RepL model), else None."""
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        return model if isinstance(model, PeftModel) else None

    # ---- what the Trainer decides by the model's class ---------------------------------------------

    def _describe_base_model(self, model: ReplacementModel) -> None:
        """Redo the Trainer's class-based decisions with the wrapped model's class instead of `ReplacementModel`.

        The Trainer reads the label names (`start_positions`/`end_positions` for question answering,
        `next_sentence_label`, ...) and `return_loss` from the model's class, and whether label smoothing
        shifts the labels from the class name (causal LMs). Loss kwargs (`num_items_in_batch`) and the
        loss type it already reads through the wrapper (attributes and `forward`'s signature are the
        base model's).
        """
        base_class = type(model.base_model)
        if self.args.label_names is None:
            self.label_names = find_labels(base_class)
        self.can_return_loss = can_return_loss(base_class)
        self._base_is_causal_lm = base_class.__name__ in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """`Trainer.compute_loss`; with label smoothing on a causal LM the labels are shifted, as the Trainer
        shifts them for the plain model (it recognises causal LMs by class name, and sees `ReplacementModel`)."""
        shifts = self.label_smoother is not None and self.compute_loss_func is None and "labels" in inputs
        context = self._shifting_label_smoother() if shifts and self._base_is_causal_lm else contextlib.nullcontext()
        with context:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    @contextlib.contextmanager
    def _shifting_label_smoother(self) -> Iterator[None]:
        smoother = self.label_smoother
        self.label_smoother = functools.partial(smoother, shift_labels=True)
        try:
            yield
        finally:
            self.label_smoother = smoother

    # ---- checkpoints and the Hub -----------------------------------------------------------------

    def _save(self, output_dir: str | None = None, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Save a RepL checkpoint (the model's `save_pretrained`), the processing class and the arguments."""
        if not self.args.should_save:
            return
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        logger.info("Saving RepL checkpoint to %s", output_dir)
        if self.peft_model is not None:
            # The adapter with the trained coefficients (PEFT's modules_to_save): what the Trainer resumes from, and
            # what PeftModel.from_pretrained(<the RepL model>, output_dir) loads. The RepL model it is built on is
            # not changed by training: save it once with save_pretrained (or merge with save_merged_model).
            self.peft_model.save_pretrained(output_dir, state_dict=state_dict)
        else:
            # state_dict: what save_model gathered (FSDP, DeepSpeed); None: the model's own.
            self.replacement_model.save_pretrained(output_dir, state_dict=state_dict)
        processor = self.processing_class
        if processor is None:  # as the Trainer does: a collator's tokenizer stands in
            processor = getattr(self.data_collator, "tokenizer", None)
        if processor is not None:
            processor.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """`Trainer.save_model`; under FSDP every process gathers the weights and the main one writes a whole
        RepL checkpoint, whatever fsdp_config's `state_dict_type` (with the FSDP2 default, SHARDED_STATE_DICT,
        the Trainer would keep the model only in its distributed checkpoint for resuming)."""
        if not self.is_fsdp_enabled:
            super().save_model(output_dir, _internal_call)
            return
        self._save(output_dir, state_dict=gather_state_dict(self.model))
        if self.args.push_to_hub and not _internal_call:  # as Trainer.save_model does
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def create_model_card(
        self,
        language: str | None = None,
        license: str | None = None,
        tags: str | list[str] | None = None,
        model_name: str | None = None,
        finetuned_from: str | None = None,
        tasks: str | list[str] | None = None,
        dataset_tags: str | list[str] | None = None,
        dataset: str | list[str] | None = None,
        dataset_args: str | list[str] | None = None,
    ) -> None:
        """Write hf_replacement's model card to `<output_dir>/README.md` (what `push_to_hub()` uploads).

        Its results are the last evaluation's (the best one's once `load_best_model_at_end` loaded it).
        `tasks` and `dataset_args` have no place in it: its task is image classification.
        """
        if not self.is_world_process_zero():
            return
        card = render_model_card(
            self.replacement_model,
            self._card_results(),
            base_model=finetuned_from,
            datasets=_as_list(dataset_tags) or _as_list(dataset),
            # hub_model_id is the full "user/name" once init_hf_repo ran: the card's loading snippet uses it.
            repo_id=self.hub_model_id or self.args.hub_model_id or model_name,
        )
        card.data.language = language
        card.data.license = license
        card.data.tags = list(dict.fromkeys(card.data.tags + _as_list(tags)))
        card.save(os.path.join(self.args.output_dir, "README.md"))

    def _card_results(self) -> dict[str, Any] | None:
        """The metrics of the evaluation of the model held now, without `eval_`, plus `updates` (its step)."""
        best_step = self.state.best_global_step if self.args.load_best_model_at_end and not self.is_in_train else None
        for logs in reversed(self.state.log_history):
            metrics = {
                key.removeprefix("eval_"): value
                for key, value in logs.items()
                if key.startswith("eval_") and not key.endswith(_SPEED_METRICS)
            }
            if metrics and best_step in (None, logs["step"]):
                return metrics | {"updates": logs["step"]}
        return None

    def save_merged_model(self, output_dir: str | None = None) -> str:
        """Write the merged plain Transformers model and the processing class; return the directory.

        The default directory is `<output_dir>/merged`. A copy is merged: the trainer keeps its RepL model.
        """
        directory = output_dir if output_dir is not None else os.path.join(self.args.output_dir, MERGED_DIR_NAME)
        if self.args.should_save:
            model = self.replacement_model
            if not model.replaced_blocks:
                logger.warning("RepL: no block is replaced now; the merged model is the plain model.")
            if self.peft_model is not None:  # the replaced blocks first, then the adapter, on a copy
                merge_peft_and_replacement(self.peft_model).save_pretrained(directory)
            else:
                model.save_merged(directory)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(directory)
            logger.info("RepL: merged plain %s saved to %s", type(model.base_model).__name__, directory)
        self.merged_dir = directory
        return directory

    def save_checkpoint_for_push(self) -> None:
        """Write the whole RepL checkpoint and hf_replacement's card to `output_dir` before a checkpoint push
        (the Trainer copies only a checkpoint's `config.json` and weights there, then uploads the folder)."""
        self._save(self.args.output_dir)
        self.create_model_card()

    # ---- logging ----------------------------------------------------------------------------------

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """`Trainer.log`; the Trainer's training log of a step (with `loss`) also carries the coefficients."""
        if "loss" in logs:
            logs = {**logs, **self.coefficient_logs_due()}
        super().log(logs, start_time)

    def coefficient_logs_due(self) -> dict[str, float]:
        """This optimizer step's coefficient logs if they are due and not logged yet, else `{}`."""
        step, every = self.state.global_step, self.replacement_callback.coefficient_logging_steps
        if not every or step % every or step == self._coefficients_logged_at:
            return {}
        self._coefficients_logged_at = step
        return coefficient_logs(self.replacement_model)

    def log_replacement(self) -> None:
        """Log the parameter counts and the replaced blocks (once per `train()` and at the replacement)."""
        model = self.replacement_model
        trainable, total = model.get_nb_trainable_parameters()
        if self.is_world_process_zero():
            logger.info(
                "RepL: replaced blocks %s (of %d); trainable params %s, all params %s",
                model.replaced_blocks,
                model.num_blocks,
                f"{trainable:,d}",
                f"{total:,d}",
            )
        # Numbers only: TensorBoard and MLflow drop (with a warning) values that are not numbers.
        self.log(
            {
                f"{LOG_PREFIX}trainable_params": trainable,
                f"{LOG_PREFIX}total_params": total,
                f"{LOG_PREFIX}num_replaced_blocks": len(model.replaced_blocks),
            }
        )

    # ---- replacement_start_step -------------------------------------------------------------------

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """`Trainer.create_optimizer`, checked to have the layout `replace_blocks` will regroup."""
        optimizer = super().create_optimizer(model)
        model = model if model is not None else self.model
        if self.replacement_callback.start_step is not None and not self.replacement_model.replaced_blocks:
            actual = [[id(p) for p in group["params"]] for group in _torch_optimizer(optimizer).param_groups]
            if actual != [[id(p) for p in group] for group in self._parameter_groups(model)]:
                raise ValueError(
                    f"replacement_start_step needs the Trainer's two parameter groups (weight decay or not), but "
                    f"optim={self.args.optim!r} built {len(actual)} other ones: use an optimizer such as adamw_torch."
                )
        return optimizer

    def _parameter_groups(self, model: nn.Module) -> list[list[nn.Parameter]]:
        """The trainable parameters grouped as `Trainer.create_optimizer` groups them: [decay, no decay]."""
        decay = set(self.get_decay_parameter_names(model))
        trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        return [[p for name, p in trainable if name in decay], [p for name, p in trainable if name not in decay]]

    def replace_blocks(self) -> dict[int, str]:
        """Replace the model's blocks now and regroup the optimizer to match: `replacement_start_step`'s switch.

        The replaced blocks' weights leave the optimizer with their state; the coefficients join it.
        The groups are rebuilt as `create_optimizer` builds them for a replaced model, so a run resumed
        after the switch gets the same layout. Returns the replaced blocks.
        """
        model = self.replacement_model
        previous = list(model.parameters())
        replaced = model.replace_blocks()
        if self.optimizer is not None:
            # The same optimizer is edited, not a new one built: the LR scheduler and Accelerate hold it,
            # and the kept parameters keep their moments.
            optimizer = _torch_optimizer(self.optimizer)
            groups = self._parameter_groups(model)
            kept = {id(p) for group in groups for p in group}
            for parameter in previous:
                if id(parameter) not in kept:
                    optimizer.state.pop(parameter, None)
            for group, parameters in zip(optimizer.param_groups, groups, strict=True):
                group["params"] = parameters
        del previous  # the last references to the freed weights: their memory is released now
        if self.is_world_process_zero():
            logger.info("RepL: step %d reached, blocks %s replaced.", self.state.global_step, sorted(replaced))
        self.log_replacement()
        return replaced


class ReplacementSeq2SeqTrainer(ReplacementTrainer, Seq2SeqTrainer):
    """`ReplacementTrainer` with `Seq2SeqTrainer`'s evaluation: with `Seq2SeqTrainingArguments(
    predict_with_generate=True)`, `evaluate`/`predict` generate (taking `max_length`, `num_beams` and
    `args.generation_config`) and `compute_metrics` sees the generated tokens, as with the plain model."""


def _own_callback(
    callbacks: list[TrainerCallback | type[TrainerCallback]] | None, from_options: ReplacementCallback
) -> tuple[list[TrainerCallback | type[TrainerCallback]], ReplacementCallback]:
    """Split `callbacks` into the others and the trainer's ReplacementCallback (given there, or `from_options`)."""
    callbacks = list(callbacks or [])
    given = [c for c in callbacks if isinstance(c, ReplacementCallback) or c is ReplacementCallback]
    others = [c for c in callbacks if not any(c is g for g in given)]
    if not given:
        return others, from_options
    defaults = ReplacementCallback()
    options = ("start_step", "merge_at_end", "coefficient_logging_steps")
    if len(given) > 1 or any(getattr(from_options, name) != getattr(defaults, name) for name in options):
        raise ValueError(
            "Give ReplacementTrainer its RepL options once: as keyword options "
            "(replacement_start_step=..., merge_at_end=..., coefficient_logging_steps=...), or as one "
            "ReplacementCallback(...) in callbacks."
        )
    callback = given[0]() if given[0] is ReplacementCallback else given[0]
    if callback.trainer is not None:
        raise ValueError("This ReplacementCallback belongs to another ReplacementTrainer: create one per trainer.")
    return others, callback


def _check_arguments(
    start_step: int | None,
    model: nn.Module | None,
    model_init: Callable[..., nn.Module] | None,
    optimizer: torch.optim.Optimizer | None,
) -> None:
    """Refuse, before the Trainer's own work (device placement, Hub repo creation), what cannot train."""
    if start_step is not None and optimizer is not None:
        raise ValueError(
            "replacement_start_step regroups the optimizer the Trainer builds when the blocks are replaced: "
            "pass optimizer_cls_and_kwargs=(cls, kwargs) instead of optimizers=(optimizer, scheduler)."
        )
    if start_step is not None and model_init is not None:
        # train() would build a new model, without the hook that resumes across the switch.
        raise ValueError("replacement_start_step needs model=..., not model_init.")
    if model is not None:
        _check_model(model, start_step)


def _check_training_arguments(args: TrainingArguments, generates: bool) -> None:
    if getattr(args, "predict_with_generate", False) and not generates:
        raise ValueError(
            "predict_with_generate=True asks for generation in evaluation, which ReplacementTrainer (like "
            "Trainer) does not do: use ReplacementSeq2SeqTrainer, the RepL Seq2SeqTrainer, with the same arguments."
        )
    deepspeed = getattr(args, "deepspeed_plugin", None)  # set by TrainingArguments(deepspeed=...) or the launcher
    check_deepspeed_stage(deepspeed.zero_stage if deepspeed is not None else None)


def _replacement_model_of(model: nn.Module) -> nn.Module:
    """The ReplacementModel of `model`: itself, or the base model of a PEFT model built on one."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


def _check_model(model: nn.Module, start_step: int | None) -> ReplacementModel:
    peft_model = model if isinstance(model, PeftModel) else None
    model = _replacement_model_of(model)
    if not isinstance(model, ReplacementModel):
        on_peft = f"a {type(peft_model).__name__} of " if peft_model is not None else ""
        fix = (
            "build the PEFT model on a RepL model: repl = get_replacement_model(base_model, config); "
            "get_peft_model(repl, prepare_peft_config(repl, peft_config))"
            if peft_model is not None
            else "wrap it with get_replacement_model(model, config) (or ReplacementModel(model, config, "
            "defer_replacement=True) with replacement_start_step) before building the trainer"
        )
        raise TypeError(f"ReplacementTrainer needs a ReplacementModel, got {on_peft}{type(model).__name__}: {fix}.")
    if peft_model is not None and start_step is not None:
        raise ValueError(
            "replacement_start_step is not supported with a PEFT model: the adapter config was prepared for the "
            "replaced blocks. Train the PEFT model on a model replaced from the start (replacement_start_step=None)."
        )
    if start_step is not None and model.replaced_blocks:
        raise ValueError(
            f"replacement_start_step={start_step} needs a model whose replacement is deferred, but blocks "
            f"{sorted(model.replaced_blocks)} are already replaced: build it with "
            "ReplacementModel(model, config, defer_replacement=True)."
        )
    if start_step is None and not model.replaced_blocks:
        raise ValueError(
            "The model's replacement is deferred (defer_replacement=True) but no replacement_start_step was given: "
            "pass ReplacementTrainer(..., replacement_start_step=N), or call model.replace_blocks() first."
        )
    return model


def _shard_with_plugin(model: ReplacementModel, accelerator: Any) -> ReplacementModel:
    """`shard_model` with the settings of the Trainer's FSDP plugin, before Accelerate sees the model.

    Accelerate's own wrapping (its auto-wrap policies) puts each module in a unit of its own, and a
    replaced block must share one with its neighbours; Accelerate leaves a model that is sharded already
    as it is.
    """
    plugin = accelerator.state.fsdp_plugin
    if plugin.fsdp_version != 2:
        raise ValueError(
            f"RepL shards with FSDP2, and fsdp_config asks for FSDP version {plugin.fsdp_version}: pass "
            "TrainingArguments(fsdp='full_shard', fsdp_config={'version': 2})."
        )
    if plugin.activation_checkpointing:
        raise ValueError(
            "fsdp_config's activation_checkpointing wraps the blocks after RepL has sharded them: use "
            "TrainingArguments(gradient_checkpointing=True) (or ReplacementConfig(recompute_replaced=True)) instead."
        )
    from torch.distributed.fsdp import MixedPrecisionPolicy

    settings: dict[str, Any] = {
        "reshard_after_forward": plugin.reshard_after_forward,
        "offload_policy": plugin.cpu_offload,
        "mp_policy": plugin.mixed_precision_policy or MixedPrecisionPolicy(),
    }
    mesh = getattr(accelerator, "torch_device_mesh", None)
    if mesh is not None:  # as Accelerate passes it (a ParallelismConfig's FSDP dimensions)
        settings["mesh"] = mesh[tuple(accelerator.parallelism_config.fsdp_dim_names)]
    return shard_model(model, **settings)


def _torch_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    return getattr(optimizer, "optimizer", optimizer)  # the torch optimizer inside Accelerate's AcceleratedOptimizer


def _has_lazy_transform(dataset: Any) -> bool:
    """A `datasets.Dataset` (or a dict of them) formatted with `with_transform`/`set_transform`."""
    if isinstance(dataset, dict):
        return any(_has_lazy_transform(value) for value in dataset.values())
    return getattr(dataset, "format", {}).get("type") == "custom"


def _as_list(value: str | list[str] | None) -> list[str]:
    return [value] if isinstance(value, str) else list(value or [])


def _match_checkpoint_replacement(
    model: ReplacementModel, state_dict: dict[str, torch.Tensor], prefix: str, *_: Any
) -> None:
    """Before a state dict loads, bring a `replacement_start_step` model to the checkpoint's side of the switch.

    A checkpoint with coefficients was saved after the replacement: replace the blocks first. One
    without them but with the replaced blocks' weights was saved before it (a best model from the
    warm-up): put the weights back (`merge_and_unload`, then overwritten by the load).
    """
    has_coefficients = any(key.startswith(prefix + _COEFFICIENTS_PREFIX) for key in state_dict)
    if has_coefficients and not model.replaced_blocks:
        model.replace_blocks()
        logger.info("RepL: checkpoint saved after the switch; blocks %s replaced.", sorted(model.replaced_blocks))
    elif not has_coefficients and model.replaced_blocks:
        names = tuple(f"{prefix}base_model.{name}." for name in model.replaced_blocks.values())
        if any(key.startswith(names) for key in state_dict):
            logger.warning(
                "RepL: loading a checkpoint saved before the switch: blocks %s hold their own weights again.",
                sorted(model.replaced_blocks),
            )
            model.merge_and_unload()


__all__ = ["MERGED_DIR_NAME", "ReplacementCallback", "ReplacementSeq2SeqTrainer", "ReplacementTrainer"]
