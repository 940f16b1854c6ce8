"""One benchmark run: data, memory/time of every method, training over seeds, derived numbers, outputs."""

from __future__ import annotations

import dataclasses
import logging
import os
import resource
import statistics
import time
from typing import Any

import torch
from tqdm.auto import tqdm

from .data import TensorData, load_tensor_data, timing_batch
from .device import load_average, machine_info, resolve_device
from .errors import BenchmarkError
from .measure import measure_compiled, measure_memory, measure_speed
from .methods import METHODS, resolve_methods
from .output import write_outputs
from .paths import suite_dir
from .resume import RunStore, measurement_settings, training_settings
from .suites import SuiteSpec, validate_suite
from .tasks import CLASSIFICATION, task_of
from .training import train_run
from .transfer import accuracy_after_conversion, pretrain, source_suite
from .verdict import add_equal_time_accuracy

logger = logging.getLogger(__name__)

MB = 2**20
MEASUREMENTS = "measurements"  # the RunStore piece holding a model's memory/time measurements


def run_benchmark(
    suite: SuiteSpec,
    output_dir: str | os.PathLike | None = None,
    *,
    data_dir: str | None = None,
    device: str | torch.device | None = None,
    command: str | None = None,
) -> dict[str, Any]:
    """Run `suite`; write results.json, results.md, accuracy_curves.png, coefficients.png to
    `output_dir` (default `benchmarks/<suite>` in this checkout, wherever the run starts) and return the results.

    A suite with `pretrain` first pretrains each model (or reuses `output_dir/pretrained/<model>`), measures
    each method's conversion on the source task, and fine-tunes from the pretrained weights."""
    validate_suite(suite)
    device = resolve_device(suite, device)
    output_dir = os.fspath(output_dir or suite_dir(suite.name))
    methods = resolve_methods(suite.methods)
    if "bp" in methods:  # bp first: the ratio columns are against it
        methods = ["bp"] + [m for m in methods if m != "bp"]
    trained = [m for m in suite.trained_methods() if m in methods]
    run_started = time.perf_counter()
    phases: dict[str, float] = {}

    data = None
    if suite.trains:
        started = time.perf_counter()
        data = task_of(suite).load(suite, data_dir)
        phases["data"] = time.perf_counter() - started
        logger.info("Data: %s", data.description)
    num_labels = data.num_labels if data is not None else suite.num_labels
    timing_batch_size = suite.timing_batch_size or suite.batch_size
    if suite.task == CLASSIFICATION:
        batch = timing_batch(suite, data, timing_batch_size, device)
    else:  # copies: a slice would keep, and the saved-tensor meter count, the whole training set's storage
        batch = task_of(suite).batch(
            data.train_x[:timing_batch_size].clone(), data.train_y[:timing_batch_size].clone(), device
        )
    if len(batch["labels"]) < timing_batch_size:
        logger.warning("Only %d training images: timing uses batches of that size.", len(batch["labels"]))

    results: dict[str, Any] = {
        "suite": dataclasses.asdict(suite),
        "methods": methods,
        "trained_methods": trained,
        "command": command,
        "machine": machine_info(device),
        "data": data.description if data is not None
        else f"random tensors {suite.num_channels}x{suite.image_size}x{suite.image_size}",
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "models": {},
    }
    models: dict[str, Any] = results["models"]

    store = RunStore(output_dir)
    started = time.perf_counter()
    for model_name in tqdm(suite.models, desc="memory/time", disable=None):
        models[model_name] = {"methods": _measure_model(suite, model_name, methods, batch, num_labels, device, store)}
    phases["memory_and_speed"] = time.perf_counter() - started

    pretrained: dict[str, str] = {}
    if suite.pretrain is not None:
        started = time.perf_counter()
        source_data = load_tensor_data(source_suite(suite), data_dir)
        results["source_data"] = source_data.description
        for model_name in suite.models:
            pretrained[model_name], models[model_name]["pretrained"] = pretrain(
                suite, model_name, source_data, output_dir, device
            )
            for method in methods:
                conversion = accuracy_after_conversion(method, pretrained[model_name], source_data, device)
                models[model_name]["methods"][method].update(conversion)
        phases["pretraining"] = time.perf_counter() - started

    started = time.perf_counter()
    runs = [(seed, name, method) for seed in range(suite.seeds) for name in suite.models for method in trained]
    for seed, model_name, method in tqdm(runs, desc="train", disable=None):
        run = _training_run(suite, model_name, method, seed, data, device, pretrained.get(model_name), store)
        models[model_name]["methods"][method].setdefault("runs", []).append(run)
    phases["training"] = time.perf_counter() - started

    results["reused_from_earlier_runs"] = store.reused
    _summarize(results)
    phases["total"] = time.perf_counter() - run_started
    results["phase_seconds"] = phases
    results["process_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    write_outputs(results, output_dir)
    logger.info("Wrote %s (%.0f s)", output_dir, phases["total"])
    return results


def train_one_seed(
    suite: SuiteSpec,
    seed: int,
    output_dir: str | os.PathLike | None = None,
    *,
    data_dir: str | None = None,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Train seed `seed` of every trained method and model of `suite` into `output_dir/runs/` (finished runs are
    skipped), nothing measured or written besides; {model: {method: run}}. Processes given different seeds share
    a machine without duplicating work; a run of the whole suite then collects their runs. A seed's runs should
    share the machine alike: its bp run sets the equal-wall-clock budget of the others."""
    validate_suite(suite)
    if not 0 <= seed < suite.seeds:
        raise BenchmarkError(
            f"--only-seed {seed} is outside the suite's seeds 0 to {suite.seeds - 1}: pick one of them, or raise "
            "--seeds (the same --seeds on every call)."
        )
    if suite.pretrain is not None:
        raise BenchmarkError(
            f"The {suite.name} suite pretrains its models before any seed trains: run it without --only-seed "
            "(the pretrained models would be built by every process at once)."
        )
    device = resolve_device(suite, device)
    data = task_of(suite).load(suite, data_dir)
    store = RunStore(os.fspath(output_dir or suite_dir(suite.name)))
    trained = [m for m in suite.trained_methods() if m in resolve_methods(suite.methods)]
    runs = [(name, method) for name in suite.models for method in trained]
    finished: dict[str, Any] = {}
    for model_name, method in tqdm(runs, desc=f"train seed {seed}", disable=None):
        run = _training_run(suite, model_name, method, seed, data, device, None, store)
        finished.setdefault(model_name, {})[method] = run
    logger.info("Seed %d trained into %s; run the suite without --only-seed to write its results.", seed,
                store.directory)
    return finished


def _measure_model(
    suite: SuiteSpec, model_name: str, methods: list[str], batch: dict[str, torch.Tensor], num_labels: int,
    device: torch.device, store: RunStore,
) -> dict[str, dict[str, Any]]:
    """Memory and time of every method on one model, or those a previous run with the same settings recorded."""
    settings = measurement_settings(suite, model_name, methods, device)
    recorded = store.load(model_name, MEASUREMENTS, settings)
    if recorded is not None:
        logger.info("%s: memory/time reused from %s", model_name, store.path(model_name, MEASUREMENTS))
        return recorded
    per_method: dict[str, dict[str, Any]] = {}
    for method in methods:
        per_method[method] = {"method": method, **measure_memory(suite, model_name, method, batch, num_labels, device)}
    for method, speed in measure_speed(suite, model_name, methods, batch, num_labels, device).items():
        per_method[method].update(speed)
    for method, compiled in measure_compiled(suite, model_name, methods, batch, num_labels, device).items():
        per_method[method].update(compiled)
    steps = ", ".join(f"{m} {per_method[m]['median_step_s'] * 1e3:.1f} ms" for m in methods)
    logger.info("%s: measured %s", model_name, steps)
    store.save(model_name, MEASUREMENTS, settings, per_method)
    return per_method


def _training_run(
    suite: SuiteSpec, model_name: str, method: str, seed: int, data: TensorData, device: torch.device,
    pretrained: str | None, store: RunStore,
) -> dict[str, Any]:
    """One seed of one method trained, or its record from a previous run with the same settings."""
    settings = training_settings(suite, model_name, method, seed, data.description, device)
    piece = f"{method}-seed{seed}"
    run = store.load(model_name, piece, settings)
    if run is not None:
        logger.info("%s %s seed %d: finished earlier, reused (%s)", model_name, method, seed,
                    store.path(model_name, piece))
        return run
    # Other work on the machine slows a run's wall clock, which the equal-time accuracy compares: kept beside it.
    load_before = load_average()
    run = train_run(suite, model_name, method, seed, data, device, pretrained)
    if load_before is not None:
        run["load_average"] = {"before": load_before, "after": load_average()}
    store.save(model_name, piece, settings, run)
    logger.info("%s %s seed %d: %s %.4f (%.1f s)", model_name, method, seed, task_of(suite).metric.name,
                run["accuracy"], run["train_seconds"])
    return run


def _summarize(results: dict[str, Any]) -> None:
    """Derived fields: MB, ms, ratios against bp of the same run, accuracy mean ± std."""
    for model in results["models"].values():
        methods = model["methods"]
        add_equal_time_accuracy(methods)
        bp = methods.get("bp")
        for entry in methods.values():
            entry["state_memory_mb"] = entry["state_memory_bytes"]["total"] / MB
            entry["saved_activations_mb"] = entry["saved_activation_bytes"] / MB
            entry["training_memory_mb"] = entry["state_memory_mb"] + entry["saved_activations_mb"]
            entry["median_step_ms"] = 1e3 * entry["median_step_s"]
            entry["checkpoint_mb"] = entry["checkpoint"]["bytes"] / MB
            entry["train_images_per_s"] = entry["batch_size"] / entry["median_step_s"]
            if "compiled_cuda_peak_bytes" in entry:
                entry["compiled_cuda_peak_mb"] = entry["compiled_cuda_peak_bytes"] / MB
            if "cuda_peak_bytes" in entry:
                entry["cuda_peak_mb"] = entry["cuda_peak_bytes"] / MB
            runs = entry.get("runs", [])
            if runs:
                accuracies = [run["accuracy"] for run in runs]
                entry["accuracy_mean"] = statistics.fmean(accuracies)
                entry["accuracy_std"] = statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0
                entry["accuracies"] = accuracies
            if bp is not None:
                entry["step_ratio_vs_bp"] = entry["median_step_s"] / bp["median_step_s"]
                entry["memory_ratio_vs_bp"] = entry["training_memory_mb"] / bp["training_memory_mb"]
                if METHODS[entry["method"]].kind == "repl" and "block_state_bytes" in bp:
                    # bp less the replaced blocks' weights, gradients and AdamW state: RepL's memory if
                    # freeing them were all it changed.
                    freed = sum(bp["block_state_bytes"][i] for i in entry["affected_blocks"]) / MB
                    entry["analytic_memory_ratio_vs_bp"] = 1 - freed / bp["training_memory_mb"]
                entry["trainable_ratio_vs_bp"] = entry["trainable_params"] / bp["trainable_params"]
                if entry.get("block_flops_per_image") is not None and bp.get("block_flops_per_image"):
                    entry["block_flops_ratio_vs_bp"] = entry["block_flops_per_image"] / bp["block_flops_per_image"]
                if "cuda_peak_mb" in entry and "cuda_peak_mb" in bp:
                    entry["cuda_peak_ratio_vs_bp"] = entry["cuda_peak_mb"] / bp["cuda_peak_mb"]
