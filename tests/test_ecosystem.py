"""Transformers / PEFT / Accelerate habits on RepL models, written as a user writes them (issue 25).

Each test is a habit that once gave a wrong result without a word: PEFT methods other than LoRA and
PEFT's own `merge_and_unload`, bf16 checkpoints, per-layer outputs under a lighter surrogate, a
PeftModel in `ReplacementTrainer`, directories other tools write, `from_pretrained`/`save_pretrained`
keywords, and the message Transformers' own loaders give for a RepL directory.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import tiny_models
import torch
from peft import (
    FourierFTConfig,
    HRAConfig,
    IA3Config,
    LoHaConfig,
    LoKrConfig,
    LoraConfig,
    OFTConfig,
    PeftModel,
    VeraConfig,
    get_peft_model,
)
from transformers import Trainer, TrainingArguments

from hf_replacement import (
    ReplacementConfig,
    ReplacementModel,
    get_replacement_model,
    merge_peft_and_replacement,
    prepare_peft_config,
)
from hf_replacement.commands.data import DataError, collate_fn, load_image_dataset, prepare_dataset, subsample

TARGETS = ["q_proj", "v_proj"]

# Every PEFT method prepare_peft_config accepts (hf_replacement.integrations.peft.MERGEABLE_PEFT_TYPES).
MERGEABLE = {
    "lora": lambda: LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS),
    "ia3": lambda: IA3Config(target_modules=TARGETS + ["fc2"], feedforward_modules=["fc2"]),
    "loha": lambda: LoHaConfig(r=2, alpha=4, target_modules=TARGETS),
    "lokr": lambda: LoKrConfig(r=2, alpha=4, target_modules=TARGETS),
    "oft": lambda: OFTConfig(r=0, oft_block_size=4, target_modules=TARGETS),
    "fourierft": lambda: FourierFTConfig(n_frequency=10, target_modules=TARGETS),
}


def repl_vit(seed: int = 0, **config_overrides) -> ReplacementModel:
    base = tiny_models.build("vit", seed=seed, **config_overrides)
    return get_replacement_model(base, ReplacementConfig(replaced_blocks=[1, 4]))


def trained_peft_model(method: str, modules_to_save: list[str] | None = None) -> PeftModel:
    """A PeftModel on a RepL ViT after a step of training (adapters and coefficients moved from their init)."""
    model = repl_vit()
    config = MERGEABLE[method]()
    config.modules_to_save = modules_to_save
    peft_model = get_peft_model(model, prepare_peft_config(model, config))
    optimizer = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.5)
    logits = peft_model(pixel_values=tiny_models.inputs()).logits
    (logits * torch.linspace(-1, 1, logits.shape[-1])).square().sum().backward()
    optimizer.step()
    return peft_model.eval()


def logits_of(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(pixel_values=x).logits


# Logits are O(1) sums over 16-32 products: merged weights reorder those sums (float32 rounding ~1e-7).
MERGE_TOLERANCE = dict(rtol=1e-5, atol=1e-6)


# ---- 1, 2: PEFT merges -----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", sorted(MERGEABLE))
def test_every_accepted_peft_method_merges_to_the_same_outputs(method):
    peft_model = trained_peft_model(method)
    x = tiny_models.inputs()
    expected = logits_of(peft_model, x)
    plain = merge_peft_and_replacement(peft_model)
    assert not any(type(m).__module__.startswith(("peft.", "hf_replacement.")) for m in plain.modules())
    torch.testing.assert_close(logits_of(plain, x), expected, **MERGE_TOLERANCE)
    # PEFT's habitual call does the same: the replaced blocks are materialized before any adapter is merged.
    merged = peft_model.merge_and_unload()
    assert isinstance(merged, ReplacementModel) and merged.replaced_blocks == {}
    torch.testing.assert_close(logits_of(merged, x), expected, **MERGE_TOLERANCE)
    assert not any(type(m).__module__.startswith("peft.") for m in merged.modules())


@pytest.mark.parametrize("method", ["lora", "ia3"])  # LoRA's own unload and PEFT's generic one
def test_peft_unload_without_merge_returns_the_coefficients_as_every_module_to_save(method):
    """`peft_model.unload()` gives the RepL model back with its coefficients as PEFT gives back any
    `modules_to_save` module, here the classifier: the trained copy up to PEFT 0.21, the module as it was
    before `get_peft_model` from PEFT 0.22 on. Either way the outputs are a RepL model's with those modules."""
    peft_model = trained_peft_model(method, modules_to_save=["classifier"])
    model = peft_model.get_base_model()
    saved = ("classifier", "replacement_coefficients")
    trained = {name: copy.deepcopy(model.get_submodule(name).modules_to_save["default"].state_dict()) for name in saved}
    original = {name: copy.deepcopy(model.get_submodule(name).original_module.state_dict()) for name in saved}
    for name in saved:  # both moved in training, so the two outcomes differ
        assert any(not torch.equal(trained[name][key], original[name][key]) for key in trained[name])
    unloaded = peft_model.unload()
    assert unloaded is model and set(model.replaced_blocks) == {1, 4}
    assert not any(type(m).__module__.startswith("peft.") for m in model.modules())
    classifier = model.classifier.state_dict()
    kept_trained = all(torch.equal(classifier[key], trained["classifier"][key]) for key in classifier)
    expected = trained if kept_trained else original
    reference = repl_vit()  # the same seed: the same weights before training; the adapters changed none in place
    for name in saved:
        reference.get_submodule(name).load_state_dict(expected[name])
    x = tiny_models.inputs()
    torch.testing.assert_close(logits_of(unloaded, x), logits_of(reference.eval(), x), rtol=0, atol=0)


