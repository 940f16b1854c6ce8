"""The core matrix: architectures × coefficient granularity × fusion × detach, against a reference.

The reference is written here independently of `hf_replacement.layer` and `.fusion`: the replaced
block's weights are computed from the neighbours' tensors with the formula (and the resampling rule as
a dense matrix) and fed to an untouched copy of the model through `torch.func.functional_call`.
"""

from __future__ import annotations

import copy
import gc
import itertools
import math
import os
import weakref

import pytest
import tiny_models
import torch
from safetensors import safe_open
from tolerances import assert_fp32_close, assert_gradients_close, reduction_length
from torch.func import functional_call

from hf_replacement import (
    ReplacementConfig,
    ReplacementModel,
    find_chains,
    get_replacement_model,
    resampling,
)
from hf_replacement import synthesis as synthesis_module
from hf_replacement.layer import ReplacementCoefficients, apply_plan, is_replaced
from hf_replacement.reference import reference_synthesize
from hf_replacement.resampling import DimResample, resample_matrix, resample_plan
from hf_replacement.selection import select_blocks
from hf_replacement.synthesis import _Synthesis, replacement_state, synthesize

ARCHITECTURES = list(tiny_models.ARCHITECTURES)
GRANULARITIES = ["block", "tensor", "channel"]
MATRIX = list(itertools.product(ARCHITECTURES, GRANULARITIES, ["resample", "nearest"], [False, True]))


def matrix_id(case) -> str:
    arch, granularity, fusion, detach = case
    return f"{arch}-{granularity}-{fusion}{'-detach' if detach else ''}"


def make(arch: str, granularity: str = "block", fusion: str = "resample", detach: bool = False, **extra):
    """(RepL model, untouched reference copy of the base model)."""
    base = tiny_models.build(arch)
    reference = copy.deepcopy(base)
    config = ReplacementConfig(
        coefficient_granularity=granularity,
        fusion=fusion,
        detach_neighbors=detach,
        block_path=tiny_models.block_path(arch),
        **extra,
    )
    model = get_replacement_model(base, config)
    with torch.no_grad():  # distinct, non-trivial coefficients per column
        for parameter in model.replacement_coefficients.parameters():
            parameter.copy_(torch.rand_like(parameter) + 0.25)
    return model, reference


def dense_rule(source: int, target: int, fan_in: bool) -> torch.Tensor:
    """The resampling rule of resampling.py's docstring as a dense float64 matrix: linear interpolation
    (align_corners), each row's deviation from the mean rescaled by 1/||row||, sqrt(n/m) on fan-in."""
    if target == 1:
        positions = torch.tensor([(source - 1) / 2], dtype=torch.float64)
    else:
        positions = torch.arange(target, dtype=torch.float64) * (source - 1) / (target - 1)
    interpolation = torch.zeros(target, source, dtype=torch.float64)
    for row, position in enumerate(positions.tolist()):
        lower = min(math.floor(position), source - 1)
        upper = min(lower + 1, source - 1)
        interpolation[row, lower] += 1 - (position - lower)
        interpolation[row, upper] += position - lower
    row_scale = interpolation.norm(dim=1, keepdim=True).reciprocal()
    matrix = row_scale * interpolation + (1 - row_scale) / source
    return matrix * math.sqrt(source / target) if fan_in else matrix


def resample_reference(tensor: torch.Tensor, shape: torch.Size, fan_in: set[int]) -> torch.Tensor:
    for dim, (source, target) in enumerate(zip(tensor.shape, shape)):
        if source != target:
            matrix = dense_rule(source, target, dim in fan_in).to(tensor.dtype)
            moved = tensor.movedim(dim, 0)
            rows = (matrix @ moved.reshape(source, -1)).reshape(target, *moved.shape[1:])
            tensor = rows.movedim(0, dim)
    return tensor


def fan_in_of(module: torch.nn.Module, name: str, ndim: int) -> set[int]:
    owner = module.get_submodule(name.rpartition(".")[0])
    if not name.endswith("weight") or ndim < 2:
        return set()
    if isinstance(owner, torch.nn.Linear):
        return {1}
    if isinstance(owner, torch.nn.modules.conv._ConvNd):
        return set(range(1, ndim))
    return set()


