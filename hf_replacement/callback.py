"""`ReplacementCallback`: Replacement Learning with the Transformers `Trainer`.

A `ReplacementModel` trains in a plain `Trainer` as it is: the Trainer keeps the dataset columns
the base model's `forward` takes, finds `labels` (evaluation loss, `label_ids`), saves the model's
`state_dict()` (the compact RepL weights and the coefficients) to `model.safetensors` and restores
it with `load_state_dict` when resuming or loading the best model. What a plain Trainer cannot do
for a model that is not a `PreTrainedModel` is write the files that make a directory loadable with
`ReplacementModel.from_pretrained`, nor report the coefficients to TensorBoard / W&B. The callback
adds those:

    trainer = Trainer(model=get_replacement_model(vit, ReplacementConfig()), args=args, ...)
    ReplacementCallback(trainer, merge_at_end=True)      # registers itself with the trainer
    trainer.train()

Why the callback holds the trainer (design notes):

* Logging. A callback's `on_log` receives the Trainer's `logs` dict only *after* the reporting
  callbacks (TensorBoard, W&B, ...), which the Trainer registers first: keys added there never reach
  them. The callback therefore logs through `trainer.log(...)`, the Trainer's own path to every
  reporter, `state.log_history` and the console. Reporters prefix training keys with `train/`, so
  TensorBoard shows `train/replacement/a/block_3`.
* Checkpoints. The Trainer saves a non-`PreTrainedModel` as a bare state dict and fires no event on
  `trainer.save_model(dir)`. The callback wraps the trainer's `_save` (every model save goes through
  it: checkpoints, `save_model`, the final save) to add `replacement_config.json` and the base
  `config.json` beside the Trainer's `model.safetensors`, whose keys are exactly
  `ReplacementModel.state_dict()`'s.
* `start_step`. Replacing blocks mid-training frees parameters the optimizer holds and creates the
  coefficients it lacks: the callback edits the trainer's optimizer in place (see below).
* The Hub. With `push_to_hub=True` the Trainer itself creates the repo (in `__init__`) and uploads
  `output_dir` (all but `checkpoint-*` and `_*`) at every save (per `hub_strategy`; in the
  background, skipping a save while the previous upload runs), on `save_model` and on
  `trainer.push_to_hub()`. Left alone, a checkpoint push holds only `config.json`,
  `model.safetensors` and `training_args.bin` (no `replacement_config.json`: not a RepL
  checkpoint), and `push_to_hub()` adds Transformers' generic card (`library_name: transformers`,
  no base model, no coefficients). Rather than push a second time on its own, the callback makes
  what the Trainer uploads right: `on_push_begin` (fired before every push) writes
  `replacement_config.json` and the card, and `trainer.create_model_card` (which `push_to_hub()`
  calls) renders `hf_replacement`'s card. One push path: no two uploads race for the repo.
"""

from __future__ import annotations

import copy
import os
from typing import TYPE_CHECKING, Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.utils import logging

from .checkpoint import write_checkpoint
from .config import CONFIG_NAME
from .hub import render_model_card
from .model import LOG_PREFIX, ReplacementModel, coefficient_logs

if TYPE_CHECKING:
    from transformers import Trainer

logger = logging.get_logger(__name__)

MERGED_DIR_NAME = "merged"
_CARD_NAME = "README.md"
# Timings the Trainer logs with every evaluation: noise in a model card's results.
_SPEED_METRICS = ("_runtime", "_per_second")
_COEFFICIENTS_PREFIX = "replacement_coefficients."


