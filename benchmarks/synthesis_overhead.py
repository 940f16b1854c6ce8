"""How much of a RepL step is weight synthesis: the shipped fused `synthesize` against the plain-autograd reference.

Run from a checkout: `python benchmarks/synthesis_overhead.py [--models vit-mini convnext-mini vit-tiny
convnext-tiny] [--rounds N] [--repeats N] [--output-dir DIR]` (also `python -m benchmarks.synthesis_overhead`).
Writes `synthesis_overhead.{json,md}` to `benchmarks/` (or `--output-dir`); `python -m benchmarks --readme`
then shows the table in `benchmarks/README.md`.

On the RepL k=4 model of each preset (default config: one (a, b) per block, fusion="resample"), with
the two public implementations (`hf_replacement.synthesis`, `hf_replacement.reference`), which give
the same weights:
- `fused` is `synthesize`, what every forward of a replaced block runs: one autograd node per
  replaced block, `torch._foreach_*` kernels over the block's tensors, and neighbours of another
  shape resampled inside the node from the matrix's structure;
- `reference` is `reference_synthesize`, the formula in plain autograd: per tensor, coefficient
  times neighbour for each side, each op its own autograd node, and a dense resampling matrix
  (built at each call) per resampled dimension.

Measured, all in one run: synthesis alone (every replaced block's weights, forward + backward into
the coefficients and both neighbours; the two implementations alternate, median), and training steps
(forward + backward + AdamW) of the plain model (bp) and of the RepL model as shipped, interleaved in
rounds, median. The synthesis share is fused synthesis ms / median RepL step: the reference is never
run inside a training step (the library has no switch for that, by design). A second table times
synthesis alone for the other coefficient granularities, to show where the fused node pays off.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shlex
import sys
from collections.abc import Sequence
from typing import Any

if __package__ in (None, ""):
    # Run as a script (`python benchmarks/synthesis_overhead.py`): Python put benchmarks/ on the path,
    # not the checkout that holds the `benchmarks` package this script imports.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
from torch import nn

from benchmarks.harness.bandwidth import measure_phase_bandwidth, render_bandwidth_table
from benchmarks.harness.data import timing_batch
from benchmarks.harness.device import describe_load, load_average, machine_info
from benchmarks.harness.measure import replaced_modules, time_synthesis, time_training_steps
from benchmarks.harness.output import write_report
from benchmarks.harness.paths import BENCHMARKS_DIR, SYNTHESIS_OVERHEAD_NAME
from benchmarks.harness.suites import SuiteSpec
from hf_replacement import ReplacementConfig, get_replacement_model
from hf_replacement.commands.presets import build_preset_model
from hf_replacement.reference import reference_synthesize
from hf_replacement.synthesis import synthesize

logger = logging.getLogger("benchmarks.synthesis_overhead")

IMPLEMENTATIONS = {"fused": synthesize, "reference": reference_synthesize}
OTHER_GRANULARITIES = ("tensor", "channel")


@dataclasses.dataclass(frozen=True)
class Setting:
    """One measured configuration; `rounds` × `steps` training steps per contender, `repeats` syntheses."""

    model: str
    image_size: int
    batch_size: int
    rounds: int
    steps: int
    repeats: int


# ConvNeXt-tiny twice: at 56 px each weight is used on 4x the positions of 28 px, for the same synthesis work.
SETTINGS = (
    Setting("vit-mini", 8, 64, 6, 5, 30),
    Setting("convnext-mini", 8, 64, 6, 5, 30),
    Setting("vit-tiny", 28, 64, 4, 3, 20),
    Setting("convnext-tiny", 28, 32, 3, 2, 10),
    Setting("convnext-tiny", 56, 32, 3, 2, 10),
)


def check_equal(model: nn.Module) -> dict[str, float | bool]:
    """Max |difference| of the synthesized weights and of every gradient, fused vs reference."""
    modules = replaced_modules(model)
    results = []
    for function in IMPLEMENTATIONS.values():
        model.zero_grad(set_to_none=True)
        weights = [w for m in modules for w in function(m)]
        generator = torch.Generator().manual_seed(0)  # the same upstream gradient for both
        torch.autograd.backward(weights, [torch.randn(w.shape, generator=generator) for w in weights])
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append(([w.detach() for w in weights], grads))
    model.zero_grad(set_to_none=True)
    (weights, grads), (reference_weights, reference_grads) = results
    return {
        "weights_max_abs": max((a - b).abs().max().item() for a, b in zip(weights, reference_weights)),
        "grads_max_rel": max(
            (grads[n] - reference_grads[n]).abs().max().item() / max(1.0, reference_grads[n].abs().max().item())
            for n in reference_grads
        ),
        "same_grad_keys": grads.keys() == reference_grads.keys(),
    }


def synthesis_ms(model: nn.Module, repeats: int) -> dict[str, float]:
    """Median ms of forward + backward synthesis of every replaced block, per implementation."""
    timed = time_synthesis(model, repeats, IMPLEMENTATIONS)
    return {name: 1e3 * forward_backward for name, (_, forward_backward) in timed.items()}


def build(model_name: str, image_size: int, granularity: str | None) -> nn.Module:
    """The preset model, replaced with k=4 and `granularity` (None: the plain model)."""
    torch.manual_seed(0)
    model = build_preset_model(model_name, 10, image_size, 1)
    if granularity is None:
        return model
    return get_replacement_model(model, ReplacementConfig(replace_interval=4, coefficient_granularity=granularity))


def measure(setting: Setting) -> dict[str, Any]:
    """Equality, synthesis alone (both implementations), bp and RepL steps, other granularities."""
    repl, bp = build(setting.model, setting.image_size, "block"), build(setting.model, setting.image_size, None)
    # The harness's step timing (interleaved rounds, warm-up excluded), at this setting's size.
    suite = SuiteSpec(
        name="synthesis-overhead", summary="", models=(setting.model,), dataset=None, image_size=setting.image_size,
        batch_size=setting.batch_size, lr=1e-4, weight_decay=0.0, timing_warmup_steps=1,
        timing_rounds=setting.rounds, timing_steps_per_round=setting.steps,
    )
    result: dict[str, Any] = {
        "model": setting.model, "image_size": setting.image_size, "batch_size": setting.batch_size,
        "replaced_blocks": list(repl.replaced_blocks), "equality": check_equal(repl),
        "synthesis_ms": synthesis_ms(repl, setting.repeats),
        # Per phase, beside the machine's streaming bandwidth over the same bytes (timed alternately).
        "bandwidth": measure_phase_bandwidth(repl, replaced_modules(repl), setting.repeats),
    }
    batch = timing_batch(suite, None, setting.batch_size, torch.device("cpu"))
    steps = time_training_steps(suite, {"bp": bp, "repl": repl}, batch, torch.device("cpu"))
    result["median_step_ms"] = {name: 1e3 * entry["median_step_s"] for name, entry in steps.items()}
    result["synthesis_percent_of_step"] = 100 * result["synthesis_ms"]["fused"] / result["median_step_ms"]["repl"]
    result["other_granularities_synthesis_ms"] = {
        granularity: synthesis_ms(build(setting.model, setting.image_size, granularity), setting.repeats)
        for granularity in OTHER_GRANULARITIES
    }
    return result


def render_table(results: Sequence[dict[str, Any]]) -> list[str]:
    """The main table: one row per setting (also shown in benchmarks/README.md)."""
    lines = [
        "| model (image, batch) | replaced | synthesis ms: fused / reference | fused, % of RepL step "
        "| under 2% | median step ms: bp / RepL | max weight diff | max grad diff (rel.) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        ms, share, step, equal = r["synthesis_ms"], r["synthesis_percent_of_step"], r["median_step_ms"], r["equality"]
        lines.append(
            f"| {r['model']} ({r['image_size']}px, {r['batch_size']}) | {r['replaced_blocks']} | "
            f"{ms['fused']:.2f} / {ms['reference']:.2f} | {share:.2f} | {'yes' if share < 2 else 'no'} | "
            f"{step['bp']:.1f} / {step['repl']:.1f} | {equal['weights_max_abs']:.1e} | {equal['grads_max_rel']:.1e} |"
        )
    return lines


WHERE_THE_TIME_GOES = (
    "Where the time goes: synthesis does the same work per replaced weight whatever the input (a few "
    "passes over the block's weights, its neighbours' and their gradients, forward and backward), while a "
    "step's work per weight grows with the batch and the number of positions each weight is applied to. "
    "On large tensors synthesis is memory traffic: a small share where each weight sees many positions "
    "(ViT-tiny's 50 tokens, ConvNeXt-tiny at 56 px), a few percent where it sees few (ConvNeXt-tiny at "
    "28 px, whose last stages run at 3x3 and 1x1, where its largest replaced block sits). On "
    "tiny blocks (the -mini presets at 8 px: tens of thousands of synthesized values, steps of a few tens "
    "of ms) it is the fixed cost of each ATen call (a few µs on this CPU), about ten per resampled tensor "
    "per step (gathers, matrix products and their transposes in backward, dot products for the "
    "coefficients) even in one autograd node; a block at a stage boundary, where every tensor of one "
    "neighbour is resampled, costs the most. The reference runs each op as its own autograd node and "
    "resamples with dense matrices built at each call, where the fused node gathers from the matrices' "
    "structure: hence its larger cost on ConvNeXt, whose stage boundaries are resampled."
)


def render_machine(report: dict[str, Any]) -> str:
    """Where and how the numbers were measured, with the machine's load (also shown in benchmarks/README.md)."""
    machine, load = report["machine"], report["load_average"]
    return (
        f"Machine: {machine['cpu']}, {machine['torch_threads']} torch threads, torch {machine['torch']}; fp32, CPU; "
        f"{describe_load(load)} "
        "(other processes share these cores: spread in the step times is theirs too). "
        f"Produced by `{report['command']}`."
    )