def reference_weights(
    model: ReplacementModel, reference: torch.nn.Module, fusion: str, detach: bool
) -> dict[str, torch.Tensor]:
    """Every parameter of the plain model, the replaced blocks' computed from the formula.

    Tensors are the RepL model's own leaves (neighbours, coefficients), so autograd on this
    reference gives the gradients the RepL model must have.
    """
    granularity = model.replacement_config.coefficient_granularity
    weights = dict(model.base_model.named_parameters())
    names = {block.index: block.name for block in model.get_blocks()}
    for index, block_name in model.replaced_blocks.items():
        coefficients = model.replacement_coefficients.get_parameter(str(index))
        block = reference.get_submodule(block_name)
        column = 0
        for name, original in block.named_parameters():
            shape = original.shape
            width = {"block": 0, "tensor": 1, "channel": shape[0] if original.ndim else 1}[granularity]
            a = coefficients[0, column : column + max(width, 1)]
            b = coefficients[1, column : column + max(width, 1)]
            column += width
            if granularity == "channel":
                a, b = (c.reshape(-1, *([1] * (original.ndim - 1))) for c in (a, b))
            else:
                a, b = a[0], b[0]
            value = 0
            for coefficient, neighbour in ((a, index - 1), (b, index + 1)):
                source = weights[f"{names[neighbour]}.{name}"]
                if detach:
                    source = source.detach()
                if source.shape != shape:
                    if fusion == "nearest":
                        continue
                    source = resample_reference(source, shape, fan_in_of(block, name, original.ndim))
                value = value + coefficient * source
            weights[f"{block_name}.{name}"] = value
    return weights


def loss_of(output: torch.Tensor) -> torch.Tensor:
    probe = torch.linspace(-1, 1, output.numel()).reshape(output.shape)
    return (output * probe).sum()


def assert_matches_reference(model, reference, fusion_mode: str, detach: bool) -> None:
    """The RepL model's logits and every gradient equal autograd through the formula, fed to `reference`,
    up to fp32 rounding of the network's reductions (the fused path sums in another order)."""
    x = tiny_models.inputs()
    loss_of(tiny_models.logits(model(pixel_values=x))).backward()
    replacement_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    weights = reference_weights(model, reference, fusion_mode, detach)
    expected = tiny_models.logits(functional_call(reference, weights, kwargs={"pixel_values": x}))
    length = reduction_length(reference)
    assert_fp32_close(tiny_models.logits(model(pixel_values=x)), expected, length)
    loss_of(expected).backward()
    reference_grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert_gradients_close(replacement_grads, reference_grads, length)
    coefficient_names = {f"replacement_coefficients.{i}" for i in model.replaced_blocks}
    assert coefficient_names <= reference_grads.keys()
    blocks = model.get_blocks()
    neighbour_prefixes = {f"base_model.{blocks[i + d].name}." for i in model.replaced_blocks for d in (-1, 1)}
    neighbour_grads = [name for name in reference_grads if any(name.startswith(p) for p in neighbour_prefixes)]
    assert bool(neighbour_grads)  # the downstream loss always reaches the neighbours' own use


@pytest.mark.parametrize("case", MATRIX, ids=matrix_id)
def test_forward_and_gradients_match_reference(case):
    arch, granularity, fusion_mode, detach = case
    model, reference = make(arch, granularity, fusion_mode, detach)
    assert_matches_reference(model, reference, fusion_mode, detach)


RESAMPLED_ARCHITECTURES = ["convnext", "convnextv2", "swin", "resnet"]


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("arch", RESAMPLED_ARCHITECTURES)
def test_structured_resampling_matches_reference(arch, granularity, monkeypatch):
    """The tiny models' tensors are small enough for dense resampling; force the structured form."""
    monkeypatch.setattr(resampling, "DENSE_LIMIT", 0)
    model, reference = make(arch, granularity)
    steps = [
        step
        for block in model.get_blocks()
        if replacement_state(block.module) is not None
        for term in replacement_state(block.module).program.terms
        for step, _ in term.resample
    ]
    assert steps and not any(step.dense for step in steps)
    # Gathers and a mean instead of a matrix product: equal up to float32 rounding.
    assert_matches_reference(model, reference, "resample", False)


@pytest.mark.parametrize(
    "source, target, dense",
    [
        ((64,), (32,), True),
        ((128,), (64,), True),
        ((256,), (128,), False),
        ((64, 64), (32, 32), True),
        ((768, 3072), (384, 1536), False),
    ],
)
def test_dense_resampling_only_with_a_small_table(source, target, dense):
    """A dense matrix is kept as a buffer of the replaced block: only while it is small and cheap."""
    steps = resample_plan(torch.Size(source), torch.Size(target), set())
    assert [step.dense for step in steps] == [dense] * len(steps)
    for step in steps:
        entries = sum(table.numel() for table in step.tables(torch.float32))
        if step.dense:
            assert entries <= resampling.DENSE_TABLE_LIMIT
        else:  # linear in the sizes: the forward table (2 indices, 3 weights per target entry) and the transposed
            limit = 5 * step.target_size + 2 * resampling.TRANSPOSED_GATHER_LIMIT * 2 * step.target_size
            assert entries <= limit


