"""How much of a RepL step is weight synthesis, and what a fused `layer.synthesize` would gain.

Run: `python benchmarks/synthesis_overhead.py [--models vit-mini convnext-mini vit-tiny convnext-tiny]`.
Writes `benchmarks/synthesis_overhead.{json,md}` next to this file.

Compares, on the RepL k=4 model of each preset:
- `current`: `hf_replacement.layer.synthesize` as shipped: per tensor, a slice + view + `.to` of the
  coefficient row, two multiplies and an add, each its own autograd node (about 5 nodes per tensor,
  16 tensors in a ViT block), and neighbours of another shape resampled with dense matrices
  (`fusion.apply_resample`: a tensordot per differing dimension);
- `fused`: the same arithmetic in ONE autograd node per block (`_FusedCombine` below): the forward
  reads the coefficients inside the node and, in the paper's setting (one (a, b) per block, both
  neighbours), runs three `torch._foreach_*` kernels for the whole block; the backward computes the
  neighbours' gradients with two foreach multiplies and every <grad, neighbour> dot product with two
  `torch._foreach_mm` calls. Resampling is unchanged;
- `fused+structured`: as `fused`, plus the resampling done from its structure instead of a dense
  matrix: M = diag(d)·R + (1-d)·1ᵀ/n with R a two-tap linear interpolation, so M·W is two
  `index_select`s, a `lerp` and a mean: O(m·cols) instead of O(m·n·cols);
- `fused+adaptive`: dense resampling for matrices under 2^16 entries (fewer ops: per-op overhead
  dominates tiny tensors), structured above (fewer FLOPs and no large buffers needed).

This is a measurement script with a prototype, not library code: the proposal is to move `_FusedCombine`
into layer.py (and the structured resampling into fusion.py) once reviewed by their owners.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

from hf_replacement import ReplacementConfig, get_replacement_model
from hf_replacement import layer
from hf_replacement.benchmark import atomic_write, machine_info, make_optimizer, train_step
from hf_replacement.fusion import apply_resample
from hf_replacement.presets import build_preset_model

HERE = os.path.dirname(os.path.abspath(__file__))


class _FusedCombine(torch.autograd.Function):
    """outputs[i] = a_i * prev_i + b_i * next_i for all tensors of one block, one autograd node.

    `specs[i]` = (has_prev, has_next, columns, coefficient_shape) as in `layer._SynthesizedTensor`;
    `sources` are the (resampled, possibly detached) neighbour tensors, prev before next per tensor.
    """

    @staticmethod
    def forward(ctx, coefficients, specs, *sources):
        ctx.specs = specs
        rows = coefficients.to(sources[0].dtype)
        if _paper_setting(specs):
            outputs = torch._foreach_mul(sources[0::2], rows[0, 0])
            torch._foreach_add_(outputs, torch._foreach_mul(sources[1::2], rows[1, 0]))
        else:
            outputs, position = [], 0
            for has_prev, has_next, columns, shape in specs:
                value = None
                for row, present in ((0, has_prev), (1, has_next)):
                    if present:
                        term = rows[row, columns].view(shape) * sources[position]
                        position += 1
                        value = term if value is None else value.add_(term)
                outputs.append(value)
        ctx.save_for_backward(coefficients, *sources)
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grads):
        coefficients, *sources = ctx.saved_tensors
        specs = ctx.specs
        rows = coefficients.to(sources[0].dtype)
        need_coefficients = ctx.needs_input_grad[0]
        if _paper_setting(specs):
            prevs, nexts = sources[0::2], sources[1::2]
            none = [None] * len(grads)
            grad_prev = torch._foreach_mul(grads, rows[0, 0]) if any(ctx.needs_input_grad[2::2]) else none
            grad_next = torch._foreach_mul(grads, rows[1, 0]) if any(ctx.needs_input_grad[3::2]) else none
            coefficient_grad = None
            if need_coefficients:
                flat = [g.reshape(1, -1) for g in grads]  # (1, N) @ (N, 1): every dot product in one call
                dot_a = torch._foreach_mm(flat, [p.reshape(-1, 1) for p in prevs])
                dot_b = torch._foreach_mm(flat, [n.reshape(-1, 1) for n in nexts])
                coefficient_grad = torch.stack([torch.cat(dot_a).sum(), torch.cat(dot_b).sum()]).float().view(2, 1)
            return (coefficient_grad, None, *[g for pair in zip(grad_prev, grad_next) for g in pair])
        coefficient_grad = torch.zeros_like(coefficients) if need_coefficients else None
        source_grads, position = [], 0
        for grad, (has_prev, has_next, columns, shape) in zip(grads, specs):
            for row, present in ((0, has_prev), (1, has_next)):
                if not present:
                    continue
                coefficient = rows[row, columns].view(shape)
                source_grads.append(coefficient * grad if ctx.needs_input_grad[2 + position] else None)
                if need_coefficients:
                    product = grad * sources[position]
                    reduced = product.sum() if shape == () else product.reshape(product.shape[0], -1).sum(1)
                    coefficient_grad[row, columns] += reduced.float()
                position += 1
        return (coefficient_grad, None, *source_grads)


def _paper_setting(specs) -> bool:
    return all(p and n and columns == slice(0, 1) and shape == () for p, n, columns, shape in specs)


class StructuredResample:
    """fusion.resample_matrix's M applied without the dense matrix (see the module docstring)."""

    def __init__(self) -> None:
        self._cache: dict[int, tuple] = {}

    def _structure(self, matrix: torch.Tensor) -> tuple:
        key = id(matrix)
        if key not in self._cache:
            from hf_replacement.fusion import resample_matrix

            target, source = matrix.shape
            plain = resample_matrix(source, target, False)
            scale = float(matrix.double().sum() / plain.sum())  # sqrt(n/m) on fan-in dims, else 1
            positions = (
                torch.tensor([(source - 1) / 2], dtype=torch.float64) if target == 1
                else torch.arange(target, dtype=torch.float64) * (source - 1) / (target - 1)
            )
            lower = positions.floor().long().clamp(max=source - 1)
            upper = (lower + 1).clamp(max=source - 1)
            fraction = positions - lower
            row_scale = ((1 - fraction) ** 2 + fraction**2 + 2 * (1 - fraction) * fraction * (lower == upper)).sqrt().reciprocal()
            device, dtype = matrix.device, matrix.dtype
            structure = (lower.to(device), upper.to(device), fraction.to(device, dtype),
                         (scale * row_scale).to(device, dtype), (scale * (1 - row_scale)).to(device, dtype), matrix)
            # The dense matrix must agree with its structure (checked once per matrix).
            rebuilt = structure[3].double()[:, None] * (
                torch.zeros(target, source, dtype=torch.float64).index_put_((torch.arange(target), lower), 1 - fraction, accumulate=True)
                .index_put_((torch.arange(target), upper), fraction, accumulate=True)
            ) + structure[4].double()[:, None] / source
            assert torch.allclose(rebuilt, matrix.double().cpu(), atol=1e-6), "resample matrix of unexpected form"
            self._cache[key] = structure
        return self._cache[key]

    def __call__(self, tensor: torch.Tensor, plan: list[tuple[int, torch.Tensor]]) -> torch.Tensor:
        for dim, matrix in plan:
            lower, upper, fraction, interp_scale, mean_scale, _ = self._structure(matrix)
            shape = [1] * tensor.ndim
            shape[dim] = -1
            interpolated = torch.lerp(tensor.index_select(dim, lower), tensor.index_select(dim, upper), fraction.view(shape))
            tensor = torch.addcmul(mean_scale.view(shape) * tensor.mean(dim, keepdim=True), interpolated, interp_scale.view(shape))
        return tensor


