"""Synthesized weights are not kept for backward: autograd saves a recipe, backward rebuilds them
(`hf_replacement/saved_tensor_hooks.py`). Same gradients as keeping them, fewer saved bytes."""

from __future__ import annotations

import pytest
import tiny_models
import torch
from torch import nn

from hf_replacement import ReplacementConfig, get_replacement_model, layer
from hf_replacement.layer import is_replaced
from hf_replacement.synthesis import replacement_state
from hf_replacement.synthesis_hooks import register_synthesis_hook

# Dropout / drop-path on, so that a rebuild that drew random numbers would show.
DROPOUT = {
    "vit": dict(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1),
    "convnext": dict(drop_path_rate=0.2),  # replaced blocks 3 and 7: next neighbour wider, previous narrower
}


def make(arch: str, **config) -> nn.Module:
    model = get_replacement_model(tiny_models.build(arch, **DROPOUT[arch]), ReplacementConfig(**config)).train()
    with torch.no_grad():  # distinct coefficients, not the symmetric default
        for parameter in model.replacement_coefficients.parameters():
            parameter.copy_(torch.rand_like(parameter) + 0.25)
    return model


def set_rebuild(model: nn.Module, rebuild: bool) -> None:
    for module in model.modules():
        if is_replaced(module):
            replacement_state(module).rebuild_saved_weights = rebuild


def step(model: nn.Module, autocast: bool = False, backwards: int = 1) -> dict[str, torch.Tensor]:
    """Gradients of the parameters and the input after `backwards` backward passes of one forward (seed 0)."""
    x = tiny_models.inputs(batch=4).requires_grad_()
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = model(pixel_values=x).logits
    loss = (logits.float() * torch.linspace(-1, 1, logits.numel()).view(logits.shape)).sum()
    for number in range(backwards):
        loss.backward(retain_graph=number < backwards - 1)
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return {**grads, "input": x.grad}


def assert_same(expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor]) -> None:
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("arch", ["vit", "convnext"])
def test_rebuilt_weights_give_the_same_gradients(arch, autocast):
    model = make(arch)
    set_rebuild(model, False)
    kept = step(model, autocast)
    model.zero_grad(set_to_none=True)
    set_rebuild(model, True)
    rebuilt = step(model, autocast)
    assert_same(kept, rebuilt)
    coefficients = {f"replacement_coefficients.{i}" for i in model.replaced_blocks}
    assert coefficients <= rebuilt.keys() and all(rebuilt[name].abs().sum() > 0 for name in coefficients)


def test_saved_tensor_hooks_disabled_by_the_caller_keep_the_weights():
    """Under `disable_saved_tensors_hooks` (as torch's own compiled code runs) installing hooks raises: the
    block keeps its weights instead, with the same gradients. Fails first if torch renames
    `torch._C._autograd._saved_tensors_hooks_is_enabled` (saved_tensor_hooks.py)."""
    model = make("vit")
    rebuilt = step(model)
    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.disable_saved_tensors_hooks("hooks are off here"):
        kept = step(model)
    assert_same(rebuilt, kept)


def test_retain_graph_and_double_backward_give_the_same_gradients():
    def second_order(model: nn.Module) -> dict[str, torch.Tensor]:
        # The input gradient's norm, differentiated again: backward through the rebuilt weights' graph.
        x = tiny_models.inputs().requires_grad_()
        (grad,) = torch.autograd.grad(model(pixel_values=x).logits.pow(2).sum(), x, create_graph=True)
        grad.pow(2).sum().backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    model = make("convnext")
    results = {}
    for rebuild in (False, True):
        set_rebuild(model, rebuild)
        results[rebuild] = step(model, backwards=2)
        model.zero_grad(set_to_none=True)
        results[rebuild, "second order"] = second_order(model)
        model.zero_grad(set_to_none=True)
    assert_same(results[False], results[True])
    assert_same(results[False, "second order"], results[True, "second order"])
    once = step(model)
    model.zero_grad(set_to_none=True)
    torch.testing.assert_close(results[True]["input"], 2 * once["input"])


class SavedStorages:
    """Bytes of the storages autograd saves while active, parameters and buffers excluded."""

    def __init__(self, model: nn.Module) -> None:
        self.excluded = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
        self.storages: dict[int, int] = {}
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda tensor: tensor)

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self.excluded:
            self.storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    def __enter__(self):
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc_info) -> None:
        self.hooks.__exit__(*exc_info)