@pytest.mark.parametrize("case", MATRIX, ids=matrix_id)
def test_reference_synthesis_equals_formula(case):
    """The library's plain-autograd reference against the formula written out in this file."""
    arch, granularity, fusion, detach = case
    model, reference = make(arch, granularity, fusion, detach)
    weights = reference_weights(model, reference, fusion, detach)
    for index, block_name in model.replaced_blocks.items():
        module = model.base_model.get_submodule(block_name)
        names = [name for name, _ in reference.get_submodule(block_name).named_parameters()]
        values = reference_synthesize(module)
        assert len(values) == len(names)
        assert list(model.synthesized_weights(index)) == names
        for name, value, shipped in zip(names, values, model.synthesized_weights(index).values()):
            expected = weights[f"{block_name}.{name}"].detach()
            atol = resampled_atol(expected)
            torch.testing.assert_close(value.detach(), expected, rtol=0, atol=atol)
            torch.testing.assert_close(shipped, expected, rtol=0, atol=atol)


def resampled_atol(expected: torch.Tensor) -> float:
    """fp32 rounding of a weight resampled along its dimensions in another order than this file's
    formula (dimension order): each step is a length-n fp32 product whose rows have norm about 1, so
    each rounds by at most about n·eps·max|value|, for n up to the largest dimension. Exact-order
    values (no resampling) differ by at most an ulp of the largest value."""
    eps = torch.finfo(torch.float32).eps
    largest = float(expected.abs().max()) if expected.numel() else 0.0
    return max(eps * largest, expected.ndim * max(expected.shape, default=1) * eps * largest)


@pytest.mark.parametrize("case", MATRIX, ids=matrix_id)
def test_fused_synthesis_equals_reference(case):
    """The fused node (`synthesize`) against `reference_synthesize`: values, and the gradients of a
    random linear function of the weights into the coefficients and both neighbours (fp32 rounding)."""
    arch, granularity, fusion, detach = case
    model, _ = make(arch, granularity, fusion, detach)
    leaves = [p for p in model.parameters() if p.requires_grad]
    generator = torch.Generator().manual_seed(0)
    for block_name in model.replaced_blocks.values():
        module = model.base_model.get_submodule(block_name)
        fused, expected = synthesize(module), reference_synthesize(module)
        assert [w.shape for w in fused] == [w.shape for w in expected]
        for value, reference_value in zip(fused, expected):
            torch.testing.assert_close(value, reference_value, rtol=0, atol=resampled_atol(reference_value))
        probes = [torch.randn(w.shape, generator=generator) for w in fused]
        fused_grads = torch.autograd.grad(fused, leaves, probes, allow_unused=True)
        reference_grads = torch.autograd.grad(expected, leaves, probes, allow_unused=True)
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        assert [got is None for got in fused_grads] == [want is None for want in reference_grads]
        # A coefficient's gradient sums a product over every synthesized entry: fp32 sums of that length.
        length = sum(w.numel() for w in fused)
        assert_gradients_close(
            {n: g for n, g in zip(names, fused_grads) if g is not None},
            {n: g for n, g in zip(names, reference_grads) if g is not None},
            length,
        )


def test_synthesis_hook_sees_every_synthesis():
    """One call per replaced block in forward; a recompute in backward synthesizes again."""
    from hf_replacement.synthesis_hooks import register_synthesis_hook

    model, _ = make("vit", recompute_replaced=True)
    seen: list[torch.nn.Module] = []
    handle = register_synthesis_hook(seen.append)
    loss_of(tiny_models.logits(model(pixel_values=tiny_models.inputs()))).backward()
    replaced = [model.base_model.get_submodule(name) for name in model.replaced_blocks.values()]
    assert len(seen) == 2 * len(replaced) and set(map(id, seen)) == set(map(id, replaced))
    handle.remove()
    model(pixel_values=tiny_models.inputs())
    assert len(seen) == 2 * len(replaced)