def make_fused_synthesize(resample: Callable = apply_resample) -> Callable[[nn.Module], list[torch.Tensor]]:
    def fused_synthesize(module: nn.Module) -> list[torch.Tensor]:
        state = module._replacement
        coefficients = state.coefficients._parameters[str(state.index)]
        specs, sources = [], []
        for tensor in state.tensors:
            present = []
            for source in (tensor.previous, tensor.next):
                if source is None:
                    present.append(False)
                    continue
                neighbour = source.owner._parameters[source.attr]
                if state.detach_neighbors:
                    neighbour = neighbour.detach()
                if source.resample:
                    neighbour = resample(neighbour, [(dim, module._buffers[name]) for dim, name in source.resample])
                sources.append(neighbour)
                present.append(True)
            specs.append((present[0], present[1], tensor.columns, tensor.coefficient_shape))
        return list(_FusedCombine.apply(coefficients, tuple(specs), *sources))

    return fused_synthesize


class AdaptiveResample:
    """Dense tensordot for small matrices (fewer ops), the structured form for large ones (fewer FLOPs)."""

    def __init__(self, threshold: int = 2**16) -> None:
        self.threshold = threshold
        self.structured = StructuredResample()

    def __call__(self, tensor: torch.Tensor, plan: list[tuple[int, torch.Tensor]]) -> torch.Tensor:
        for dim, matrix in plan:
            resample = self.structured if matrix.numel() >= self.threshold else apply_resample
            tensor = resample(tensor, [(dim, matrix)])
        return tensor


