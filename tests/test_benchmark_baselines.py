"""The benchmark's equal-cost baselines are what they claim: tie-k4 shares its previous neighbour's weights and
keeps sharing them through training, sd skips whole blocks at drop-k4's expected depth with the stochastic-depth
scaling and deploys the plain model, narrow has the width closest to RepL's trainable parameter count."""

from __future__ import annotations

import pytest
import torch

from benchmarks.harness import BenchmarkError, build_method_model, get_suite
from benchmarks.harness.baselines import (
    StochasticDepthMixin,
    apply_stochastic_depth,
    narrow_width,
    narrowed_config,
    remove_stochastic_depth,
)
from benchmarks.harness.measure import measure_memory
from benchmarks.harness.methods import inference_model, repl_trainable_params
from hf_replacement import find_blocks
from hf_replacement.commands.training_steps import make_optimizer, train_step
from hf_replacement.utils import count_parameters

IMAGE_SIZE = 8


def _build(method: str, model_name: str, seed: int = 0):
    return build_method_model(method, model_name, num_labels=10, image_size=IMAGE_SIZE, num_channels=1, seed=seed)


def _batch(size: int = 8) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return {
        "pixel_values": torch.randn(size, 1, IMAGE_SIZE, IMAGE_SIZE, generator=generator),
        "labels": torch.randint(0, 10, (size,), generator=generator),
    }


def _previous_neighbour_weights(model, index: int) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.get_blocks()[index - 1].module.named_parameters()}


@pytest.mark.parametrize("model_name", ["vit-mini", "convnext-mini"])
def test_tie_reuses_the_previous_neighbour_and_keeps_reusing_it_after_steps(model_name):
    built = _build("tie-k4", model_name)
    model = built.model
    # ConvNeXt's block 3 opens a wider stage than its previous neighbour: it is resampled, not tied. The tied
    # blocks are those whose previous neighbour has their shape.
    tied = [
        index for index in built.affected_blocks
        if all(w.shape == _previous_neighbour_weights(model, index)[name].shape
               for name, w in model.synthesized_weights(index).items())
    ]
    assert tied, "no same-shape replaced block to check"
    optimizer = make_optimizer(model, lr=1e-2, weight_decay=0.05)
    coefficients = {k: v.detach().clone() for k, v in model.replacement_coefficients.named_parameters()}
    assert not any(p.requires_grad for p in model.replacement_coefficients.parameters())
    before = {index: _previous_neighbour_weights(model, index) for index in tied}
    for _ in range(2):
        for index in tied:
            previous = _previous_neighbour_weights(model, index)
            synthesized = model.synthesized_weights(index)
            assert synthesized.keys() == previous.keys()
            for name, weight in synthesized.items():
                # a*w + 0*w' with a = 1: exact in floating point.
                assert torch.equal(weight, previous[name]), (index, name)
        train_step(model, optimizer, _batch())
    for index in tied:  # the step trained the shared weights: the check above compared moving tensors
        moved = _previous_neighbour_weights(model, index)
        assert any(not torch.equal(moved[name], before[index][name]) for name in moved)
    for key, value in model.replacement_coefficients.named_parameters():
        assert torch.equal(value, coefficients[key]) and value.grad is None
    trainable, _ = count_parameters(model)
    assert trainable == repl_trainable_params(_build("bp", model_name).model, 4) - 2 * len(built.affected_blocks)


def test_stochastic_depth_probability_matches_drop_k4_expected_depth():
    for model_name in ("vit-mini", "convnext-mini"):
        sd, drop = _build("sd", model_name), _build("drop-k4", model_name)
        expected_blocks = sd.num_blocks * (1 - sd.details["drop_probability"])
        assert expected_blocks == pytest.approx(sd.num_blocks - len(drop.affected_blocks))
        assert all(isinstance(b.module, StochasticDepthMixin) for b in find_blocks(sd.model))


