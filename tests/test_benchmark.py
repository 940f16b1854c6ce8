"""Benchmark harness (`benchmarks/`, run from the checkout): the compared methods are what they claim,
the meters count right through public hooks only, a tiny run writes every output, the GPU suite
refuses cleanly without CUDA, the synthesis-overhead script measures and checks both synthesis
implementations, and benchmarks/README.md is generated from the results on disk."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import math
import os
import pathlib
import shutil
import statistics
import subprocess
import sys

import pytest
import torch
from tolerances import assert_fp32_close, reduction_length
from torch import nn

from benchmarks import fsdp_state, synthesis_overhead
from benchmarks.harness import (
    METHODS,
    BenchmarkError,
    SavedTensorMeter,
    SynthesisCounter,
    add_benchmark_arguments,
    build_method_model,
    get_suite,
    render_readme,
    report,
    run_benchmark,
    run_benchmark_from_args,
    state_memory,
    tasks,
    training,
    write_readme,
)
from benchmarks.harness import cli as benchmark_cli
from benchmarks.harness.measure import measure_memory, replaced_modules
from benchmarks.harness.methods import TRANSFER_METHODS, inference_model, replacement_of
from benchmarks.harness.paths import BENCHMARKS_DIR
from benchmarks.harness.suites import PretrainSpec
from hf_replacement import find_blocks
from hf_replacement.loading import load_image_classifier
from hf_replacement.reference import reference_synthesize
from hf_replacement.synthesis import synthesize

IMAGE_SIZE = 8


def _build(method: str, model_name: str, seed: int = 0):
    return build_method_model(method, model_name, num_labels=10, image_size=IMAGE_SIZE, num_channels=1, seed=seed)


def _pixels(batch: int = 4) -> torch.Tensor:
    return torch.randn(batch, 1, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("model_name", ["vit-mini", "deit-mini", "convnext-mini"])
@pytest.mark.parametrize("interval", [4, 3])
def test_drop_removes_the_replaced_blocks_and_runs(model_name, interval, tmp_path):
    plain = _build("bp", model_name)
    repl = _build(f"repl-k{interval}", model_name)
    dropped = _build(f"drop-k{interval}", model_name)
    assert dropped.affected_blocks == sorted(repl.model.replaced_blocks) and dropped.affected_blocks
    blocks = find_blocks(dropped.model)  # discovery reads the updated config depths
    assert len(blocks) == len(find_blocks(plain.model)) - len(dropped.affected_blocks)
    # The surviving blocks are the plain model's, same init (same seed), in order.
    kept = [b for b in find_blocks(plain.model) if b.index not in dropped.affected_blocks]
    for survivor, original in zip(blocks, kept):
        for (name, p), (_, q) in zip(survivor.module.named_parameters(), original.module.named_parameters()):
            assert torch.equal(p, q), name
    removed = sum(
        p.numel() for b in find_blocks(plain.model) if b.index in dropped.affected_blocks for p in b.module.parameters()
    )
    assert sum(p.numel() for p in dropped.model.parameters()) == plain.plain_params - removed
    dropped.model.eval()
    with torch.no_grad():
        logits = dropped.model(pixel_values=_pixels()).logits
    assert logits.shape == (4, 10) and torch.isfinite(logits).all()
    # The shallower model really skips them: its output differs from the plain model's.
    with torch.no_grad():
        assert not torch.allclose(logits, plain.model.eval()(pixel_values=_pixels()).logits)
    # And it saves/loads as a Transformers model of the new depth.
    import transformers

    dropped.model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values=_pixels()).logits, logits)


def test_freeze_counts_and_no_gradients():
    plain = _build("bp", "vit-mini")
    frozen = _build("freeze-k3", "vit-mini")
    blocks = find_blocks(frozen.model)
    frozen_params = sum(p.numel() for i in frozen.affected_blocks for p in blocks[i].module.parameters())
    trainable = sum(p.numel() for p in frozen.model.parameters() if p.requires_grad)
    assert frozen_params > 0
    assert trainable == plain.plain_params - frozen_params
    assert sum(p.numel() for p in frozen.model.parameters()) == plain.plain_params
    frozen.model(pixel_values=_pixels(), labels=torch.tensor([0, 1, 2, 3])).loss.backward()
    for index in frozen.affected_blocks:
        assert all(p.grad is None for p in blocks[index].module.parameters())
    trained = [b for i, b in enumerate(blocks) if i not in frozen.affected_blocks]
    assert all(p.grad is not None for b in trained for p in b.module.parameters())


def test_lora_trains_adapters_and_classifier_only():
    lora = _build("lora", "vit-mini")
    trainable = [n for n, p in lora.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or "classifier" in n for n in trainable)
    assert any("q_proj.lora_A" in n for n in trainable) and any("v_proj.lora_A" in n for n in trainable)
    convnext = _build("lora", "convnext-mini")
    names = [n for n, p in convnext.model.named_parameters() if p.requires_grad]
    assert any("pwconv1.lora_A" in n for n in names) and any("pwconv2.lora_B" in n for n in names)


def test_lora_on_repl_adapts_the_kept_blocks_and_deploys_as_trained():
    """lora-repl-k4-fit: LoRA on the kept blocks only, the coefficients (PEFT's copy) and classifier trained;
    after a step the deployed model (RepL, then LoRA merged) computes what the trained PeftModel computes."""
    built = _build("lora-repl-k4-fit", "vit-mini")
    model = built.model
    replaced = [f"{name}." for name in replacement_of(model).replaced_blocks.values()]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all("lora_" in n or "classifier" in n or "replacement_coefficients" in n for n in trainable)
    assert any("q_proj.lora_A" in n for n in trainable) and any("replacement_coefficients" in n for n in trainable)
    assert not [n for n in trainable if "lora_" in n and any(block in n for block in replaced)]
    before = training._coefficients(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()(pixel_values=_pixels(), labels=torch.tensor([0, 1, 2, 3])).loss.backward()
    optimizer.step()
    after = training._coefficients(model)
    assert set(after) == set(before) and all(after[k] != before[k] for k in after)  # the copy PEFT trains
    model.eval()
    with torch.no_grad():
        expected = model(pixel_values=_pixels()).logits
        deployed = inference_model(built)(pixel_values=_pixels()).logits
    # Merging LoRA and the coefficients into the weights changes the summation order: fp32 rounding.
    assert_fp32_close(deployed, expected, reduction_length(inference_model(built)))


def test_saved_tensor_meter_counts_a_linear_chain_exactly():
    torch.manual_seed(0)
    chain = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(5, 8)
    meter = SavedTensorMeter(exclude=list(chain.parameters()))
    with meter:
        out = chain(x).sum()
    # Linear 1 saves its input x (for its weight's gradient); ReLU saves its output, which Linear 2
    # saves again as its input: one storage. The weights are parameters (state), not counted; sum
    # saves no tensor.
    assert meter.bytes == x.numel() * 4 + 5 * 16 * 4
    out.backward()  # the meter's hooks leave the graph intact
    assert chain[0].weight.grad is not None


def test_saved_tensor_meter_sees_recompute_saving_memory():
    def saved(method: str) -> int:
        model = _build(method, "vit-mini").model.train()
        meter = SavedTensorMeter(exclude=list(model.parameters()) + list(model.buffers()))
        with meter:
            loss = model(pixel_values=_pixels(16), labels=torch.zeros(16, dtype=torch.long)).loss
        loss.backward()
        return meter.bytes

    bp, repl, recompute = saved("bp"), saved("repl-k4"), saved("repl-k4-recompute")
    # RepL keeps what bp keeps (its synthesized weights are rebuilt in backward, not saved); recomputing
    # keeps only the replaced block's input (saved by the checkpoint outside its own hooks).
    assert repl == bp
    assert recompute < repl
    assert recompute > 0.5 * repl


def test_state_memory_counts_parameters_gradients_and_adam():
    model = nn.Linear(10, 10)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 10)).sum().backward()
    optimizer.step()
    memory = state_memory(model, optimizer)
    size = 110 * 4
    assert memory["parameters"] == size and memory["gradients"] == size
    assert memory["optimizer"] == 2 * size + 2 * 4  # exp_avg, exp_avg_sq, and a step scalar per parameter
    assert memory["total"] == sum(v for k, v in memory.items() if k != "total")


def _tiny_suite(**overrides):
    suite = get_suite("quick", seeds=1, epochs=1, max_train_samples=48, batch_size=16)
    return dataclasses.replace(
        suite,
        max_test_samples=32,
        timing_warmup_steps=1,
        timing_rounds=1,
        timing_steps_per_round=1,
        inference_batch_size=8,
        inference_rounds=1,
        inference_calls_per_round=1,
        **overrides,
    )


@pytest.mark.slow
def test_tiny_run_writes_every_output(tmp_path):
    methods = tuple(m for m in METHODS if m not in ("repl-k3-recompute", "freeze-k3"))
    suite = _tiny_suite(methods=methods, accuracy_methods=None)
    results = run_benchmark(suite, tmp_path, command="pytest")
    for name in ("results.json", "results.md", "accuracy_curves.png", "coefficients.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert (tmp_path / "accuracy_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["machine"]["torch"] == torch.__version__ and saved["command"] == "pytest"
    assert set(saved["models"]) == set(suite.models)
    markdown = (tmp_path / "results.md").read_text()
    trained_runs = sum(len(e.get("runs", ())) for m in saved["models"].values() for e in m["methods"].values())
    assert f"recorded by {trained_runs} training runs: over 1 minute at their start and end " in markdown
    for model in saved["models"].values():
        methods = model["methods"]
        assert list(methods) == list(results["methods"]) and set(methods) == set(suite.methods)
        bp = methods["bp"]
        assert bp["step_ratio_vs_bp"] == pytest.approx(1.0)
        for method, entry in methods.items():
            assert f"| {method}" in markdown
            assert 0 < entry["trainable_params"] <= entry["total_params"]
            assert entry["state_memory_mb"] > 0 and entry["saved_activations_mb"] > 0
            assert entry["median_step_ms"] > 0 and math.isfinite(entry["median_step_ms"])
            assert entry["checkpoint_mb"] > 0 and entry["inference_images_per_s"] > 0
            assert 0 <= entry["accuracy_mean"] <= 1 and entry["accuracy_std"] == 0.0
            assert len(entry["runs"][0]["accuracy_per_epoch"]) == 1
            load = entry["runs"][0]["load_average"]
            assert [len(load["before"]), len(load["after"])] == [3, 3] and min(load["before"] + load["after"]) >= 0
        # RepL: fewer trainable parameters and a smaller checkpoint than bp; its merged model is bp's size.
        for method in ("repl-k4", "repl-k3"):
            assert methods[method]["trainable_params"] < bp["trainable_params"]
            assert methods[method]["checkpoint_mb"] < bp["checkpoint_mb"]
            assert methods[method]["inference_params"] == bp["inference_params"]
            assert methods[method]["synthesis_percent"] > 0
            assert methods[method]["runs"][0]["coefficients"]["blocks"]
        assert methods["repl-k4-recompute"]["synthesis_calls_per_block_per_step"] == pytest.approx(2.0)
        assert methods["repl-k4"]["synthesis_calls_per_block_per_step"] == pytest.approx(2.0)  # rebuilt in backward
        # The analytic memory, for RepL methods only; their saved activations are bp's.
        assert {m for m, e in methods.items() if "analytic_memory_ratio_vs_bp" in e} == {
            m for m in methods if METHODS[m].kind == "repl"
        }
        assert methods["repl-k4"]["saved_activations_mb"] == bp["saved_activations_mb"]
        assert methods["drop-k4"]["inference_params"] < bp["inference_params"]
        # Forward FLOPs of a replaced block: the whole block, its MLP sub-block, that at half width, nothing.
        assert methods["repl-k4"]["block_flops_ratio_vs_bp"] == pytest.approx(1.0)
        assert 0 < methods["repl-k4-half"]["block_flops_ratio_vs_bp"] < methods["repl-k4-mlp"][
            "block_flops_ratio_vs_bp"] < 1
        assert methods["drop-k4"]["block_flops_per_image"] == 0 and "block_flops_per_image" not in methods["repl-k3"]
        assert methods["repl-k4-half"]["inference_params"] == bp["inference_params"]  # merged: the plain model
        assert methods["freeze-k4"]["total_params"] == bp["total_params"] > methods["freeze-k4"]["trainable_params"]
        assert methods["lora"]["trainable_params"] < methods["repl-k3"]["trainable_params"]
        # Recomputing changes memory, not arithmetic: the same losses as repl-k4.
        assert methods["repl-k4-recompute"]["runs"][0]["train_loss_per_epoch"] == pytest.approx(
            methods["repl-k4"]["runs"][0]["train_loss_per_epoch"], rel=1e-5
        )
        assert methods["repl-k4-recompute"]["saved_activations_mb"] < methods["repl-k4"]["saved_activations_mb"]
    assert "LoRA adapts a random" in markdown and "| analytic ×bp |" in markdown


def test_analytic_memory_is_bp_less_exactly_the_replaced_blocks_parameter_state():
    suite = _tiny_suite()
    batch = {"pixel_values": _pixels(16), "labels": torch.zeros(16, dtype=torch.long)}
    bp, repl = (measure_memory(suite, "convnext-mini", m, batch, 10, torch.device("cpu")) for m in ("bp", "repl-k4"))
    assert len(bp["block_state_bytes"]) == bp["num_blocks"] and "block_state_bytes" not in repl
    freed = sum(bp["block_state_bytes"][i] for i in repl["affected_blocks"])
    # What RepL adds: its coefficients (with gradient, exp_avg, exp_avg_sq and a step scalar each) and
    # the resampling tables of its stage-boundary blocks.
    model = _build("repl-k4", "convnext-mini").model
    coefficients = list(model.replacement_coefficients.parameters())
    added = sum(4 * c.numel() * c.element_size() + 4 for c in coefficients)
    added += sum(b.numel() * b.element_size() for n, b in model.named_buffers() if "replacement_resample_" in n)
    assert added > 0
    assert repl["state_memory_bytes"]["total"] == bp["state_memory_bytes"]["total"] - freed + added
    assert repl["saved_activation_bytes"] == bp["saved_activation_bytes"]


@pytest.mark.slow
def test_transfer_run_pretrains_once_and_measures_each_conversion(tmp_path):
    pretraining = PretrainSpec("fashion-mnist", epochs=1, max_train_samples=64, max_test_samples=48, batch_size=16)
    suite = _tiny_suite(models=("vit-mini",), methods=TRANSFER_METHODS, accuracy_methods=None, pretrain=pretraining)
    results = run_benchmark(suite, tmp_path, command="pytest")
    model = results["models"]["vit-mini"]
    pretrained, methods = model["pretrained"], model["methods"]
    assert not pretrained["cached"] and (tmp_path / "pretrained" / "vit-mini" / "pretraining.json").is_file()
    # bp and LoRA (B = 0) convert nothing: the pretrained model's own source accuracy.
    assert methods["bp"]["source_accuracy_after_conversion"] == pytest.approx(pretrained["source_accuracy"])
    assert methods["lora"]["source_accuracy_after_conversion"] == pytest.approx(pretrained["source_accuracy"])
    # LoRA + RepL converts as repl-k4-fit does (B = 0; PEFT's coefficient copy starts as the fit), and its
    # coefficients are traced from the copy PEFT trains.
    combined = methods["lora-repl-k4-fit"]
    assert combined["source_accuracy_after_conversion"] == methods["repl-k4-fit"]["source_accuracy_after_conversion"]
    assert combined["coefficient_fit"] == methods["repl-k4-fit"]["coefficient_fit"]
    assert combined["trainable_params"] < methods["repl-k4-fit"]["trainable_params"]
    trace = combined["runs"][0]["coefficients"]["blocks"]["block 3"]
    assert trace["a"][0] != trace["a"][-1]
    fit = methods["repl-k4-fit"]["coefficient_fit"]["3"]
    assert fit["relative_error"] <= fit["default_relative_error"]
    assert "coefficient_fit" not in methods["repl-k4"]
    assert all("accuracy_mean" in entry for entry in methods.values())
    markdown = (tmp_path / "results.md").read_text()
    assert "source acc. after conversion" in markdown and "LoRA adapts a random" not in markdown
    assert (tmp_path / "transfer.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Fine-tuning starts from the pretrained body with a new head for the target's labels.
    directory = str(tmp_path / "pretrained" / "vit-mini")
    saved = load_image_classifier(directory).state_dict()
    tuned = build_method_model("bp", "vit-mini", 10, IMAGE_SIZE, 1, 0, pretrained=directory)
    for key, value in tuned.model.state_dict().items():
        assert torch.equal(value, saved[key]) != key.startswith("classifier."), key
    # A second run reuses the checkpoint; other pretraining settings train it again.
    again = run_benchmark(suite, tmp_path)["models"]["vit-mini"]
    assert again["pretrained"]["cached"]
    assert again["methods"]["repl-k4-fit"]["source_accuracy_after_conversion"] == pytest.approx(
        methods["repl-k4-fit"]["source_accuracy_after_conversion"]
    )
    other = dataclasses.replace(suite, pretrain=dataclasses.replace(pretraining, max_train_samples=32), methods=("bp",))
    with pytest.raises(BenchmarkError, match="other settings"):  # the finished runs of the first settings
        run_benchmark(other, tmp_path)
    shutil.rmtree(tmp_path / "runs")
    assert not run_benchmark(other, tmp_path)["models"]["vit-mini"]["pretrained"]["cached"]


def test_pretraining_flags_only_for_a_transfer_suite():
    assert get_suite("transfer", pretrain_epochs=1).pretrain.epochs == 1
    with pytest.raises(BenchmarkError, match="Suite 'quick' pretrains nothing.*apply to transfer"):
        get_suite("quick", pretrain_epochs=1)


@pytest.mark.slow
def test_accuracy_methods_subset_trains_only_those(tmp_path):
    suite = _tiny_suite(models=("vit-mini",), methods=("bp", "repl-k4", "drop-k4"), accuracy_methods=("bp",))
    results = run_benchmark(suite, tmp_path)
    methods = results["models"]["vit-mini"]["methods"]
    assert "runs" in methods["bp"] and "runs" not in methods["repl-k4"]
    assert "not trained" in (tmp_path / "results.md").read_text()


def test_unknown_method_and_model_are_clear_errors():
    with pytest.raises(BenchmarkError, match="Unknown method 'sgd'"):
        get_suite("quick", methods=["bp", "sgd"])
    with pytest.raises(BenchmarkError, match="Unknown model"):
        get_suite("quick", models=["resnet-9000"])
    assert get_suite("quick", methods=["bp,drop", "freeze"]).methods == ("bp", "drop-k4", "freeze-k4")


def test_cli_flags_and_error_exit(capsys):
    parser = argparse.ArgumentParser()
    add_benchmark_arguments(parser)
    args = parser.parse_args(["--suite", "quick", "--methods", "bp", "nonsense"])
    assert run_benchmark_from_args(args) == 2
    assert "Unknown method 'nonsense'" in capsys.readouterr().err
    args = parser.parse_args([])
    assert args.suite == "quick" and args.seeds is None and args.output_dir is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_gpu_suite_without_cuda_is_a_clear_error(tmp_path):
    with pytest.raises(BenchmarkError, match="needs a CUDA GPU"):
        run_benchmark(get_suite("gpu"), tmp_path)
    assert not any(tmp_path.iterdir())
    parser = argparse.ArgumentParser()
    add_benchmark_arguments(parser)
    assert run_benchmark_from_args(parser.parse_args(["--suite", "gpu", "--output-dir", str(tmp_path)])) == 2


def run_gpu_checks(*arguments: str, python: str = sys.executable) -> subprocess.CompletedProcess:
    script = pathlib.Path(__file__).parent.parent / "benchmarks" / "gpu_checks.sh"
    return subprocess.run(
        ["bash", str(script), *arguments], env={**os.environ, "PYTHON": python},
        capture_output=True, text=True, timeout=120,
    )


needs_bash = pytest.mark.skipif(shutil.which("bash") is None, reason="the GPU checks are a bash script")


@needs_bash
@pytest.mark.parametrize("budget", ["abc", "30"])
def test_gpu_checks_script_refuses_a_bad_budget_before_writing_anything(tmp_path, budget):
    result = run_gpu_checks(str(tmp_path / "out"), budget)
    assert result.returncode == 2
    assert f"SECONDS must be a whole number of seconds, at least 60 (got '{budget}')" in result.stderr
    assert not (tmp_path / "out").exists()


@needs_bash
def test_gpu_checks_script_exits_non_zero_when_a_step_fails(tmp_path):
    """A run whose steps failed must not look like a finished one: here a stand-in Python that reports CUDA
    and fails everything else."""
    python = tmp_path / "python"
    python.write_text('#!/usr/bin/env bash\ncase "$*" in *cuda.is_available*) exit 0;; esac\nexit 3\n')
    python.chmod(0o755)
    result = run_gpu_checks(str(tmp_path / "out"), "120", python=str(python))
    assert result.returncode == 1
    assert "3 of 3 steps failed or did not run" in result.stderr
    summary = (tmp_path / "out" / "summary.txt").read_text()
    for step in ("cuda-tests", "gpu-suite", "speed-cuda"):
        assert f"{step}: exit status 3" in summary


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@needs_bash
def test_gpu_checks_script_without_cuda_stops_at_once_and_says_why(tmp_path):
    result = run_gpu_checks(str(tmp_path / "out"))
    assert result.returncode == 2
    assert "no CUDA device visible" in result.stderr and "run it on a GPU machine" in result.stderr
    assert (tmp_path / "out" / "summary.txt").read_text() == result.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["summary.txt"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_suite_runs_on_cuda(tmp_path):
    suite = dataclasses.replace(
        get_suite("gpu", models=["vit-mini"], methods=["bp", "repl-k4", "repl-k4-recompute", "drop-k4"]),
        batch_size=8, timing_rounds=1, timing_steps_per_round=2, timing_warmup_steps=1, inference_batch_size=8,
    )
    results = run_benchmark(suite, tmp_path)
    methods = results["models"]["vit-mini"]["methods"]
    assert methods["bp"]["cuda_peak_mb"] > 0
    assert methods["repl-k4-recompute"]["cuda_peak_mb"] <= methods["repl-k4"]["cuda_peak_mb"]
    # torch.compile (inductor) for the suite's compiled methods, each alone: its own peak and throughput.
    assert {m for m, e in methods.items() if "compiled_median_step_s" in e} == {"bp", "repl-k4", "drop-k4"}
    assert all(methods[m]["compiled_cuda_peak_mb"] > 0 for m in ("bp", "repl-k4", "drop-k4"))


@pytest.mark.parametrize(
    "repl_accuracies, drop_accuracies, verdict",
    [([0.80, 0.82, 0.84], [0.70, 0.72, 0.71], "RepL beats the shallower model (+11.0 points, spread 2.2)"),
     ([0.70, 0.72, 0.71], [0.80, 0.82, 0.84], "RepL loses to the shallower model (-11.0 points, spread 2.2)"),
     ([0.70, 0.80, 0.75], [0.74, 0.72, 0.76], "RepL is within the seed spread of the shallower model (+1.0 points"),
     ([0.80], [0.70], "+10.0 points with one seed, no spread to judge by: not evidence either way")],
)
def test_findings_judge_repl_against_drop_by_the_seed_spread(repl_accuracies, drop_accuracies, verdict):
    def method(trainable: int, accuracies: list[float]) -> dict:
        return {"trainable_params": trainable, "state_memory_mb": trainable / 1e5, "saved_activations_mb": 1.0,
                "step_ratio_vs_bp": 1.0, "median_step_s": 0.1, "accuracies": accuracies,
                "accuracy_mean": statistics.mean(accuracies),
                "accuracy_std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0}

    methods = {"bp": method(400, [0.75, 0.75, 0.75][: len(repl_accuracies)]),
               "repl-k4": method(300, repl_accuracies), "drop-k4": method(300, drop_accuracies)}
    text = "\n".join(report._pair_findings("vit-mini", methods, 4))
    assert "- vit-mini, repl-k4: 25.0% fewer trainable parameters than bp" in text
    assert verdict in text


@pytest.mark.parametrize(
    "metric, accuracies, line",
    [(tasks.ACCURACY, [0.80, 0.82, 0.84],
      "- vit-mini: bp's accuracy has a standard deviation of 2.0 points over 3 seeds"),
     (tasks.TASKS["causal-lm"].metric, [8.5, 9.0, 9.5],
      "- vit-mini: bp's perplexity has a standard deviation of 0.500 perplexity over 3 seeds")],
)
def test_findings_give_the_resolution_of_the_budget_as_bps_seed_spread(metric, accuracies, line):
    bp = {"accuracies": accuracies, "accuracy_mean": statistics.mean(accuracies),
          "accuracy_std": statistics.stdev(accuracies)}
    assert report._resolution("vit-mini", {"bp": bp}, metric)[0].startswith(line)
    # One seed has no spread, and a suite that trained nothing has no accuracies: no line.
    assert report._resolution("vit-mini", {"bp": {**bp, "accuracies": accuracies[:1]}}, metric) == []
    assert report._resolution("vit-mini", {"bp": {"trainable_params": 1}}, metric) == []


def _mlp_flops(tokens: int, width: int, hidden: int) -> int:
    return 2 * tokens * 2 * width * hidden  # two Linear layers, 2 FLOPs a multiply-add


@pytest.mark.parametrize("model_name", ["vit-mini", "convnext-mini"])
def test_block_flops_are_the_analytic_count(model_name):
    """FLOPs per image of the blocks repl-k4 replaces, written out from the presets' shapes (8 px images)."""
    from benchmarks.harness.measure import block_flops

    if model_name == "vit-mini":  # 4x4 patches of 2 px + CLS = 17 tokens, width 64, MLP 256; block 3 replaced
        tokens, width = 17, 64
        attention = 2 * tokens * 4 * width * width + 2 * 2 * tokens * tokens * width  # projections, scores, mix
        per_block = [(tokens, width, attention)]
    else:  # stem stride 1: block 3 at 4x4 px, 32 channels; block 7 at 2x2 px, 64 channels; dwconv 7x7
        per_block = [(16, 32, 2 * 16 * 32 * 49), (4, 64, 2 * 4 * 64 * 49)]
    expected = {
        "bp": [mixer + _mlp_flops(n, c, 4 * c) for n, c, mixer in per_block],
        "repl-k4": [mixer + _mlp_flops(n, c, 4 * c) for n, c, mixer in per_block],
        "repl-k4-mlp": [_mlp_flops(n, c, 4 * c) for n, c, _ in per_block],
        "repl-k4-half": [_mlp_flops(n, c, 2 * c) for n, c, _ in per_block],
        "drop-k4": [0],
    }
    for method, flops in expected.items():
        assert block_flops(_build(method, model_name), {"pixel_values": _pixels()}) == pytest.approx(
            statistics.mean(flops)
        ), method


def test_surrogate_summary_answers_against_drop_at_equal_cost():
    def method(step: float, accuracies: list[float], flops: float | None = None) -> dict:
        entry = {"step_ratio_vs_bp": step, "median_step_s": step, "memory_ratio_vs_bp": 0.9, "accuracies": accuracies,
                 "accuracy_mean": statistics.mean(accuracies), "accuracy_std": statistics.stdev(accuracies)}
        return entry | ({"block_flops_ratio_vs_bp": flops} if flops is not None else {})

    results = {"models": {"vit-mini": {"methods": {
        "bp": method(1.0, [0.8, 0.8, 0.8]), "drop-k4": method(0.86, [0.70, 0.71, 0.72]),
        "repl-k4-mlp": method(0.95, [0.80, 0.81, 0.82], 0.67), "repl-k4-half": method(0.88, [0.80, 0.81, 0.82], 0.33),
    }}}}  # fmt: skip
    text = "\n".join(report.surrogate_summary(results))
    assert "at equal cost (step time within 5% of drop-k4's): repl-k4-half on vit-mini." in text
    assert "Beating it in accuracy at a higher cost: repl-k4-mlp on vit-mini." in text
    assert "- vit-mini, repl-k4-mlp: a replaced block costs ×0.67 of a plain block's forward FLOPs; step ×0.95" in text
    results["models"]["vit-mini"]["methods"]["repl-k4-half"] = method(0.88, [0.70, 0.72, 0.71], 0.33)
    results["models"]["vit-mini"]["methods"]["repl-k4-mlp"] = method(0.95, [0.60, 0.62, 0.61], 0.67)
    text = "\n".join(report.surrogate_summary(results))
    assert "drop-k4's): none." in text and "higher cost" not in text and "loses to drop-k4" in text
    assert report.surrogate_summary({"models": {"vit-mini": {"methods": {"bp": method(1.0, [0.8, 0.8])}}}}) == []


class _CheckpointedLinear(nn.Linear):
    """A module whose forward runs inside a non-reentrant checkpoint, as a replaced block with recompute."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Inside, Linear saves `2 * x`: a new storage the checkpoint's own hooks hide from the meter.
        return torch.utils.checkpoint.checkpoint(lambda t: super(_CheckpointedLinear, self).forward(2 * t), x,
                                                 use_reentrant=False)


def test_saved_tensor_meter_counts_what_a_checkpoint_keeps():
    layer = _CheckpointedLinear(8, 4)
    x = torch.randn(5, 8, requires_grad=True)
    meter = SavedTensorMeter(exclude=list(layer.parameters()))
    with meter:
        out = layer(x).sum()
    # What the checkpoint keeps for its recompute is its input, saved through autograd outside its
    # hooks (torch's "Nestable Checkpoint" rule 2): counted, while `2 * x` inside is not.
    assert meter.bytes == x.numel() * 4
    out.backward()
    assert layer.weight.grad is not None


def test_synthesis_counter_counts_forward_and_recompute_syntheses():
    def calls(method: str) -> tuple[int, int]:
        model = _build(method, "vit-mini").model.train()
        counter = SynthesisCounter()
        with counter.active():
            model(pixel_values=_pixels(), labels=torch.tensor([0, 1, 2, 3])).loss.backward()
        model(pixel_values=_pixels(), labels=torch.tensor([0, 1, 2, 3])).loss.backward()  # inactive: not counted
        return counter.calls, len(replaced_modules(model))

    # Forward, then backward: the weights rebuilt for the saved views, or the block recomputed.
    calls_k4, replaced = calls("repl-k4")
    assert replaced and calls_k4 == 2 * replaced
    assert calls("repl-k4-recompute") == (2 * replaced, replaced)


def _attribute_owner(node: ast.Attribute) -> str:
    return node.value.id if isinstance(node.value, ast.Name) else ""


def test_harness_uses_only_public_library_api():
    # No private attribute of another object (the harness's own `self._x` aside), no private import.
    offences = []
    for path in sorted(pathlib.Path(BENCHMARKS_DIR).rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                if _attribute_owner(node) != "self":
                    offences.append(f"{path.name}:{node.lineno} .{node.attr}")
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("hf_replacement"):
                offences += [f"{path.name}:{node.lineno} {a.name}" for a in node.names if a.name.startswith("_")]
    assert not offences


def test_fused_and_reference_synthesis_give_the_same_weights():
    for model_name in ("vit-mini", "convnext-mini"):  # ConvNeXt: neighbours of another width, resampled
        model = _build("repl-k4", model_name).model
        with torch.no_grad():
            for module in replaced_modules(model):
                for fused, reference in zip(synthesize(module), reference_synthesize(module), strict=True):
                    torch.testing.assert_close(fused, reference)


@pytest.fixture(scope="module")
def overhead_dir(tmp_path_factory):
    """A tiny synthesis_overhead.py run: vit-mini only, one round of steps, two synthesis repeats."""
    directory = tmp_path_factory.mktemp("overhead")
    argv = ["--models", "vit-mini", "--rounds", "1", "--repeats", "2", "--output-dir", str(directory)]
    assert synthesis_overhead.main(argv) == 0
    return directory


@pytest.mark.slow
def test_synthesis_overhead_script_writes_measured_numbers(overhead_dir):
    report_json = json.loads((overhead_dir / "synthesis_overhead.json").read_text())
    assert set(report_json) == {"command", "machine", "load_average", "results"}
    assert report_json["command"].startswith("python benchmarks/synthesis_overhead.py --models vit-mini")
    (result,) = report_json["results"]
    assert result["model"] == "vit-mini" and result["replaced_blocks"] == [3]
    assert set(result["synthesis_ms"]) == {"fused", "reference"}
    assert set(result["median_step_ms"]) == {"bp", "repl"}
    numbers = [*result["synthesis_ms"].values(), *result["median_step_ms"].values()]
    numbers.append(result["synthesis_percent_of_step"])
    numbers += [ms for other in result["other_granularities_synthesis_ms"].values() for ms in other.values()]
    assert all(math.isfinite(n) and n > 0 for n in numbers)
    assert set(result["other_granularities_synthesis_ms"]) == {"tensor", "channel"}
    equality = result["equality"]
    assert equality["same_grad_keys"] and equality["weights_max_abs"] <= 1e-6 and equality["grads_max_rel"] <= 1e-4
    markdown = (overhead_dir / "synthesis_overhead.md").read_text()
    assert "fused / reference" in markdown and "| vit-mini (8px, 64) | [3] |" in markdown


@pytest.mark.slow
def test_fsdp_state_script_counts_what_each_process_holds(tmp_path):
    """A tiny fsdp_state.py run of its own (vit-mini at 8 px, bp and repl-k4, 2 spawned processes): no other
    test depends on it, and a failing child comes back as the child's own traceback."""
    fsdp_state_dir = tmp_path
    assert fsdp_state.main(["--models", "vit-mini", "--image-size", "8", "--output-dir", str(tmp_path)]) == 0
    report_json = json.loads((fsdp_state_dir / "fsdp_state.json").read_text())
    assert report_json["command"].startswith("python benchmarks/fsdp_state.py --models vit-mini")
    bp, repl = report_json["results"]
    assert (bp["method"], repl["method"]) == ("bp", "repl-k4") and report_json["processes"] == 2
    for entry in (bp, repl):
        ranks, whole = entry["per_process"], entry["unsharded"]
        # the shards partition the parameters and gradients: together, the whole model's bytes
        for kind in ("parameters", "gradients"):
            assert sum(rank[kind] for rank in ranks) == whole[kind] > 0
        # AdamW: two moments per parameter, sharded; one fp32 step count per tensor, held by every process
        step_bytes = whole["optimizer"] - 2 * whole["parameters"]
        assert step_bytes > 0 and sum(rank["optimizer"] for rank in ranks) == 2 * whole["parameters"] + 2 * step_bytes
        assert all(abs(rank["parameters"] - whole["parameters"] / 2) < whole["parameters"] / 10 for rank in ranks)
    for bp_rank, repl_rank in zip(bp["per_process"], repl["per_process"]):
        assert repl_rank["total"] < bp_rank["total"]
    assert repl["units"] == [[0], [1], [2, 3, 4], [5], [6], [7]] and bp["units"] == [[i] for i in range(8)]
    assert repl["largest_unit_bytes"] == 2 * bp["largest_unit_bytes"]  # two neighbours, gathered together
    markdown = (fsdp_state_dir / "fsdp_state.md").read_text()
    assert "| vit-mini | repl-k4 |" in markdown and "| vit-mini | repl-k4 | 0, 1, 2+3+4, 5, 6, 7 |" in markdown


def test_readme_is_generated_from_the_results_on_disk(tmp_path):
    empty = render_readme(str(tmp_path))
    for command in ("python -m benchmarks --suite quick", "python -m benchmarks --suite fashion-mnist",
                    "python -m benchmarks --suite gpu", "python -m benchmarks --suite causal-lm",
                    "python -m benchmarks --suite segmentation", "python -m benchmarks --suite detection",
                    "python benchmarks/synthesis_overhead.py",
                    "python benchmarks/fsdp_state.py", "python -m benchmarks --readme"):
        assert f"`{command}`" in empty
    not_run = ("Not run yet (no `results.json`): `quick`, `fashion-mnist`, `transfer`, `fashion-mnist-full`, `gpu`, "
               "`causal-lm`, `segmentation`, `detection`.")
    assert not_run in empty
    assert "## Suite" not in empty and "## Synthesis overhead" not in empty and "## Training state" not in empty
    # With the committed quick results and a synthesis-overhead run beside them:
    (tmp_path / "quick").mkdir()
    shutil.copy(os.path.join(BENCHMARKS_DIR, "quick", "results.json"), tmp_path / "quick" / "results.json")
    # The committed reports of the stand-alone scripts: this test renders, it runs no script (their own tests
    # do, and a failure there cannot take this one down).
    for name in ("synthesis_overhead.json", "fsdp_state.json"):
        shutil.copy(os.path.join(BENCHMARKS_DIR, name), tmp_path / name)
    assert write_readme(str(tmp_path)) == str(tmp_path / "README.md")
    text = (tmp_path / "README.md").read_text()
    assert text == render_readme(str(tmp_path))  # deterministic: regenerating changes nothing
    assert "## Suite `quick`" in text and "## Suite `fashion-mnist`" not in text
    assert ("Not run yet (no `results.json`): `fashion-mnist`, `transfer`, `fashion-mnist-full`, `gpu`, `causal-lm`, "
            "`segmentation`, `detection`.") in text
    assert "### vit-mini" in text and "### convnext-mini" in text and "| repl-k4 |" in text
    assert "[`quick/results.md`](quick/results.md)" in text and "(quick/accuracy_curves.png)" in text
    assert "## Synthesis overhead" in text and "| vit-mini (8px, 64) | [3] |" in text
    assert "## Training state per process under FSDP2" in text and "| vit-tiny | repl-k4 |" in text


def test_committed_readme_is_up_to_date():
    with open(os.path.join(BENCHMARKS_DIR, "README.md"), encoding="utf-8") as handle:
        committed = handle.read()
    assert committed == render_readme(), "benchmarks/README.md is generated: run `python -m benchmarks --readme`"


def test_readme_flag_rewrites_the_readme_without_training(monkeypatch, capsys):
    written = []
    monkeypatch.setattr(benchmark_cli, "write_readme", lambda: written.append(True) or "README.md")
    monkeypatch.setattr(benchmark_cli, "run_benchmark", lambda *a, **k: pytest.fail("--readme must not train"))
    assert benchmark_cli.main(["--readme"]) == 0
    assert written == [True] and "README.md" in capsys.readouterr().out


def test_default_output_dir_is_beside_the_package_not_the_cwd(tmp_path, monkeypatch):
    from benchmarks.harness.paths import suite_dir

    monkeypatch.chdir(tmp_path)
    assert suite_dir("quick") == os.path.join(BENCHMARKS_DIR, "quick")
    assert os.path.isfile(os.path.join(BENCHMARKS_DIR, "__main__.py"))


@pytest.mark.slow
def test_output_calibration_script_measures_the_three_initialisations(tmp_path):
    from benchmarks import output_calibration

    argv = ["--models", "vit-mini", "--pretrain-epochs", "1", "--pretrain-max-train-samples", "64",
            "--source-test-samples", "32", "--calibration-images", "16", "--steps", "3",
            "--cache-dir", str(tmp_path), "--output-dir", str(tmp_path)]
    assert output_calibration.main(argv) == 0
    results = json.loads((tmp_path / "output_calibration.json").read_text())
    model = results["models"]["vit-mini"]
    for granularity in output_calibration.GRANULARITIES:
        for init in output_calibration.INITS:
            assert 0 <= model[f"{granularity}/{init}"]["accuracy"] <= 1
        calibrated = model[f"{granularity}/output fit"]["block_output_error"]["3"]
        # L-BFGS starts from the weight fit and keeps the better of what it tries: never worse on its own images.
        assert calibrated["before"] == pytest.approx(model[f"{granularity}/weight fit"]["block_output_error"]["3"])
        assert calibrated["after"] <= calibrated["before"] + 1e-6
    assert "| block |" in (tmp_path / "output_calibration.md").read_text()
