"""Synthesis against the machine's memory bandwidth: per phase, the bytes a synthesis must move, its
time, and a streaming triad over the same bytes timed next to it.

A training step synthesizes each replaced block's weights three times: in the forward (`forward`),
again when backward needs the weights its layers saved (`rebuild`, without autograd), and the
synthesis's own backward into the coefficients and both neighbours (`backward`). What each phase
must move at the least (its compulsory traffic, fp32 or the parameters' dtype):

- forward and rebuild: read every neighbour tensor the block is built from, write every synthesized tensor;
- backward: read the synthesized tensors' gradients, read the neighbour tensors again (the
  coefficients' gradients are their dot products with the gradients) and write their gradients.

The reference for each phase is the STREAM triad `out = x + s·y` over three preallocated tensors of
that phase's total bytes (a third each), the fastest way this machine moves those bytes with a torch
kernel. Triad and phase alternate in every repeat, so both see the same load from other processes:
the per-repeat ratio triad time / phase time is the fraction of the streaming bandwidth the phase
reaches, meaningful even on a busy machine; its median and interquartile range are reported.
Minor page faults per phase are counted too (first touches of freshly mapped memory, which the
allocator's large fresh tensors pay for and a preallocated triad does not).

One more, untimed, run of each phase under `op_traffic.OpTrafficMeter` gives the bytes its ATen ops
read and write (the op traffic), the ceiling compulsory / op traffic that no faster op can lift without
fusing ops, and the ops that took the most time: where the time goes.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from hf_replacement.synthesis import replacement_state, synthesize

from .device import synchronize
from .op_traffic import OpTrafficMeter

PHASES = ("forward", "rebuild", "backward")
# Ops listed per phase in the profile: the ones that took the most time.
PROFILED_OPS = 4
# Repeats dropped before the medians: the allocator and caches warm up on them.
WARMUP_REPEATS = 2


def _minor_faults() -> int:
    try:
        import resource
    except ImportError:  # not on Windows: no counts
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def synthesis_traffic(modules: Sequence[nn.Module]) -> dict[str, int]:
    """Compulsory bytes of each phase over all `modules` (replaced blocks), as the module docstring defines them.

    The neighbour tensors are those the block's state names for its synthesis, one per term.
    """
    written = read = 0
    for module in modules:
        with torch.no_grad():
            written += sum(w.numel() * w.element_size() for w in synthesize(module))
        sources = [getattr(owner, attr) for owner, attr in replacement_state(module).neighbours]
        read += sum(source.numel() * source.element_size() for source in sources)
    return {"forward": read + written, "rebuild": read + written, "backward": written + 2 * read}


def _triad(numel: int, device: torch.device, dtype: torch.dtype) -> tuple[Any, ...]:
    x = torch.rand(numel, device=device, dtype=dtype)
    return x, torch.rand(numel, device=device, dtype=dtype), torch.empty_like(x)


def _timed(device: torch.device, function: Any) -> tuple[float, int, Any]:
    synchronize(device)
    faults, started = _minor_faults(), time.perf_counter()
    result = function()
    synchronize(device)
    return time.perf_counter() - started, _minor_faults() - faults, result


def _forward(modules: Sequence[nn.Module]) -> list[torch.Tensor]:
    """The forward phase: every replaced block's weights, with autograd."""
    return [w for module in modules for w in synthesize(module)]


def _rebuild(modules: Sequence[nn.Module]) -> None:
    """The rebuild phase: the same weights without autograd, as backward rebuilds them."""
    with torch.no_grad():
        _forward(modules)


def _metered_phases(
    model: nn.Module, modules: Sequence[nn.Module], gradients: Sequence[torch.Tensor], device: torch.device
) -> dict[str, OpTrafficMeter]:
    """One run of each phase under an `OpTrafficMeter`: phase -> meter."""
    meters = {phase: OpTrafficMeter(device) for phase in PHASES}
    with meters["forward"]:
        weights = _forward(modules)
    with meters["rebuild"]:
        _rebuild(modules)
    with meters["backward"]:
        torch.autograd.backward(weights, gradients)
    model.zero_grad(set_to_none=True)
    return meters


def _quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        return values[0], values[0], values[0]
    low, median, high = statistics.quantiles(values, n=4, method="inclusive")
    return low, median, high


