"""FSDP2 sharding of RepL models (`hf_replacement.integrations.fsdp`) in one process, in a one-rank gloo group.

One rank is enough to tell a grouping that works from one that does not (a replaced block alone in
its unit reads its neighbours as sharded `DTensor`s there too) and to hold a sharded model to the
unsharded one exactly. Several processes against one are in test_cli.py (`--fsdp`).
"""

from __future__ import annotations

import copy

import pytest
import tiny_models
import torch
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from hf_replacement import ReplacementConfig, ReplacementModel, gather_state_dict, get_replacement_model, shard_model
from hf_replacement.integrations.fsdp import (
    check_deepspeed_stage,
    gather_optimizer_state_dict,
    load_full_optimizer_state_dict,
    load_full_state_dict,
    sharding_units,
)
from hf_replacement.model import coefficient_logs


def replacement_model(arch: str, **options) -> ReplacementModel:
    return get_replacement_model(tiny_models.build(arch), ReplacementConfig(**options)).train()


@pytest.mark.parametrize(
    "arch, options, units",
    [
        ("vit", {"replace_interval": 4}, [[0], [1], [2, 3, 4], [5]]),
        # blocks 1 and 3 share block 2: one unit
        ("vit", {"replace_interval": 2}, [[0, 1, 2, 3, 4], [5]]),
        # ConvNeXt 2+2+3+2: block 3 fuses stages 1 and 2, block 7 stages 2 and 3
        ("convnext", {"replace_interval": 4}, [[0], [1], [2, 3, 4], [5], [6, 7, 8]]),
        ("vit", {"replaced_blocks": [1, 4]}, [[0, 1, 2], [3, 4, 5]]),
    ],
)
def test_each_replaced_block_shares_a_unit_with_its_neighbours(arch, options, units):
    model = replacement_model(arch, **options)
    assert [[block.index for block in unit] for unit in sharding_units(model)] == units


def test_a_plain_model_has_a_unit_per_block():
    units = sharding_units(tiny_models.build("vit"))
    assert [[block.index for block in unit] for unit in units] == [[i] for i in range(6)]


def test_a_replaced_block_alone_in_its_unit_fails(process_group):
    """The premise: what `shard_model` groups, a unit per block cannot train (the neighbours stay sharded)."""
    model = replacement_model("vit", replace_interval=4)
    for block in model.get_blocks():
        fully_shard(block.module)
    fully_shard(model)
    with pytest.raises(Exception, match="mixed torch.Tensor and DTensor"):
        model(pixel_values=tiny_models.inputs())


def _train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int, seed: int) -> list[float]:
    losses = []
    for step in range(steps):
        pixels = tiny_models.inputs(batch=4, seed=seed + step)
        labels = torch.arange(4) % tiny_models.NUM_LABELS
        loss = model(pixel_values=pixels, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def _adamw(model: torch.nn.Module) -> torch.optim.AdamW:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.05)


def _assert_same_optimizer_state(actual: dict, expected: dict) -> None:
    assert actual["param_groups"] == expected["param_groups"]
    assert actual["state"].keys() == expected["state"].keys()
    for number, state in expected["state"].items():
        assert actual["state"][number].keys() == state.keys()
        for key, value in state.items():
            assert torch.equal(actual["state"][number][key], value), (number, key)