@pytest.mark.parametrize("case", [c for c in MATRIX if not c[3]], ids=matrix_id)
def test_merge_and_save_round_trip(case, tmp_path):
    arch, granularity, fusion, _ = case
    model, reference = make(arch, granularity, fusion)
    x = tiny_models.inputs()
    with torch.no_grad():
        expected = tiny_models.logits(model(pixel_values=x))
    if arch == "custom":
        model.save_pretrained(tmp_path)
        loaded = ReplacementModel.from_pretrained(tmp_path, model=tiny_models.CustomModel())
    else:
        model.save_pretrained(tmp_path)
        loaded = ReplacementModel.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(tiny_models.logits(loaded(pixel_values=x)), expected)
    for key, value in model.replacement_coefficients.state_dict().items():
        assert torch.equal(loaded.replacement_coefficients.state_dict()[key], value)

    merged = loaded.merge_and_unload()
    assert [type(m) for m in merged.modules()] == [type(m) for m in reference.modules()]  # no swapped class left
    assert not hasattr(merged, "replacement_coefficients")
    assert merged.state_dict().keys() == reference.state_dict().keys()
    with torch.no_grad():  # merged weights equal the synthesized ones up to the synthesis' rounding
        assert_fp32_close(tiny_models.logits(merged(pixel_values=x)), expected, reduction_length(merged))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_checkpoint_is_compact_by_replaced_bytes(arch, tmp_path):
    model, reference = make(arch)
    model.save_pretrained(tmp_path / "repl")
    with safe_open(tmp_path / "repl" / "model.safetensors", "pt") as handle:
        saved = {key: handle.get_tensor(key) for key in handle.keys()}
    replaced_bytes = sum(
        p.numel() * p.element_size()
        for i, name in model.replaced_blocks.items()
        for p in reference.get_submodule(name).parameters()
    )
    coefficient_bytes = sum(p.numel() * 4 for p in model.replacement_coefficients.parameters())
    full_bytes = sum(t.numel() * t.element_size() for t in reference.state_dict().values())
    assert sum(t.numel() * t.element_size() for t in saved.values()) == full_bytes - replaced_bytes + coefficient_bytes
    for name in model.replaced_blocks.values():
        assert not any(
            key.startswith(f"base_model.{name}.") and key.split(".")[-1] in ("weight", "bias") and "resample" not in key
            for key in saved
            if key.rpartition(".")[0] in dict(reference.get_submodule(name).named_modules(prefix=name))
        )


@pytest.mark.parametrize("arch", ["vit", "convnext", "resnet", "custom"])
def test_freed_parameters_are_gone(arch):
    base = tiny_models.build(arch)
    config = ReplacementConfig(block_path=tiny_models.block_path(arch))
    total_before = sum(p.numel() for p in base.parameters())
    blocks = {b.index: b for b in __import__("hf_replacement").find_blocks(base, config.block_path)}
    replaced_names = [blocks[i].name for i in range(3, len(blocks) - 1, 4)]
    references = [weakref.ref(p) for name in replaced_names for p in base.get_submodule(name).parameters()]
    freed = sum(p.numel() for name in replaced_names for p in base.get_submodule(name).parameters())
    model = get_replacement_model(base, config)
    gc.collect()
    assert references and all(ref() is None for ref in references)
    coefficient_count = sum(p.numel() for p in model.replacement_coefficients.parameters())
    trainable, total = model.get_nb_trainable_parameters()
    assert total == trainable == total_before - freed + coefficient_count
    for name in replaced_names:
        assert not list(model.base_model.get_submodule(name).parameters())
        block = model.base_model.get_submodule(name)
        for parameter_name in dict(blocks[0].module.named_parameters()):
            owner_name, _, attr = parameter_name.rpartition(".")
            # Read between forwards: an error that says why, and `hasattr` stays False.
            with pytest.raises(AttributeError, match=f"{name}.{parameter_name} does not exist between forwards"):
                getattr(block.get_submodule(owner_name), attr)
        assert not any(k.startswith(f"base_model.{name}.") for k, _ in model.named_parameters())


def test_print_trainable_parameters(capsys):
    model, _ = make("vit")
    model.print_trainable_parameters()
    trainable, total = model.get_nb_trainable_parameters()
    assert capsys.readouterr().out.startswith(
        f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: 100.0000 "
        "|| replaced blocks: 3 (of 6)"
    )


def test_merged_model_loads_with_transformers_alone(tmp_path):
    from transformers import AutoModelForImageClassification

    model, _ = make("convnext")
    x = tiny_models.inputs()
    with torch.no_grad():
        expected = model(pixel_values=x).logits
    model.merge_and_unload().save_pretrained(tmp_path)
    plain = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    assert type(plain).__name__ == "ConvNextForImageClassification"
    with torch.no_grad():
        assert_fp32_close(plain(pixel_values=x).logits, expected, reduction_length(plain))


@pytest.mark.parametrize("setting", ["gradient_checkpointing", "recompute_replaced"])
def test_recomputation_gives_same_gradients(setting):
    model, _ = make("vit", granularity="tensor")
    model.train()
    x = tiny_models.inputs()
    loss_of(model(pixel_values=x).logits).backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    if setting == "gradient_checkpointing":
        model.activation_checkpointing_enable({"use_reentrant": False})
        assert model.base_model.is_gradient_checkpointing
    else:
        model.replacement_config.recompute_replaced = True
        for block in model.get_blocks():
            if replacement_state(block.module) is not None:
                replacement_state(block.module).recompute = True
    loss_of(model(pixel_values=x).logits).backward()
    # The recompute runs the same kernels; gradients reaching a neighbour accumulate in another order.
    assert_gradients_close({n: p.grad for n, p in model.named_parameters()}, expected, reduction_length(model))