def render(report: dict[str, Any]) -> str:
    """synthesis_overhead.md: the setting, the main table, the explanation, the granularity table."""
    results = report["results"]
    lines = [
        "# Synthesis overhead of RepL (k=4): the shipped fused `synthesize` vs the plain-autograd reference",
        "",
        render_machine(report) + " Method: the docstring of `benchmarks/synthesis_overhead.py`.",
        "",
        "Synthesis = building every replaced block's weights, forward + backward (into the coefficients and both "
        "neighbours), timed alone, the two implementations alternating, median. Steps: forward + backward + AdamW, "
        "bp and RepL (fused, as shipped) interleaved in rounds, median; % = fused synthesis over the median RepL "
        "step. Weight and gradient differences: fused against reference, same coefficients and upstream gradient.",
        "",
        *render_table(results),
        "",
        WHERE_THE_TIME_GOES,
        "",
        *render_bandwidth_table([r for r in results if "bandwidth" in r]),
        "",
        "Synthesis alone (ms, fused / reference) with the other coefficient granularities:",
        "",
        "| model | " + " | ".join(OTHER_GRANULARITIES) + " |",
        "|---|" + "---|" * len(OTHER_GRANULARITIES),
    ]
    for r in results:
        other = r["other_granularities_synthesis_ms"]
        cells = " | ".join(f"{other[g]['fused']:.2f} / {other[g]['reference']:.2f}" for g in OTHER_GRANULARITIES)
        lines.append(f"| {r['model']} ({r['image_size']}px) | {cells} |")
    lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Measure the selected settings, write synthesis_overhead.{json,md}, print the Markdown."""
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
    parser = argparse.ArgumentParser(
        prog="python benchmarks/synthesis_overhead.py", description=__doc__.split("\n\n")[0]
    )
    models = sorted({setting.model for setting in SETTINGS})
    parser.add_argument("--models", nargs="+", default=models, choices=models)
    parser.add_argument("--rounds", type=int, default=None, help="step rounds per setting (default: the setting's)")
    parser.add_argument("--repeats", type=int, default=None, help="synthesis repeats (default: the setting's)")
    parser.add_argument("--output-dir", default=BENCHMARKS_DIR)
    args = parser.parse_args(argv)
    arguments = sys.argv[1:] if argv is None else list(argv)
    load = {"before": load_average()}
    results = []
    for setting in SETTINGS:
        if setting.model not in args.models:
            continue
        setting = dataclasses.replace(
            setting, rounds=args.rounds or setting.rounds, repeats=args.repeats or setting.repeats
        )
        results.append(measure(setting))
        logger.info("%s", json.dumps({k: v for k, v in results[-1].items() if k != "equality"}))
    load["after"] = load_average()
    report = {
        "command": " ".join([parser.prog, *(shlex.quote(a) for a in arguments)]),
        "machine": machine_info(torch.device("cpu")),
        "load_average": load,
        "results": results,
    }
    markdown = render(report)
    write_report(args.output_dir, SYNTHESIS_OVERHEAD_NAME, report, markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