@pytest.mark.parametrize(
    "arch, options",
    [
        ("vit", {"replace_interval": 2}),
        ("convnext", {"replace_interval": 4, "coefficient_granularity": "channel", "recompute_replaced": True}),
    ],
    ids=["vit-merged-units", "convnext-stage-fusion-recompute"],
)
def test_a_sharded_model_trains_as_the_unsharded_one_and_gathers_its_state(process_group, arch, options):
    plain = replacement_model(arch, **options)
    sharded = shard_model(copy.deepcopy(plain))
    plain_optimizer, sharded_optimizer = _adamw(plain), _adamw(sharded)
    assert _train(sharded, sharded_optimizer, 2, seed=0) == _train(plain, plain_optimizer, 2, seed=0)

    weights = gather_state_dict(sharded)
    assert weights.keys() == plain.state_dict().keys()
    for key, value in plain.state_dict().items():
        assert torch.equal(weights[key], value), key
    # the unsharded optimizer's layout: a checkpoint does not depend on how the run was sharded
    _assert_same_optimizer_state(gather_optimizer_state_dict(sharded, sharded_optimizer), plain_optimizer.state_dict())
    assert coefficient_logs(sharded) == coefficient_logs(plain)

    # a fresh sharded model loaded from the gathered state continues as the unsharded one
    resumed = shard_model(replacement_model(arch, **options))
    resumed_optimizer = _adamw(resumed)
    load_full_state_dict(resumed, weights)
    load_full_optimizer_state_dict(resumed, resumed_optimizer, gather_optimizer_state_dict(sharded, sharded_optimizer))
    assert _train(resumed, resumed_optimizer, 1, seed=3) == _train(plain, plain_optimizer, 1, seed=3)
    for key, value in plain.state_dict().items():
        assert torch.equal(gather_state_dict(resumed)[key], value), key


def test_mixed_precision_computes_in_bf16_and_reports_the_fp32_coefficients(process_group):
    model = replacement_model("vit", replace_interval=4)
    with torch.no_grad():
        model.replacement_coefficients.get_parameter("3").fill_(0.501)  # bf16 would round it to 0.5
    shard_model(model, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32))
    _train(model, _adamw(model), 1, seed=0)
    with torch.no_grad():  # a forward without backward leaves the root unit gathered, in bf16
        assert model(pixel_values=tiny_models.inputs()).logits.dtype == torch.bfloat16
    coefficients = gather_state_dict(model)["replacement_coefficients.3"]
    assert coefficients.dtype == torch.float32
    a, b = coefficients[:, 0].tolist()
    assert coefficient_logs(model) == {"replacement/a/block_3": a, "replacement/b/block_3": b}
    assert a not in (0.5, 0.50390625)  # moved by the update, and no bf16 value


def test_shard_model_needs_a_process_group():
    with pytest.raises(ValueError, match="needs a process group: launch with torchrun"):
        shard_model(replacement_model("vit", replace_interval=4))


def test_what_cannot_be_done_to_a_sharded_model_is_refused_with_the_fix(process_group, tmp_path):
    deferred = ReplacementModel(tiny_models.build("vit"), ReplacementConfig(replace_interval=4), defer_replacement=True)
    with pytest.raises(ValueError, match=r"Call model.replace_blocks\(\) before shard_model"):
        shard_model(deferred)
    fully_shard(deferred)  # sharded by hand, then switched
    with pytest.raises(ValueError, match="Replace them before sharding"):
        deferred.replace_blocks()

    model = shard_model(replacement_model("vit", replace_interval=4))
    with pytest.raises(ValueError, match="already sharded"):
        shard_model(model)
    with pytest.raises(ValueError, match=r"hf_replacement.gather_state_dict\(model\)"):
        model.save_pretrained(tmp_path / "shards")
    for merge in (model.merge_and_unload, lambda: model.save_merged(tmp_path / "merged")):
        with pytest.raises(ValueError, match="ReplacementModel.from_pretrained"):
            merge()
    # the supported way: gather, save, load whole, merge
    model.save_pretrained(tmp_path / "whole", state_dict=gather_state_dict(model))
    loaded = ReplacementModel.from_pretrained(tmp_path / "whole")
    expected = tiny_models.logits(loaded(pixel_values=tiny_models.inputs()))
    torch.testing.assert_close(
        tiny_models.logits(loaded.merge_and_unload()(pixel_values=tiny_models.inputs())), expected
    )


def test_deepspeed_zero3_is_refused_pointing_to_fsdp():
    with pytest.raises(ValueError, match="ZeRO-3 .* Shard with FSDP2 instead"):
        check_deepspeed_stage(3)
    for stage in (None, 0, 1, 2):
        check_deepspeed_stage(stage)