class ReplacementCallback(TrainerCallback):
    """Logs, checkpoints and (optionally) schedules and merges Replacement Learning in a `Trainer`.

    Args:
        trainer: the `Trainer` whose model is a `ReplacementModel`. The callback registers itself with
            it (do not `add_callback` it again). It can also be given later with `attach(trainer)`,
            e.g. after `Trainer(..., callbacks=[callback])`.
        start_step: train ordinarily for this many optimizer steps, then replace the blocks. The
            model must be built with `ReplacementModel(model, config, defer_replacement=True)`. At
            that step the selected blocks' own weights are dropped (and their optimizer state with
            them), the coefficients start at `coefficient_init` and join the optimizer, and the
            neighbours must from then on also serve the replaced blocks. Trade-off: the warm-up
            gives the neighbours trained, mutually consistent weights to synthesize from, and the
            early, fast-moving phase runs on the full model; but whatever the replaced blocks learnt
            during it is lost (the model's function changes at `start_step`; on an 8-block digits
            ViT the evaluation loss moved by under 1%), the remaining steps must make up for it, and
            the parameter, gradient and optimizer memory is only saved after it (peak memory is
            that of the full model). `None` (default) trains a model replaced from
            the start. Single-process training only: under DDP the set of parameters cannot change
            after the model is wrapped.
        merge_at_end: when training ends, write the merged plain Transformers model (the replaced
            blocks' synthesized weights materialized, `merge_and_unload`) and the trainer's
            processing class to `<output_dir>/merged`. The trainer's own model stays a
            `ReplacementModel` (a copy is merged). With `load_best_model_at_end`, it is the best model.
        coefficient_logging_steps: log every replaced block's coefficients every this many optimizer
            steps (default 1: every step), as `replacement/a/block_<i>` and `replacement/b/block_<i>`
            (the mean over the coefficients of a block for "tensor" and "channel" granularity).
            0 turns them off. They go through `trainer.log`, so they also reach the console.

    Once per `train()` call (and again when `start_step` replaces the blocks) it logs
    `replacement/trainable_params`, `replacement/total_params` and `replacement/num_replaced_blocks`,
    and the replaced block names through the `hf_replacement` logger.

    Sharing on the Hub: set `TrainingArguments(push_to_hub=True, hub_model_id="user/name")` and,
    after training, call `trainer.push_to_hub()` as with any Transformers model (the Trainer's
    checkpoint pushes during training, per `hub_strategy`, are complete too). Every push is the
    compact RepL checkpoint (`replacement_config.json`, `config.json`, `model.safetensors`) with
    `hf_replacement`'s model card, which `ReplacementModel.from_pretrained("user/name")` loads.
    The card's results are the metrics of the last evaluation (of the best one once
    `load_best_model_at_end` has loaded it), with `eval_` dropped; `push_to_hub(finetuned_from=...,
    dataset_tags=..., tags=..., license=...)` fill its metadata, as for the Trainer's own card.
    Only the main process writes and uploads. The Trainer uploads everything else in
    `output_dir` as well (e.g. `runs/`, and with `merge_at_end` the merged model in `merged/`,
    which `AutoModelForImageClassification.from_pretrained(repo_id, subfolder="merged")` loads).
    For the merged model alone, or a push outside the Trainer, use
    `trainer.model.push_to_hub(repo_id, merged=True)`. Prefer `hf auth login` or `HF_TOKEN` to
    `hub_token`: the Trainer pickles its arguments, `hub_token` included, into
    `training_args.bin`, which it uploads with every push.
    """

    def __init__(
        self,
        trainer: "Trainer | None" = None,
        *,
        start_step: int | None = None,
        merge_at_end: bool = False,
        coefficient_logging_steps: int = 1,
    ) -> None:
        if start_step is not None and (isinstance(start_step, bool) or not isinstance(start_step, int) or start_step < 0):
            raise ValueError(f"start_step={start_step!r} is invalid: give a step number >= 0, or None.")
        if (
            isinstance(coefficient_logging_steps, bool)
            or not isinstance(coefficient_logging_steps, int)
            or coefficient_logging_steps < 0
        ):
            raise ValueError(
                f"coefficient_logging_steps={coefficient_logging_steps!r} is invalid: give an integer >= 0 (0 turns it off)."
            )
        self.start_step = start_step
        self.merge_at_end = merge_at_end
        self.coefficient_logging_steps = coefficient_logging_steps
        self.merged_dir: str | None = None
        self._trainer: Trainer | None = None
        if trainer is not None:
            self.attach(trainer)

    # ---- wiring -------------------------------------------------------------------------------

    def attach(self, trainer: "Trainer") -> "ReplacementCallback":
        """Bind to `trainer`: check its model, hook its saves, and register this callback with it."""
        if self._trainer is trainer:
            return self
        if self._trainer is not None:
            raise ValueError("This ReplacementCallback is already attached to another Trainer; create one per Trainer.")
        model = _replacement_model_of(trainer)
        if self.start_step is not None:
            if model.replaced_blocks:
                raise ValueError(
                    f"start_step={self.start_step} needs a model whose replacement is deferred, but blocks "
                    f"{sorted(model.replaced_blocks)} are already replaced: build it with "
                    "ReplacementModel(model, config, defer_replacement=True)."
                )
            if trainer.args.world_size > 1:
                raise NotImplementedError(
                    "start_step is supported in single-process training only: replacing blocks changes the "
                    "set of parameters after DDP has wrapped the model. Train replaced from the start instead."
                )
            # Resuming (or loading the best model) from a checkpoint saved after the replacement must
            # first replace the blocks, so that the coefficients have a place to load into and the
            # optimizer the Trainer builds next matches the saved one.
            model.register_load_state_dict_pre_hook(_match_checkpoint_replacement)
        self._trainer = trainer
        if not getattr(trainer, "_replacement_hooked", False):
            _hook_trainer_save(trainer)
            _hook_model_card(trainer)
            trainer._replacement_hooked = True
        if trainer.args.push_to_hub and trainer.args.hub_token and trainer.is_world_process_zero():
            logger.warning(
                "RepL: TrainingArguments.hub_token is pickled into training_args.bin, which the Trainer uploads "
                "to the Hub with every push: log in with `hf auth login` or set HF_TOKEN instead."
            )
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        return self

    def _replacement_model(self) -> ReplacementModel:
        if self._trainer is None:
            raise RuntimeError(
                "ReplacementCallback is not attached to a Trainer, so it cannot log through it nor write "
                "RepL checkpoints. Create it with the trainer: `ReplacementCallback(trainer)` (it registers "
                "itself), or call `callback.attach(trainer)` after `Trainer(..., callbacks=[callback])`."
            )
        return _replacement_model_of(self._trainer)

    # ---- events -------------------------------------------------------------------------------

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        model = self._replacement_model()
        if model.replaced_blocks:
            self._log_replacement(model, state)
        elif self.start_step is None:
            raise ValueError(
                "The model's replacement is deferred (defer_replacement=True) but no start_step was given: "
                "pass ReplacementCallback(trainer, start_step=N), or call model.replace_blocks() before training."
            )
        elif state.is_world_process_zero:
            logger.info("RepL: training the full model until step %d, then replacing blocks.", self.start_step)

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self.start_step is None or state.global_step < self.start_step:
            return
        model = self._replacement_model()
        if not model.replaced_blocks:  # `>=` and this check: a resumed run past start_step is replaced already
            self._replace_now(model, state)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if not self.coefficient_logging_steps or state.global_step % self.coefficient_logging_steps:
            return
        model = self._replacement_model()
        if model.replaced_blocks:
            # `trainer.log` clears `control.should_log` (CallbackHandler.on_log does), which the default
            # flow set just before for this step's loss log: keep the Trainer's own decision.
            should_log = control.should_log
            self._trainer.log(coefficient_logs(model))
            control.should_log = should_log

    def on_train_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        processing_class: Any = None,
        **kwargs: Any,
    ) -> None:
        if not self.merge_at_end or not args.should_save:
            return
        model = self._replacement_model()
        if not model.replaced_blocks:
            logger.warning("RepL: no block was replaced (start_step not reached); the merged model is the plain model.")
        directory = os.path.join(args.output_dir, MERGED_DIR_NAME)
        # Merge a copy: the trainer's model stays a ReplacementModel for evaluate()/save_model() after.
        merged = copy.deepcopy(model).merge_and_unload()
        merged.save_pretrained(directory)
        if processing_class is not None and hasattr(processing_class, "save_pretrained"):
            processing_class.save_pretrained(directory)
        self.merged_dir = directory
        logger.info("RepL: merged plain %s saved to %s", type(merged).__name__, directory)

    def on_push_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        # A checkpoint push uploads output_dir after copying only the checkpoint's config.json and
        # weights there: the RepL files and the card must be there too. (Before push_to_hub(), which
        # then saves and writes the card itself, this is redundant and cheap.)
        if not state.is_world_process_zero:
            return
        write_replacement_files(self._replacement_model(), args.output_dir)
        self._trainer.create_model_card()

    # ---- helpers ------------------------------------------------------------------------------

    def _log_replacement(self, model: ReplacementModel, state: TrainerState) -> None:
        trainable, total = model.get_nb_trainable_parameters()
        if state.is_world_process_zero:
            logger.info(
                "RepL: replaced blocks %s (of %d); trainable params %s, all params %s",
                model.replaced_blocks, model.num_blocks, f"{trainable:,d}", f"{total:,d}",
            )
        # Numbers only: TensorBoard and MLflow drop (with a warning) values that are not numbers.
        self._trainer.log(
            {
                f"{LOG_PREFIX}trainable_params": trainable,
                f"{LOG_PREFIX}total_params": total,
                f"{LOG_PREFIX}num_replaced_blocks": len(model.replaced_blocks),
            }
        )

    def _replace_now(self, model: ReplacementModel, state: TrainerState) -> None:
        before = list(model.parameters())
        model.replace_blocks()
        after = list(model.named_parameters())
        kept = {id(parameter) for _, parameter in after}
        known = {id(parameter) for parameter in before}
        freed = [parameter for parameter in before if id(parameter) not in kept]
        new = [(name, parameter) for name, parameter in after if id(parameter) not in known]
        self._update_optimizer(model, freed, new)
        del before, freed  # the last references to the dropped weights: their memory is released now
        if state.is_world_process_zero:
            logger.info("RepL: step %d reached, blocks %s replaced.", state.global_step, sorted(model.replaced_blocks))
        self._log_replacement(model, state)

    def _update_optimizer(
        self, model: ReplacementModel, freed: list[torch.nn.Parameter], new: list[tuple[str, torch.nn.Parameter]]
    ) -> None:
        """Drop the freed weights (and their state) from the optimizer and add the coefficients.

        The param groups are edited in place rather than rebuilt: the learning-rate scheduler, the
        Accelerate wrapper and the callback handler all hold this optimizer, and the other weights
        keep their moments. The coefficients go to the group the Trainer would have put them in
        (weight decay by `get_decay_parameter_names`), at its end: that is where `create_optimizer`
        puts them for a replaced model, so a resumed run builds the same layout as the saved one.
        """
        optimizer = self._trainer.optimizer
        if optimizer is None:
            return
        optimizer = getattr(optimizer, "optimizer", optimizer)  # unwrap Accelerate's AcceleratedOptimizer
        freed_ids = {id(parameter) for parameter in freed}
        for group in optimizer.param_groups:
            group["params"] = [parameter for parameter in group["params"] if id(parameter) not in freed_ids]
        for parameter in freed:
            optimizer.state.pop(parameter, None)
        groups = optimizer.param_groups
        if len(groups) != 2:
            logger.warning(
                "RepL: the optimizer has %d param groups (the Trainer's own has 2); the coefficients join the "
                "first. Resuming needs an optimizer built with the same layout.", len(groups),
            )
        decay = set(self._trainer.get_decay_parameter_names(model))
        for name, parameter in new:
            index = 0 if name in decay or len(groups) != 2 else 1
            groups[index]["params"].append(parameter)


