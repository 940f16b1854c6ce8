"""Bad configs, models and checkpoints: each raises one clear error naming the problem and the fix."""

from __future__ import annotations

import json
import logging

import pytest
import tiny_models
import torch
from torch import nn

from hf_replacement import (
    BlockDiscoveryError,
    FusionError,
    ReplacementConfig,
    ReplacementConfigError,
    ReplacementModel,
    get_replacement_model,
)
from hf_replacement.loading import GUARD_MESSAGE

BAD_CONFIGS = [
    (dict(replace_interval=1), "replace_interval=1 is invalid"),
    (dict(replace_interval=0), "replace_interval=0 is invalid"),
    (dict(replace_interval="4"), "replace_interval='4' is invalid"),
    (dict(replace_interval=True), "replace_interval=True is invalid"),
    (dict(replaced_blocks=[]), r"replaced_blocks=\[\] is invalid"),
    (dict(replaced_blocks=[1.5]), "give a non-empty list of block indices"),
    (dict(replaced_blocks=[2, 2]), "lists a block twice"),
    (dict(coefficient_granularity="layer"), "coefficient_granularity='layer' is invalid: choose one of"),
    (dict(fusion="average"), "fusion='average' is invalid"),
    (dict(coefficient_init=(1.0,)), r"coefficient_init=\(1.0,\) is invalid"),
    (dict(coefficient_init=("a", "b")), "give two finite numbers"),
    (dict(coefficient_init=(float("nan"), 0.5)), r"coefficient_init=\(nan, 0.5\) is invalid: give two finite numbers"),
    (dict(coefficient_init=(0.5, float("inf"))), r"coefficient_init=\(0.5, inf\) is invalid"),
    (dict(coefficient_init=(1e39, 0.5)), "within float32 range"),
    (dict(coefficient_init=None), "coefficient_init=None is invalid: give two finite numbers"),
    (dict(replaced_blocks=3), "replaced_blocks=3 is invalid: give a non-empty list of block indices"),
    (dict(detach_neighbors="yes"), "detach_neighbors='yes' is invalid"),
    (dict(recompute_replaced=1), "recompute_replaced=1 is invalid"),
    (dict(block_path=""), "block_path='' is invalid"),
    (dict(format_version=3), "format_version=3 is not supported"),
]


@pytest.mark.parametrize("kwargs, message", BAD_CONFIGS, ids=[str(k) for k, _ in BAD_CONFIGS])
def test_bad_config_values(kwargs, message):
    with pytest.raises(ReplacementConfigError, match=message):
        ReplacementConfig(**kwargs)


BAD_SELECTIONS = [
    (dict(replaced_blocks=[0]), r"\[0\] outside the valid range 1..4"),
    (dict(replaced_blocks=[5]), r"\[5\] outside the valid range 1..4"),
    (dict(replaced_blocks=[-1]), r"\[-1\] outside the valid range"),
    (dict(replaced_blocks=[2, 3]), r"adjacent blocks \[\(2, 3\)\]"),
    (dict(replace_interval=13), r"replace_interval=13 selects no block .* lengths: \{'vit.layers': 6\}"),
    (dict(block_path="vit.nothing"), "block_path='vit.nothing' does not exist"),
    (dict(block_path="classifier"), "points at a Linear, not an nn.ModuleList"),
]


@pytest.mark.parametrize("kwargs, message", BAD_SELECTIONS, ids=[str(k) for k, _ in BAD_SELECTIONS])
def test_bad_selection_for_model(kwargs, message):
    model = tiny_models.build("vit")
    with pytest.raises(ValueError, match=message):
        get_replacement_model(model, ReplacementConfig(**kwargs))
    assert not any(type(m).__name__.startswith("Replaced") for m in model.modules())  # left untouched


def test_model_without_blocks():
    with pytest.raises(BlockDiscoveryError, match="Pass ReplacementConfig\\(block_path="):
        get_replacement_model(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))


def test_too_few_blocks():
    model = nn.Module()
    model.blocks = nn.ModuleList(nn.Linear(2, 2) for _ in range(2))
    with pytest.raises(ReplacementConfigError, match="has 2 block\\(s\\); RepL needs at least 3"):
        get_replacement_model(model, ReplacementConfig(block_path="blocks"))


def test_not_a_module():
    with pytest.raises(TypeError, match="needs an nn.Module, got dict"):
        get_replacement_model({"weights": 1})


