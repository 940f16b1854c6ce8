"""Lighter surrogates (`ReplacementConfig.surrogate`): every supported family against its formula written out here.

The reference computes each used tensor of a replaced block as `a·N(p_prev) + b·N(p_next)`, where `N`
keeps the leading half of the neighbour's hidden units ("half") and resamples a neighbour of another
width with the dense rule of test_core, then runs the surrogate's formula (torch.nn.functional, no
module of the block) in place of the block, inside an untouched copy of the model fed the RepL
model's own leaves: the RepL model's outputs and every gradient must equal autograd through it.
"""

from __future__ import annotations

import copy
import gc
import itertools
import json
import os
import weakref

import pytest
import tiny_models
import torch
import torch.nn.functional as F
import transformers
from test_core import fan_in_of, loss_of, resample_reference
from tolerances import assert_fp32_close, assert_gradients_close, reduction_length
from torch.func import functional_call

from hf_replacement import ReplacementConfig, ReplacementModel, get_replacement_model
from hf_replacement.config import ReplacementConfigError
from hf_replacement.synthesis import replacement_state

TRANSFORMERS = ["vit", "deit", "deit-teacher", "beit", "dinov2", "dinov2-swiglu", "swin"]
CONVNEXTS = ["convnext", "convnextv2"]
SUPPORTED = {
    **{arch: ("mlp", "half") for arch in TRANSFORMERS + CONVNEXTS},
    "resnet": ("half",),
    "resnet-basic": ("half",),
}
CASES = [(arch, surrogate) for arch, surrogates in SUPPORTED.items() for surrogate in surrogates]

# The test's own tables: the token mixer's parameters (skipped) and the hidden units' dimensions ("half").
MIXER = {
    "vit": ("attention.", "layernorm_before."),
    "deit": ("attention.", "layernorm_before."),
    "deit-teacher": ("attention.", "layernorm_before."),
    "swin": ("attention.", "layernorm_before."),
    "beit": ("attention.", "layernorm_before.", "lambda_1", "relative_position_bias."),
    "dinov2": ("attention.", "norm1.", "layer_scale1."),
    "dinov2-swiglu": ("attention.", "norm1.", "layer_scale1."),
    "convnext": ("dwconv.",),
    "convnextv2": ("dwconv.",),
    "resnet": (),
    "resnet-basic": (),
}
_MLP = {"mlp.fc1.weight": (0,), "mlp.fc1.bias": (0,), "mlp.fc2.weight": (1,)}
_PW = {"pwconv1.weight": (0,), "pwconv1.bias": (0,), "pwconv2.weight": (1,)}
HIDDEN = {
    **dict.fromkeys(TRANSFORMERS, _MLP),
    "dinov2-swiglu": {"mlp.gate_proj.weight": (0,), "mlp.gate_proj.bias": (0,), "mlp.up_proj.weight": (0,),
                      "mlp.up_proj.bias": (0,), "mlp.down_proj.weight": (1,)},  # fmt: skip
    "convnext": _PW,
    "convnextv2": {**_PW, "grn.weight": (3,), "grn.bias": (3,)},
    "resnet": {
        "layer.0.convolution.weight": (0,), "layer.0.normalization.weight": (0,), "layer.0.normalization.bias": (0,),
        "layer.1.convolution.weight": (0, 1), "layer.1.normalization.weight": (0,), "layer.1.normalization.bias": (0,),
        "layer.2.convolution.weight": (1,),
    },
    "resnet-basic": {
        "layer.0.convolution.weight": (0,), "layer.0.normalization.weight": (0,), "layer.0.normalization.bias": (0,),
        "layer.1.convolution.weight": (1,),
    },
}


def case_id(case) -> str:
    return "-".join(str(part) for part in case)


