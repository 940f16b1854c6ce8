"""`coefficient_init="fit"`: least-squares coefficients rebuilding each replaced block's own weights.

The reference builds each column's design from `reference_synthesize` (the plain-autograd synthesis,
dense resampling matrices): with the block's coefficients set to (1, 0) it returns R(p_prev), with
(0, 1) R(p_next). Each column is then solved with `torch.linalg.lstsq` (the minimum-norm solution,
shifted to the one nearest (0.5, 0.5) where the design is rank-deficient, as documented).
"""

from __future__ import annotations

import copy
import json

import pytest
import tiny_models
import torch

from hf_replacement import ReplacementConfig, ReplacementModel, get_replacement_model
from hf_replacement.commands.cli import build_parser, main
from hf_replacement.config import ReplacementConfigError
from hf_replacement.planning import coefficient_width
from hf_replacement.reference import reference_synthesize
from hf_replacement.synthesis import replacement_state

GRANULARITIES = ["block", "tensor", "channel"]
PRIOR = torch.tensor([0.5, 0.5], dtype=torch.float64)


def config(**options) -> ReplacementConfig:
    return ReplacementConfig(coefficient_init="fit", **options)


def design(arch: str, base: torch.nn.Module, granularity: str, fusion: str = "resample", surrogate: str = "block"):
    """Per replaced block index: (target weights, R(p_prev), R(p_next)) per tensor, float64, from the reference
    run on a float64 copy (the fp32 weights are exact in float64; the resampling is then float64 too). A lighter
    surrogate's targets are the leading part of the block's own tensors, the part it synthesizes."""
    original = copy.deepcopy(base)
    model = get_replacement_model(
        copy.deepcopy(base).double(),
        ReplacementConfig(
            coefficient_granularity=granularity, fusion=fusion, surrogate=surrogate,
            block_path=tiny_models.block_path(arch),
        ),
    )
    designs = {}
    for index, block_name in model.replaced_blocks.items():
        block = model.base_model.get_submodule(block_name)
        coefficients = model.replacement_coefficients.get_parameter(str(index))
        sides = []
        for row in (0, 1):
            with torch.no_grad():
                coefficients.zero_()
                coefficients[row] = 1.0
                sides.append([w.double() for w in reference_synthesize(block)])
        shapes = [t.shape for t in replacement_state(block).plan.tensors]
        targets = [
            original.get_submodule(block_name).get_parameter(t.name).detach().double()[tuple(map(slice, shape))]
            for t, shape in zip(replacement_state(block).tensors, shapes)
        ]
        designs[index] = (targets, sides[0], sides[1], shapes)
    return designs


def reference_fit(targets, previous, following, shapes, granularity: str) -> torch.Tensor:
    """(2, K): per column, the least-squares solution nearest to (0.5, 0.5), via torch.linalg.lstsq."""
    rows: dict[int, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}
    offset = 0
    for target, p, q, shape in zip(targets, previous, following, shapes):
        width = coefficient_width(granularity, shape)
        if granularity == "channel" and len(shape) > 0:
            for channel in range(shape[0]):
                rows.setdefault(offset + channel, []).append((target[channel], p[channel], q[channel]))
        else:
            rows.setdefault(offset if width else 0, []).append((target, p, q))
        offset += width
    solution = torch.zeros(2, max(offset, 1), dtype=torch.float64)
    for column, parts in rows.items():
        w = torch.cat([part[0].reshape(-1) for part in parts])
        x = torch.stack([torch.cat([part[1].reshape(-1) for part in parts]),
                         torch.cat([part[2].reshape(-1) for part in parts])], dim=1)
        shift = torch.linalg.lstsq(x, (w - x @ PRIOR)[:, None], driver="gelsd", rcond=1e-5).solution[:, 0]
        solution[:, column] = PRIOR + shift
    return solution