def measure_phase_bandwidth(
    model: nn.Module, modules: Sequence[nn.Module], repeats: int, device: torch.device | None = None
) -> dict[str, dict[str, Any]]:
    """Per phase: compulsory bytes, median seconds, bandwidth, the triad's bandwidth and the ratio
    (median and quartiles of per-repeat ratios), median page faults, over all `modules` of `model`; and from
    one metered run, the phase's op traffic, its ceiling and its heaviest ops (`op_traffic.OpTrafficMeter`)."""
    device = device or torch.device("cpu")
    traffic = synthesis_traffic(modules)
    with torch.no_grad():
        sample = _forward(modules)
    dtype = sample[0].dtype
    gradients = [torch.ones_like(w) for w in sample]
    del sample
    triads = {
        phase: _triad(max(1, traffic[phase] // (3 * dtype.itemsize)), device, dtype) for phase in PHASES
    }
    records: dict[str, list[tuple[float, float, int]]] = {phase: [] for phase in PHASES}

    def run_triad(phase: str) -> float:
        x, y, out = triads[phase]
        return _timed(device, lambda: torch.add(x, y, alpha=0.5, out=out))[0]

    for repeat in range(repeats + WARMUP_REPEATS):
        triad = run_triad("forward")
        seconds, faults, weights = _timed(device, lambda: _forward(modules))
        timings = {"forward": (triad, seconds, faults)}
        triad = run_triad("rebuild")
        seconds, faults, _ = _timed(device, lambda: _rebuild(modules))
        timings["rebuild"] = (triad, seconds, faults)
        triad = run_triad("backward")
        seconds, faults, _ = _timed(device, lambda outputs=weights: torch.autograd.backward(outputs, gradients))
        timings["backward"] = (triad, seconds, faults)
        del weights
        model.zero_grad(set_to_none=True)
        if repeat >= WARMUP_REPEATS:
            for phase, record in timings.items():
                records[phase].append(record)
    meters = _metered_phases(model, modules, gradients, device)
    results = {}
    for phase, record in records.items():
        seconds = statistics.median(r[1] for r in record)
        triad_seconds = statistics.median(r[0] for r in record)
        low, median, high = _quartiles([r[0] / r[1] for r in record])
        results[phase] = {
            "bytes": traffic[phase],
            "ms": 1e3 * seconds,
            "gb_per_s": traffic[phase] / seconds / 1e9,
            "triad_gb_per_s": traffic[phase] / triad_seconds / 1e9,
            "bandwidth_ratio": median,
            "bandwidth_ratio_iqr": [low, high],
            "page_faults": statistics.median(r[2] for r in record),
            "op_bytes": meters[phase].total_bytes,
            "op_ceiling": traffic[phase] / meters[phase].total_bytes,
            "heaviest_ops": meters[phase].heaviest(PROFILED_OPS),
        }
    return results


def render_bandwidth_table(results: Sequence[dict[str, Any]]) -> list[str]:
    """Markdown lines: per result (`model`, `image_size`, `bandwidth` from `measure_phase_bandwidth`), each phase's
    compulsory MB, ms, GB/s, the fraction of the triad's bandwidth reached and the ceiling of its op sequence;
    then the profile: each phase's heaviest ops."""
    lines = [
        "Synthesis per phase: compulsory MB, ms, GB/s, the fraction of a streaming triad over the same bytes "
        "timed next to it (median [IQR] of per-repeat ratios; `benchmarks/harness/bandwidth.py`), and the ceiling of "
        "its ATen ops: compulsory / the bytes they read and write (`benchmarks/harness/op_traffic.py`), the "
        "fraction no faster op can exceed without fusing ops:",
        "",
        "| model (px) | " + " | ".join(PHASES) + " |",
        "|---|" + "---|" * len(PHASES),
    ]
    for result in results:
        cells = []
        for phase in PHASES:
            entry = result["bandwidth"][phase]
            low, high = entry["bandwidth_ratio_iqr"]
            cells.append(
                f"{entry['bytes'] / 1e6:.0f} MB, {entry['ms']:.1f} ms, {entry['gb_per_s']:.2f} GB/s, "
                f"{entry['bandwidth_ratio']:.2f} [{low:.2f}-{high:.2f}] of triad, ceiling {entry['op_ceiling']:.2f}"
            )
        lines.append(f"| {result['model']} ({result['image_size']}) | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Where the time goes: each phase's {PROFILED_OPS} slowest ATen ops in one metered run (ms, MB read and "
        "written, calls; the meter adds a few µs per call):",
        "",
        "| model (px) | " + " | ".join(PHASES) + " |",
        "|---|" + "---|" * len(PHASES),
    ]
    for result in results:
        cells = [
            "<br>".join(
                f"{op['op']} {op['ms']:.1f} ms, {op['mb']:.0f} MB, {op['calls']}x"
                for op in result["bandwidth"][phase]["heaviest_ops"]
            )
            for phase in PHASES
        ]
        lines.append(f"| {result['model']} ({result['image_size']}) | " + " | ".join(cells) + " |")
    return lines


__all__ = ["PHASES", "measure_phase_bandwidth", "render_bandwidth_table", "synthesis_traffic"]