VARIANTS: dict[str, Callable] = {
    "current": layer.synthesize,
    "fused": make_fused_synthesize(),
    "fused+structured": make_fused_synthesize(StructuredResample()),
    "fused+adaptive": make_fused_synthesize(AdaptiveResample()),
}


@contextlib.contextmanager
def synthesize_as(function: Callable):
    original = layer.synthesize
    layer.synthesize = function  # _synthesized_weights_attached looks the name up at each call
    try:
        yield
    finally:
        layer.synthesize = original


def _replaced(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if layer.is_replaced(m)]


def check_equal(model: nn.Module) -> dict[str, float]:
    """Max |difference| of the synthesized weights and of every gradient, variant vs current."""
    modules = _replaced(model)
    reference = None
    errors = {}
    for name, function in VARIANTS.items():
        model.zero_grad(set_to_none=True)
        weights = [w for m in modules for w in function(m)]
        generator = torch.Generator().manual_seed(0)
        torch.autograd.backward(weights, [torch.randn(w.shape, generator=generator) for w in weights])
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        if reference is None:
            reference = ([w.detach() for w in weights], grads)
            continue
        weight_error = max((a - b.detach()).abs().max().item() for a, b in zip(reference[0], weights))
        grad_error = max((reference[1][n] - grads[n]).abs().max().item() / max(1.0, reference[1][n].abs().max().item()) for n in grads)
        errors[name] = {"weights_max_abs": weight_error, "grads_max_rel": grad_error, "same_grad_keys": set(grads) == set(reference[1])}
    model.zero_grad(set_to_none=True)
    return errors


def time_isolated(model: nn.Module, function: Callable, repeats: int) -> float:
    modules = _replaced(model)
    with torch.no_grad():
        gradients = [torch.ones_like(w) for m in modules for w in function(m)]
    times = []
    for _ in range(repeats + 2):
        started = time.perf_counter()
        torch.autograd.backward([w for m in modules for w in function(m)], gradients)
        times.append(time.perf_counter() - started)
        model.zero_grad(set_to_none=True)
    return statistics.median(times[2:])