def test_stochastic_depth_skips_or_scales_the_whole_branch_and_is_plain_in_eval():
    plain = _build("bp", "vit-mini").model.train()
    block = find_blocks(plain)[2].module
    hidden = torch.randn(4, 17, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = block(hidden)
    apply_stochastic_depth(plain, 0.5)
    outcomes = set()
    torch.manual_seed(0)
    with torch.no_grad():
        for _ in range(40):
            out = block(hidden)
            if torch.equal(out, hidden):
                outcomes.add("skipped")
            else:
                # kept: input + (branch) / (1 - p); the branch is O(1), so a few ulps of it
                torch.testing.assert_close(out, hidden + (full - hidden) / 0.5, rtol=1e-5, atol=1e-5)
                outcomes.add("kept")
        assert outcomes == {"skipped", "kept"}
        plain.eval()
        assert torch.equal(block(hidden), full)
    with pytest.raises(BenchmarkError, match=r"drop_probability=1.*\[0, 1\)"):
        apply_stochastic_depth(plain, 1.0)


def test_stochastic_depth_deploys_the_plain_model_with_the_same_weights():
    sd, bp = _build("sd", "convnext-mini"), _build("bp", "convnext-mini")
    deployed = inference_model(sd).eval()
    assert not any(isinstance(m, StochasticDepthMixin) for m in deployed.modules())
    assert type(find_blocks(deployed)[0].module) is type(find_blocks(bp.model)[0].module)
    state, reference = deployed.state_dict(), bp.model.state_dict()
    assert state.keys() == reference.keys() and all(torch.equal(state[k], reference[k]) for k in state)
    with torch.no_grad():
        assert torch.equal(deployed(**_batch()).logits, bp.model.eval()(**_batch()).logits)
    assert remove_stochastic_depth(deployed) is deployed  # nothing left to remove


@pytest.mark.parametrize("model_name", ["vit-mini", "convnext-mini", "vit-base", "convnext-tiny"])
def test_narrow_has_the_width_closest_to_repl_trainable_count(model_name):
    plain = _build("bp", model_name).model
    target = repl_trainable_params(plain, 4)
    width, params = narrow_width(plain, target)
    step = plain.config.num_attention_heads if hasattr(plain.config, "num_attention_heads") else 1

    def count(w: int) -> int:
        with torch.device("meta"):
            return sum(p.numel() for p in type(plain)(narrowed_config(plain.config, w)).parameters())

    assert count(width) == params
    assert abs(params - target) <= abs(count(width - step) - target)
    assert abs(params - target) <= abs(count(width + step) - target)


def test_narrow_model_keeps_depth_and_trains():
    built = _build("narrow", "vit-mini")
    plain = _build("bp", "vit-mini").model
    assert len(find_blocks(built.model)) == len(find_blocks(plain))
    assert built.model.config.hidden_size == built.details["widths"] < plain.config.hidden_size
    assert count_parameters(built.model)[0] == built.details["params"]
    assert built.details["target_params"] == repl_trainable_params(plain, 4)
    model = built.model.train()
    optimizer = make_optimizer(model, lr=1e-3, weight_decay=0.0)
    losses = [float(train_step(model, optimizer, _batch())) for _ in range(5)]
    assert losses[-1] < losses[0]
    with pytest.raises(BenchmarkError, match="not a multiple of the 2 heads"):
        narrowed_config(plain.config, 63)


def test_narrow_is_refused_where_models_are_fine_tuned():
    with pytest.raises(BenchmarkError, match="narrow cannot fine-tune.*--methods without it"):
        get_suite("transfer", methods=["bp", "narrow"])
    with pytest.raises(BenchmarkError, match="no pretrained weights exist at its width"):
        build_method_model("narrow", "vit-mini", 10, IMAGE_SIZE, 1, 0, pretrained="/nonexistent")


def test_stochastic_depth_memory_is_measured_at_full_depth():
    # Memory must hold the step where no block is skipped: sd's state and saved activations are bp's, to the byte.
    suite = get_suite("quick", seeds=1, epochs=1)
    batch = _batch(16)
    bp, sd = (measure_memory(suite, "vit-mini", m, batch, 10, torch.device("cpu")) for m in ("bp", "sd"))
    assert sd["saved_activation_bytes"] == bp["saved_activation_bytes"] > 0
    assert sd["state_memory_bytes"] == bp["state_memory_bytes"]