def relative_error(targets, previous, following, coefficients, shapes, granularity) -> float:
    error, norm, offset = 0.0, 0.0, 0
    for target, p, q, shape in zip(targets, previous, following, shapes):
        width = coefficient_width(granularity, shape)
        a, b = coefficients[:, offset:offset + max(width, 1)] if width else coefficients[:, :1]
        if granularity == "channel" and len(shape) > 0:
            a, b = a.view(-1, *(1,) * (len(shape) - 1)), b.view(-1, *(1,) * (len(shape) - 1))
        error += float(((target - a * p - b * q) ** 2).sum())
        norm += float((target**2).sum())
        offset += width
    return (error / norm) ** 0.5


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize(
    "arch, fusion", [("vit", "resample"), ("custom", "resample"), ("convnext", "resample"), ("convnext", "nearest")]
)
def test_fit_equals_least_squares_reference(arch, fusion, granularity):
    """ViT and the custom model: same-shape neighbours; ConvNeXt: a neighbour across a stage boundary
    (resampled, or left out with fusion="nearest")."""
    base = tiny_models.build(arch)
    designs = design(arch, base, granularity, fusion)
    model = get_replacement_model(
        copy.deepcopy(base),
        config(coefficient_granularity=granularity, fusion=fusion, block_path=tiny_models.block_path(arch)),
    )
    errors = model.coefficient_fit_errors()
    assert sorted(errors) == sorted(designs)
    for index, (targets, previous, following, shapes) in designs.items():
        expected = reference_fit(targets, previous, following, shapes, granularity)
        fitted = model.replacement_coefficients.get_parameter(str(index))
        assert fitted.dtype == torch.float32 and fitted.shape == expected.shape
        torch.testing.assert_close(fitted.double(), expected, rtol=1e-5, atol=1e-6)
        expected_error = relative_error(targets, previous, following, expected, shapes, granularity)
        default = relative_error(targets, previous, following, PRIOR[:, None].expand_as(expected), shapes, granularity)
        assert errors[index]["relative_error"] == pytest.approx(expected_error, rel=1e-5)
        assert errors[index]["default_relative_error"] == pytest.approx(default, rel=1e-6)
        assert errors[index]["relative_error"] <= errors[index]["default_relative_error"]
    if arch == "convnext":  # the case this test is for: a neighbour of another shape
        plans = [replacement_state(m).plan for m in model.base_model.modules() if replacement_state(m) is not None]
        assert any(steps != () for plan in plans for t in plan.tensors for steps in (t.previous, t.next))


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("arch, surrogate", [("vit", "mlp"), ("vit", "half"), ("convnext", "half")])
def test_a_lighter_surrogate_fits_the_part_of_the_block_it_synthesizes(arch, surrogate, granularity):
    """"half": the neighbours' leading hidden units against the block's own leading hidden units (ConvNeXt:
    across a stage boundary, narrowed then resampled); "mlp": only the MLP's tensors take part."""
    base = tiny_models.build(arch)
    designs = design(arch, base, granularity, surrogate=surrogate)
    model = get_replacement_model(
        copy.deepcopy(base),
        config(coefficient_granularity=granularity, surrogate=surrogate, block_path=tiny_models.block_path(arch)),
    )
    errors = model.coefficient_fit_errors()
    for index, (targets, previous, following, shapes) in designs.items():
        expected = reference_fit(targets, previous, following, shapes, granularity)
        fitted = model.replacement_coefficients.get_parameter(str(index))
        torch.testing.assert_close(fitted.double(), expected, rtol=1e-5, atol=1e-6)
        expected_error = relative_error(targets, previous, following, expected, shapes, granularity)
        assert errors[index]["relative_error"] == pytest.approx(expected_error, rel=1e-5)
    if surrogate == "half":  # the case this test is for: a target narrower than the block's own tensor
        block = model.base_model.get_submodule(model.replaced_blocks[min(designs)])
        assert any(plan.block_shape is not None for plan in replacement_state(block).plan.tensors)


def test_full_rank_fit_is_plain_least_squares():
    """Where the design has full rank the prior plays no part: the unique least-squares solution."""
    base = tiny_models.build("vit")
    (targets, previous, following, shapes), = design("vit", base, "tensor").values()
    model = get_replacement_model(copy.deepcopy(base), config(coefficient_granularity="tensor"))
    fitted = next(model.replacement_coefficients.parameters()).double()
    for column, (w, p, q) in enumerate(zip(targets, previous, following)):
        x = torch.stack([p.reshape(-1), q.reshape(-1)], dim=1)
        plain = torch.linalg.lstsq(x, w.reshape(-1, 1)).solution[:, 0]
        torch.testing.assert_close(fitted[:, column], plain, rtol=1e-5, atol=1e-6)