def test_merge_adapter_in_place_is_refused_at_the_forward_and_unmerge_restores():
    """`peft_model.merge_adapter()` would change the replaced blocks (synthesized from the merged neighbours)."""
    peft_model = trained_peft_model("lora")
    x = tiny_models.inputs()
    expected = logits_of(peft_model, x)
    peft_model.merge_adapter()
    with pytest.raises(
        ValueError, match=r"peft_model.merge_adapter\(\)\): the replaced blocks \[1, 4\].*unmerge_adapter"
    ):
        logits_of(peft_model, x)
    peft_model.unmerge_adapter()
    # Unmerging subtracts what merging added: float32 rounding of weights of magnitude ~1 (eps 1.2e-7, a few ops).
    torch.testing.assert_close(logits_of(peft_model, x), expected, **MERGE_TOLERANCE)


@pytest.mark.parametrize(
    "config, error, message",
    [
        (
            HRAConfig(r=2, target_modules=TARGETS),
            ValueError,
            r"peft_type='HRA' .*only LORA, LOHA, LOKR, IA3, OFT, FOURIERFT",
        ),
        (VeraConfig(r=2, target_modules=TARGETS), TypeError, "VeraConfig has no exclude_modules"),
    ],
    ids=["hra", "vera"],
)
def test_other_peft_methods_are_refused_before_training(config, error, message):
    with pytest.raises(error, match=message):
        prepare_peft_config(repl_vit(), config)


def test_layer_replication_is_refused():
    with pytest.raises(ValueError, match=r"layer_replication=\[\[0, 2\]\] would duplicate blocks"):
        prepare_peft_config(repl_vit(), LoraConfig(target_modules=TARGETS, layer_replication=[[0, 2]]))


def test_a_merge_that_fails_leaves_the_peft_model_as_it_was(monkeypatch):
    peft_model = trained_peft_model("lora")
    model = peft_model.get_base_model()
    x = tiny_models.inputs()
    expected = logits_of(peft_model, x)
    last_lora_layer = [m for m in peft_model.modules() if hasattr(m, "lora_A")][-1]

    def fail(*args, **kwargs):
        raise RuntimeError("merge failed in PEFT")

    # The merge works on a copy: make every copy of this layer fail.
    monkeypatch.setattr(type(last_lora_layer), "merge", fail)
    with pytest.raises(RuntimeError, match="merge failed in PEFT"):
        merge_peft_and_replacement(peft_model)
    assert set(model.replaced_blocks) == {1, 4}
    torch.testing.assert_close(logits_of(peft_model, x), expected, rtol=0, atol=0)