def test_recompute_replaced_config_gives_same_gradients():
    eager, _ = make("convnext")
    recomputed, _ = make("convnext", recompute_replaced=True)
    recomputed.load_state_dict(eager.state_dict())
    x = tiny_models.inputs()
    for model in (eager, recomputed):
        loss_of(model(pixel_values=x).logits).backward()
    assert_gradients_close(
        {n: q.grad for n, q in recomputed.named_parameters()},
        {n: p.grad for n, p in eager.named_parameters()},
        reduction_length(eager),
    )


def test_bf16_autocast_and_half_model_keep_fp32_coefficients():
    model, _ = make("vit")
    x = tiny_models.inputs()
    with torch.no_grad():
        fp32 = model(pixel_values=x).logits
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(pixel_values=x).logits
    loss_of(out.float()).backward()
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), fp32, rtol=0.05, atol=0.05)
    coefficients = model.replacement_coefficients.get_parameter("3")
    assert coefficients.dtype == torch.float32 and coefficients.grad is not None and coefficients.grad.abs().sum() > 0

    model.to(torch.bfloat16)
    assert coefficients.dtype == torch.float32
    assert model.base_model.vit.layers[2].attention.q_proj.weight.dtype == torch.bfloat16
    out = model(pixel_values=x.bfloat16()).logits
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), fp32, rtol=0.05, atol=0.05)
    fp32_grad, coefficients.grad = coefficients.grad, None
    loss_of(out.float()).backward()
    assert coefficients.grad.dtype == torch.float32
    torch.testing.assert_close(coefficients.grad, fp32_grad, rtol=0.05, atol=0.05)


@pytest.mark.slow
@pytest.mark.parametrize("synthesis_in_graph", [True, False])  # False: the path torch before 2.13 takes
def test_torch_compile_matches_eager(synthesis_in_graph, monkeypatch):
    if not synthesis_in_graph:
        monkeypatch.setattr(synthesis_module, "_apply_synthesis", torch.compiler.disable(_Synthesis.apply))
    torch._dynamo.reset()
    model, _ = make("vit")
    x = tiny_models.inputs()
    loss_of(model(pixel_values=x).logits).backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=False)
    out = compiled(pixel_values=x).logits
    loss_of(out).backward()
    assert_gradients_close({n: p.grad for n, p in model.named_parameters()}, expected, reduction_length(model))


RESAMPLE_CASES = [
    # (tensor shape, dim, target size): up- and downsampling, equal size, 1 entry, each position of dim
    ((7,), 0, 12),
    ((12,), 0, 7),
    ((5,), 0, 5),
    ((6,), 0, 1),
    ((1,), 0, 4),
    ((9, 4), 0, 16),
    ((16, 4), 0, 9),
    ((4, 9), 1, 16),
    ((4, 16), 1, 9),
    ((4, 8), 1, 8),
    ((3, 10, 2, 2), 1, 6),
    ((3, 6, 2, 2), 1, 10),
    ((10, 1, 3, 3), 0, 20),
    ((2, 3, 5), 2, 11),
]


@pytest.mark.parametrize("transposed", ["gathered", "scattered"])
@pytest.mark.parametrize("fan_in", [False, True])
@pytest.mark.parametrize("case", RESAMPLE_CASES, ids=str)
def test_structured_resampling_equals_dense_rule(case, fan_in, transposed, monkeypatch):
    """Both forms of the transposed step: gathers over its table, or index_add_ where that table would be large."""
    if transposed == "scattered":
        monkeypatch.setattr(resampling, "TRANSPOSED_GATHER_LIMIT", 0)
    shape, dim, target = case
    source = shape[dim]
    matrix = dense_rule(source, target, fan_in)
    torch.testing.assert_close(resample_matrix(source, target, fan_in), matrix, rtol=0, atol=1e-12)
    generator = torch.Generator().manual_seed(0)
    tensor = torch.randn(shape, generator=generator)
    expected = torch.tensordot(matrix.float(), tensor, dims=([1], [dim])).movedim(0, dim)
    grad = torch.randn(expected.shape, generator=generator)
    expected_transposed = torch.tensordot(matrix.T.float(), grad, dims=([1], [dim])).movedim(0, dim)
    for dense in (False, True):
        step = DimResample(dim, source, target, fan_in, dense, len(shape))
        tables = step.tables(torch.float32)
        assert dense or len(tables) == (4 if transposed == "gathered" else 2) + (dim == 0)  # dim 0: bags of rows
        # Gathers and means against a matrix product over the dimension: fp32 sums of its length.
        assert_fp32_close(step.apply(tensor, tables), expected, max(source, target))
        assert_fp32_close(step.apply_transposed(grad, tables), expected_transposed, max(source, target))
        # A 0-dim coefficient folded into the step's table: the product of the coefficient and the step.
        scale = torch.tensor(0.37)
        assert_fp32_close(step.apply(tensor, tables, scale), scale * expected, max(source, target))