def build(arch: str, seed: int = 0) -> torch.nn.Module:
    if arch == "dinov2-swiglu":  # DINOv2's SwiGLU MLP (gate, up, down projections)
        torch.manual_seed(seed)
        config = transformers.Dinov2Config(**tiny_models.ARCHITECTURES["dinov2"][2], use_swiglu_ffn=True)
        model = transformers.Dinov2ForImageClassification(config).eval()
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(0.1 * torch.randn_like(parameter))
    elif arch == "resnet-basic":  # ResNet-18/34's two 3x3 convolutions per block
        torch.manual_seed(seed)
        config = transformers.ResNetConfig(num_labels=tiny_models.NUM_LABELS, embedding_size=8, layer_type="basic",
                                           hidden_sizes=[8, 16, 16, 32], depths=[2, 2, 2, 2])  # fmt: skip
        model = transformers.ResNetForImageClassification(config).eval()
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(0.1 * torch.randn_like(parameter))
    else:
        model = tiny_models.build(arch, seed)
    if arch.startswith("resnet"):  # running statistics other than 0 and 1, so that their slicing shows
        generator = torch.Generator().manual_seed(seed)
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.copy_(torch.randn(module.num_features, generator=generator))
                module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
    return model


def make(arch: str, surrogate: str, granularity: str = "block", fusion: str = "resample", **extra):
    """(RepL model, untouched copy of the base model), with distinct random coefficients."""
    base = build(arch)
    reference = copy.deepcopy(base)
    config = ReplacementConfig(surrogate=surrogate, coefficient_granularity=granularity, fusion=fusion, **extra)
    model = get_replacement_model(base, config)
    with torch.no_grad():
        for parameter in model.replacement_coefficients.parameters():
            parameter.copy_(torch.rand_like(parameter) + 0.25)
    return model, reference


