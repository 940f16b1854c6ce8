"""A ReplacementModel in the Transformers Trainer: ReplacementTrainer, and the misuse it rejects.

Tiny ViT (4 blocks, block 1 replaced), random 1x8x8 images, CPU fp32, dropout 0: every run takes
well under a second, so each behaviour gets its own real Trainer run.
"""

from __future__ import annotations

import gc
import json
import math
import os
import weakref

import datasets
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from tolerances import assert_fp32_close, reduction_length
from transformers import (
    AutoImageProcessor,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessorPil,
)
from transformers.utils import logging as hf_logging

from hf_replacement import (
    CONFIG_NAME,
    ReplacementCallback,
    ReplacementConfig,
    ReplacementModel,
    ReplacementTrainer,
    get_replacement_model,
    prepare_peft_config,
)
from hf_replacement.integrations.trainer import MERGED_DIR_NAME
from hf_replacement.model import coefficient_logs

A, B = "replacement/a/block_1", "replacement/b/block_1"


@pytest.fixture(autouse=True)
def _quiet_transformers():
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the Trainer's per-run info/warnings drown pytest's output
    yield
    hf_logging.set_verbosity(verbosity)


def tiny_vit(seed: int = 0, **config) -> ViTForImageClassification:
    torch.manual_seed(seed)
    return ViTForImageClassification(
        ViTConfig(
            hidden_size=32,
            num_hidden_layers=4,
            num_attention_heads=2,
            intermediate_size=64,
            image_size=8,
            patch_size=4,
            num_channels=1,
            num_labels=10,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            **config,
        )
    )


def repl_vit(defer: bool = False) -> ReplacementModel:
    return ReplacementModel(tiny_vit(), ReplacementConfig(replace_interval=2), defer_replacement=defer)


def dataset(size: int = 24, extra_column: bool = False) -> datasets.Dataset:
    generator = torch.Generator().manual_seed(1)
    columns = {
        "pixel_values": torch.randn(size, 1, 8, 8, generator=generator).tolist(),
        "labels": torch.randint(0, 10, (size,), generator=generator).tolist(),
    }
    if extra_column:
        columns["file_name"] = [f"{i}.png" for i in range(size)]
    return datasets.Dataset.from_dict(columns).with_format("torch")