@pytest.mark.parametrize("case", RESAMPLE_CASES, ids=str)
def test_structured_resampling_in_bf16(case):
    """bf16 tensors and tables (a bf16 model): the step in bf16 against the dense rule in float64. Each
    result entry is a few bf16 products and sums of values rounded to bf16 (eps relative each), its
    mean term a sum over the dimension: bf16 rounding of a sum of that length at the result's scale."""
    shape, dim, target = case
    generator = torch.Generator().manual_seed(0)
    tensor = torch.randn(shape, generator=generator, dtype=torch.float64)
    matrix = dense_rule(shape[dim], target, True)
    expected = torch.tensordot(matrix, tensor, dims=([1], [dim])).movedim(0, dim)
    grad = torch.randn(expected.shape, generator=generator, dtype=torch.float64)
    expected_transposed = torch.tensordot(matrix.T, grad, dims=([1], [dim])).movedim(0, dim)
    eps = torch.finfo(torch.bfloat16).eps
    for dense in (False, True):
        step = DimResample(dim, shape[dim], target, True, dense, len(shape))
        tables = step.tables(torch.bfloat16)
        for got, want in (
            (step.apply(tensor.bfloat16(), tables), expected),
            (step.apply_transposed(grad.bfloat16(), tables), expected_transposed),
        ):
            assert got.dtype == torch.bfloat16
            atol = 4 * eps * math.sqrt(max(shape[dim], target)) * float(want.abs().max())
            torch.testing.assert_close(got.double(), want, rtol=0, atol=atol)


class StagedBlock(torch.nn.Module):
    """Every kind of tensor a block holds: vector, linear and convolution weights, a 0-dim scale."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(width)
        self.linear = torch.nn.Linear(width, 2 * width)
        self.conv = torch.nn.Conv2d(width, width, 2)
        self.scale = torch.nn.Parameter(torch.randn(()))


class StagedModel(torch.nn.Module):
    def __init__(self, widths: tuple[int, ...]) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList(StagedBlock(width) for width in widths)


@pytest.mark.parametrize("form", ["dense", "structured"])
@pytest.mark.parametrize("fusion_mode", ["resample", "nearest"])
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_synthesis_gradcheck(granularity, fusion_mode, form, monkeypatch):
    """The fused synthesis node's backward against finite differences, float64, small tensors."""
    monkeypatch.setattr(resampling, "DENSE_LIMIT", 2**40 if form == "dense" else 0)
    torch.manual_seed(0)
    # Block 1: previous neighbour narrower (upsampled), next wider (downsampled); block 3: next the same.
    # With fusion="nearest" a tensor of a neighbour of another width is left out (one term).
    widths = (2, 3, 5, 4, 4) if fusion_mode == "resample" else (3, 3, 5, 4, 4)
    model = get_replacement_model(
        StagedModel(widths),
        ReplacementConfig(
            block_path="blocks", replaced_blocks=[1, 3], coefficient_granularity=granularity, fusion=fusion_mode
        ),
    )
    for index in (1, 3):
        module = model.base_model.blocks[index]
        state = replacement_state(module)
        coefficients = torch.rand(state.coefficients.get_parameter(str(index)).shape, dtype=torch.float64) + 0.25
        sources = [owner._parameters[attr].detach().double() for owner, attr in state.neighbours]
        tables = [
            module._buffers[name].double() if module._buffers[name].is_floating_point() else module._buffers[name]
            for name in state.table_names
        ]
        inputs = [coefficients.requires_grad_(), *(s.requires_grad_() for s in sources)]
        assert torch.autograd.gradcheck(
            lambda *args: _Synthesis.apply(state.program, *args, *tables), inputs, eps=1e-6, atol=1e-8
        )
        shapes = [tuple(p.shape) for p in StagedBlock(widths[index]).parameters()]
        assert [tuple(w.shape) for w in _Synthesis.apply(state.program, *inputs, *tables)] == shapes