def _replacement_model_of(trainer: "Trainer") -> ReplacementModel:
    model = trainer.model
    if not isinstance(model, ReplacementModel):
        raise TypeError(
            f"ReplacementCallback needs a Trainer whose model is a ReplacementModel, got {type(model).__name__}: "
            "wrap it with get_replacement_model(model, config) (or ReplacementModel(model, config, "
            "defer_replacement=True) with start_step) before building the Trainer."
        )
    return model


def write_replacement_files(model: ReplacementModel, directory: str | os.PathLike) -> None:
    """Add `replacement_config.json` and the base `config.json` to a directory holding the weights."""
    files = {CONFIG_NAME: model.replacement_config.to_json_string()}
    config = model.config
    if config is not None and hasattr(config, "to_json_string"):
        config.architectures = [type(model.base_model).__name__]  # what from_pretrained builds
        files["config.json"] = config.to_json_string()
    write_checkpoint(directory, files)


def _hook_trainer_save(trainer: "Trainer") -> None:
    """Make every model save of `trainer` (checkpoints, `save_model`) a RepL checkpoint."""
    save = trainer._save

    def _save(output_dir: str | None = None, *args: Any, **kwargs: Any) -> None:
        save(output_dir, *args, **kwargs)
        model = trainer.accelerator.unwrap_model(trainer.model)
        if trainer.args.should_save and isinstance(model, ReplacementModel):
            write_replacement_files(model, output_dir if output_dir is not None else trainer.args.output_dir)

    trainer._save = _save