def test_config_changed_after_construction_is_checked_when_used():
    config = ReplacementConfig()
    config.coefficient_init = (float("nan"), 0.5)
    with pytest.raises(ReplacementConfigError, match="coefficient_init=\\(nan, 0.5\\) is invalid"):
        get_replacement_model(tiny_models.build("vit"), config)


def test_dict_config_names_the_fix():
    message = r"replacement_config must be a ReplacementConfig, got dict: .*ReplacementConfig\(\*\*options\)"
    with pytest.raises(TypeError, match=message):
        get_replacement_model(tiny_models.build("vit"), {"replace_interval": 4})


def test_replacing_twice():
    model = get_replacement_model(tiny_models.build("vit"))
    with pytest.raises(ValueError, match="already has replaced blocks"):
        get_replacement_model(model.base_model)


def test_fusion_error_refuses_other_shapes():
    with pytest.raises(FusionError, match=r"has shape .* \(fusion='error'\); use fusion='resample' or 'nearest'"):
        get_replacement_model(tiny_models.build("convnext"), ReplacementConfig(replaced_blocks=[3], fusion="error"))


class Gain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(4))


@pytest.mark.parametrize(
    "neighbour, message",
    [
        (
            Gain(),
            "blocks.1 and its neighbour blocks.2 are different kinds of block: the neighbour has no parameter 'weight'",
        ),
        (nn.LayerNorm(4), r"different kinds of block: weight has shape \(4, 4\) here and \(4,\) there"),
    ],
)
def test_neighbours_of_another_kind_raise_when_explicit(neighbour, message):
    model = nn.Module()
    model.blocks = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4), neighbour, nn.Linear(4, 4)])
    with pytest.raises(FusionError, match=message):
        get_replacement_model(model, ReplacementConfig(block_path="blocks", replaced_blocks=[1]))


def test_interval_blocks_of_another_kind_move_to_a_neighbour():
    model = nn.Module()
    model.blocks = nn.ModuleList([nn.LayerNorm(4)] + [nn.Linear(4, 4) for _ in range(5)])
    replaced = get_replacement_model(model, ReplacementConfig(block_path="blocks", replace_interval=2))
    # Block 1 (aimed at) has a LayerNorm neighbour: block 2 is replaced instead, then 4 (3 is next to 2).
    assert replaced.replaced_blocks == {2: "blocks.2", 4: "blocks.4"}


def test_interval_blocks_with_no_replaceable_neighbour_are_skipped_with_warning(caplog):
    model = nn.Module()
    kinds = [nn.LayerNorm(4), nn.Linear(4, 4), nn.LayerNorm(4)] + [nn.Linear(4, 4) for _ in range(4)]
    model.blocks = nn.ModuleList(kinds)
    with caplog.at_level("WARNING"):
        replaced = get_replacement_model(model, ReplacementConfig(block_path="blocks", replace_interval=2))
    assert replaced.replaced_blocks == {4: "blocks.4"}
    assert "Not replaced" in caplog.text and "1 (blocks.1 and its neighbour blocks.0 are different kinds" in caplog.text


def test_nearest_with_no_matching_neighbour():
    model = nn.Module()
    model.blocks = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 6), nn.Linear(6, 6)])
    with pytest.raises(FusionError, match="no neighbour tensor of the same shape \\(fusion='nearest'\\)"):
        get_replacement_model(model, ReplacementConfig(block_path="blocks", replaced_blocks=[1], fusion="nearest"))


@pytest.fixture
def saved(tmp_path):
    model = get_replacement_model(tiny_models.build("vit"))
    model.save_pretrained(tmp_path)
    return tmp_path


def test_missing_checkpoint_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a directory holding a RepL checkpoint"):
        ReplacementModel.from_pretrained(tmp_path / "nothing")


def test_corrupt_replacement_config(saved):
    (saved / "replacement_config.json").write_text("{not json")
    with pytest.raises(ReplacementConfigError, match="is not valid JSON .* the checkpoint is corrupt"):
        ReplacementModel.from_pretrained(saved)


def test_unknown_config_key(saved):
    data = json.loads((saved / "replacement_config.json").read_text())
    data["rank"] = 8
    (saved / "replacement_config.json").write_text(json.dumps(data))
    with pytest.raises(ReplacementConfigError, match=r"Unknown replacement config keys \['rank'\]"):
        ReplacementModel.from_pretrained(saved)


def test_newer_format_version(saved):
    data = json.loads((saved / "replacement_config.json").read_text())
    data["format_version"] = 99
    (saved / "replacement_config.json").write_text(json.dumps(data))
    with pytest.raises(ReplacementConfigError, match="format_version=99 is not supported .* upgrade hf_replacement"):
        ReplacementModel.from_pretrained(saved)


