"""Task models and chains: RepL in the dense-prediction, detection and language models users bring.

Per family (tiny configs built here, never from the Hub): the default discovery (chains and their
lengths), chain boundaries (a replaced block's neighbours are in its own chain), the round trip
(convert -> save -> reload -> merge -> the plain task class reloading), and a two-step
ReplacementTrainer run. Then the checkpoint format: chains recorded, format_version 1 loads as saved.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
import transformers as tf
from transformers import TrainingArguments
from transformers.utils import logging as hf_logging

from hf_replacement import (
    CONFIG_NAME,
    ReplacementConfig,
    ReplacementModel,
    ReplacementTrainer,
    find_chains,
    get_replacement_model,
)
from hf_replacement.config import ReplacementConfigError
from hf_replacement.synthesis import replacement_state

IMAGE = 32
CLASSES = 3


@pytest.fixture(autouse=True)
def _quiet_transformers():
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    yield
    hf_logging.set_verbosity(verbosity)


def _convnext_backbone() -> tf.ConvNextConfig:
    return tf.ConvNextConfig(
        hidden_sizes=[4, 8, 16, 32], depths=[2, 2, 3, 2], out_features=["stage1", "stage2", "stage3", "stage4"]
    )


def _swin_backbone() -> tf.SwinConfig:
    return tf.SwinConfig(
        embed_dim=8, depths=[2, 2, 2, 2], num_heads=[1, 2, 2, 4], window_size=2, image_size=IMAGE,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )  # fmt: skip


def _resnet_backbone() -> tf.ResNetConfig:
    return tf.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16, 16, 32], depths=[2, 2, 2, 2], out_features=["stage2", "stage3", "stage4"]
    )


def _detr_head(**extra: Any) -> dict[str, Any]:
    heads = dict(encoder_attention_heads=2, decoder_attention_heads=2)
    return dict(heads, d_model=32, encoder_ffn_dim=32, decoder_ffn_dim=32, encoder_layers=4, decoder_layers=4, **extra)


def _pixels(batch: int = 2, size: int = IMAGE) -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.randn(batch, 3, size, size)}


def _segmentation_labels(batch: int) -> dict[str, Any]:
    return {"labels": torch.randint(0, CLASSES, (batch, IMAGE, IMAGE))}


def _class_labels(batch: int) -> dict[str, Any]:
    return {"labels": torch.randint(0, CLASSES, (batch,))}


def _mask_labels(batch: int) -> dict[str, Any]:
    masks = [(torch.rand(2, IMAGE, IMAGE) > 0.5).float() for _ in range(batch)]
    return {"mask_labels": masks, "class_labels": [torch.randint(0, CLASSES, (2,)) for _ in range(batch)]}


def _box_labels(batch: int) -> dict[str, Any]:
    boxes = lambda: torch.cat([torch.rand(2, 2) * 0.5 + 0.25, torch.rand(2, 2) * 0.3 + 0.1], dim=1)  # noqa: E731
    return {"labels": [{"class_labels": torch.randint(0, CLASSES, (2,)), "boxes": boxes()} for _ in range(batch)]}


def _tokens(batch: int = 2) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(0, 64, (batch, 8))}


def _token_labels(batch: int) -> dict[str, Any]:
    return {"labels": torch.randint(0, 64, (batch, 8))}


@dataclass(frozen=True)
class Family:
    build: Callable[[], torch.nn.Module]
    inputs: Callable[[int], dict[str, Any]]  # the forward's inputs, batch size given
    labels: Callable[[int], dict[str, Any]]  # what the loss needs, batch size given
    chains: dict[str, int]  # discovered by default: chain name -> number of blocks
    replaced: list[int]  # blocks ReplacementConfig() replaces
    output: str = "logits"  # the output compared in the round trip
    compute_loss: Callable | None = None  # for a model without a loss of its own
    extra: dict[str, Any] = field(default_factory=dict)


def _feature_loss(outputs: Any, labels: torch.Tensor, num_items_in_batch: Any = None) -> torch.Tensor:
    return (outputs.feature_maps[-1].mean(dim=(1, 2, 3)) - labels.float()).square().mean()


SWIN_IN_MASKFORMER = "model.pixel_level_module.encoder.model.encoder.layers.*.blocks"
SWIN_IN_MASK2FORMER = "model.pixel_level_module.encoder.swin.encoder.layers.*.blocks"
FAMILIES = {
    "upernet-convnext": Family(
        lambda: tf.UperNetForSemanticSegmentation(tf.UperNetConfig(
            backbone_config=_convnext_backbone(), hidden_size=16, auxiliary_in_channels=16, auxiliary_channels=8,
            num_labels=CLASSES,
        )),  # fmt: skip
        _pixels, _segmentation_labels, {"backbone.encoder.stages.*.layers": 9}, [3, 7],
    ),
    "segformer": Family(
        lambda: tf.SegformerForSemanticSegmentation(tf.SegformerConfig(
            hidden_sizes=[8, 16, 16, 32], depths=[2, 2, 2, 2], num_attention_heads=[1, 1, 2, 2],
            decoder_hidden_size=16, num_labels=CLASSES,
        )),  # fmt: skip
        _pixels, _segmentation_labels, {"segformer.stages.*.blocks": 8}, [3],
    ),
    "dpt": Family(
        lambda: tf.DPTForSemanticSegmentation(tf.DPTConfig(
            hidden_size=16, num_hidden_layers=4, num_attention_heads=2, intermediate_size=32, image_size=IMAGE,
            patch_size=8, backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[8, 8, 16, 16], fusion_hidden_size=16,
            num_labels=CLASSES,
        )),  # fmt: skip
        _pixels, _segmentation_labels, {"dpt.encoder.layer": 4}, [2],
    ),
    "maskformer-swin": Family(
        lambda: tf.MaskFormerForInstanceSegmentation(tf.MaskFormerConfig(
            backbone_config=_swin_backbone(), decoder_config=tf.DetrConfig(**_detr_head()), fpn_feature_size=32,
            mask_feature_size=32, num_labels=CLASSES, num_queries=5,
        )),  # fmt: skip
        _pixels, _mask_labels, {SWIN_IN_MASKFORMER: 8, "model.transformer_module.decoder.layers": 4}, [3, 10],
        output="masks_queries_logits",
    ),
    "mask2former-swin": Family(
        # decoder_layers=4 equals the number of Swin stages: the stages must not be taken for blocks.
        lambda: tf.Mask2FormerForUniversalSegmentation(tf.Mask2FormerConfig(
            backbone_config=_swin_backbone(), hidden_dim=32, feature_size=32, mask_feature_size=32, encoder_layers=2,
            decoder_layers=4, num_attention_heads=2, encoder_feedforward_dim=32, dim_feedforward=32, num_queries=5,
            num_labels=CLASSES,
        )),  # fmt: skip
        _pixels, _mask_labels, {SWIN_IN_MASK2FORMER: 8, "model.transformer_module.decoder.layers": 3}, [3, 9],
        output="masks_queries_logits",
    ),
    "detr-resnet": Family(
        lambda: tf.DetrForObjectDetection(tf.DetrConfig(
            use_timm_backbone=False, backbone_config=_resnet_backbone(), use_pretrained_backbone=False,
            num_queries=5, num_labels=CLASSES, **_detr_head(),
        )),  # fmt: skip
        _pixels, _box_labels,
        {"model.backbone.model.encoder.stages.*.layers": 8, "model.encoder.layers": 4, "model.decoder.layers": 4},
        [3, 10, 14], output="pred_boxes",
    ),
    "vitmae": Family(
        lambda: tf.ViTMAEForPreTraining(tf.ViTMAEConfig(
            hidden_size=16, num_hidden_layers=6, num_attention_heads=2, intermediate_size=32, image_size=16,
            patch_size=4, decoder_hidden_size=8, decoder_num_hidden_layers=4, decoder_num_attention_heads=2,
            decoder_intermediate_size=16,
        )),  # fmt: skip
        lambda batch: {**_pixels(batch, 16), "noise": torch.rand(batch, 16)}, lambda batch: {},
        {"vit.layers": 6, "decoder.decoder_layers": 4}, [3, 8],
    ),
    "t5": Family(
        lambda: tf.T5ForConditionalGeneration(tf.T5Config(
            vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=4, num_decoder_layers=4, num_heads=2,
            decoder_start_token_id=0,
        )),  # fmt: skip
        lambda batch: {**_tokens(batch), "decoder_input_ids": torch.randint(0, 64, (batch, 5))},
        lambda batch: {"labels": torch.randint(0, 64, (batch, 5))}, {"encoder.block": 4, "decoder.block": 4}, [2, 6],
    ),
    "resnet-50-layout": Family(
        lambda: tf.ResNetForImageClassification(tf.ResNetConfig(
            embedding_size=8, hidden_sizes=[8, 16, 16, 32], depths=[3, 4, 6, 3], num_labels=CLASSES,
        )),  # fmt: skip
        _pixels, _class_labels, {"resnet.encoder.stages.*.layers": 16}, [2, 6, 11],
    ),
    "resnet-small": Family(
        lambda: tf.ResNetForImageClassification(tf.ResNetConfig(
            embedding_size=8, hidden_sizes=[8, 16], depths=[2, 2], num_labels=CLASSES,
        )),  # fmt: skip
        _pixels, _class_labels, {"resnet.encoder.stages.*.layers": 4}, [1],
    ),
    "regnet": Family(
        lambda: tf.RegNetForImageClassification(tf.RegNetConfig(
            embedding_size=8, hidden_sizes=[8, 16, 16, 32], depths=[1, 2, 2, 1], groups_width=4, num_labels=CLASSES,
        )),  # fmt: skip
        _pixels, _class_labels, {"regnet.encoder.stages.*.layers": 6}, [2],
    ),
    "hiera": Family(
        lambda: tf.HieraForImageClassification(tf.HieraConfig(
            embed_dim=8, image_size=[IMAGE, IMAGE], patch_size=[3, 3], patch_stride=[2, 2], patch_padding=[1, 1],
            depths=[1, 2, 3, 1], num_heads=[1, 1, 2, 2], num_labels=CLASSES,
        )),  # fmt: skip
        _pixels, _class_labels, {"hiera.encoder.stages.*.layers": 7}, [2],
    ),
    "pvt": Family(
        lambda: tf.PvtForImageClassification(tf.PvtConfig(
            image_size=IMAGE, hidden_sizes=[8, 16, 16, 32], depths=[1, 2, 2, 1], num_attention_heads=[1, 1, 2, 2],
            num_labels=CLASSES,
        )),  # fmt: skip
        _pixels, _class_labels, {"pvt.encoder.block.*": 6}, [3],
    ),
    "vitdet": Family(
        lambda: tf.VitDetBackbone(tf.VitDetConfig(
            hidden_size=16, num_hidden_layers=4, num_attention_heads=2, mlp_ratio=2, image_size=IMAGE, patch_size=8,
            pretrain_image_size=IMAGE, out_features=["stage4"],
        )),  # fmt: skip
        _pixels, lambda batch: {"labels": torch.randn(batch)}, {"encoder.layer": 4}, [2],
        output="feature_maps", compute_loss=_feature_loss,
    ),
    "gpt2": Family(
        lambda: tf.GPT2LMHeadModel(tf.GPT2Config(
            vocab_size=64, n_embd=16, n_layer=6, n_head=2, n_positions=32, bos_token_id=0, eos_token_id=0,
        )),  # fmt: skip
        _tokens, _token_labels, {"transformer.h": 6}, [3],
    ),
    "llama": Family(
        lambda: tf.LlamaForCausalLM(tf.LlamaConfig(
            vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=6, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64,
        )),  # fmt: skip
        _tokens, _token_labels, {"model.layers": 6}, [3],
    ),
}


def build(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return FAMILIES[name].build().eval()


def inputs(name: str, batch: int = 2) -> dict[str, Any]:
    torch.manual_seed(1)
    return FAMILIES[name].inputs(batch)


def output(model: torch.nn.Module, name: str, batch: dict[str, Any]) -> torch.Tensor:
    with torch.no_grad():
        value = getattr(model(**batch), FAMILIES[name].output)
    return value[-1] if isinstance(value, tuple) else value


@pytest.mark.parametrize("name", FAMILIES)
def test_default_discovery(name):
    model = get_replacement_model(build(name), ReplacementConfig())
    assert {chain: len(blocks) for chain, blocks in model.chains.items()} == FAMILIES[name].chains
    assert sorted(model.replaced_blocks) == FAMILIES[name].replaced


@pytest.mark.parametrize("name", FAMILIES)
def test_neighbours_are_in_the_replaced_blocks_own_chain(name):
    model = get_replacement_model(build(name), ReplacementConfig(replace_interval=2))
    chain_of = {index: chain for chain, indices in model.chains.items() for index in indices}
    blocks = model.get_blocks()
    assert model.replaced_blocks
    for index in model.replaced_blocks:
        plan = replacement_state(blocks[index].module).plan
        assert (plan.previous.index, plan.next.index) == (index - 1, index + 1)
        assert chain_of[index - 1] == chain_of[index] == chain_of[index + 1]
    # The first block of every chain after the first has no neighbour before it in its chain.
    for indices in list(model.chains.values())[1:]:
        with pytest.raises(ReplacementConfigError, match=rf"\[{indices[0]}\] outside the valid range"):
            get_replacement_model(build(name), ReplacementConfig(replaced_blocks=[indices[0]]))


@pytest.mark.parametrize("name", FAMILIES)
def test_round_trip_to_the_task_class(name, tmp_path):
    model = get_replacement_model(build(name), ReplacementConfig()).eval()
    batch = inputs(name)
    expected = output(model, name, batch)
    model.save_pretrained(tmp_path / "repl")
    loaded = ReplacementModel.from_pretrained(tmp_path / "repl")
    assert torch.equal(output(loaded, name, batch), expected)  # the same weights, the same operations
    merged = loaded.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    plain = type(merged).from_pretrained(tmp_path / "merged").eval()
    assert type(plain) is type(build(name))
    merged_weights, plain_weights = merged.state_dict(), plain.state_dict()
    assert merged_weights.keys() == plain_weights.keys()
    assert all(torch.equal(merged_weights[key], plain_weights[key]) for key in merged_weights)
    merged_output = output(merged, name, batch)
    # Copied: weights loaded from safetensors lie at other memory alignments, where oneDNN's convolutions
    # round differently (a plain model saved and reloaded differs by ~1e-8 too); a copy is aligned as built.
    assert torch.equal(output(copy.deepcopy(plain), name, batch), merged_output)
    # The merged weights equal the synthesized ones, but convolutions and matmuls may pick another
    # kernel for a weight of another memory layout: fp32 rounding (eps 1.2e-7) over a few layers.
    scale = expected.abs().max().item()
    torch.testing.assert_close(merged_output, expected, rtol=0, atol=1e-5 * max(scale, 1.0))


@pytest.mark.parametrize("name", FAMILIES)
def test_two_trainer_steps_train_the_coefficients(name, tmp_path):
    family = FAMILIES[name]
    model = get_replacement_model(build(name), ReplacementConfig())
    before = {key: value.detach().clone() for key, value in model.replacement_coefficients().named_parameters()}
    torch.manual_seed(2)
    examples = [{**family.inputs(1), **family.labels(1)} for _ in range(4)]

    def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
        def join(values: list[Any]) -> Any:
            return torch.cat(values) if isinstance(values[0], torch.Tensor) else [v for value in values for v in value]

        return {key: join([item[key] for item in items]) for key in items[0]}

    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, learning_rate=0.05,
        report_to=[], save_strategy="no", use_cpu=True, logging_steps=1, remove_unused_columns=False,
    )  # fmt: skip
    trainer = ReplacementTrainer(
        model=model, args=args, train_dataset=examples, data_collator=collate, compute_loss_func=family.compute_loss
    )
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    after = dict(model.replacement_coefficients().named_parameters())
    assert before.keys() == after.keys() == {str(index) for index in family.replaced}
    assert all(not torch.equal(before[key], after[key].detach()) for key in before)


def test_target_chains_picks_the_chains_replaced():
    model = get_replacement_model(build("detr-resnet"), ReplacementConfig(target_chains=["model.backbone"]))
    assert sorted(model.replaced_blocks) == [3]
    heads = get_replacement_model(build("detr-resnet"), ReplacementConfig(target_chains=["model.encoder.layers"]))
    assert sorted(heads.replaced_blocks) == [10]
    with pytest.raises(ReplacementConfigError, match=r"target_chains=\['neck'\] names none of this model's chains"):
        get_replacement_model(build("detr-resnet"), ReplacementConfig(target_chains=["neck"]))


def test_block_path_takes_a_list_of_chains():
    stages = "backbone.encoder.stages"
    paths = [[f"{stages}.0.layers", f"{stages}.1.layers"], f"{stages}.3.layers"]
    model = get_replacement_model(build("upernet-convnext"), ReplacementConfig(block_path=paths, replace_interval=2))
    assert model.chains == {f"{stages}.*.layers": [0, 1, 2, 3], f"{stages}.3.layers": [4, 5]}
    assert sorted(model.replaced_blocks) == [1]  # a chain of 2 blocks has no block with two neighbours


def test_converting_a_backbone_in_place_is_refused_with_the_fix():
    upernet = build("upernet-convnext")
    with pytest.raises(ValueError, match=r"submodule 'backbone' of a UperNetFor.*target_chains=\['backbone'\]"):
        get_replacement_model(upernet.backbone, ReplacementConfig())
    detr = build("detr-resnet")
    with pytest.raises(ValueError, match=r"submodule 'model.backbone.model' of a DetrForObjectDetection"):
        get_replacement_model(detr.model.backbone.model, ReplacementConfig())
    # The whole model converted with that advice replaces the backbone's blocks only.
    converted = get_replacement_model(detr, ReplacementConfig(target_chains=["model.backbone.model"]))
    assert sorted(converted.replaced_blocks) == [3]
    assert not any(key.startswith("replacement") for key in upernet.state_dict())
    # A standalone backbone (not inside another model) converts, also when a plain dict holds it, and so
    # does a merged one that its former ReplacementModel still holds.
    held = {"backbone": build("vitdet")}
    merged = get_replacement_model(held["backbone"], ReplacementConfig()).merge_and_unload()
    assert get_replacement_model(merged, ReplacementConfig()).replaced_blocks == {2: "encoder.layer.2"}


def test_the_checkpoint_records_its_chains_and_blocks(tmp_path):
    model = get_replacement_model(build("t5"), ReplacementConfig())
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert (saved["format_version"], saved["block_path"], saved["replaced_blocks"]) == (
        2, [["encoder.block"], ["decoder.block"]], [2, 6]
    )
    assert model.replacement_config.block_path is None  # the live config is left as given


MAE_DECODER_1 = "decoder.decoder_layers.1"


@pytest.mark.parametrize(
    "name, interval, legacy_blocks, block, neighbours",
    [
        # Before chains: ViT-MAE's encoder and decoder were one list, encoder block 5 took decoder block 0
        # (8 wide, resampled to 16) as a neighbour.
        ("vitmae", 2, {1: "vit.layers.1", 3: "vit.layers.3", 5: "vit.layers.5", 7: MAE_DECODER_1}, 5, (4, 6)),
        # replace_interval skipped the stage-first blocks 3 and 7 it aimed at: 1 block of 16.
        ("resnet-50-layout", 4, {11: "resnet.encoder.stages.2.layers.4"}, 11, (10, 12)),
    ],
)
def test_a_format_version_1_checkpoint_loads_as_saved(name, interval, legacy_blocks, block, neighbours, tmp_path):
    old = get_replacement_model(build(name), ReplacementConfig(format_version=1, replace_interval=interval)).eval()
    assert old.replaced_blocks == legacy_blocks
    batch = inputs(name)
    expected = output(old, name, batch)
    old.save_pretrained(tmp_path / "resaved")
    old.save_pretrained(tmp_path / "v1")
    # As a version 1 writer left it: no chains, no recorded blocks, no target_chains key.
    data = json.loads((tmp_path / "v1" / CONFIG_NAME).read_text())
    del data["target_chains"]
    data.update(format_version=1, block_path=None, replaced_blocks=None)
    (tmp_path / "v1" / CONFIG_NAME).write_text(json.dumps(data))
    for directory in ("v1", "resaved"):
        loaded = ReplacementModel.from_pretrained(tmp_path / directory)
        assert loaded.replaced_blocks == legacy_blocks
        plan = replacement_state(loaded.get_blocks()[block].module).plan
        assert (plan.previous.index, plan.next.index) == neighbours
        assert torch.equal(output(loaded, name, batch), expected)


def test_find_chains_matches_the_model():
    chains = find_chains(build("vitmae"))
    assert [(chain.name, [block.name for block in chain.blocks][:1]) for chain in chains] == [
        ("vit.layers", ["vit.layers.0"]),
        ("decoder.decoder_layers", ["decoder.decoder_layers.0"]),
    ]
    assert [block.chain for chain in chains for block in chain.blocks] == [0] * 6 + [1] * 4