def _hook_model_card(trainer: "Trainer") -> None:
    """Make `trainer.create_model_card` (which `trainer.push_to_hub` calls) write `hf_replacement`'s card.

    Same parameters as `Trainer.create_model_card`; `tasks` and `dataset_args` have no place in the
    card (its task is image classification).
    """

    def create_model_card(
        language: str | list[str] | None = None,
        license: str | None = None,
        tags: str | list[str] | None = None,
        model_name: str | None = None,
        finetuned_from: str | None = None,
        tasks: str | list[str] | None = None,
        dataset_tags: str | list[str] | None = None,
        dataset: str | list[str] | None = None,
        dataset_args: str | list[str] | None = None,
    ) -> None:
        if not trainer.is_world_process_zero():
            return
        card = render_model_card(
            _replacement_model_of(trainer),
            _evaluation_results(trainer),
            base_model=finetuned_from,
            datasets=_as_list(dataset_tags) or _as_list(dataset),
            # hub_model_id is the full "user/name" once init_hf_repo ran: the card's loading snippet uses it.
            repo_id=trainer.hub_model_id or trainer.args.hub_model_id or model_name,
        )
        card.data.language = language
        card.data.license = license
        card.data.tags = list(dict.fromkeys(card.data.tags + _as_list(tags)))
        card.save(os.path.join(trainer.args.output_dir, _CARD_NAME))

    trainer.create_model_card = create_model_card