def saved_by_one_forward(model: nn.Module, monkeypatch) -> tuple[SavedStorages, dict[str, torch.Tensor]]:
    """What autograd saves in one forward (under a meter's hooks), and the synthesized weights by name."""
    weights = {}
    synthesize = layer.synthesize

    def recording(module: nn.Module) -> list[torch.Tensor]:
        values = synthesize(module)
        for tensor, value in zip(replacement_state(module).tensors, values):
            weights[f"{replacement_state(module).index}.{tensor.name}"] = (tensor, value)
        return values

    monkeypatch.setattr(layer, "synthesize", recording)
    torch.manual_seed(0)
    with SavedStorages(model) as saved:
        loss = model(pixel_values=tiny_models.inputs()).logits.sum()
    loss.backward()
    monkeypatch.undo()
    return saved, weights


@pytest.mark.parametrize("arch", ["vit", "convnext"])
def test_saved_bytes_exclude_the_synthesized_weights(arch, monkeypatch):
    model = make(arch)
    set_rebuild(model, False)
    kept, kept_weights = saved_by_one_forward(model, monkeypatch)
    set_rebuild(model, True)
    rebuilt, rebuilt_weights = saved_by_one_forward(model, monkeypatch)
    # Every synthesized tensor is saved by the layer that uses it, except the biases of Linear and
    # convolution layers, whose gradient needs no saved tensor.
    needed = {
        name: value for name, (tensor, value) in kept_weights.items()
        if not (tensor.attr == "bias" and isinstance(tensor.owner, (nn.Linear, nn.Conv2d)))
    }
    weight_bytes = sum(value.numel() * value.element_size() for value in needed.values())
    assert {value.untyped_storage().data_ptr() for value in needed.values()} <= kept.storages.keys()
    assert weight_bytes > 0.8 * sum(v.numel() * v.element_size() for _, v in kept_weights.values())
    assert sum(kept.storages.values()) - sum(rebuilt.storages.values()) == weight_bytes
    assert not {value.untyped_storage().data_ptr() for _, value in rebuilt_weights.values()} & rebuilt.storages.keys()


def synthesis_calls(model: nn.Module) -> int:
    calls = []
    handle = register_synthesis_hook(calls.append)
    try:
        step(model)
    finally:
        handle.remove()
    return len(calls)


def test_one_rebuild_per_block_and_none_inside_a_checkpoint():
    model = make("vit")
    replaced = len(model.replaced_blocks)
    assert synthesis_calls(model) == 2 * replaced  # forward, and once in backward for all the block's views
    set_rebuild(model, False)
    assert synthesis_calls(model) == replaced
    set_rebuild(model, True)
    # A checkpoint keeps none of the block's tensors and synthesizes again in its recompute: no rebuild on top.
    for setting in ({"use_reentrant": False}, {"use_reentrant": True}):
        model.activation_checkpointing_enable(setting)
        assert synthesis_calls(model) == 2 * replaced
        model.activation_checkpointing_disable()
    assert synthesis_calls(make("vit", recompute_replaced=True)) == 2 * replaced


@pytest.mark.parametrize("rebuild", [False, True])
def test_changing_a_saved_tensor_or_the_coefficients_before_backward_is_an_error(rebuild):
    model = make("vit")
    set_rebuild(model, rebuild)
    block = model.base_model.vit.layers[3]
    assert is_replaced(block)

    def change_input(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        inputs[0].mul_(2)

    # In place on the q projection's input after the projection saved it: autograd's own check, kept.
    handle = block.attention.q_proj.register_forward_hook(change_input)
    loss = model(pixel_values=tiny_models.inputs()).logits.sum()
    handle.remove()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    # Coefficients changed in place, as optimizer.step() would. Kept weights: autograd's own check on
    # what _Synthesis saved; rebuilt: checked before rebuilding (the block's backward comes first).
    loss = model(pixel_values=tiny_models.inputs()).logits.sum()
    with torch.no_grad():
        model.replacement_coefficients.get_parameter("3").mul_(2)
    with pytest.raises(RuntimeError, match="changed between forward and backward" if rebuild else "inplace"):
        loss.backward()