def test_each_synthesized_tensor_has_exactly_one_forward_path():
    """`Program` decides once how forward writes each tensor from its first term. Every tensor gets exactly
    one path, and these configurations reach all four (their values are checked against the reference
    in this file and, for "half", in test_surrogates)."""
    reached = set()
    for arch, granularity in itertools.product(["vit", "convnext", "resnet"], ["block", "channel"]):
        config = ReplacementConfig(surrogate="half", coefficient_granularity=granularity)
        model = get_replacement_model(tiny_models.build(arch), config)
        for block in model.get_blocks():
            state = replacement_state(block.module)
            if state is None:
                continue
            program = state.program
            paths = {
                "plain": program.plain,
                "folded": program.folded,
                "scaled_in_place": program.scaled_in_place,
                "narrowed": program.narrowed,
            }
            assert sorted(o for outputs in paths.values() for o in outputs) == list(range(len(program.firsts)))
            for path, outputs in paths.items():
                for output in outputs:
                    steps = [step for step, _ in program.terms[program.firsts[output]].resample]
                    resampled = any(isinstance(step, DimResample) for step in steps)
                    assert (path == "plain") == (not steps)
                    assert (path == "narrowed") == (bool(steps) and not resampled)
                    if path == "folded":
                        assert program.coefficient_shapes[output] == () and isinstance(steps[-1], DimResample)
            reached |= {path for path, outputs in paths.items() if outputs}
    assert reached == {"plain", "folded", "scaled_in_place", "narrowed"}


def test_fused_linear_keeps_output_scale():
    torch.manual_seed(0)
    source = torch.nn.Linear(256, 128)
    torch.nn.init.normal_(source.weight, std=256**-0.5)
    for target_out, target_in in [(256, 512), (64, 128), (200, 300)]:
        matrix_out = resample_matrix(128, target_out, fan_in=False).float()
        matrix_in = resample_matrix(256, target_in, fan_in=True).float()
        fused = matrix_out @ source.weight.detach() @ matrix_in.T
        x = torch.randn(4096, target_in)
        scale = (x @ fused.T).std() / x.std()
        assert abs(scale.item() - 1) < 0.05, (target_out, target_in, scale)
        ones = resample_matrix(128, target_out, fan_in=False) @ torch.ones(128, dtype=torch.float64)
        torch.testing.assert_close(ones, torch.ones(target_out, dtype=torch.float64))


def test_coefficients_are_trained_by_any_optimizer():
    model, _ = make("convnext", granularity="channel")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = {k: v.clone() for k, v in model.replacement_coefficients.state_dict().items()}
    loss_of(model(pixel_values=tiny_models.inputs()).logits).backward()
    optimizer.step()
    assert all(not torch.equal(before[k], v) for k, v in model.replacement_coefficients.state_dict().items())
    assert {id(p) for p in model.replacement_coefficients.parameters()} <= {id(p) for p in model.parameters()}


def test_atomic_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    import hf_replacement.checkpoint as checkpoint

    model, _ = make("vit")
    model.save_pretrained(tmp_path)
    before = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}
    with torch.no_grad():
        model.replacement_coefficients.get_parameter("3").add_(1)

    def failing_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(tmp_path)
    assert {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)} == before


@pytest.mark.parametrize("copier", ["pickle", "deepcopy"])
def test_pickle_and_deepcopy_give_an_independent_working_model(copier):
    import pickle

    model, _ = make("convnext")  # fused neighbours of another width
    copied = pickle.loads(pickle.dumps(model)) if copier == "pickle" else copy.deepcopy(model)
    x = tiny_models.inputs()
    torch.testing.assert_close(tiny_models.logits(copied(pixel_values=x)), tiny_models.logits(model(pixel_values=x)))
    assert [type(m).__name__ for m in copied.modules()] == [type(m).__name__ for m in model.modules()]
    loss_of(tiny_models.logits(copied(pixel_values=x))).backward()
    # The copy synthesizes from its own neighbours and coefficients, not the original's.
    assert all(p.grad is None for p in model.parameters())
    assert all(p.grad is not None for p in copied.replacement_coefficients.parameters())
    assert copied.merge_and_unload() is copied.base_model


def test_num_parameters_counts_the_coefficients():
    model, _ = make("vit", "channel")
    trainable, total = model.get_nb_trainable_parameters()
    assert model.num_parameters() == total and model.num_parameters(only_trainable=True) == trainable
    coefficients = sum(p.numel() for p in model.replacement_coefficients.parameters())
    assert model.num_parameters() == model.base_model.num_parameters() + coefficients


@pytest.mark.parametrize("dtype", [torch.bfloat16, "bfloat16", "auto"])
def test_from_pretrained_dtype_device_and_subfolder(tmp_path, dtype):
    model, _ = make("vit")
    model.to(torch.bfloat16)  # saved as bf16: base_config.json records it, and "auto" reads it
    model.save_pretrained(tmp_path / "sub")
    loaded = ReplacementModel.from_pretrained(tmp_path, subfolder="sub", dtype=dtype, device_map="cpu")
    assert {p.dtype for p in loaded.base_model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in loaded.replacement_coefficients.parameters()} == {torch.float32}
    assert loaded.base_model.device == torch.device("cpu")
    old_name = ReplacementModel.from_pretrained(tmp_path / "sub", torch_dtype=torch.bfloat16)
    assert next(old_name.base_model.parameters()).dtype == torch.bfloat16