def training_args(output_dir, **overrides) -> TrainingArguments:
    values = dict(
        use_cpu=True,
        report_to=[],
        per_device_train_batch_size=4,
        per_device_eval_batch_size=8,
        learning_rate=1e-2,
        max_steps=4,
        save_steps=2,
        logging_steps=1,
        seed=0,
        data_seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    values.update(overrides)
    return TrainingArguments(str(output_dir), **values)


class Recorder(TrainerCallback):
    """Registered before the trainer's ReplacementCallback, like the reporters: sees what reaches them."""

    def __init__(self) -> None:
        self.logs: list[tuple[int, dict]] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append((state.global_step, dict(logs)))

    def values(self, key: str) -> dict[int, float]:
        return {step: logs[key] for step, logs in self.logs if key in logs}


def assert_same_state(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> None:
    assert first.keys() == second.keys()
    different = [key for key in first if not torch.equal(first[key], second[key])]
    assert not different, f"differ: {different[:5]}"


def logits(model, pixel_values: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(pixel_values=pixel_values).logits


# ---- the model's inputs and labels -------------------------------------------------------------------


def test_trainer_keeps_columns_finds_labels_and_evaluates(tmp_path):
    train = dataset(extra_column=True)
    trainer = ReplacementTrainer(
        repl_vit(),
        training_args(tmp_path),
        train_dataset=train,
        eval_dataset=dataset(16),
        compute_metrics=lambda p: {"accuracy": float((p.predictions.argmax(-1) == p.label_ids).mean())},
    )
    # forward's signature is the base model's: the image column survives, the unused one goes.
    assert set(trainer._remove_unused_columns(train).column_names) == {"pixel_values", "labels"}
    assert trainer.label_names == ["labels"]
    metrics = trainer.evaluate()
    assert math.isfinite(metrics["eval_loss"]) and 0 <= metrics["eval_accuracy"] <= 1
    prediction = trainer.predict(dataset(16))
    assert prediction.label_ids.tolist() == dataset(16)[:]["labels"].tolist()


# ---- checkpoints -------------------------------------------------------------------------------------


def test_every_checkpoint_and_save_model_load_with_from_pretrained(tmp_path):
    trainer = ReplacementTrainer(repl_vit(), training_args(tmp_path / "run"), train_dataset=dataset())
    trainer.train()
    model = trainer.model
    images = dataset(8)[:]["pixel_values"]

    coefficients = {}
    for step in (2, 4):
        checkpoint = tmp_path / "run" / f"checkpoint-{step}"
        assert {CONFIG_NAME, "config.json", "model.safetensors", "optimizer.pt", "training_args.bin"} <= set(
            os.listdir(checkpoint)
        )
        # The weights file holds exactly ReplacementModel.state_dict()'s keys: what the Trainer resumes from.
        assert set(load_file(checkpoint / "model.safetensors")) == set(model.state_dict())
        loaded = ReplacementModel.from_pretrained(checkpoint)
        assert loaded.replaced_blocks == {1: "vit.layers.1"}
        coefficients[step] = loaded.replacement_coefficients.get_parameter("1").detach()
    assert not torch.equal(coefficients[2], coefficients[4])  # each checkpoint holds its own step
    last = ReplacementModel.from_pretrained(tmp_path / "run" / "checkpoint-4")
    assert_same_state(last.state_dict(), model.state_dict())

    trainer.save_model(str(tmp_path / "final"))
    final = ReplacementModel.from_pretrained(tmp_path / "final")
    assert_same_state(final.state_dict(), model.state_dict())
    torch.testing.assert_close(logits(final, images), logits(model, images), rtol=0, atol=0)
    assert json.loads((tmp_path / "final" / CONFIG_NAME).read_text())["replace_interval"] == 2
    assert not [name for name in os.listdir(tmp_path / "final") if name.endswith(".tmp")]  # written atomically


@pytest.mark.slow
def test_resume_continues_exactly(tmp_path):
    """8 steps straight == 4 steps, resume from checkpoint-4, 4 more (crossing an epoch boundary).

    Exact because the Trainer reloads a ReplacementModel's checkpoint as its raw state dict. (A plain
    Transformers 5.23 model does not resume exactly: save_pretrained writes the legacy key names,
    e.g. `vit.encoder.layer.0...`, and `_load_from_checkpoint`'s `load_state_dict(strict=False)`
    loads none of the block weights, with only a warning: huggingface/transformers#43701.)
    """
    args = dict(max_steps=8, save_steps=4)
    straight = ReplacementTrainer(repl_vit(), training_args(tmp_path / "straight", **args), train_dataset=dataset())
    straight.train()

    resumed = ReplacementTrainer(repl_vit(), training_args(tmp_path / "resumed", **args), train_dataset=dataset())
    resumed.train(resume_from_checkpoint=str(tmp_path / "straight" / "checkpoint-4"))

    assert_same_state(resumed.model.state_dict(), straight.model.state_dict())  # weights and coefficients
    first, second = straight.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k][name], second[k][name]) for k in first for name in first[k])
    losses = [
        [entry["loss"] for entry in t.state.log_history if "loss" in entry and entry["step"] > 4]
        for t in (straight, resumed)
    ]
    assert losses[0] == losses[1] and len(losses[0]) == 4


def best_model_trainer(tmp_path, model, max_steps: int, scores: list[float], **options) -> ReplacementTrainer:
    """Evaluates every 2 steps with the given scores (higher is better) and loads the best model at the end."""
    scores = iter(scores)
    return ReplacementTrainer(
        model,
        training_args(
            tmp_path,
            max_steps=max_steps,
            eval_strategy="steps",
            eval_steps=2,
            load_best_model_at_end=True,
            metric_for_best_model="score",
            greater_is_better=True,
        ),
        train_dataset=dataset(),
        eval_dataset=dataset(8),
        compute_metrics=lambda _: {"score": next(scores)},
        **options,
    )