def kept(shape: tuple[int, ...], dims: tuple[int, ...]) -> tuple[slice, ...]:
    """The leading half (at least one) along `dims`."""
    return tuple(slice(0, max(1, size // 2)) if dim in dims else slice(None) for dim, size in enumerate(shape))


def surrogate_weights(model, reference, arch: str, surrogate: str, index: int, fusion: str, detach: bool) -> dict:
    """The replaced block's used tensors by the formula, from the RepL model's leaves."""
    granularity = model.replacement_config.coefficient_granularity
    names = {block.index: block.name for block in model.get_blocks()}
    block = reference.get_submodule(names[index])
    coefficients = model.replacement_coefficients.get_parameter(str(index))
    weights, column = {}, 0
    for name, own in block.named_parameters():
        if any(name.startswith(prefix) for prefix in MIXER[arch]):
            continue
        dims = HIDDEN[arch].get(name, ()) if surrogate == "half" else ()
        shape = own[kept(own.shape, dims)].shape
        width = {"block": 0, "tensor": 1, "channel": shape[0] if own.ndim else 1}[granularity]
        a, b = coefficients[:, column : column + max(width, 1)]
        column += width
        if granularity == "channel":
            a, b = (c.reshape(-1, *([1] * (own.ndim - 1))) for c in (a, b))
        else:
            a, b = a[0], b[0]
        value = 0
        for coefficient, neighbour in ((a, index - 1), (b, index + 1)):
            source = model.base_model.get_submodule(names[neighbour]).get_parameter(name)
            source = source.detach() if detach else source
            source = source[kept(source.shape, dims)]
            if source.shape != shape:
                if fusion == "nearest":
                    continue
                source = resample_reference(source, shape, fan_in_of(block, name, own.ndim))
            value = value + coefficient * source
        weights[name] = value
    return weights


def layer_norm(x, w, prefix, eps):
    return F.layer_norm(x, x.shape[-1:], w[f"{prefix}.weight"], w[f"{prefix}.bias"], eps)


def mlp(x, w, prefix="mlp.fc"):
    hidden = F.gelu(F.linear(x, w[f"{prefix}1.weight"], w[f"{prefix}1.bias"]))
    return F.linear(hidden, w[f"{prefix}2.weight"], w[f"{prefix}2.bias"])


def formula(arch: str, block, w: dict):
    """The surrogate of `block` (the untouched reference block: eps, running statistics) written out."""
    if arch in ("vit", "deit", "deit-teacher", "swin"):

        def forward(x, *args, **kwargs):
            out = x + mlp(layer_norm(x, w, "layernorm_after", block.layernorm_after.eps), w)
            return (out, None) if arch == "swin" else out

    elif arch == "beit":

        def forward(x, *args, **kwargs):
            return x + w["lambda_2"] * mlp(layer_norm(x, w, "layernorm_after", block.layernorm_after.eps), w)

    elif arch == "dinov2":

        def forward(x, *args, **kwargs):
            return x + w["layer_scale2.lambda1"] * mlp(layer_norm(x, w, "norm2", block.norm2.eps), w)

    elif arch == "dinov2-swiglu":

        def forward(x, *args, **kwargs):
            h = layer_norm(x, w, "norm2", block.norm2.eps)
            gate = F.silu(F.linear(h, w["mlp.gate_proj.weight"], w["mlp.gate_proj.bias"]))
            h = gate * F.linear(h, w["mlp.up_proj.weight"], w["mlp.up_proj.bias"])
            return x + w["layer_scale2.lambda1"] * F.linear(h, w["mlp.down_proj.weight"], w["mlp.down_proj.bias"])

    elif arch in CONVNEXTS:

        def forward(x):
            h = F.gelu(F.linear(layer_norm(x.permute(0, 2, 3, 1), w, "layernorm", 1e-6), w["pwconv1.weight"],
                                w["pwconv1.bias"]))  # fmt: skip
            if arch == "convnextv2":  # the mean response over the block's full width: left-out units are silent
                norms = h.pow(2).sum(dim=(1, 2), keepdim=True).sqrt()
                normalized = norms / (norms.sum(-1, keepdim=True) / block.pwconv2.in_features + 1e-6)
                h = w["grn.weight"] * (h * normalized) + w["grn.bias"] + h
            h = F.linear(h, w["pwconv2.weight"], w["pwconv2.bias"])
            if arch == "convnext":
                h = w["layer_scale_parameter"] * h
            return x + h.permute(0, 3, 1, 2)

    else:  # ResNet, eval: the running statistics of the leading channels

        def bn(h, i):
            norm = block.layer[i].normalization
            k = h.shape[1]
            return F.batch_norm(h, norm.running_mean[:k], norm.running_var[:k], w[f"layer.{i}.normalization.weight"],
                                w[f"layer.{i}.normalization.bias"], False, 0.0, norm.eps)  # fmt: skip

        def forward(x):
            if arch == "resnet-basic":
                h = F.relu(bn(F.conv2d(x, w["layer.0.convolution.weight"], padding=1), 0))
                return F.relu(x + bn(F.conv2d(h, w["layer.1.convolution.weight"], padding=1), 1))
            h = F.relu(bn(F.conv2d(x, w["layer.0.convolution.weight"]), 0))
            h = F.relu(bn(F.conv2d(h, w["layer.1.convolution.weight"], padding=1), 1))
            h = bn(F.conv2d(h, w["layer.2.convolution.weight"]), 2)
            return F.relu(x + h)

    return forward


def reference_logits(model, reference, arch: str, surrogate: str, x: torch.Tensor, fusion: str, detach: bool):
    """The reference model with each replaced block computing the formula, every tensor a RepL model leaf."""
    reference = copy.deepcopy(reference)
    for index, name in model.replaced_blocks.items():
        block = reference.get_submodule(name)
        weights = surrogate_weights(model, reference, arch, surrogate, index, fusion, detach)
        block.forward = formula(arch, block, weights)
    leaves = {n.removeprefix("base_model."): p for n, p in model.named_parameters() if n.startswith("base_model.")}
    return tiny_models.logits(functional_call(reference, leaves, kwargs={"pixel_values": x}, strict=False))


def assert_matches_formula(model, reference, arch, surrogate, fusion="resample", detach=False) -> None:
    """Logits and gradients equal the formula's up to fp32 rounding of the network's reductions."""
    x = tiny_models.inputs()
    loss_of(tiny_models.logits(model(pixel_values=x))).backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    expected = reference_logits(model, reference, arch, surrogate, x, fusion, detach)
    length = reduction_length(reference)
    assert_fp32_close(tiny_models.logits(model(pixel_values=x)), expected, length)
    loss_of(expected).backward()
    want = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert_gradients_close(got, want, length)
    assert {f"replacement_coefficients.{i}" for i in model.replaced_blocks} <= want.keys()


MATRIX = [
    (arch, surrogate, granularity, fusion, detach)
    for (arch, surrogate), granularity, fusion, detach in itertools.product(
        CASES, ["block", "tensor", "channel"], ["resample", "nearest"], [False, True]
    )
    if not (fusion == "nearest" and detach)
]


@pytest.mark.parametrize("case", MATRIX, ids=case_id)
def test_outputs_and_gradients_match_the_formula(case):
    arch, surrogate, granularity, fusion, detach = case
    model, reference = make(arch, surrogate, granularity, fusion, detach_neighbors=detach)
    assert model.replaced_blocks
    assert_matches_formula(model, reference, arch, surrogate, fusion, detach)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_unused_tensors_are_freed_and_not_synthesized(case):
    arch, surrogate = case
    base = build(arch)
    reference = copy.deepcopy(base)
    blocks = {b.index: b for b in __import__("hf_replacement").find_blocks(base)}
    index = 3
    own = dict(blocks[index].module.named_parameters())
    references = [weakref.ref(p) for p in own.values()]
    model = get_replacement_model(base, ReplacementConfig(replaced_blocks=[index], surrogate=surrogate))
    del own
    gc.collect()
    assert all(ref() is None for ref in references)
    assert not list(model.base_model.get_submodule(blocks[index].name).parameters())
    synthesized = model.synthesized_weights(index)
    names = [n for n, _ in reference.get_submodule(blocks[index].name).named_parameters()]
    used = [n for n in names if not any(n.startswith(prefix) for prefix in MIXER[arch])]
    assert list(synthesized) == used and (len(used) < len(names) or not MIXER[arch])
    for name, value in synthesized.items():
        full = reference.get_submodule(blocks[index].name).get_parameter(name)
        dims = HIDDEN[arch].get(name, ()) if surrogate == "half" else ()
        assert value.shape == full[kept(full.shape, dims)].shape, name
    trainable, total = model.get_nb_trainable_parameters()
    freed = sum(p.numel() for p in reference.get_submodule(blocks[index].name).parameters())
    coefficients = sum(p.numel() for p in model.replacement_coefficients.parameters())
    assert total == sum(p.numel() for p in reference.parameters()) - freed + coefficients


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_merged_plain_model_computes_the_surrogate(case, tmp_path):
    """A plain block can hold each surrogate: skipped token mixer zero (or an identity kernel),
    left-out hidden units zero; the merged model equals the RepL model, in eval and (no dropout) train mode."""
    arch, surrogate = case
    model, reference = make(arch, surrogate, "channel")
    x = tiny_models.inputs()
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "replacement_config.json").read_text())
    assert saved["surrogate"] == surrogate
    loaded = ReplacementModel.from_pretrained(tmp_path)
    with torch.no_grad():
        expected = tiny_models.logits(model(pixel_values=x))
        assert torch.equal(tiny_models.logits(loaded(pixel_values=x)), expected)
    merged = loaded.merge_and_unload()
    assert type(merged) is type(reference)
    assert merged.state_dict().keys() == reference.state_dict().keys()
    for key, value in reference.state_dict().items():
        assert merged.state_dict()[key].shape == value.shape, key
    with torch.no_grad():
        assert_fp32_close(tiny_models.logits(merged(pixel_values=x)), expected, reduction_length(merged))
    if arch in ("resnet", "resnet-basic", "convnext", "convnextv2"):  # train mode (no dropout): batch statistics
        model.train(), merged.train()
        with torch.no_grad():
            assert_fp32_close(
                tiny_models.logits(merged(pixel_values=x)), tiny_models.logits(model(pixel_values=x)),
                reduction_length(merged),
            )
        # The running statistics the surrogate updated (of its channels) are the merged block's, so eval agrees again.
        model.eval(), merged.eval()
        with torch.no_grad():
            assert_fp32_close(
                tiny_models.logits(merged(pixel_values=x)), tiny_models.logits(model(pixel_values=x)),
                reduction_length(merged),
            )


def test_resnet_half_trains_only_the_leading_running_statistics():
    model, reference = make("resnet", "half")
    name = model.replaced_blocks[3]
    norm = model.base_model.get_submodule(name).layer[0].normalization
    before_mean, before_var = norm.running_mean.clone(), norm.running_var.clone()
    model.train()
    x = tiny_models.inputs(batch=4)
    inputs = {}
    hook = model.base_model.get_submodule(name).register_forward_pre_hook(lambda m, a: inputs.update(x=a[0]))
    model(pixel_values=x)
    hook.remove()
    k = norm.running_mean.shape[0] // 2
    with torch.no_grad():
        weights = model.synthesized_weights(3)
        hidden = F.conv2d(inputs["x"], weights["layer.0.convolution.weight"])
    expected_mean = 0.9 * before_mean[:k] + 0.1 * hidden.mean(dim=(0, 2, 3))
    expected_var = 0.9 * before_var[:k] + 0.1 * hidden.var(dim=(0, 2, 3), unbiased=True)
    # Batch statistics: fp32 sums over the batch and positions of each channel.
    statistics_length = hidden[:, 0].numel()
    assert_fp32_close(norm.running_mean[:k], expected_mean, statistics_length)
    assert_fp32_close(norm.running_var[:k], expected_var, statistics_length)
    assert torch.equal(norm.running_mean[k:], before_mean[k:]) and torch.equal(norm.running_var[k:], before_var[k:])
    assert int(norm.num_batches_tracked) == 1


@pytest.mark.parametrize("arch, surrogate", [("resnet", "mlp"), ("custom", "mlp"), ("custom", "half")])
def test_a_family_without_the_surrogate_is_one_clear_error(arch, surrogate):
    for selection in ({}, {"replaced_blocks": [3]}):  # an interval choice does not skip it silently either
        config = ReplacementConfig(surrogate=surrogate, block_path=tiny_models.block_path(arch), **selection)
        with pytest.raises(ReplacementConfigError) as error:
            get_replacement_model(build(arch), config)
        message = str(error.value)
        assert f"surrogate={surrogate!r} is not available" in message
        assert "ViT/DeiT, BEiT, DINOv2, Swin, ConvNeXt, ConvNeXt V2" in message and "surrogate='block'" in message


def test_an_unknown_surrogate_is_refused_by_the_config():
    with pytest.raises(ReplacementConfigError, match=r"surrogate='attention' is invalid: choose one of \('block'"):
        ReplacementConfig(surrogate="attention")


@pytest.mark.parametrize(
    "setting", ["gradient_checkpointing", "recompute_replaced", pytest.param("compile", marks=pytest.mark.slow)]
)
def test_recompute_checkpointing_and_compile_give_the_same_gradients(setting):
    model, _ = make("vit", "half", "tensor")
    model.train()
    x = tiny_models.inputs()
    loss_of(model(pixel_values=x).logits).backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    run = model
    if setting == "gradient_checkpointing":
        model.activation_checkpointing_enable({"use_reentrant": False})
    elif setting == "recompute_replaced":
        replacement_state(model.base_model.vit.layers[3]).recompute = True
    else:
        run = torch.compile(model, backend="aot_eager")
    loss_of(run(pixel_values=x).logits).backward()
    assert_gradients_close({n: p.grad for n, p in model.named_parameters()}, expected, reduction_length(model))


def test_bf16_autocast_and_a_bf16_model(tmp_path):
    model, _ = make("convnextv2", "half")
    x = tiny_models.inputs()
    with torch.no_grad():
        fp32 = model(pixel_values=x).logits
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(pixel_values=x).logits
    loss_of(out.float()).backward()
    torch.testing.assert_close(out.float(), fp32, rtol=0.05, atol=0.05)
    model.to(torch.bfloat16)
    out = model(pixel_values=x.bfloat16()).logits
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), fp32, rtol=0.05, atol=0.05)
    merged = copy.deepcopy(model).merge_and_unload()
    assert {p.dtype for p in merged.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("copier", ["pickle", "deepcopy"])
def test_pickle_and_deepcopy(copier):
    import pickle

    model, _ = make("dinov2", "half")
    copied = pickle.loads(pickle.dumps(model)) if copier == "pickle" else copy.deepcopy(model)
    x = tiny_models.inputs()
    with torch.no_grad():
        assert torch.equal(copied(pixel_values=x).logits, model(pixel_values=x).logits)
    assert "surrogate 'half'" in repr(copied)


def test_repr_shows_the_surrogate_and_the_shapes_of_the_unused_layers():
    model, _ = make("vit", "half")
    text = repr(model.base_model.vit.layers[3])
    assert "surrogate 'half' (attention, layernorm_before skipped; half of the hidden units)" in text
    assert "(q_proj): SynthesizedLinear(in_features=16, out_features=16, bias=True)" in text
    assert not list(model.base_model.vit.layers[3].parameters())


def test_ddp_finds_every_parameter_used(process_group):
    """DDP without find_unused_parameters: a second step fails if any parameter got no gradient."""
    from torch.nn.parallel import DistributedDataParallel

    model, _ = make("swin", "half")
    model.train()
    wrapped = DistributedDataParallel(model)
    for _ in range(2):
        loss_of(wrapped(pixel_values=tiny_models.inputs()).logits).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_fsdp2_trains_like_one_process_without_sharding(process_group):
    """FSDP2 (`fully_shard`) with each replaced block grouped with its neighbours: the same gradients."""
    from torch.distributed.fsdp import fully_shard

    model, _ = make("convnext", "half")
    model.train()
    x = tiny_models.inputs()
    loss_of(model(pixel_values=x).logits).backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    length = reduction_length(model)  # of the whole tensors, before they are sharded
    model.zero_grad(set_to_none=True)
    blocks = model.get_blocks()
    grouped = {i + d for i in model.replaced_blocks for d in (-1, 0, 1)}
    for index in model.replaced_blocks:
        fully_shard([blocks[index + d].module for d in (-1, 0, 1)])
    for block in blocks:
        if block.index not in grouped:
            fully_shard(block.module)
    fully_shard(model)
    loss_of(model(pixel_values=x).logits).backward()
    sharded = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
    assert_gradients_close(sharded, expected, length)


@pytest.mark.slow
def test_launcher_trains_evaluates_and_merges_a_surrogate(tmp_path, capsys):
    from hf_replacement.commands.cli import main

    out = tmp_path / "run"
    argv = ["--model", "vit-mini", "--dataset", "digits", "--max-train-samples", "128", "--max-eval-samples", "64",
            "--batch-size", "32"]  # fmt: skip
    assert main(["train", *argv, "--epochs", "1", "--surrogate", "half", "--output-dir", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["replacement_config"]["surrogate"] == "half"
    assert json.loads((out / "replacement_config.json").read_text())["surrogate"] == "half"
    capsys.readouterr()
    assert main(["merge", str(out), str(tmp_path / "merged")]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "merged"), "--max-eval-samples", "64"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == pytest.approx(results["accuracy"])
    assert os.path.isfile(tmp_path / "merged" / "model.safetensors")


def test_trainer_trains_and_checkpoints_a_surrogate(tmp_path):
    from test_trainer import dataset, tiny_vit, training_args

    from hf_replacement import ReplacementTrainer

    model = ReplacementModel(tiny_vit(), ReplacementConfig(replace_interval=2, surrogate="mlp"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = ReplacementTrainer(model, training_args(tmp_path), train_dataset=dataset())
    trainer.train()
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters() if "coefficients" in n)
    loaded = ReplacementModel.from_pretrained(tmp_path / "checkpoint-4")
    assert loaded.replacement_config.surrogate == "mlp"
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(pixel_values=x).logits, model.eval()(pixel_values=x).logits)
