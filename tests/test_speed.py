"""The speed benchmark (`python -m benchmarks --suite speed`) and its bandwidth instrument, on tiny presets."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch

from benchmarks import speed
from benchmarks.harness import cli as benchmark_cli
from benchmarks.harness.bandwidth import PHASES, measure_phase_bandwidth, synthesis_traffic
from benchmarks.harness.device import step_clock
from benchmarks.harness.measure import replaced_modules
from benchmarks.harness.meters import flop_counter
from benchmarks.harness.methods import build_method_model
from hf_replacement.synthesis import replacement_state, synthesize


def _repl(model_name: str) -> torch.nn.Module:
    return build_method_model("repl-k4", model_name, 10, 8, 3, seed=0).model


@pytest.mark.parametrize("model_name", ["vit-mini", "convnext-mini"])
def test_synthesis_traffic_counts_each_neighbour_read_and_each_weight_written(model_name):
    """Forward and rebuild read every term's neighbour tensor and write every weight; backward reads the
    weights' gradients and the neighbours, and writes the neighbours' gradients. Counted here from the
    block's state, there from the synthesis node's inputs."""
    modules = replaced_modules(_repl(model_name))
    neighbours = [owner._parameters[attr] for module in modules for owner, attr in replacement_state(module).neighbours]
    read = sum(tensor.numel() * 4 for tensor in neighbours)
    written = sum(w.numel() * 4 for module in modules for w in synthesize(module))
    assert synthesis_traffic(modules) == {"forward": read + written, "rebuild": read + written,
                                          "backward": written + 2 * read}
    # ViT: both neighbours the weights' own shapes; ConvNeXt: stage boundaries, neighbours of another width.
    assert (read == 2 * written) == (model_name == "vit-mini")


def test_phase_bandwidth_reports_each_phase_beside_the_triad():
    model = _repl("convnext-mini")
    results = measure_phase_bandwidth(model, replaced_modules(model), repeats=2)
    assert set(results) == set(PHASES)
    traffic = synthesis_traffic(replaced_modules(model))
    for phase, entry in results.items():
        assert entry["bytes"] == traffic[phase]
        # bytes / seconds, both as reported
        assert math.isclose(entry["gb_per_s"], entry["bytes"] / (entry["ms"] / 1e3) / 1e9, rel_tol=1e-9)
        low, high = entry["bandwidth_ratio_iqr"]
        assert 0 < low <= entry["bandwidth_ratio"] <= high and entry["triad_gb_per_s"] > 0
    assert all(p.grad is None for p in model.parameters())  # the backward phase leaves no gradient behind


@pytest.fixture
def torch_threads_restored():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("torch_threads_restored")
def test_speed_suite_measures_ratios_limit_and_unchanged_saved_bytes(tmp_path, monkeypatch):
    monkeypatch.setattr(speed, "SETTINGS", (speed.SpeedSetting("vit-mini", 8, 8),))
    argv = ["--suite", "speed", "--rounds", "2", "--steps", "1", "--device", "cpu", "--output-dir", str(tmp_path),
            "--threads", "2"]
    assert benchmark_cli.main(argv) == 0
    report = json.loads((tmp_path / "speed.json").read_text())
    assert report["command"].startswith("python -m benchmarks --suite speed --rounds 2")
    assert report["precision"] == "fp32"
    (result,) = report["results"]
    assert set(result["step_ratio"]) == {"repl-k4", "repl-k4-half", "drop-k4"}
    for ratio in result["step_ratio"].values():
        assert ratio["iqr"][0] <= ratio["median"] <= ratio["iqr"][1]
    # RepL saves exactly what bp saves for backward: its synthesized weights are rebuilt, not kept.
    assert result["saved_bytes"]["repl-k4"] == result["saved_bytes"]["bp"] > 0
    # the limit: bp's step less AdamW's share for the freed parameters (one block of 8 blocks' worth)
    assert 0 < result["freed_parameter_fraction"] < 1 and result["limit"] < 1
    assert math.isclose(
        result["limit"],
        1 - result["bp_optimizer_ms"] * result["freed_parameter_fraction"] / result["step_ms"]["bp"],
        rel_tol=1e-12,
    )
    assert math.isclose(result["synthesis_ms"], sum(result["bandwidth"][p]["ms"] for p in PHASES), rel_tol=1e-12)
    # at the triad's rate: faster than measured, since every phase's ops move more than its compulsory bytes
    assert 0 < speed.synthesis_at_triad_ms(result["bandwidth"]) < result["synthesis_ms"]
    # FLOPs: a replaced block computes the plain block's products (plus the coefficients' dot products);
    # the half surrogate skips attention and half the MLP; dropping skips the whole block.
    flops = result["flops_ratio"]
    assert 1 <= flops["repl-k4"] < 1.01
    assert flops["drop-k4"] < flops["repl-k4-half"] < 1
    assert flops["repl-k4-half"] == result["step_flops"]["repl-k4-half"] / result["step_flops"]["bp"]
    markdown = (tmp_path / "speed.md").read_text()
    assert "| vit-mini (8, 8) |" in markdown and "of triad" in markdown
    # --threads 2: two torch threads, so the steps are timed in wall-clock
    assert report["machine"]["torch_threads"] == 2 and torch.get_num_threads() == 2
    assert report["clock"] == "wall-clock" and "steps timed in wall-clock;" in markdown
    # State: bp's less the replaced block's weights, gradients and AdamW state, plus what RepL adds: the block's
    # (2, 1) coefficients with their gradient and two AdamW moments (8 bytes each) and AdamW's step count (4 bytes).
    assert result["state_bytes"]["repl-k4"] - result["analytic_state_bytes"] == 4 * 8 + 4
    assert result["analytic_state_bytes"] < result["state_bytes"]["bp"]


@pytest.mark.parametrize("groups", [1, 8])
def test_flop_counter_counts_a_convolutions_backward_as_two_forwards(groups):
    """Input and weight gradients each cost the forward's multiply-adds, grouped (depthwise) or not; torch's own
    formula counts a grouped convolution's weight gradient as an ungrouped one."""
    conv = torch.nn.Conv2d(8, 8, 3, padding=1, groups=groups)
    x = torch.randn(2, 8, 5, 5, requires_grad=True)
    forward = 2 * 2 * 8 * (8 // groups) * 5 * 5 * 3 * 3  # 2 x batch x outputs x inputs each x positions x taps
    with flop_counter() as counter:
        conv(x).sum().backward()
    assert counter.get_total_flops() == 3 * forward
    with flop_counter() as counter:  # no input gradient wanted: the weight's only
        conv(x.detach()).sum().backward()
    assert counter.get_total_flops() == 2 * forward


def test_step_clock_on_one_cpu_thread_leaves_out_time_the_thread_does_not_run():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert step_clock(torch.device("cpu")) == (time.perf_counter, "wall-clock")
        torch.set_num_threads(1)
        clock, name = step_clock(torch.device("cpu"))
        assert name == "thread CPU time"
        started, wall_started = clock(), time.perf_counter()
        time.sleep(0.3)  # the thread waits: the core is free for others, as when another process takes it
        assert time.perf_counter() - wall_started >= 0.3 and clock() - started < 0.15
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("flag", ["--rounds", "--threads"])
def test_speed_suite_has_its_own_flags(flag):
    with pytest.raises(SystemExit) as raised:
        benchmark_cli.main(["--suite", "speed", flag, "0"])
    assert raised.value.code == 2