# ---- 3: dtypes ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_checkpoints_reload_as_saved(tmp_path, dtype):
    model = repl_vit().to(dtype)
    model.save_pretrained(tmp_path)
    saved_config = json.loads((tmp_path / "base_config.json").read_text())
    assert saved_config["dtype"] == str(dtype).removeprefix("torch.")
    x = tiny_models.inputs().to(dtype)
    # model=: a fresh fp32 model of the architecture; the checkpoint's dtype still decides.
    for keywords in ({}, {"dtype": "auto"}, {"torch_dtype": "auto"}, {"model": tiny_models.build("vit")}):
        loaded = ReplacementModel.from_pretrained(tmp_path, **keywords)
        assert {p.dtype for p in loaded.base_model.parameters()} == {dtype}
        assert {p.dtype for p in loaded.replacement_coefficients.parameters()} == {torch.float32}
        torch.testing.assert_close(logits_of(loaded, x), logits_of(model.eval(), x), rtol=0, atol=0)
    as_fp32 = ReplacementModel.from_pretrained(tmp_path, dtype=torch.float32)
    assert {p.dtype for p in as_fp32.base_model.parameters()} == {torch.float32}


# ---- 7: from_pretrained / save_pretrained keywords ---------------------------------------------------------


def test_attn_implementation_and_low_cpu_mem_usage(tmp_path):
    repl_vit().save_pretrained(tmp_path)
    loaded = ReplacementModel.from_pretrained(tmp_path, attn_implementation="eager", low_cpu_mem_usage=True)
    assert loaded.config._attn_implementation == "eager"
    with torch.no_grad():
        output = loaded(pixel_values=tiny_models.inputs(), output_attentions=True)
    assert len(output.attentions) == 6 and all(a is not None for a in output.attentions)


def test_re_heading_a_checkpoint_for_a_new_label_set(tmp_path):
    model = repl_vit()
    model.save_pretrained(tmp_path)
    labels = {0: "a", 1: "b", 2: "c", 3: "d", 4: "e"}
    with pytest.raises(ValueError, match=r"wrong shape \['base_model.classifier.bias', 'base_model.classifier.weight'"
                       r"\].*pass ignore_mismatched_sizes=True"):  # fmt: skip
        ReplacementModel.from_pretrained(tmp_path, num_labels=5)
    reheaded = ReplacementModel.from_pretrained(
        tmp_path,
        num_labels=5,
        id2label=labels,
        label2id={v: k for k, v in labels.items()},
        ignore_mismatched_sizes=True,
    )
    assert reheaded.config.num_labels == 5 and reheaded.config.id2label == labels
    assert reheaded.base_model.classifier.weight.shape == (5, 16)
    old, new = model.state_dict(), reheaded.state_dict()
    assert set(old) == set(new)
    for key in old:
        if not key.startswith("base_model.classifier."):
            torch.testing.assert_close(new[key], old[key], rtol=0, atol=0, msg=key)
    # The new head is initialised as Transformers initialises one (normal(0, initializer_range), zero bias),
    # not left as the uninitialised memory the model was built with.
    head = reheaded.base_model.classifier
    assert torch.equal(head.bias, torch.zeros(5))
    assert 0.5 * reheaded.config.initializer_range < head.weight.std() < 2 * reheaded.config.initializer_range
    assert set(reheaded.replaced_blocks) == {1, 4}