def make_exact_combination(arch: str, a: float = 0.3, b: float = 0.7) -> torch.nn.Module:
    """A model whose replaced blocks' weights are exactly a·R(prev) + b·R(next)."""
    base = tiny_models.build(arch)
    replaced = get_replacement_model(copy.deepcopy(base), ReplacementConfig(block_path=tiny_models.block_path(arch)))
    # Replaced blocks are never adjacent: rewriting one leaves every other one's neighbours as they were.
    for index, (_, previous, following, _) in design(arch, base, "block").items():
        name = replaced.replaced_blocks[index]
        block = base.get_submodule(name)
        names = [t.name for t in replacement_state(replaced.base_model.get_submodule(name)).tensors]
        with torch.no_grad():
            for tensor_name, p, q in zip(names, previous, following):
                block.get_parameter(tensor_name).copy_(a * p + b * q)
    return base


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("arch", ["vit", "convnext"])
def test_exact_combination_is_recovered_and_outputs_are_unchanged(arch, granularity):
    base = make_exact_combination(arch)
    original = copy.deepcopy(base)
    model = get_replacement_model(base, config(coefficient_granularity=granularity))
    for index, errors in model.coefficient_fit_errors().items():
        assert errors["relative_error"] < 1e-6
        assert errors["default_relative_error"] > 0.05
        coefficients = model.replacement_coefficients.get_parameter(str(index))
        # "channel": a 1-D tensor gives each column one equation a·p + b·q = w, met exactly by the point of that
        # line nearest (0.5, 0.5), not by (0.3, 0.7); the Linear/conv weights' columns have full rank.
        block = model.base_model.get_submodule(model.replaced_blocks[index])
        offset = 0
        for tensor in replacement_state(block).plan.tensors:
            width = max(coefficient_width(granularity, tensor.shape), 1)
            if granularity != "channel" or len(tensor.shape) >= 2:
                part = coefficients[:, offset:offset + width]
                torch.testing.assert_close(part, torch.tensor([[0.3], [0.7]]).expand_as(part))
            offset += coefficient_width(granularity, tensor.shape)
    pixels = tiny_models.inputs()
    with torch.no_grad():
        expected = tiny_models.logits(original(pixels))
        torch.testing.assert_close(tiny_models.logits(model(pixel_values=pixels)), expected, rtol=1e-5, atol=1e-5)


def test_degenerate_designs_fall_back_to_the_default_where_undetermined(caplog):
    base = tiny_models.build("custom")
    blocks = base.trunk.blocks
    with torch.no_grad():  # block 3 replaced: neighbours 2 and 4 all zero, so nothing determines (a, b)
        for parameter in [*blocks[2].parameters(), *blocks[4].parameters()]:
            parameter.zero_()
    model = get_replacement_model(copy.deepcopy(base), config(block_path="trunk.blocks"))
    torch.testing.assert_close(model.replacement_coefficients.get_parameter("3"), torch.tensor([[0.5], [0.5]]))
    assert model.coefficient_fit_errors()[3]["relative_error"] == pytest.approx(1.0)
    assert "the neighbours explain little of block(s) [3]" in caplog.text

    base = tiny_models.build("custom")
    with torch.no_grad():  # equal neighbours: only a + b is determined; the solution nearest (0.5, 0.5) has a == b
        for parameter in base.parameters():  # no zero biases: every column then has a non-zero design
            parameter.add_(0.1 * torch.randn_like(parameter))
        for mine, theirs in zip(blocks_of(base)[4].parameters(), blocks_of(base)[2].parameters()):
            mine.copy_(theirs)
        for mine, theirs in zip(blocks_of(base)[3].parameters(), blocks_of(base)[2].parameters()):
            mine.copy_(0.8 * theirs)
    model = get_replacement_model(base, config(block_path="trunk.blocks", coefficient_granularity="channel"))
    a, b = model.replacement_coefficients.get_parameter("3")
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a + b, torch.full_like(a, 0.8))
    assert model.coefficient_fit_errors()[3]["relative_error"] < 1e-6

    base = tiny_models.build("custom")
    with torch.no_grad():  # an all-zero block: rebuilt exactly (a = b = 0 where the neighbours are not zero), error 0
        for parameter in blocks_of(base)[3].parameters():
            parameter.zero_()
    model = get_replacement_model(base, config(block_path="trunk.blocks", coefficient_granularity="tensor"))
    assert model.coefficient_fit_errors()[3]["relative_error"] == 0.0
    assert all(weight.abs().max() < 1e-6 for weight in model.synthesized_weights(3).values())


def blocks_of(model: torch.nn.Module):
    return model.trunk.blocks


def test_deferred_replacement_fits_the_weights_it_has_then():
    base = tiny_models.build("vit")
    model = ReplacementModel(base, config(), defer_replacement=True)
    assert model.coefficient_fit_errors() == {}
    trained = make_exact_combination("vit", 0.2, 0.9)  # stands for the weights after the warm-up
    base.load_state_dict(trained.state_dict())
    model.replace_blocks()
    torch.testing.assert_close(model.replacement_coefficients.get_parameter("3"), torch.tensor([[0.2], [0.9]]))
    assert model.coefficient_fit_errors()[3]["relative_error"] < 1e-6