def test_corrupt_weights(saved):
    path = saved / "model.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="is not a readable safetensors file .* the checkpoint is corrupt"):
        ReplacementModel.from_pretrained(saved)


def test_missing_weights(saved):
    (saved / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors is missing: the checkpoint is incomplete"):
        ReplacementModel.from_pretrained(saved)


def test_weights_from_another_model(saved, tmp_path):
    other = get_replacement_model(tiny_models.build("vit"), ReplacementConfig(replaced_blocks=[2]))
    other.save_pretrained(tmp_path / "other")
    (saved / "model.safetensors").write_bytes((tmp_path / "other" / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="does not match the model built from its configs: missing"):
        ReplacementModel.from_pretrained(saved)


def test_coefficients_of_another_granularity_name_both_shapes(tmp_path):
    model = get_replacement_model(tiny_models.build("vit"), ReplacementConfig(coefficient_granularity="tensor"))
    model.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "replacement_config.json").read_text())
    data["coefficient_granularity"] = "block"
    (tmp_path / "replacement_config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"block 3 .* have shape \(2, 16\); its plan needs \(2, 1\) "):
        ReplacementModel.from_pretrained(tmp_path)


def test_missing_base_config_for_custom_model(tmp_path):
    model = get_replacement_model(tiny_models.CustomModel(), ReplacementConfig(block_path="trunk.blocks"))
    model.save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="pass model=<a fresh instance of the base architecture>"):
        ReplacementModel.from_pretrained(tmp_path)


@pytest.mark.parametrize("architecture", ["NoSuchModel", "AutoModel", "pipeline", "ViTConfig"])
def test_architectures_must_name_a_model_class(saved, architecture):
    """Only a model class is built: `AutoModel(config)` or `pipeline(config)` are never called."""
    data = json.loads((saved / "base_config.json").read_text())
    data["architectures"] = [architecture]
    (saved / "base_config.json").write_text(json.dumps(data))
    with pytest.raises(
        ValueError, match=f"names no Transformers model class in 'architectures' \\(\\['{architecture}'\\]\\)"
    ):
        ReplacementModel.from_pretrained(saved)


def test_garbage_base_config(saved):
    (saved / "base_config.json").write_bytes(b"\x00\xff not json")
    with pytest.raises(ValueError, match="config.json is not a readable Transformers config"):
        ReplacementModel.from_pretrained(saved)