def test_save_pretrained_the_no_trainer_way(tmp_path):
    """`unwrapped.save_pretrained(dir, is_main_process=accelerator.is_main_process, save_function=accelerator.save)`."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(repl_vit())
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.save_pretrained(tmp_path / "other", is_main_process=False, save_function=accelerator.save)
    assert not (tmp_path / "other").exists()
    unwrapped.save_pretrained(tmp_path, is_main_process=accelerator.is_main_process, save_function=accelerator.save)
    x = tiny_models.inputs()
    torch.testing.assert_close(
        logits_of(ReplacementModel.from_pretrained(tmp_path), x), logits_of(unwrapped.eval(), x), rtol=0, atol=0
    )


# ---- 4: per-layer outputs under a lighter surrogate ------------------------------------------------------


@pytest.mark.parametrize("surrogate", ["mlp", "half"])
@pytest.mark.parametrize("architecture", ["vit", "deit", "beit", "dinov2", "swin"])
def test_attentions_keep_one_entry_per_layer_under_every_surrogate(architecture, surrogate):
    """A skipped token mixer reports the attention its merged block computes (zero query and key: uniform,
    within the shifted-window mask for Swin), so attentions[i] stays layer i's (Swin: stage i's)."""
    base = tiny_models.build(architecture)
    base.set_attn_implementation("eager")  # the attention weights are only returned by the eager path
    # Block 1 is the last of Swin's first stage: the block whose attention a Swin stage reports.
    model = get_replacement_model(base, ReplacementConfig(replaced_blocks=[1], surrogate=surrogate)).eval()
    plain = tiny_models.build(architecture)
    plain.set_attn_implementation("eager")
    x = tiny_models.inputs()
    with torch.no_grad():
        expected = plain(pixel_values=x, output_attentions=True, output_hidden_states=True)
        output = model(pixel_values=x, output_attentions=True, output_hidden_states=True)
        merged = copy.deepcopy(model).merge_and_unload()(pixel_values=x, output_attentions=True)
    assert len(output.attentions) == len(expected.attentions)
    assert len(output.hidden_states) == len(expected.hidden_states)
    # Probabilities (<= 1) after the same weights up to float32 reordering of sums in the merged block.
    for layer, (got, want) in enumerate(zip(output.attentions, merged.attentions, strict=True)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=f"attentions[{layer}]")
    if architecture != "swin":  # layer 0 runs before the replaced block: as in the plain model, to the bit
        torch.testing.assert_close(output.attentions[0], expected.attentions[0], rtol=0, atol=0)


# ---- 6: directories other tools write; the launcher's data helpers in a plain Trainer ------------------------


def digits_for_tiny_models(count: int = 8):
    data = subsample(load_image_dataset("digits"), count, count)
    return prepare_dataset(data, image_size=tiny_models.IMAGE_SIZE, num_channels=3)


def plain_trainer(output_dir, model, **arguments) -> Trainer:
    args = TrainingArguments(
        str(output_dir), use_cpu=True, report_to=[], max_steps=2, per_device_train_batch_size=4,
        disable_tqdm=True, save_strategy="no", **arguments,
    )  # fmt: skip
    return Trainer(model=model, args=args, train_dataset=digits_for_tiny_models()["train"], data_collator=collate_fn)


def test_prepare_dataset_in_a_plain_trainer_says_what_it_needs(tmp_path):
    with pytest.raises(DataError, match=r"'image' and 'label' and got only \['label'\].*remove_unused_columns=False"):
        plain_trainer(tmp_path, repl_vit(num_labels=10)).train()


@pytest.mark.parametrize("writer", ["trainer", "accelerate"])
def test_a_directory_of_weights_only_says_what_wrote_it_and_loads_with_the_config(tmp_path, writer):
    config = ReplacementConfig(replaced_blocks=[1, 4])
    model = get_replacement_model(tiny_models.build("vit", num_labels=10), config)
    if writer == "trainer":
        trainer = plain_trainer(tmp_path / "run", model, remove_unused_columns=False)
        trainer.train()
        trainer.save_model(str(tmp_path))
        wrote = r"a plain transformers\.Trainer \(training_args\.bin is there\)"
    else:
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=True)
        accelerator.save_model(accelerator.prepare(model), str(tmp_path))
        wrote = "accelerator.save_model, a plain transformers.Trainer or safetensors.save_file"
    with pytest.raises(FileNotFoundError, match=f"no replacement_config.json: it was written by {wrote}.*"
                       r"from_pretrained\(directory, model=<a fresh base model>, replacement_config="):  # fmt: skip
        ReplacementModel.from_pretrained(tmp_path)
    loaded = ReplacementModel.from_pretrained(
        tmp_path, model=tiny_models.build("vit", seed=1, num_labels=10), replacement_config=config
    )
    assert set(loaded.replaced_blocks) == {1, 4}
    x = tiny_models.inputs()
    torch.testing.assert_close(logits_of(loaded, x), logits_of(model.eval(), x), rtol=0, atol=0)


# ---- 8: Transformers' own loaders on a RepL directory -------------------------------------------------------


@pytest.mark.slow  # a fresh interpreter: Transformers without hf_replacement imported
def test_transformers_alone_on_a_repl_directory_is_told_no_update_helps(tmp_path):
    repl_vit().save_pretrained(tmp_path)
    script = (
        "import sys, transformers\n"
        "try:\n"
        f"    transformers.AutoModelForImageClassification.from_pretrained({str(tmp_path)!r})\n"
        "except ValueError as error:\n"
        "    print(error)\n"
        "assert 'hf_replacement' not in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True)
    # Transformers appends its advice to update; the model_type it quotes first says that will not help.
    assert "which no Transformers version loads (updating Transformers will not help): load it with " \
        "hf_replacement.ReplacementModel.from_pretrained" in result.stdout  # fmt: skip