def measure(model_name: str, image_size: int, batch_size: int, rounds: int, steps: int) -> dict:
    def build(replace: bool) -> nn.Module:
        torch.manual_seed(0)
        model = build_preset_model(model_name, 10, image_size, 1)
        return get_replacement_model(model, ReplacementConfig(replace_interval=4)) if replace else model

    repl, bp = build(True), build(False)
    result = {"model": model_name, "image_size": image_size, "batch_size": batch_size,
              "replaced_blocks": list(repl.replaced_blocks), "equality": check_equal(repl)}
    result["isolated_ms"] = {name: 1e3 * time_isolated(repl, f, repeats=10) for name, f in VARIANTS.items()}
    # In-step: the same RepL model and optimizer, variants interleaved in rounds; bp alongside.
    pixels = torch.randn(batch_size, 1, image_size, image_size)
    labels = torch.randint(0, 10, (batch_size,))
    optimizers = {"bp": make_optimizer(bp, 1e-4, 0.0), "repl": make_optimizer(repl, 1e-4, 0.0)}
    contenders = {"bp": (bp, None), **{name: (repl, f) for name, f in VARIANTS.items()}}
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for name, (model, function) in contenders.items():
        with synthesize_as(function or layer.synthesize):
            train_step(model, optimizers["bp" if function is None else "repl"], pixels, labels)
    order = list(contenders)
    for round_index in range(rounds):
        for name in order[round_index % len(order):] + order[:round_index % len(order)]:
            model, function = contenders[name]
            with synthesize_as(function or layer.synthesize):
                for _ in range(steps):
                    started = time.perf_counter()
                    train_step(model, optimizers["bp" if function is None else "repl"], pixels, labels)
                    times[name].append(time.perf_counter() - started)
    result["median_step_ms"] = {name: 1e3 * statistics.median(values) for name, values in times.items()}
    step = result["median_step_ms"]["current"]
    result["synthesis_percent_of_step"] = {name: 100 * ms / step for name, ms in result["isolated_ms"].items()}
    return result


SETTINGS = {  # model: (image size, batch, rounds, steps per round)
    "vit-mini": (8, 64, 6, 5),
    "convnext-mini": (8, 64, 6, 5),
    "vit-tiny": (28, 64, 3, 3),
    "convnext-tiny": (28, 32, 2, 2),
}


def render(results: list[dict], machine: dict) -> str:
    lines = [
        "# Synthesis overhead of RepL (k=4): current `layer.synthesize` vs a fused prototype",
        "",
        f"Machine: {machine['cpu']}, {machine['torch_threads']} torch threads, torch {machine['torch']}; fp32, CPU. "
        "Produced by `python benchmarks/synthesis_overhead.py` (prototype and method in its docstring).",
        "",
        "Synthesis = building every replaced block's weights, forward + backward (into the coefficients and both "
        "neighbours), timed alone, median; % = of the median RepL step (current code). Steps: forward + backward + "
        "AdamW, variants interleaved in rounds.",
        "",
        "| model (image, batch) | replaced | synthesis ms: " + " / ".join(VARIANTS) + " | % of step: " + " / ".join(VARIANTS)
        + " | median step ms: bp / RepL " + " / ".join(VARIANTS) + " | max grad diff (rel.) |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        iso, pct, step = r["isolated_ms"], r["synthesis_percent_of_step"], r["median_step_ms"]
        worst = max(v["grads_max_rel"] for v in r["equality"].values())
        lines.append(
            f"| {r['model']} ({r['image_size']}px, {r['batch_size']}) | {r['replaced_blocks']} | "
            + " / ".join(f"{iso[k]:.2f}" for k in VARIANTS) + " | "
            + " / ".join(f"{pct[k]:.2f}" for k in VARIANTS) + " | "
            + " / ".join(f"{step[k]:.1f}" for k in ("bp", *VARIANTS)) + f" | {worst:.1e} |"
        )
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--output-dir", default=HERE)
    args = parser.parse_args(argv)
    results = []
    for name in args.models:
        results.append(measure(name, *SETTINGS[name]))
        print(json.dumps({k: v for k, v in results[-1].items() if k != "equality"}), file=sys.stderr, flush=True)
    machine = machine_info(torch.device("cpu"))
    atomic_write(os.path.join(args.output_dir, "synthesis_overhead.json"),
                 json.dumps({"machine": machine, "results": results}, indent=1, default=str) + "\n")
    markdown = render(results, machine)
    atomic_write(os.path.join(args.output_dir, "synthesis_overhead.md"), markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