def _evaluation_results(trainer: "Trainer") -> dict[str, Any] | None:
    """The metrics of the evaluation of the model being pushed, without `eval_` (`accuracy`, `loss`).

    That is the last evaluation; after training with `load_best_model_at_end`, the best model's.
    """
    state = trainer.state
    best_step = state.best_global_step if trainer.args.load_best_model_at_end and not trainer.is_in_train else None
    for logs in reversed(state.log_history):
        metrics = {
            key.removeprefix("eval_"): value
            for key, value in logs.items()
            if key.startswith("eval_") and not key.endswith(_SPEED_METRICS)
        }
        if metrics and best_step in (None, logs["step"]):
            return metrics | {"updates": logs["step"]}
    return None


def _as_list(value: str | list[str] | None) -> list[str]:
    return [value] if isinstance(value, str) else list(value or [])


def _match_checkpoint_replacement(
    model: ReplacementModel, state_dict: dict[str, torch.Tensor], prefix: str, *_: Any
) -> None:
    """Before loading a state dict, bring a `start_step` model to the checkpoint's side of the switch.

    A checkpoint with coefficients was saved after the replacement: replace the blocks first. One
    without them but with the replaced blocks' weights was saved before it (a best model from the
    warm-up): put the weights back (`merge_and_unload`, then overwritten by the load).
    """
    has_coefficients = any(key.startswith(prefix + _COEFFICIENTS_PREFIX) for key in state_dict)
    if has_coefficients and not model.replaced_blocks:
        model.replace_blocks()
        logger.info("RepL: the checkpoint was saved after start_step; blocks %s replaced before loading.", sorted(model.replaced_blocks))
    elif not has_coefficients and model.replaced_blocks:
        names = [f"{prefix}base_model.{name}." for name in model.replaced_blocks.values()]
        if any(key.startswith(tuple(names)) for key in state_dict):
            logger.warning(
                "RepL: loading a checkpoint saved before start_step: blocks %s hold their own weights again.",
                sorted(model.replaced_blocks),
            )
            model.merge_and_unload()


__all__ = ["MERGED_DIR_NAME", "ReplacementCallback", "coefficient_logs", "write_replacement_files"]
