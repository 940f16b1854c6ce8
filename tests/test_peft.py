"""PEFT on top of a RepL model: LoRA on the kept blocks, the coefficients trained and saved with the
adapter, save/load, merge; and the refusals (RepL on a PeftModel, PEFT without `prepare_peft_config`)."""

from __future__ import annotations

import copy
import json
import logging

import pytest
import tiny_models
import torch
from peft import LoraConfig, PeftModel, PromptTuningConfig, get_peft_model
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file

from hf_replacement import (
    ReplacementConfig,
    ReplacementModel,
    get_replacement_model,
    merge_peft_and_replacement,
    prepare_peft_config,
)

TARGETS = ["q_proj", "v_proj"]


def make(name: str = "vit") -> ReplacementModel:
    return get_replacement_model(tiny_models.build(name), ReplacementConfig(replaced_blocks=[1, 4]))  # of 0-5


def lora(**options) -> LoraConfig:
    return LoraConfig(r=2, lora_alpha=4, target_modules=list(TARGETS), **options)


def loss_of(logits: torch.Tensor) -> torch.Tensor:
    return (logits * torch.linspace(-1, 1, logits.shape[-1])).square().sum()


def train_one_step(peft_model: PeftModel) -> None:
    optimizer = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.05)
    loss_of(peft_model(pixel_values=tiny_models.inputs()).logits).backward()
    optimizer.step()
    optimizer.zero_grad()


def peft_records(caplog) -> list[logging.LogRecord]:
    return [record for record in caplog.records if record.name == "hf_replacement.integrations.peft"]


@pytest.mark.parametrize("name", ["vit", "deit"])
def test_lora_lands_on_the_kept_blocks_only_with_one_warning(name, caplog):
    model = make(name)
    user_config = lora()
    with caplog.at_level(logging.WARNING):
        peft_model = get_peft_model(model, prepare_peft_config(model, user_config))
    (record,) = peft_records(caplog)
    assert f"replaced blocks 1 ({name}.layers.1), 4 ({name}.layers.4)," in record.getMessage()
    assert user_config.exclude_modules is None and user_config.modules_to_save is None  # the user's config untouched
    adapted = {key.rsplit(".", 1)[0] for key, _ in peft_model.named_modules() if key.endswith(".lora_A")}
    expected = {f"base_model.model.base_model.{name}.layers.{i}.attention.{t}" for i in (0, 2, 3, 5) for t in TARGETS}
    assert adapted == expected
    trainable = {key for key, parameter in peft_model.named_parameters() if parameter.requires_grad}
    coefficients = {f"base_model.model.replacement_coefficients.modules_to_save.default.{i}" for i in (1, 4)}
    assert trainable == {f"{key}.{ab}.default.weight" for key in expected for ab in ("lora_A", "lora_B")} | coefficients


def test_user_exclusions_and_modules_to_save_are_kept(caplog):
    model = make()
    list_config = prepare_peft_config(model, lora(exclude_modules=["vit.layers.0.attention.q_proj"]))
    regex_config = prepare_peft_config(model, lora(exclude_modules=r".*layers\.2\..*", modules_to_save=["classifier"]))
    assert regex_config.modules_to_save == ["classifier", "replacement_coefficients"]
    peft_model = get_peft_model(copy.deepcopy(model), list_config)
    adapted = {key for key, _ in peft_model.named_modules() if key.endswith(".lora_A")}
    assert not any(".layers.0.attention.q_proj." in key or ".layers.4." in key for key in adapted)
    assert any(".layers.0.attention.v_proj." in key for key in adapted) and len(adapted) == 2 * 4 - 1
    peft_model = get_peft_model(copy.deepcopy(model), regex_config)
    adapted = {key for key, _ in peft_model.named_modules() if key.endswith(".lora_A")}
    assert {key.split(".layers.")[1][0] for key in adapted} == {"0", "3", "5"} and len(adapted) == 2 * 3
    # Target modules that match nothing in a replaced block: nothing to warn about.
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        prepare_peft_config(model, LoraConfig(target_modules=["classifier"]))
    assert not peft_records(caplog)


def test_outputs_and_gradients_of_the_coefficients():
    model = make()
    reference = copy.deepcopy(model)
    x = tiny_models.inputs()
    peft_model = get_peft_model(model, prepare_peft_config(model, lora()))
    # LoRA starts at zero: the same outputs, and the same gradients for the coefficients' trained copy.
    logits = peft_model(pixel_values=x).logits
    expected = reference(pixel_values=x).logits
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)
    loss_of(logits).backward()
    loss_of(expected).backward()
    wrapper = model.replacement_coefficients
    copies = wrapper.modules_to_save["default"]
    trained, original = copies.get_parameter("4"), wrapper.original_module.get_parameter("4")
    assert original.grad is None and not original.requires_grad
    torch.testing.assert_close(trained.grad, reference.replacement_coefficients.get_parameter("4").grad)
    peft_model.zero_grad()

    train_one_step(peft_model)
    assert not torch.equal(trained, original)
    torch.testing.assert_close(original, reference.replacement_coefficients.get_parameter("4"), rtol=0, atol=0)
    # The replaced block is built from the trained copy: a·W(block 3) + b·W(block 5), their base weights.
    (a,), (b,) = trained.detach()
    synthesized = model.synthesized_weights(4)
    blocks = model.base_model.vit.layers
    for tensor_name in ("attention.q_proj.weight", "mlp.fc1.bias", "layernorm_before.weight"):
        neighbours = [block.get_parameter(tensor_name.replace("q_proj", "q_proj.base_layer")) for block in blocks[3::2]]
        torch.testing.assert_close(synthesized[tensor_name], a * neighbours[0] + b * neighbours[1])
    assert model.get_coefficients()["vit.layers.4"]["a"] == a
    # Without the adapter: the original coefficients and no LoRA, the RepL model as it was.
    with torch.no_grad(), peft_model.disable_adapter():
        torch.testing.assert_close(peft_model(pixel_values=x).logits, reference(pixel_values=x).logits, rtol=0, atol=0)
    # The forward uses the trained copy: with the LoRA updates zeroed, it is the RepL model with these coefficients.
    with torch.no_grad():
        for key, parameter in peft_model.named_parameters():
            if ".lora_B." in key:
                parameter.zero_()
        for index in ("1", "4"):
            reference.replacement_coefficients.get_parameter(index).copy_(copies.get_parameter(index))
        torch.testing.assert_close(peft_model(pixel_values=x).logits, reference(pixel_values=x).logits, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["vit", "deit"])
