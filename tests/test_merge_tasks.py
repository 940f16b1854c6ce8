"""`hf-replacement merge` and `evaluate` on models of other tasks than image classification.

Per task (a classifier, a causal LM, a segmenter, a detector, each built from a tiny config with its processing
files made offline): `merge` names the Auto class and pipeline task that fit the model, carries over every
processing file, and the merged directory loads with that Auto class and serves that pipeline with the RepL
model's own outputs. `evaluate` refuses the tasks it does not measure before it loads any weight or data.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import tiny_models
import torch
import transformers
from PIL import Image

from hf_replacement import ReplacementConfig, ReplacementModel, get_replacement_model
from hf_replacement.commands.cli import main
from hf_replacement.commands.merge import processing_files

# What `save_pretrained` of a RepL model writes: never a processing file.
REPL_MODEL_FILES = {"model.safetensors", "config.json", "base_config.json", "replacement_config.json"}
# What a training run leaves beside the model (Trainer, the launcher): not part of the merged model.
RUN_FILES = {"results.json": "{}", "trainer_state.json": "{}", "all_results.json": "{}"}
IMAGE_SIZE = 32


def _image(seed: int) -> Image.Image:
    pixels = torch.randint(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), generator=torch.Generator().manual_seed(seed))
    return Image.fromarray(pixels.to(torch.uint8).numpy())


def _vit_classifier() -> tuple[torch.nn.Module, list[Any]]:
    model = tiny_models.build("vit", image_size=IMAGE_SIZE)
    size = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    return model, [transformers.ViTImageProcessorPil(size=size, image_mean=[0.5] * 3, image_std=[0.5] * 3)]


def _gpt2_causal_lm() -> tuple[torch.nn.Module, list[Any]]:
    """GPT-2 with a word-level tokenizer built offline, a chat template and a generation config of its own."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<unk>", "<eos>"] + [f"w{index}" for index in range(30)]
    backend = Tokenizer(models.WordLevel({word: index for index, word in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>"
    )
    tokenizer.chat_template = "{% for message in messages %}{{ message['content'] }} {% endfor %}"
    config = transformers.GPT2Config(
        vocab_size=len(words), n_positions=64, n_embd=16, n_layer=6, n_head=2, bos_token_id=1, eos_token_id=1
    )
    torch.manual_seed(0)
    generation = transformers.GenerationConfig(max_new_tokens=7, do_sample=False, eos_token_id=1, pad_token_id=1)
    return transformers.GPT2LMHeadModel(config), [tokenizer, generation]


def _dpt_segmenter() -> tuple[torch.nn.Module, list[Any]]:
    config = transformers.DPTConfig(
        hidden_size=16, num_hidden_layers=6, num_attention_heads=2, intermediate_size=32, image_size=IMAGE_SIZE,
        patch_size=8, backbone_out_indices=[1, 3, 4, 5], neck_hidden_sizes=[8, 8, 8, 8], fusion_hidden_size=8,
        num_labels=4, use_auxiliary_head=False, initializer_range=0.2,  # logits of order 1, not 1e-9
    )  # fmt: skip
    torch.manual_seed(0)
    processor = transformers.DPTImageProcessorPil(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, keep_aspect_ratio=False, ensure_multiple_of=1
    )
    return transformers.DPTForSemanticSegmentation(config), [processor]


def _yolos_detector() -> tuple[torch.nn.Module, list[Any]]:
    config = transformers.YolosConfig(
        hidden_size=16, num_hidden_layers=6, num_attention_heads=2, intermediate_size=32,
        image_size=[IMAGE_SIZE, IMAGE_SIZE], patch_size=8, num_detection_tokens=5, num_labels=3, initializer_range=0.2,
    )  # fmt: skip
    torch.manual_seed(0)
    processor = transformers.YolosImageProcessorPil(size={"shortest_edge": IMAGE_SIZE, "longest_edge": IMAGE_SIZE})
    model = transformers.YolosForObjectDetection(config)
    with torch.no_grad():  # detection tokens and position embeddings start at zero: every detection would be alike
        for parameter in model.vit.embeddings.parameters():
            parameter.normal_(std=0.2)
    return model, [processor]


@dataclasses.dataclass(frozen=True)
class Task:
    build: Callable[[], tuple[torch.nn.Module, list[Any]]]
    auto_class: str
    pipeline_task: str
    processing_files: frozenset[str]
    pipeline_inputs: Any
    pipeline_kwargs: dict[str, Any]
    model_inputs: Callable[[dict[str, Any]], dict[str, torch.Tensor]]


def _pixels(processor_files: dict[str, Any]) -> dict[str, torch.Tensor]:
    return dict(processor_files["image_processor"]([_image(1), _image(2)], return_tensors="pt"))


def _tokens(processor_files: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {"input_ids": processor_files["tokenizer"](["w1 w2 w3", "w4 w5 w6"], return_tensors="pt")["input_ids"]}


IMAGES = [_image(1), _image(2)]
TASKS = {
    "classifier": Task(
        _vit_classifier, "AutoModelForImageClassification", "image-classification",
        frozenset({"preprocessor_config.json"}), IMAGES, {"top_k": 3}, _pixels,
    ),
    "causal-lm": Task(
        _gpt2_causal_lm, "AutoModelForCausalLM", "text-generation",
        frozenset({"tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"}),
        ["w1 w2 w3", "w7 w8"], {"do_sample": False}, _tokens,
    ),
    "segmenter": Task(
        _dpt_segmenter, "AutoModelForSemanticSegmentation", "image-segmentation",
        frozenset({"preprocessor_config.json"}), IMAGES, {}, _pixels,
    ),
    "detector": Task(
        _yolos_detector, "AutoModelForObjectDetection", "object-detection",
        frozenset({"preprocessor_config.json"}), IMAGES, {"threshold": 0.0}, _pixels,
    ),
}  # fmt: skip


def _save_repl_checkpoint(task: Task, directory) -> torch.nn.Module:
    """A RepL checkpoint with the task's processing files and a training run's leftovers; returns the base model
    as built (before replacement) for the test to tell the merged model from it."""
    model, processing = task.build()
    model.eval()
    unreplaced = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    replacement = get_replacement_model(model, ReplacementConfig(replace_interval=2, coefficient_init=(0.7, 0.4)))
    replacement.save_pretrained(directory)
    for item in processing:
        item.save_pretrained(directory)
    for name, text in RUN_FILES.items():
        (directory / name).write_text(text)
    return unreplaced


def _processors(directory) -> dict[str, Any]:
    """The processing objects of a directory, as the pipeline of its task loads them."""
    found = {}
    if (directory / "tokenizer_config.json").exists():
        found["tokenizer"] = transformers.AutoTokenizer.from_pretrained(directory)
    if (directory / "preprocessor_config.json").exists():
        found["image_processor"] = transformers.AutoImageProcessor.from_pretrained(directory)
    return found


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _served(task: Task, model: Any, processors: dict[str, Any]) -> tuple[Any, list[str]]:
    """The task pipeline's answers for `model` (a directory or a model object), and what the pipeline logged."""
    records = _Records()
    transformers_logger = logging.getLogger("transformers")  # does not propagate to the root logger
    transformers_logger.addHandler(records)
    try:
        serve = transformers.pipeline(task.pipeline_task, model=model, device="cpu", **processors)
        answers = serve(task.pipeline_inputs, **task.pipeline_kwargs)
    finally:
        transformers_logger.removeHandler(records)
    return answers, records.messages


def _comparable(answers: Any) -> Any:
    """Pipeline answers with masks (PIL images) as arrays, so that `==` compares them pixel by pixel."""
    if isinstance(answers, list):
        return [_comparable(answer) for answer in answers]
    if isinstance(answers, dict):
        return {key: _comparable(value) for key, value in answers.items()}
    if isinstance(answers, Image.Image):
        return np.asarray(answers).tolist()
    return answers


@pytest.mark.parametrize("name", list(TASKS))
def test_merge_names_the_task_carries_the_processing_files_and_serves_the_same_outputs(name, tmp_path, capsys):
    task = TASKS[name]
    repl, merged = tmp_path / "repl", tmp_path / "merged"
    unreplaced = _save_repl_checkpoint(task, repl)
    assert set(os.listdir(repl)) == REPL_MODEL_FILES | set(RUN_FILES) | task.processing_files

    assert main(["merge", str(repl), str(merged)]) == 0
    printed = capsys.readouterr().out
    assert f'loads with {task.auto_class}; serves pipeline("{task.pipeline_task}", model="{merged}")' in printed
    assert f"processing files carried over: {', '.join(sorted(task.processing_files))}" in printed
    assert set(os.listdir(merged)) == {"model.safetensors", "config.json"} | task.processing_files
    for file_name in task.processing_files:  # the generation config too: the saved one, not a derived one
        assert (merged / file_name).read_bytes() == (repl / file_name).read_bytes(), file_name

    plain = getattr(transformers, task.auto_class).from_pretrained(merged).eval()
    replacement = ReplacementModel.from_pretrained(repl)
    assert type(plain) is type(replacement.base_model)
    processors = _processors(repl)
    inputs = task.model_inputs(processors)
    with torch.no_grad():
        expected, got = replacement(**inputs), plain(**inputs)
    first_output = next(iter(expected.values()))
    # The merged weights are the RepL model's synthesized ones, computed by the same expression: equal outputs.
    torch.testing.assert_close(got[0], first_output, rtol=0, atol=0)
    plain.load_state_dict(unreplaced)  # the model before replacement answers otherwise: the merge changed weights
    with torch.no_grad():
        change = (plain(**inputs)[0] - first_output).abs().max()
    assert change > 1e-2 * first_output.abs().max()

    served, logged = _served(task, str(merged), {})
    served_repl, logged_repl = _served(task, replacement, processors)
    assert _comparable(served) == _comparable(served_repl)
    assert not [message for message in logged + logged_repl if "is not supported" in message]


def test_processing_files_are_transformers_processing_files_only(tmp_path):
    """Every file name Transformers' processing classes load (a v4 tokenizer's vocabulary files included, as its
    class names them), and nothing of the model or the training run."""
    processing = {
        "tokenizer_config.json": '{"tokenizer_class": "GPT2Tokenizer"}', "vocab.json": "{}", "merges.txt": "",
        "tokenizer.json": "{}", "special_tokens_map.json": "{}", "added_tokens.json": "{}",
        "preprocessor_config.json": "{}", "processor_config.json": "{}", "video_preprocessor_config.json": "{}",
        "chat_template.jinja": "", "chat_template.json": "{}", "generation_config.json": "{}",
        "additional_chat_templates/tool_use.jinja": "",
    }  # fmt: skip
    others = dict.fromkeys([*REPL_MODEL_FILES, *RUN_FILES, "README.md", "spiece.model", "training_args.bin"], "")
    (tmp_path / "additional_chat_templates").mkdir()
    for file_name, text in {**processing, **others}.items():
        (tmp_path / file_name).write_text(text)
    assert processing_files(str(tmp_path)) == sorted(processing)


@pytest.fixture(scope="module")
def configs_only(tmp_path_factory):
    """RepL checkpoints of each task but the classifier, and a plain causal LM, without their weights: what evaluate
    reads first."""
    root = tmp_path_factory.mktemp("configs")
    for name in ("causal-lm", "segmenter", "detector"):
        _save_repl_checkpoint(TASKS[name], root / name)
        (root / name / "model.safetensors").unlink()
    plain_config = TASKS["causal-lm"].build()[0].config
    plain_config.architectures = ["GPT2LMHeadModel"]  # as the merged model's save_pretrained writes it
    plain_config.save_pretrained(root / "plain-causal-lm")
    return root


@pytest.mark.parametrize(
    "name, architecture, example",
    [
        ("causal-lm", "GPT2LMHeadModel (text-generation)", "examples/pytorch/language-modeling/run_clm.py"),
        ("plain-causal-lm", "GPT2LMHeadModel (text-generation)", "examples/pytorch/language-modeling/run_clm.py"),
        ("segmenter", "DPTForSemanticSegmentation (image-segmentation)",
         "examples/pytorch/semantic-segmentation/run_semantic_segmentation.py"),
        ("detector", "YolosForObjectDetection (object-detection)",
         "examples/pytorch/object-detection/run_object_detection.py"),
    ],
)  # fmt: skip
def test_evaluate_names_what_evaluates_another_task_before_loading_anything(
    name, architecture, example, configs_only, monkeypatch, capsys
):
    from hf_replacement.commands import data, train  # noqa: F401  (train binds the real function before the patch)

    monkeypatch.setattr(data, "load_image_dataset", pytest.fail)  # the refusal comes before any data
    with pytest.raises(SystemExit) as exit_info:  # and before the weights: this checkpoint has none
        main(["evaluate", str(configs_only / name), "--max-eval-samples", "8"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "Traceback" not in error
    assert f"holds a {architecture}; `hf-replacement evaluate` measures image-classification accuracy only" in error
    assert example in error and "ReplacementTrainer" in error and ".evaluate()" in error


def test_a_repl_checkpoint_keeps_the_generation_config_it_was_saved_with(tmp_path, capsys):
    """As Transformers' `save_pretrained` / `from_pretrained` do: a generating base model's generation config is
    saved with the RepL checkpoint, loaded with it, and merged with it; a classifier has none."""
    model, _ = _gpt2_causal_lm()
    model.generation_config.max_new_tokens, model.generation_config.repetition_penalty = 5, 1.3
    get_replacement_model(model, ReplacementConfig(replace_interval=2)).save_pretrained(tmp_path / "repl")
    saved = model.generation_config.to_diff_dict()
    assert ReplacementModel.from_pretrained(tmp_path / "repl").generation_config.to_diff_dict() == saved
    assert main(["merge", str(tmp_path / "repl"), str(tmp_path / "merged")]) == 0
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert merged.generation_config.to_diff_dict() == saved
    assert "generation_config.json" in capsys.readouterr().out

    get_replacement_model(tiny_models.build("vit")).save_pretrained(tmp_path / "classifier")
    assert not (tmp_path / "classifier" / "generation_config.json").exists()


@pytest.mark.parametrize(
    "model_type, architecture, auto_class, pipeline_task",
    [
        ("vit", "ViTForImageClassification", "AutoModelForImageClassification", "image-classification"),
        ("gpt2", "GPT2LMHeadModel", "AutoModelForCausalLM", "text-generation"),
        ("gpt2", "GPT2ForSequenceClassification", "AutoModelForSequenceClassification", "text-classification"),
        ("bert", "BertForMaskedLM", "AutoModelForMaskedLM", "fill-mask"),
        ("bert", "BertModel", "AutoModel", "feature-extraction"),
        ("upernet", "UperNetForSemanticSegmentation", "AutoModelForSemanticSegmentation", "image-segmentation"),
        ("dpt", "DPTForDepthEstimation", "AutoModelForDepthEstimation", "depth-estimation"),
        ("yolos", "YolosForObjectDetection", "AutoModelForObjectDetection", "object-detection"),
        ("t5", "T5ForConditionalGeneration", "AutoModelForSeq2SeqLM", None),  # no Transformers 5 pipeline takes it
        ("vit_mae", "ViTMAEForPreTraining", "AutoModelForPreTraining", None),
    ],
)
def test_the_task_comes_from_transformers_tables(model_type, architecture, auto_class, pipeline_task):
    """Named for architectures no test builds too (the UperNet segmenter of run_semantic_segmentation.py)."""
    from hf_replacement.commands.tasks import model_task

    task = model_task(model_type, architecture)
    assert (task.auto_class, task.pipeline_task) == (auto_class, pipeline_task)
