"""A ReplacementModel in the Transformers Trainer, and ReplacementCallback.

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
from safetensors.torch import load_file
from transformers import Trainer, TrainerCallback, TrainingArguments, ViTConfig, ViTForImageClassification
from transformers.utils import logging as hf_logging

from hf_replacement import CONFIG_NAME, ReplacementConfig, ReplacementModel, get_replacement_model
from hf_replacement.callback import MERGED_DIR_NAME, ReplacementCallback, coefficient_logs

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
            hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, image_size=8,
            patch_size=4, num_channels=1, num_labels=10, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0, **config,
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
        use_cpu=True, report_to=[], per_device_train_batch_size=4, per_device_eval_batch_size=8,
        learning_rate=1e-2, max_steps=4, save_steps=2, logging_steps=1, seed=0, data_seed=0,
        dataloader_num_workers=0, disable_tqdm=True,
    )
    values.update(overrides)
    return TrainingArguments(str(output_dir), **values)


class Recorder(TrainerCallback):
    """Registered before ReplacementCallback, like the reporters: sees what reaches them."""

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


# ---- a ReplacementModel in a plain Trainer ---------------------------------------------------------


def test_plain_trainer_keeps_columns_finds_labels_and_evaluates(tmp_path):
    train = dataset(extra_column=True)
    trainer = Trainer(
        repl_vit(), training_args(tmp_path), train_dataset=train, eval_dataset=dataset(16),
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
    trainer = Trainer(repl_vit(), training_args(tmp_path / "run"), train_dataset=dataset())
    ReplacementCallback(trainer)
    trainer.train()
    model = trainer.model
    images = dataset(8)[:]["pixel_values"]

    coefficients = {}
    for step in (2, 4):
        checkpoint = tmp_path / "run" / f"checkpoint-{step}"
        assert {CONFIG_NAME, "config.json", "model.safetensors", "optimizer.pt"} <= set(os.listdir(checkpoint))
        # The Trainer's own weights file holds exactly ReplacementModel.state_dict()'s keys.
        assert set(load_file(checkpoint / "model.safetensors")) == set(model.state_dict())
        loaded = ReplacementModel.from_pretrained(checkpoint)
        assert loaded.replaced_blocks == {1: "vit.layers.1"}
        coefficients[step] = loaded.replacement_coefficients.get_parameter("1").detach()
    assert not torch.equal(coefficients[2], coefficients[4])  # each checkpoint holds its own step
    assert_same_state(ReplacementModel.from_pretrained(tmp_path / "run" / "checkpoint-4").state_dict(), model.state_dict())

    trainer.save_model(str(tmp_path / "final"))
    final = ReplacementModel.from_pretrained(tmp_path / "final")
    assert_same_state(final.state_dict(), model.state_dict())
    torch.testing.assert_close(logits(final, images), logits(model, images), rtol=0, atol=0)
    assert json.loads((tmp_path / "final" / CONFIG_NAME).read_text())["replace_interval"] == 2


def test_resume_continues_exactly(tmp_path):
    """8 steps straight == 4 steps, resume from checkpoint-4, 4 more (crossing an epoch boundary).

    Exact because the Trainer saves and reloads a ReplacementModel as its raw state dict. (A plain
    Transformers 5.23 model does not resume exactly: save_pretrained writes the legacy key names,
    e.g. `vit.encoder.layer.0...`, and `_load_from_checkpoint`'s `load_state_dict(strict=False)`
    loads none of the block weights, with only a warning: huggingface/transformers#43701.)
    """
    args = dict(max_steps=8, save_steps=4)
    straight = Trainer(repl_vit(), training_args(tmp_path / "straight", **args), train_dataset=dataset())
    ReplacementCallback(straight)
    straight.train()

    resumed = Trainer(repl_vit(), training_args(tmp_path / "resumed", **args), train_dataset=dataset())
    ReplacementCallback(resumed)
    resumed.train(resume_from_checkpoint=str(tmp_path / "straight" / "checkpoint-4"))

    assert_same_state(resumed.model.state_dict(), straight.model.state_dict())  # weights and coefficients
    first, second = straight.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k][name], second[k][name]) for k in first for name in first[k])
    losses = [[entry["loss"] for entry in t.state.log_history if "loss" in entry and entry["step"] > 4] for t in (straight, resumed)]
    assert losses[0] == losses[1] and len(losses[0]) == 4


def test_load_best_model_at_end(tmp_path):
    scores = iter([1.0, 0.0, 0.0])  # the evaluation at step 2 is the best one
    trainer = Trainer(
        repl_vit(),
        training_args(
            tmp_path, max_steps=6, eval_strategy="steps", eval_steps=2, load_best_model_at_end=True,
            metric_for_best_model="score", greater_is_better=True,
        ),
        train_dataset=dataset(), eval_dataset=dataset(8), compute_metrics=lambda _: {"score": next(scores)},
    )
    ReplacementCallback(trainer)
    trainer.train()
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-2")
    assert_same_state(trainer.model.state_dict(), load_file(tmp_path / "checkpoint-2" / "model.safetensors"))
    assert not torch.equal(
        trainer.model.replacement_coefficients.get_parameter("1"),
        load_file(tmp_path / "checkpoint-6" / "model.safetensors")["replacement_coefficients.1"],
    )


def test_merge_at_end_leaves_a_plain_transformers_model(tmp_path):
    trainer = Trainer(repl_vit(), training_args(tmp_path), train_dataset=dataset())
    callback = ReplacementCallback(trainer, merge_at_end=True)
    trainer.train()
    assert callback.merged_dir == str(tmp_path / MERGED_DIR_NAME)
    merged = ViTForImageClassification.from_pretrained(callback.merged_dir)  # transformers alone
    assert sum(p.numel() for p in merged.parameters()) == sum(p.numel() for p in tiny_vit().parameters())
    images = dataset(8)[:]["pixel_values"]
    torch.testing.assert_close(logits(merged, images), logits(trainer.model, images), rtol=1e-5, atol=1e-5)
    assert trainer.model.replaced_blocks == {1: "vit.layers.1"}  # a copy was merged


# ---- logging -------------------------------------------------------------------------------------------


def test_coefficients_reach_callbacks_before_it_every_step(tmp_path):
    recorder = Recorder()
    trainer = Trainer(
        repl_vit(), training_args(tmp_path, logging_steps=2), train_dataset=dataset(), callbacks=[recorder]
    )
    ReplacementCallback(trainer)
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
    assert counts == [{"replacement/trainable_params": trainable, "replacement/total_params": total,
                       "replacement/num_replaced_blocks": 1, "epoch": 0}]
    # The Trainer's own loss logs still happen on its schedule (trainer.log clears should_log).
    assert sorted(recorder.values("loss")) == [2, 4]
    assert [entry["step"] for entry in trainer.state.log_history if A in entry] == [1, 2, 3, 4]


def test_coefficients_reach_tensorboard(tmp_path, monkeypatch):
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)  # events go to <output_dir>/runs
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    trainer = Trainer(
        repl_vit(), training_args(tmp_path, report_to=["tensorboard"]), train_dataset=dataset(),
    )
    ReplacementCallback(trainer)
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


# ---- start_step ------------------------------------------------------------------------------------


class OptimizerSpy(TrainerCallback):
    """Registered after ReplacementCallback: sees the optimizer once each step has begun."""

    def __init__(self) -> None:
        self.params: dict[int, set[int]] = {}

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        self.params[state.global_step] = {id(p) for group in optimizer.param_groups for p in group["params"]}


def test_start_step_trains_the_full_model_then_replaces(tmp_path):
    model = repl_vit(defer=True)
    block = model.base_model.vit.layers[1]
    freed = [weakref.ref(p) for p in block.parameters()]
    freed_ids = {id(p) for p in block.parameters()}
    initial = {name: p.detach().clone() for name, p in block.named_parameters()}
    recorder, spy = Recorder(), OptimizerSpy()
    trainer = Trainer(model, training_args(tmp_path, max_steps=5, save_steps=1), train_dataset=dataset(), callbacks=[recorder])
    ReplacementCallback(trainer, start_step=2)
    trainer.add_callback(spy)
    trainer.train()

    # Steps 1-2 trained block 1 itself; from step 3 on it is synthesized and its weights are gone.
    assert spy.params[0] >= freed_ids and spy.params[1] >= freed_ids
    coefficients = model.replacement_coefficients.get_parameter("1")
    for step in (2, 3, 4):
        assert id(coefficients) in spy.params[step] and not spy.params[step] & freed_ids
    assert spy.params[4] == {id(p) for p in model.parameters()}
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
    trainable, total = model.get_nb_trainable_parameters()
    assert recorder.values("replacement/total_params") == {2: total}
    assert total < sum(p.numel() for p in tiny_vit().parameters())
    losses = recorder.values("loss")
    assert sorted(losses) == [1, 2, 3, 4, 5] and all(math.isfinite(loss) for loss in losses.values())


@pytest.mark.parametrize("checkpoint", [2, 3], ids=["from-warmup-checkpoint", "from-replaced-checkpoint"])
def test_start_step_resume_continues_exactly(tmp_path, checkpoint):
    def run(output_dir, resume=None):
        trainer = Trainer(repl_vit(defer=True), training_args(output_dir, max_steps=5, save_steps=1), train_dataset=dataset())
        ReplacementCallback(trainer, start_step=2)
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    straight = run(tmp_path / "straight")
    resumed = run(tmp_path / "resumed", resume=str(tmp_path / "straight" / f"checkpoint-{checkpoint}"))
    assert resumed.model.replaced_blocks == {1: "vit.layers.1"}
    assert_same_state(resumed.model.state_dict(), straight.model.state_dict())


def test_start_step_best_model_from_the_warmup(tmp_path):
    scores = iter([1.0, 0.0])  # the best checkpoint (step 2) was saved before the replacement
    trainer = Trainer(
        repl_vit(defer=True),
        training_args(
            tmp_path, max_steps=4, eval_strategy="steps", eval_steps=2, load_best_model_at_end=True,
            metric_for_best_model="score", greater_is_better=True,
        ),
        train_dataset=dataset(), eval_dataset=dataset(8), compute_metrics=lambda _: {"score": next(scores)},
    )
    ReplacementCallback(trainer, start_step=2)
    trainer.train()
    assert trainer.model.replaced_blocks == {}  # block 1 holds its own (warm-up) weights again
    assert_same_state(trainer.model.state_dict(), load_file(tmp_path / "checkpoint-2" / "model.safetensors"))


# ---- misuse --------------------------------------------------------------------------------------------


def test_callback_not_attached_fails_at_train_begin(tmp_path):
    trainer = Trainer(repl_vit(), training_args(tmp_path), train_dataset=dataset(), callbacks=[ReplacementCallback()])
    with pytest.raises(RuntimeError, match=r"not attached to a Trainer.*ReplacementCallback\(trainer\)"):
        trainer.train()


def test_attach_after_passing_it_in_callbacks(tmp_path):
    callback = ReplacementCallback()
    trainer = Trainer(repl_vit(), training_args(tmp_path, max_steps=2), train_dataset=dataset(), callbacks=[callback])
    assert callback.attach(trainer) is callback and callback.attach(trainer) is callback
    assert [type(c).__name__ for c in trainer.callback_handler.callbacks].count("ReplacementCallback") == 1
    trainer.train()
    assert (tmp_path / "checkpoint-2" / CONFIG_NAME).is_file()


def test_misuse_is_rejected_with_the_fix(tmp_path):
    def trainer(model):
        return Trainer(model, training_args(tmp_path), train_dataset=dataset())

    with pytest.raises(TypeError, match="needs a Trainer whose model is a ReplacementModel, got ViTForImageClassification"):
        ReplacementCallback(trainer(tiny_vit()))
    with pytest.raises(ValueError, match=r"start_step=2 needs a model whose replacement is deferred.*defer_replacement=True"):
        ReplacementCallback(trainer(repl_vit()), start_step=2)
    deferred = trainer(repl_vit(defer=True))
    ReplacementCallback(deferred)
    with pytest.raises(ValueError, match="replacement is deferred .* but no start_step"):
        deferred.train()
    with pytest.raises(ValueError, match="start_step=-1 is invalid"):
        ReplacementCallback(start_step=-1)
    with pytest.raises(ValueError, match="coefficient_logging_steps=1.5 is invalid"):
        ReplacementCallback(coefficient_logging_steps=1.5)