def test_garbage_bytes_in_replacement_config_name_the_file(saved):
    (saved / "replacement_config.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ReplacementConfigError, match="replacement_config.json is not valid JSON"):
        ReplacementModel.from_pretrained(saved)


def test_synthesized_weights_of_unreplaced_block():
    model = get_replacement_model(tiny_models.build("vit"))
    with pytest.raises(ValueError, match="block 2 .* is not replaced; replaced: \\{3: 'vit.layers.3'\\}"):
        model.synthesized_weights(2)
    assert torch.is_tensor(next(iter(model.synthesized_weights(3).values())))


def test_tied_weights_are_saved_once_and_tied_again_on_load(tmp_path):
    """GPT-2 ties `lm_head.weight` to `wte.weight`: saved once (safetensors refuses shared memory), re-tied on load."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=4, n_embd=32, n_head=2, vocab_size=50, n_positions=16)
    model = get_replacement_model(GPT2LMHeadModel(config), ReplacementConfig(replace_interval=2))
    tokens = torch.randint(0, 50, (2, 8))
    model.save_pretrained(tmp_path)
    loaded = ReplacementModel.from_pretrained(tmp_path)
    assert loaded.base_model.lm_head.weight.data_ptr() == loaded.base_model.transformer.wte.weight.data_ptr()
    torch.testing.assert_close(loaded(input_ids=tokens).logits, model.eval()(input_ids=tokens).logits, rtol=0, atol=0)


@pytest.mark.parametrize(
    "keywords, message",
    [
        (dict(num_labels=5), "ignore_mismatched_sizes=True with the new num_labels"),
        (dict(tpyo_kwarg=1), "tpyo_kwarg \\(unknown keyword, and is no attribute of the checkpoint's base config"),
        (dict(model=tiny_models.build("vit"), num_labels=5), "num_labels .*but model= was given"),
        (dict(use_safetensors=False), "use_safetensors \\(only safetensors are ever loaded\\)"),
        (dict(dtype=torch.bfloat16, torch_dtype=torch.float16), "give dtype or torch_dtype"),
        (dict(dtype="int8"), "dtype='int8' is not a floating-point torch dtype"),
        (dict(device_map="auto"), "device_map='auto' would split the model across devices"),
        (dict(device_map={"vit": 0, "classifier": 1}), "would split the model across devices"),
    ],
    ids=lambda value: str(value)[:40],
)
def test_from_pretrained_refuses_keywords_it_cannot_honour(saved, keywords, message):
    with pytest.raises((TypeError, ValueError), match=message):
        ReplacementModel.from_pretrained(saved, **keywords)


def test_save_pretrained_refuses_pickle_and_unknown_keywords(tmp_path):
    model = get_replacement_model(tiny_models.build("vit"))
    with pytest.raises(ValueError, match="safe_serialization=False would write a pickle"):
        model.save_pretrained(tmp_path, safe_serialization=False)
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['tpyo'\]"):
        model.save_pretrained(tmp_path, tpyo=1)
    assert not list(tmp_path.iterdir())


def test_transformers_loaders_refuse_a_repl_checkpoint_naming_ours(saved):
    """A RepL checkpoint's config.json is a guard: never a randomly initialised model from the base config."""
    from transformers import AutoConfig, AutoModelForImageClassification, pipeline

    for load in (
        lambda: AutoModelForImageClassification.from_pretrained(saved),
        lambda: AutoConfig.from_pretrained(saved),
        lambda: pipeline("image-classification", model=str(saved)),
    ):
        with pytest.raises(ValueError) as error:
            load()
        # hf_replacement's message alone: not Transformers' advice to update Transformers (issue 25).
        assert str(error.value) == GUARD_MESSAGE
    assert ReplacementModel.from_pretrained(saved).replaced_blocks == {3: "vit.layers.3"}


def test_checkpoints_of_the_earlier_format_still_load(saved):
    """Before base_config.json, config.json held the base config itself."""
    model = ReplacementModel.from_pretrained(saved)
    (saved / "config.json").unlink()
    (saved / "base_config.json").rename(saved / "config.json")
    earlier = ReplacementModel.from_pretrained(saved)
    x = tiny_models.inputs()
    torch.testing.assert_close(
        tiny_models.logits(earlier(pixel_values=x)), tiny_models.logits(model(pixel_values=x)), rtol=0, atol=0
    )


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_pipelines_take_a_repl_model_and_its_base_model_alike():
    """`pipeline(model=repl_model)` answers as `pipeline(model=repl_model.base_model)` and the model itself do,
    and neither logs the ~50 supported models; a class of another name still does, so the capture works."""
    from PIL import Image
    from transformers import ViTImageProcessorPil, pipeline

    model = get_replacement_model(tiny_models.build("vit")).eval()
    size = model.config.image_size
    processor = ViTImageProcessorPil(size={"height": size, "width": size}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    image = Image.fromarray((torch.rand(size, size, 3) * 255).to(torch.uint8).numpy())

    class Renamed(ReplacementModel):
        pass

    records = _Records()
    transformers_logger = logging.getLogger("transformers")  # does not propagate to the root logger
    transformers_logger.addHandler(records)
    try:
        answers = [
            pipeline("image-classification", model=served, image_processor=processor, top_k=1, device="cpu")(image)
            for served in (model, model.base_model)
        ]
        unsupported = [message for message in records.messages if "is not supported" in message]
        pipeline("image-classification", model=Renamed(tiny_models.build("vit"), ReplacementConfig()),
                 image_processor=processor)  # fmt: skip
    finally:
        transformers_logger.removeHandler(records)
    assert not unsupported
    assert any("The model 'Renamed' is not supported" in message for message in records.messages)
    assert answers[0] == answers[1]
    pixels = processor(image, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        probabilities = model(pixel_values=pixels).logits.softmax(-1)[0]
    assert answers[0][0]["label"] == model.config.id2label[int(probabilities.argmax())]
    assert answers[0][0]["score"] == pytest.approx(float(probabilities.max()), abs=1e-6)


def test_repl_on_a_peft_model_is_a_clear_error():
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(tiny_models.build("vit"), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    with pytest.raises(ValueError, match="holds PEFT modules .* would silently drop"):
        get_replacement_model(peft_model, ReplacementConfig(block_path=tiny_models.block_path("vit")))
    with pytest.raises(ValueError, match="holds PEFT modules"):
        get_replacement_model(peft_model.base_model.model, ReplacementConfig(block_path=tiny_models.block_path("vit")))