def test_a_fitted_model_saves_and_loads_its_coefficients_not_a_new_fit(tmp_path, monkeypatch):
    model = get_replacement_model(tiny_models.build("vit"), config(coefficient_granularity="tensor"))
    with torch.no_grad():  # "trained": the checkpoint's coefficients differ from any fit
        model.replacement_coefficients.get_parameter("3").add_(1.0)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "replacement_config.json").read_text())["coefficient_init"] == "fit"

    def no_fit(*args, **kwargs):
        raise AssertionError("from_pretrained fitted coefficients the checkpoint holds")

    monkeypatch.setattr("hf_replacement.layer.fit_coefficients", no_fit)
    loaded = ReplacementModel.from_pretrained(tmp_path)
    assert loaded.replacement_config.coefficient_init == "fit"
    assert loaded.coefficient_fit_errors() == {}
    torch.testing.assert_close(
        loaded.replacement_coefficients.get_parameter("3"), model.replacement_coefficients.get_parameter("3")
    )


def test_print_trainable_parameters_reports_the_fit(capsys):
    model = get_replacement_model(tiny_models.build("vit"), config())
    model.print_trainable_parameters()
    error = model.coefficient_fit_errors()[3]
    assert (
        f"fitted init, relative error: block 3: {error['relative_error']:.3f} "
        f"(a=b=0.5: {error['default_relative_error']:.3f})" in capsys.readouterr().out
    )
    plain = get_replacement_model(tiny_models.build("vit"), ReplacementConfig())
    plain.print_trainable_parameters()
    assert plain.coefficient_fit_errors() == {} and "fitted" not in capsys.readouterr().out


def test_config_accepts_fit_and_pairs_and_loads_old_files():
    assert ReplacementConfig.from_dict(ReplacementConfig(coefficient_init="fit").to_dict()).coefficient_init == "fit"
    old = {"coefficient_init": [0.25, 0.75], "format_version": 1}  # as written before "fit" existed
    assert ReplacementConfig.from_dict(old).coefficient_init == (0.25, 0.75)
    with pytest.raises(ReplacementConfigError, match=r"coefficient_init='fitted' is invalid: .* or 'fit'"):
        ReplacementConfig(coefficient_init="fitted")


def test_cli_flag_takes_fit_or_a_pair(capsys):
    parser = build_parser()
    assert parser.parse_args(["train", "--coefficient-init", "fit"]).coefficient_init == "fit"
    assert parser.parse_args(["train", "--coefficient-init", "0.3,0.7"]).coefficient_init == (0.3, 0.7)
    assert parser.parse_args(["train"]).coefficient_init == (0.5, 0.5)
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--coefficient-init", "0.3"])
    assert "'0.3' is neither 'fit' nor two numbers a,b" in capsys.readouterr().err


def test_launcher_fits_a_local_pretrained_model_and_reports_it(tmp_path, capsys):
    """`--model DIR --coefficient-init fit` on a model saved by save_pretrained (no image processor)."""
    from hf_replacement.loading import load_image_classifier

    torch.manual_seed(0)
    pretrained = make_exact_combination_preset()
    pretrained.save_pretrained(tmp_path / "pretrained")
    out = tmp_path / "run"
    assert main(["train", "--model", str(tmp_path / "pretrained"), "--dataset", "digits", "--max-train-samples", "64",
                 "--max-eval-samples", "32", "--batch-size", "32", "--epochs", "0.5", "--coefficient-init", "fit",
                 "--output-dir", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["replacement_config"]["coefficient_init"] == "fit"
    expected = get_replacement_model(load_image_classifier(tmp_path / "pretrained"), config()).coefficient_fit_errors()
    assert results["coefficient_fit"] == {str(k): pytest.approx(v) for k, v in expected.items()}
    assert results["coefficient_fit"]["3"]["relative_error"] < 1e-6  # the block is 0.3·prev + 0.7·next
    printed = capsys.readouterr().out
    assert "fitted initial coefficients, relative reconstruction error: block 3: 0.000 (a=b=0.5: " in printed


def make_exact_combination_preset() -> torch.nn.Module:
    """vit-mini for the digits (8 px, 10 labels) whose block 3 is exactly 0.3·block 2 + 0.7·block 4."""
    from hf_replacement.commands.presets import build_preset_model

    model = build_preset_model("vit-mini", 10, 8, 1)
    blocks = model.vit.layers
    with torch.no_grad():
        for mine, previous, following in zip(
            blocks[3].parameters(), blocks[2].parameters(), blocks[4].parameters()
        ):
            mine.copy_(0.3 * previous + 0.7 * following)
    return model