def test_load_best_model_at_end(tmp_path):
    trainer = best_model_trainer(tmp_path, repl_vit(), 6, [1.0, 0.0, 0.0])  # the evaluation at step 2 is the best
    trainer.train()
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-2")
    assert_same_state(trainer.model.state_dict(), load_file(tmp_path / "checkpoint-2" / "model.safetensors"))
    assert not torch.equal(
        trainer.model.replacement_coefficients.get_parameter("1"),
        load_file(tmp_path / "checkpoint-6" / "model.safetensors")["replacement_coefficients.1"],
    )


def test_merge_at_end_leaves_a_plain_transformers_model(tmp_path):
    processor = ViTImageProcessorPil(size={"height": 8, "width": 8}, image_mean=[0.3], image_std=[0.2])
    trainer = ReplacementTrainer(
        repl_vit(), training_args(tmp_path), train_dataset=dataset(), merge_at_end=True, processing_class=processor
    )
    assert trainer.merged_dir is None
    trainer.train()
    assert trainer.merged_dir == str(tmp_path / MERGED_DIR_NAME)
    for directory in ("checkpoint-2", "checkpoint-4", MERGED_DIR_NAME):  # the processing class goes with every save
        assert AutoImageProcessor.from_pretrained(tmp_path / directory).to_dict() == processor.to_dict()
    merged = ViTForImageClassification.from_pretrained(trainer.merged_dir)  # transformers alone
    assert sum(p.numel() for p in merged.parameters()) == sum(p.numel() for p in tiny_vit().parameters())
    images = dataset(8)[:]["pixel_values"]
    assert_fp32_close(logits(merged, images), logits(trainer.model, images), reduction_length(merged))
    assert trainer.model.replaced_blocks == {1: "vit.layers.1"}  # a copy was merged