def test_save_and_load_round_trip(name, tmp_path, caplog):
    model = make(name)
    model.save_pretrained(tmp_path / "repl")  # the base of the adapter
    peft_model = get_peft_model(model, prepare_peft_config(model, lora()))
    train_one_step(peft_model)
    peft_model.save_pretrained(tmp_path / "adapter")

    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    coefficients = {f"base_model.model.replacement_coefficients.{i}" for i in (1, 4)}
    assert {key for key in saved if "lora_" not in key} == coefficients
    assert not any(".layers.1." in key or ".layers.4." in key for key in saved)
    adapter_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["modules_to_save"] == ["replacement_coefficients"] and adapter_config["exclude_modules"]

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        loaded = PeftModel.from_pretrained(ReplacementModel.from_pretrained(tmp_path / "repl"), tmp_path / "adapter")
    assert not peft_records(caplog)
    expected, actual = get_peft_model_state_dict(peft_model), get_peft_model_state_dict(loaded)
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0)
    peft_model.eval()
    x = tiny_models.inputs(batch=3, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values=x).logits, peft_model(pixel_values=x).logits, rtol=0, atol=0)
        torch.testing.assert_close(
            loaded.get_base_model().synthesized_weights(4)["attention.v_proj.weight"],
            model.synthesized_weights(4)["attention.v_proj.weight"],
            rtol=0,
            atol=0,
        )


def test_merge_gives_a_plain_model_with_the_same_outputs():
    model = make()
    peft_model = get_peft_model(model, prepare_peft_config(model, lora()))
    train_one_step(peft_model)
    peft_model.eval()
    x = tiny_models.inputs()
    with torch.no_grad():
        expected = peft_model(pixel_values=x).logits
    plain = merge_peft_and_replacement(peft_model)
    assert type(plain).__name__ == "ViTForImageClassification"
    assert all(type(m).__module__.startswith(("torch.", "transformers.")) for m in plain.modules())
    with torch.no_grad():
        torch.testing.assert_close(plain(pixel_values=x).logits, expected, rtol=1e-5, atol=1e-6)
        # The merge ran on a copy: the PeftModel is unchanged.
        assert model.replaced_blocks == {1: "vit.layers.1", 4: "vit.layers.4"}
        torch.testing.assert_close(peft_model(pixel_values=x).logits, expected, rtol=0, atol=0)

    # PEFT's own merge_and_unload materializes the replaced blocks before LoRA reaches their neighbours too.
    merged = peft_model.merge_and_unload()
    assert merged is model and not model.replaced_blocks
    with torch.no_grad():
        torch.testing.assert_close(merged(pixel_values=x).logits, expected, rtol=1e-5, atol=1e-6)


def test_misuse_is_a_clear_error():
    model = make()
    with pytest.raises(AttributeError, match=r"vit\.layers\.1\.attention\.q_proj\.weight does not exist between .*"
                       r"hf_replacement\.prepare_peft_config\(model, config\)"):  # fmt: skip
        get_peft_model(copy.deepcopy(model), lora())
    with pytest.raises(TypeError, match="needs the ReplacementModel"):
        prepare_peft_config(model.base_model, lora())
    with pytest.raises(TypeError, match="PromptTuningConfig has no exclude_modules: only PEFT methods that adapt"):
        prepare_peft_config(model, PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=2))
    deferred = ReplacementModel(tiny_models.build("vit"), ReplacementConfig(), defer_replacement=True)
    with pytest.raises(ValueError, match=r"no replaced blocks .*replace_blocks\(\) first"):
        prepare_peft_config(deferred, lora())
    with pytest.raises(TypeError, match="needs a PeftModel made by get_peft_model on a ReplacementModel"):
        merge_peft_and_replacement(get_peft_model(tiny_models.build("vit"), lora()))

    peft_model = get_peft_model(model, prepare_peft_config(model, lora()))
    # RepL on the PeftModel (or on the RepL model inside it) stays refused, as do a RepL save and a replacement.
    with pytest.raises(ValueError, match="holds PEFT modules .* would silently drop"):
        get_replacement_model(peft_model, ReplacementConfig())
    with pytest.raises(ValueError, match=r"holds PEFT adapters: save the adapter with peft_model\.save_pretrained"):
        model.save_pretrained("never-written")
    model.merge_and_unload()
    with pytest.raises(ValueError, match="holds PEFT modules"):
        model.replace_blocks()
