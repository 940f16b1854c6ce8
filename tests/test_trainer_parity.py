"""ReplacementTrainer gives what the plain Trainer gives on the merged model with the same weights.

The Trainer decides some things by the model's class (label names, `return_loss`, label shifting under
label smoothing for causal LMs, refusing head-less models) and others by its attributes (loss kwargs,
`num_items_in_batch`, the loss type, the generation config). Each test runs both trainers on one task:
the RepL model and its merged copy. The merged weights are the very tensors the replaced blocks
synthesize (same kernels on the same values), so the losses and predictions are compared exactly.
"""

from __future__ import annotations

import copy

import datasets
import pytest
import torch
import transformers
from peft import LoraConfig, get_peft_model
from transformers import (
    GenerationConfig,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
    Trainer,
    TrainingArguments,
)
from transformers.utils import logging as hf_logging

from hf_replacement import (
    ReplacementConfig,
    ReplacementSeq2SeqTrainer,
    ReplacementTrainer,
    get_replacement_model,
    prepare_peft_config,
)

VOCAB = 40
LENGTH = 10
ROWS = 8
NO_DROPOUT = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


@pytest.fixture(autouse=True)
def _quiet_transformers():
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    yield
    hf_logging.set_verbosity(verbosity)


def tiny_model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    configs = {
        "gpt2": lambda: transformers.GPT2LMHeadModel(
            transformers.GPT2Config(n_layer=4, n_embd=16, n_head=2, vocab_size=VOCAB, n_positions=16, **NO_DROPOUT)
        ),
        "llama": lambda: transformers.LlamaForCausalLM(
            transformers.LlamaConfig(
                num_hidden_layers=4,
                hidden_size=16,
                intermediate_size=32,
                num_attention_heads=2,
                num_key_value_heads=1,
                vocab_size=VOCAB,
                max_position_embeddings=16,
            )
        ),
        "t5": lambda: transformers.T5ForConditionalGeneration(
            transformers.T5Config(
                num_layers=4,
                num_decoder_layers=4,
                d_model=16,
                d_kv=8,
                d_ff=32,
                num_heads=2,
                vocab_size=VOCAB,
                dropout_rate=0.0,
                decoder_start_token_id=0,
                pad_token_id=0,
                eos_token_id=1,
            )
        ),
        "bert-qa": lambda: transformers.BertForQuestionAnswering(
            transformers.BertConfig(
                num_hidden_layers=4,
                hidden_size=16,
                intermediate_size=32,
                num_attention_heads=2,
                vocab_size=VOCAB,
                max_position_embeddings=16,
                hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0,
            )
        ),
        "vit": lambda: transformers.ViTForImageClassification(
            transformers.ViTConfig(
                hidden_size=16,
                num_hidden_layers=4,
                num_attention_heads=2,
                intermediate_size=32,
                image_size=8,
                patch_size=4,
                num_channels=1,
                num_labels=5,
                hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0,
            )
        ),
    }
    return configs[name]()