def lora_on_repl_vit() -> PeftModel:
    model = repl_vit()
    return get_peft_model(model, prepare_peft_config(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"])))


def test_a_peft_model_on_a_repl_model_trains_saves_resumes_and_merges(tmp_path):
    """LoRA over a RepL model, the composition the README documents, in ReplacementTrainer."""
    args = dict(max_steps=8, save_steps=4)
    straight = ReplacementTrainer(
        lora_on_repl_vit(), training_args(tmp_path / "straight", **args), train_dataset=dataset(), merge_at_end=True
    )
    initial = {k: v.clone() for k, v in straight.model.state_dict().items()}
    straight.train()
    trained = straight.model.state_dict()
    moved = [k for k in trained if not torch.equal(trained[k], initial[k])]
    assert moved and all("lora_" in k or "replacement_coefficients.modules_to_save" in k for k in moved), moved
    assert any("replacement_coefficients" in k for k in moved)  # the coefficients train with the adapter

    # Saved as PEFT saves an adapter (with the coefficients); it loads on a fresh RepL model with PEFT's loader.
    images = dataset(8)[:]["pixel_values"]
    reloaded = PeftModel.from_pretrained(repl_vit(), tmp_path / "straight" / "checkpoint-8")
    torch.testing.assert_close(logits(reloaded, images), logits(straight.model, images), rtol=0, atol=0)

    resumed = ReplacementTrainer(
        lora_on_repl_vit(), training_args(tmp_path / "resumed", **args), train_dataset=dataset()
    )
    resumed.train(resume_from_checkpoint=str(tmp_path / "straight" / "checkpoint-4"))
    assert_same_state(resumed.model.state_dict(), trained)

    # merge_at_end: the replaced blocks from their neighbours without the adapter, then the adapter merged.
    merged = ViTForImageClassification.from_pretrained(straight.merged_dir)
    torch.testing.assert_close(logits(merged, images), logits(straight.model, images), rtol=1e-5, atol=1e-5)
    assert isinstance(straight.model, PeftModel) and straight.replacement_model.replaced_blocks == {1: "vit.layers.1"}


def test_a_peft_model_needs_a_repl_model_under_it(tmp_path):
    plain_lora = get_peft_model(tiny_vit(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    with pytest.raises(TypeError, match="got a PeftModel of ViTForImageClassification: build the PEFT model on a"):
        ReplacementTrainer(plain_lora, training_args(tmp_path))
    with pytest.raises(ValueError, match="replacement_start_step is not supported with a PEFT model"):
        ReplacementTrainer(lora_on_repl_vit(), training_args(tmp_path), replacement_start_step=2)


# ---- logging -------------------------------------------------------------------------------------------


def test_coefficients_reach_callbacks_before_it_every_step(tmp_path):
    recorder = Recorder()
    trainer = ReplacementTrainer(
        repl_vit(), training_args(tmp_path, logging_steps=2), train_dataset=dataset(), callbacks=[recorder]
    )
    names = [type(callback).__name__ for callback in trainer.callback_handler.callbacks]
    assert names.index("Recorder") < names.index("ReplacementCallback")  # like the reporters

    trainer.train()
    a, b = recorder.values(A), recorder.values(B)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    final = trainer.model.replacement_coefficients.get_parameter("1").detach()
    assert (a[4], b[4]) == (final[0, 0].item(), final[1, 0].item())
    assert a[1] != 0.5  # logged after the optimizer step
    counts = [logs for _, logs in recorder.logs if "replacement/total_params" in logs]
    trainable, total = trainer.model.get_nb_trainable_parameters()
    assert counts == [
        {
            "replacement/trainable_params": trainable,
            "replacement/total_params": total,
            "replacement/num_replaced_blocks": 1,
            "epoch": 0,
        }
    ]
    # The Trainer's own loss logs keep their schedule, and carry the coefficients of their step.
    assert sorted(recorder.values("loss")) == [2, 4]
    assert [entry["step"] for entry in trainer.state.log_history if A in entry] == [1, 2, 3, 4]
    assert [entry["step"] for entry in trainer.state.log_history if A in entry and "loss" in entry] == [2, 4]


def test_coefficient_logging_steps_and_epoch_logs_log_once_per_step(tmp_path):
    # logging per epoch (6 steps): the Trainer's epoch log comes after the step's own coefficient log.
    recorder = Recorder()
    trainer = ReplacementTrainer(
        repl_vit(),
        training_args(tmp_path, max_steps=6, logging_strategy="epoch"),
        train_dataset=dataset(),
        callbacks=[recorder],
        coefficient_logging_steps=3,
    )
    trainer.train()
    assert [step for step, logs in recorder.logs if A in logs] == [3, 6]
    assert sorted(recorder.values("loss")) == [6]

    off = ReplacementTrainer(
        repl_vit(), training_args(tmp_path / "off"), train_dataset=dataset(), coefficient_logging_steps=0
    )
    off.train()
    assert not [entry for entry in off.state.log_history if A in entry]


def test_coefficients_reach_tensorboard(tmp_path, monkeypatch):
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)  # events go to <output_dir>/runs
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    args = training_args(tmp_path, report_to=["tensorboard"])
    trainer = ReplacementTrainer(repl_vit(), args, train_dataset=dataset())
    trainer.train()
    [run] = [root for root, _, files in os.walk(tmp_path / "runs") if any(f.startswith("events.") for f in files)]
    events = event_accumulator.EventAccumulator(run)
    events.Reload()
    assert [event.step for event in events.Scalars(f"train/{A}")] == [1, 2, 3, 4]
    assert [event.step for event in events.Scalars(f"train/{B}")] == [1, 2, 3, 4]
    assert events.Scalars("train/replacement/total_params")[0].value == trainer.model.get_nb_trainable_parameters()[1]


def test_coefficient_logs_use_the_mean_for_finer_granularity():
    model = get_replacement_model(tiny_vit(), ReplacementConfig(replace_interval=2, coefficient_granularity="tensor"))
    with torch.no_grad():
        coefficients = model.replacement_coefficients.get_parameter("1")
        coefficients.copy_(torch.arange(coefficients.numel(), dtype=torch.float32).view_as(coefficients))
    logs = coefficient_logs(model)
    assert logs == pytest.approx({A: coefficients[0].mean().item(), B: coefficients[1].mean().item()})


# ---- replacement_start_step ----------------------------------------------------------------------------


class OptimizerSpy(TrainerCallback):
    """Registered after the trainer's ReplacementCallback: sees the optimizer once each step has begun."""

    def __init__(self) -> None:
        self.params: dict[int, list[list[int]]] = {}

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        self.params[state.global_step] = [[id(p) for p in group["params"]] for group in optimizer.param_groups]

    def all(self, step: int) -> set[int]:
        return {p for group in self.params[step] for p in group}


def test_start_step_trains_the_full_model_then_replaces(tmp_path):
    model = repl_vit(defer=True)
    block = model.base_model.vit.layers[1]
    freed = [weakref.ref(p) for p in block.parameters()]
    freed_ids = {id(p) for p in block.parameters()}
    initial = {name: p.detach().clone() for name, p in block.named_parameters()}
    recorder, spy = Recorder(), OptimizerSpy()
    trainer = ReplacementTrainer(
        model,
        training_args(tmp_path, max_steps=5, save_steps=1),
        train_dataset=dataset(),
        callbacks=[recorder],
        replacement_start_step=2,
    )
    trainer.add_callback(spy)
    trainer.train()

    # Steps 1-2 trained block 1 itself; from step 3 on it is synthesized and its weights are gone.
    assert spy.all(0) >= freed_ids and spy.all(1) >= freed_ids
    coefficients = model.replacement_coefficients.get_parameter("1")
    for step in (2, 3, 4):
        assert id(coefficients) in spy.all(step) and not spy.all(step) & freed_ids
    # The groups are the ones Trainer.create_optimizer builds for the replaced model: a resume rebuilds them.
    expected = [[id(p) for p in group] for group in trainer._parameter_groups(model)]
    assert spy.params[4] == expected and id(coefficients) in expected[0]  # weight decay, like other weights
    del block
    gc.collect()
    assert all(ref() is None for ref in freed)  # truly released, optimizer state included
    assert set(trainer.optimizer.state_dict()["state"]) == set(range(len(list(model.parameters()))))

    warmup = ReplacementModel.from_pretrained(tmp_path / "checkpoint-2")
    assert warmup.replaced_blocks == {}  # saved before the replacement: loads deferred
    trained = dict(warmup.base_model.vit.layers[1].named_parameters())
    assert not any(torch.equal(trained[name], value) for name, value in initial.items() if name.endswith("weight"))
    assert ReplacementModel.from_pretrained(tmp_path / "checkpoint-3").replaced_blocks == {1: "vit.layers.1"}

    assert sorted(recorder.values(A)) == [3, 4, 5]  # coefficients exist from the replacement on
    _, total = model.get_nb_trainable_parameters()
    assert recorder.values("replacement/total_params") == {2: total}
    assert total < sum(p.numel() for p in tiny_vit().parameters())
    losses = recorder.values("loss")
    assert sorted(losses) == [1, 2, 3, 4, 5] and all(math.isfinite(loss) for loss in losses.values())


@pytest.mark.slow
@pytest.mark.parametrize("checkpoint", [2, 3], ids=["from-warmup-checkpoint", "from-replaced-checkpoint"])
def test_start_step_resume_continues_exactly(tmp_path, checkpoint):
    def run(output_dir, resume=None):
        trainer = ReplacementTrainer(
            repl_vit(defer=True),
            training_args(output_dir, max_steps=5, save_steps=1),
            train_dataset=dataset(),
            replacement_start_step=2,
        )
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    straight = run(tmp_path / "straight")
    resumed = run(tmp_path / "resumed", resume=str(tmp_path / "straight" / f"checkpoint-{checkpoint}"))
    assert resumed.model.replaced_blocks == {1: "vit.layers.1"}
    assert_same_state(resumed.model.state_dict(), straight.model.state_dict())


def test_start_step_best_model_from_the_warmup(tmp_path):
    # The best checkpoint (step 2) was saved before the replacement.
    trainer = best_model_trainer(tmp_path, repl_vit(defer=True), 4, [1.0, 0.0], replacement_start_step=2)
    trainer.train()
    assert trainer.model.replaced_blocks == {}  # block 1 holds its own (warm-up) weights again
    assert_same_state(trainer.model.state_dict(), load_file(tmp_path / "checkpoint-2" / "model.safetensors"))


def test_start_step_needs_the_trainers_parameter_groups(tmp_path):
    # An optimizer whose "params" override the Trainer's groups: the switch could only guess where the
    # coefficients go, so training refuses to start.
    trainer = ReplacementTrainer(
        repl_vit(defer=True),
        training_args(tmp_path),
        train_dataset=dataset(),
        replacement_start_step=2,
        optimizer_cls_and_kwargs=(torch.optim.SGD, {"lr": 0.1, "params": [{"params": []}]}),
    )
    with pytest.raises(ValueError, match="needs the Trainer's two parameter groups"):
        trainer.train()


# ---- the options as a ReplacementCallback -----------------------------------------------------------


def test_options_given_as_a_replacement_callback(tmp_path):
    callback = ReplacementCallback(merge_at_end=True, coefficient_logging_steps=2)
    trainer = ReplacementTrainer(repl_vit(), training_args(tmp_path), train_dataset=dataset(), callbacks=[callback])
    assert trainer.replacement_callback is callback
    assert [type(c).__name__ for c in trainer.callback_handler.callbacks].count("ReplacementCallback") == 1
    trainer.train()
    assert trainer.merged_dir == str(tmp_path / MERGED_DIR_NAME)
    assert [entry["step"] for entry in trainer.state.log_history if A in entry] == [2, 4]

    with pytest.raises(ValueError, match="belongs to another ReplacementTrainer"):
        ReplacementTrainer(repl_vit(), training_args(tmp_path), callbacks=[callback])
    with pytest.raises(ValueError, match="Give ReplacementTrainer its RepL options once"):
        ReplacementTrainer(repl_vit(), training_args(tmp_path), callbacks=[ReplacementCallback()], merge_at_end=True)


# ---- misuse fails at construction, with the fix --------------------------------------------------------


def test_replacement_callback_in_a_plain_trainer_fails_at_construction(tmp_path):
    with pytest.raises(TypeError, match=r"only works inside the ReplacementTrainer.*ReplacementTrainer\(model="):
        Trainer(repl_vit(), training_args(tmp_path), train_dataset=dataset(), callbacks=[ReplacementCallback()])
    with pytest.raises(TypeError, match="only works inside the ReplacementTrainer"):
        Trainer(repl_vit(), training_args(tmp_path), callbacks=[ReplacementCallback])
    # Added after construction, where no init event comes: it fails as training begins, before any step.
    trainer = Trainer(repl_vit(), training_args(tmp_path), train_dataset=dataset())
    trainer.add_callback(ReplacementCallback())
    with pytest.raises(TypeError, match="only works inside the ReplacementTrainer"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_the_former_callback_form_says_how_to_migrate(tmp_path):
    trainer = Trainer(repl_vit(), training_args(tmp_path), train_dataset=dataset())
    with pytest.raises(
        TypeError,
        match=r"ReplacementCallback\(trainer, \.\.\.\) is no longer supported.*"
        r"ReplacementTrainer\(model=.*replacement_start_step=",
    ):
        ReplacementCallback(trainer, start_step=2)


def test_misuse_is_rejected_at_construction_with_the_fix(tmp_path):
    def build(model, **options):
        return ReplacementTrainer(model, training_args(tmp_path), train_dataset=dataset(), **options)

    with pytest.raises(
        TypeError,
        match="ReplacementTrainer needs a ReplacementModel, got ViTForImageClassification.*get_replacement_model",
    ):
        build(tiny_vit())
    with pytest.raises(TypeError, match="needs a ReplacementModel, got ViTForImageClassification"):
        ReplacementTrainer(args=training_args(tmp_path), model_init=lambda: tiny_vit())
    with pytest.raises(
        ValueError,
        match=r"replacement_start_step=2 needs a model whose replacement is deferred.*"
        r"defer_replacement=True",
    ):
        build(repl_vit(), replacement_start_step=2)
    with pytest.raises(
        ValueError,
        match=r"replacement is deferred .* but no replacement_start_step.*"
        r"replacement_start_step=N",
    ):
        build(repl_vit(defer=True))
    model = repl_vit(defer=True)
    with pytest.raises(ValueError, match=r"pass optimizer_cls_and_kwargs=\(cls, kwargs\) instead of optimizers="):
        build(model, replacement_start_step=2, optimizers=(torch.optim.SGD(model.parameters(), lr=0.1), None))
    with pytest.raises(ValueError, match=r"replacement_start_step needs model=\.\.\., not model_init"):
        ReplacementTrainer(
            args=training_args(tmp_path), model_init=lambda: repl_vit(defer=True), replacement_start_step=2
        )
    with pytest.raises(ValueError, match="replacement_start_step=-1 is invalid"):
        build(repl_vit(defer=True), replacement_start_step=-1)
    with pytest.raises(ValueError, match="coefficient_logging_steps=1.5 is invalid"):
        build(repl_vit(), coefficient_logging_steps=1.5)


def test_start_step_is_rejected_under_several_processes(tmp_path, monkeypatch):
    monkeypatch.setattr(TrainingArguments, "world_size", property(lambda self: 2))
    with pytest.raises(NotImplementedError, match="single-process training only"):
        ReplacementTrainer(repl_vit(defer=True), training_args(tmp_path), replacement_start_step=2)


def test_prepared_datasets_train_with_the_default_remove_unused_columns(tmp_path):
    """prepare_dataset's lazy transform reads `image`, which the model's forward does not take."""
    from hf_replacement.commands.data import collate_fn, load_image_dataset, prepare_dataset, subsample

    data = prepare_dataset(subsample(load_image_dataset("digits"), 16, 8, seed=0), image_size=8, num_channels=1)
    args = training_args(tmp_path, max_steps=2, remove_unused_columns=True, eval_strategy="no")
    trainer = ReplacementTrainer(repl_vit(), args, train_dataset=data["train"], data_collator=collate_fn)
    assert trainer.args.remove_unused_columns is False  # as Transformers' image-classification example sets it
    trainer.train()
    assert trainer.state.global_step == 2 and "eval_loss" in trainer.evaluate(data["test"])


def test_ddp_does_not_look_for_unused_parameters_by_default(tmp_path):
    trainer = ReplacementTrainer(repl_vit(), training_args(tmp_path), train_dataset=dataset())
    assert trainer.args.ddp_find_unused_parameters is False
    (handler,) = trainer._build_accelerator_args()["kwargs_handlers"]
    assert handler.find_unused_parameters is False
    chosen = ReplacementTrainer(
        repl_vit(), training_args(tmp_path, ddp_find_unused_parameters=True), train_dataset=dataset()
    )
    assert chosen.args.ddp_find_unused_parameters is True  # the user's choice stands


# ---- parameter sharding: FSDP2 and DeepSpeed ---------------------------------------------------------


def test_deepspeed_zero3_is_refused_at_construction_pointing_to_fsdp(tmp_path):
    from accelerate.utils import DeepSpeedPlugin

    args = training_args(tmp_path)
    # What TrainingArguments(deepspeed=...) holds with ZeRO-3 (building it needs the deepspeed package).
    args.deepspeed_plugin = DeepSpeedPlugin(hf_ds_config={"zero_optimization": {"stage": 3}})
    with pytest.raises(ValueError, match="DeepSpeed ZeRO-3 .* Shard with FSDP2 instead"):
        ReplacementTrainer(repl_vit(), args, train_dataset=dataset())


def test_fsdp_plugin_settings_shard_the_model_in_repl_units(process_group):
    """What ReplacementTrainer does under TrainingArguments(fsdp=...) before Accelerate sees the model.

    The Trainer's FSDP path itself needs CUDA (Accelerate falls back to DDP on the CPU): tests/test_cuda.py.
    """
    from types import SimpleNamespace

    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from hf_replacement.integrations.trainer import _shard_with_plugin

    def accelerator(**plugin_options) -> SimpleNamespace:
        return SimpleNamespace(state=SimpleNamespace(fsdp_plugin=FullyShardedDataParallelPlugin(**plugin_options)))

    with pytest.raises(ValueError, match=r"fsdp_config=\{'version': 2\}"):
        _shard_with_plugin(repl_vit(), accelerator(fsdp_version=1))
    with pytest.raises(ValueError, match="gradient_checkpointing=True"):
        _shard_with_plugin(repl_vit(), accelerator(fsdp_version=2, activation_checkpointing=True))

    bf16 = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    model = _shard_with_plugin(repl_vit(), accelerator(fsdp_version=2, mixed_precision_policy=bf16))
    layers = model.base_model.vit.layers
    states = [layer._get_fsdp_state() for layer in layers]
    assert states[0] is states[1] is states[2] and states[3] is not states[0]  # block 1 with its neighbours
    assert logits(model, torch.randn(2, 1, 8, 8)).dtype == torch.bfloat16  # the plugin's mixed precision