def test_sharded_save_round_trip_and_back_to_one_file(tmp_path):
    model, _ = make("vit")
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "model.safetensors.index.json").is_file()
    assert not (tmp_path / "model.safetensors").exists()
    loaded = ReplacementModel.from_pretrained(tmp_path)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    model.save_pretrained(tmp_path)  # one file again: the shards and their index go
    assert sorted(p.name for p in tmp_path.glob("model*")) == ["model.safetensors"]


# ---- the plan and the state: one way in -----------------------------------------------------------


def test_replacement_state_is_there_exactly_for_the_replaced_blocks():
    model = get_replacement_model(tiny_models.build("vit"), ReplacementConfig(replace_interval=2))
    assert sorted(model.replaced_blocks) == [1, 3]
    for block in model.get_blocks():
        state = replacement_state(block.module)
        assert (state is not None) == is_replaced(block.module) == (block.index in model.replaced_blocks)
        if state is not None:
            assert (state.plan.previous.index, state.plan.block.index, state.plan.next.index) == (
                block.index - 1, block.index, block.index + 1,
            )  # fmt: skip
    model.merge_and_unload()
    assert [replacement_state(block.module) for block in model.get_blocks()] == [None] * 6
    with pytest.raises(ValueError, match="is not a replaced block"):
        synthesize(model.get_blocks()[1].module)


def test_a_plan_is_carried_out_without_the_config():
    config = ReplacementConfig(
        replace_interval=3,
        coefficient_granularity="channel",
        coefficient_init=(0.3, 0.6),
        surrogate="mlp",
        detach_neighbors=True,
        recompute_replaced=True,
    )
    reference = get_replacement_model(tiny_models.build("vit"), config)
    base = tiny_models.build("vit")
    plans = select_blocks(find_chains(base), config)
    for plan in plans:  # everything the config said that matters after planning
        assert (plan.granularity, plan.coefficient_init, plan.detach_neighbors, plan.recompute) == (
            "channel", (0.3, 0.6), True, True,
        )  # fmt: skip
        assert (plan.surrogate.name, plan.surrogate.family.name) == ("mlp", "ViT/DeiT")
    coefficients = ReplacementCoefficients()
    for plan in plans:
        apply_plan(plan, coefficients)
    pixels = tiny_models.inputs()
    # The same operations on the same numbers: equal to the bit.
    expected = tiny_models.logits(reference(pixel_values=pixels))
    assert torch.equal(tiny_models.logits(base(pixel_values=pixels)), expected)
    assert coefficients.state_dict().keys() == reference.replacement_coefficients.state_dict().keys()


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_fused_synthesis_in_bf16_equals_reference(granularity, monkeypatch):
    """A bf16 ConvNeXt (stage boundaries: every tensor of one neighbour resampled, structured form forced):
    the fused node against `reference_synthesize` run on the same bf16 model, values and gradients. Both
    round each product and sum to bf16 (eps relative); a coefficient's gradient sums a product over every
    synthesized entry (the fused node in fp32, the reference in bf16 autograd): bf16 sums of that length."""
    monkeypatch.setattr(resampling, "DENSE_LIMIT", 0)
    model, _ = make("convnext", granularity)
    model.to(torch.bfloat16)
    leaves = [p for p in model.parameters() if p.requires_grad]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    eps = torch.finfo(torch.bfloat16).eps
    generator = torch.Generator().manual_seed(0)
    for block_name in model.replaced_blocks.values():
        module = model.base_model.get_submodule(block_name)
        fused, expected = synthesize(module), reference_synthesize(module)
        assert [(w.shape, w.dtype) for w in fused] == [(w.shape, torch.bfloat16) for w in expected]
        for value, reference_value in zip(fused, expected):
            scale = float(reference_value.detach().abs().max())
            atol = 4 * eps * math.sqrt(max(reference_value.shape, default=1)) * scale
            torch.testing.assert_close(value.float(), reference_value.float(), rtol=0, atol=atol)
        probes = [torch.randn(w.shape, generator=generator).bfloat16() for w in fused]
        fused_grads = torch.autograd.grad(fused, leaves, probes, allow_unused=True)
        reference_grads = torch.autograd.grad(expected, leaves, probes, allow_unused=True)
        assert [got is None for got in fused_grads] == [want is None for want in reference_grads]
        length = sum(w.numel() for w in fused)
        pairs = [(n, g, r) for n, g, r in zip(names, fused_grads, reference_grads) if g is not None]
        scale = max(float(r.abs().max()) for _, _, r in pairs)
        for name, got, want in pairs:
            assert got.dtype == want.dtype
            torch.testing.assert_close(
                got.float(), want.float(), rtol=0, atol=4 * eps * math.sqrt(length) * scale, msg=name
            )