def task_dataset(name: str) -> datasets.Dataset:
    """Rows for the task; token labels are padded with -100 by different amounts per row, so the
    number of items in a batch (`num_items_in_batch`) differs from rows times length."""
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(2, VOCAB, (ROWS, LENGTH), generator=generator)
    if name == "vit":
        columns = {"pixel_values": torch.randn(ROWS, 1, 8, 8, generator=generator), "labels": tokens[:, 0] % 5}
    elif name == "bert-qa":
        start = torch.randint(0, LENGTH // 2, (ROWS,), generator=generator)
        columns = {"input_ids": tokens, "start_positions": start, "end_positions": start + 2}
    else:
        labels = torch.randint(2, VOCAB, (ROWS, LENGTH), generator=generator) if name == "t5" else tokens.clone()
        for row in range(ROWS):
            labels[row, LENGTH - row % 4 :] = -100
        columns = {"input_ids": tokens, "labels": labels}
        if name == "t5":  # as DataCollatorForSeq2Seq gives them: label smoothing takes the labels out of the inputs
            columns["decoder_input_ids"] = torch.cat([torch.zeros(ROWS, 1, dtype=torch.long), labels[:, :-1]], 1)
            columns["decoder_input_ids"][columns["decoder_input_ids"] == -100] = 0
    return datasets.Dataset.from_dict({k: v.tolist() for k, v in columns.items()}).with_format("torch")


def model_pair(name: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A RepL model and the plain model merged from a copy of it (the same weights)."""
    repl = get_replacement_model(tiny_model(name), ReplacementConfig(replace_interval=2))
    assert repl.replaced_blocks
    return repl, copy.deepcopy(repl).merge_and_unload()


def arguments(output_dir, arguments_class=TrainingArguments, **overrides) -> TrainingArguments:
    values = dict(
        use_cpu=True,
        report_to=[],
        per_device_train_batch_size=2,
        per_device_eval_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=1e-2,
        max_steps=1,
        logging_steps=1,
        seed=0,
        disable_tqdm=True,
        save_strategy="no",
    )
    return arguments_class(str(output_dir), **(values | overrides))


def trainer_pair(tmp_path, name: str, plain_class=Trainer, repl_class=ReplacementTrainer, **options):
    repl, merged = model_pair(name)
    data = task_dataset(name)
    built = []
    for trainer_class, model, directory in ((repl_class, repl, "repl"), (plain_class, merged, "plain")):
        args = arguments(tmp_path / directory, **options)
        built.append(trainer_class(model=model, args=args, train_dataset=data, eval_dataset=data))
    return built


TASKS = ["gpt2", "llama", "t5", "bert-qa", "vit"]


@pytest.mark.parametrize("name", TASKS)
def test_the_trainer_reads_the_wrapped_models_class_and_attributes(tmp_path, name):
    repl_trainer, plain_trainer = trainer_pair(tmp_path, name)
    for attribute in ("label_names", "can_return_loss", "model_accepts_loss_kwargs", "_loss_shifts_labels"):
        assert getattr(repl_trainer, attribute) == getattr(plain_trainer, attribute), attribute
    if name == "bert-qa":
        assert repl_trainer.label_names == ["start_positions", "end_positions"]


@pytest.mark.parametrize("label_smoothing_factor", [0.0, 0.1])
@pytest.mark.parametrize("name", TASKS)
def test_losses_equal_the_plain_trainers_on_the_merged_model(tmp_path, name, label_smoothing_factor):
    """Evaluation (loss, predictions, label ids) and the first optimizer step's loss, accumulated over two
    micro-batches normalised by `num_items_in_batch` where the model takes loss kwargs."""
    trainers = trainer_pair(tmp_path, name, label_smoothing_factor=label_smoothing_factor)
    predictions = [trainer.predict(trainer.eval_dataset) for trainer in trainers]
    assert predictions[0].metrics["test_loss"] == predictions[1].metrics["test_loss"]
    for repl_values, plain_values in zip(
        (predictions[0].predictions, predictions[0].label_ids), (predictions[1].predictions, predictions[1].label_ids)
    ):
        for repl_array, plain_array in zip(_as_tuple(repl_values), _as_tuple(plain_values), strict=True):
            assert (repl_array == plain_array).all()
    losses = [trainer.train().training_loss for trainer in trainers]
    assert losses[0] == losses[1]


def test_causal_lm_label_smoothing_shifts_the_labels(tmp_path):
    """The issue's case: label smoothing on a RepL GPT-2 gave the unshifted loss. The expected value is
    computed here by hand: smoothed cross-entropy of logits[:, :-1] against labels[:, 1:]."""
    trainer, _ = trainer_pair(tmp_path, "gpt2", label_smoothing_factor=0.1)
    batch = task_dataset("gpt2")[:4]
    trainer.model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, dict(batch))
        logits = trainer.model(input_ids=batch["input_ids"]).logits
    expected = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, VOCAB), batch["labels"][:, 1:].reshape(-1), ignore_index=-100, label_smoothing=0.1
    )
    # LabelSmoother mixes the NLL and the uniform term by their means over the kept tokens, as cross_entropy
    # does: equal up to the float32 rounding of two sums over at most 4 * 9 tokens of log-probabilities < 10.
    torch.testing.assert_close(loss, expected, rtol=0, atol=36 * 10 * torch.finfo(torch.float32).eps)


def test_causal_lm_label_smoothing_with_a_peft_model_on_top(tmp_path):
    """LoRA on a RepL GPT-2 against LoRA on the merged GPT-2: the Trainer names a PEFT model by its base
    model's class, here ReplacementModel. LoRA starts as an exact zero update, so the losses are equal."""
    repl, merged = model_pair("gpt2")
    lora = LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"])
    models = {"repl": get_peft_model(repl, prepare_peft_config(repl, lora)), "plain": get_peft_model(merged, lora)}
    losses = [
        trainer_class(
            model=models[name],
            args=arguments(tmp_path / name, label_smoothing_factor=0.1),
            eval_dataset=task_dataset("gpt2"),
        ).evaluate()["eval_loss"]
        for trainer_class, name in ((ReplacementTrainer, "repl"), (Trainer, "plain"))
    ]
    assert losses[0] == losses[1]


def test_seq2seq_generation_in_evaluation(tmp_path):
    """predict_with_generate: the generated tokens, the loss and args.generation_config as Seq2SeqTrainer's."""
    generation = GenerationConfig(max_new_tokens=5, num_beams=2, decoder_start_token_id=0, eos_token_id=1)
    trainers = trainer_pair(
        tmp_path,
        "t5",
        plain_class=Seq2SeqTrainer,
        repl_class=ReplacementSeq2SeqTrainer,
        arguments_class=Seq2SeqTrainingArguments,
        predict_with_generate=True,
        generation_config=generation,
        label_smoothing_factor=0.1,
    )
    results = [trainer.predict(trainer.eval_dataset) for trainer in trainers]
    generated = [torch.as_tensor(result.predictions) for result in results]
    # max_new_tokens=5 from args.generation_config: the start token plus at most 5, then the padding (0)
    # the Trainer adds up to max_length; the model's own config (max_length 20) would generate more.
    assert generated[0].shape == (ROWS, 20) and (generated[0][:, 6:] == 0).all() and (generated[0][:, 1:6] != 0).any()
    assert torch.equal(generated[0], generated[1])
    assert results[0].metrics["test_loss"] == results[1].metrics["test_loss"]
    assert trainers[0].model.base_model.generation_config.num_beams == 2


def test_generation_in_evaluation_needs_the_seq2seq_trainer(tmp_path):
    repl, _ = model_pair("t5")
    args = arguments(tmp_path, arguments_class=Seq2SeqTrainingArguments, predict_with_generate=True)
    with pytest.raises(ValueError, match="use ReplacementSeq2SeqTrainer"):
        ReplacementTrainer(model=repl, args=args)


def _as_tuple(values):
    return values if isinstance(values, tuple) else (values,)
