"""Resumable suites: a run interrupted mid-way continues where it stopped, skipping what it finished, and ends
with the results of an uninterrupted run; results made with other settings are refused with the differences
named. Also the suites the evidence issue defines (fashion-mnist-full, gpu) and the torch.compile measurement."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from benchmarks.harness import BenchmarkError, get_suite, run_benchmark
from benchmarks.harness import runner as benchmark_runner
from benchmarks.harness.cli import main as benchmark_main
from benchmarks.harness.device import describe_load, load_average
from benchmarks.harness.measure import measure_compiled
from benchmarks.harness.paths import BENCHMARKS_DIR
from benchmarks.harness.resume import RunStore, settings_digest
from benchmarks.harness.runner import train_one_seed

ROOT = os.path.dirname(BENCHMARKS_DIR)


def _tiny_suite(**overrides):
    suite = get_suite("quick", models=["vit-mini"], methods=["bp", "repl-k4"], seeds=2, epochs=1,
                      max_train_samples=48, batch_size=16)
    return dataclasses.replace(
        suite, max_test_samples=32, timing_warmup_steps=1, timing_rounds=1, timing_steps_per_round=1,
        inference_batch_size=8, inference_rounds=1, inference_calls_per_round=1, **overrides,
    )


def _runs(results):
    return {
        (method, run["seed"]): run
        for method, entry in results["models"]["vit-mini"]["methods"].items()
        for run in entry.get("runs", [])
    }


class Interrupted(Exception):
    """Stands for the kill: raised from inside the run, after some runs finished."""


def test_interrupted_suite_resumes_skipping_finished_runs_and_equals_a_straight_run(tmp_path, monkeypatch):
    suite = _tiny_suite()
    straight = run_benchmark(suite, tmp_path / "straight")
    trained = []
    real_train_run = benchmark_runner.train_run

    def interrupted_after_two(*args, **kwargs):
        if len(trained) == 2:
            raise Interrupted
        trained.append(args[2:4])  # (method, seed)
        return real_train_run(*args, **kwargs)

    monkeypatch.setattr(benchmark_runner, "train_run", interrupted_after_two)
    with pytest.raises(Interrupted):
        run_benchmark(suite, tmp_path / "resumed")
    store = RunStore(tmp_path / "resumed")
    assert trained == [("bp", 0), ("repl-k4", 0)]
    assert not (tmp_path / "resumed" / "results.json").exists()
    finished = sorted(os.listdir(os.path.join(store.directory, "vit-mini")))
    assert finished == ["bp-seed0.json", "measurements.json", "repl-k4-seed0.json"]
    first_record = (tmp_path / "resumed" / "runs" / "vit-mini" / "bp-seed0.json").read_bytes()

    # The rerun measures nothing again and trains only the two runs that were left.
    trained.clear()
    def counted(*args, **kwargs):
        trained.append(args[2:4])
        return real_train_run(*args, **kwargs)

    monkeypatch.setattr(benchmark_runner, "train_run", counted)
    monkeypatch.setattr(benchmark_runner, "measure_memory", lambda *a, **k: pytest.fail("measured again"))
    resumed = run_benchmark(suite, tmp_path / "resumed")
    assert trained == [("bp", 1), ("repl-k4", 1)]
    assert (tmp_path / "resumed" / "runs" / "vit-mini" / "bp-seed0.json").read_bytes() == first_record
    assert sorted(resumed["reused_from_earlier_runs"]) == [
        os.path.join("runs", "vit-mini", f"{piece}.json") for piece in ("bp-seed0", "measurements", "repl-k4-seed0")
    ]
    # Same seeds, same data order, same process: the resumed suite's runs are the straight run's, to the bit.
    straight_runs, resumed_runs = _runs(straight), _runs(resumed)
    assert straight_runs.keys() == resumed_runs.keys() == {(m, s) for m in ("bp", "repl-k4") for s in (0, 1)}
    for key, run in straight_runs.items():
        for field in ("accuracy_per_epoch", "train_loss_per_epoch", "steps"):
            assert resumed_runs[key][field] == run[field], (key, field)
    on_disk = json.loads((tmp_path / "resumed" / "results.json").read_text())
    assert on_disk["models"]["vit-mini"]["methods"]["repl-k4"]["accuracies"] == [
        resumed_runs[("repl-k4", seed)]["accuracy"] for seed in (0, 1)
    ]
    markdown = (tmp_path / "resumed" / "results.md").read_text()
    assert "resumed: 3 finished pieces" in markdown
    # The runtime line is the last sitting's; the time every run trained, reused or not, is given beside it.
    total = sum(run["train_seconds"] for run in resumed_runs.values())
    assert f"in this sitting; the 4 training runs took {total:.0f} s of training in all" in markdown


def test_a_seed_trained_by_a_process_of_its_own_is_collected_by_the_whole_suite(tmp_path, monkeypatch, capsys):
    suite = _tiny_suite()
    finished = train_one_seed(suite, 1, tmp_path)
    assert list(finished["vit-mini"]) == ["bp", "repl-k4"]
    assert sorted(os.listdir(tmp_path / "runs" / "vit-mini")) == ["bp-seed1.json", "repl-k4-seed1.json"]
    assert not (tmp_path / "results.json").exists()  # nothing measured, nothing written but the runs
    trained = []
    real_train_run = benchmark_runner.train_run

    def counted(*args, **kwargs):
        trained.append(args[2:4])
        return real_train_run(*args, **kwargs)

    monkeypatch.setattr(benchmark_runner, "train_run", counted)
    assert train_one_seed(suite, 1, tmp_path) == finished and trained == []  # finished: not trained again
    results = run_benchmark(suite, tmp_path)
    assert trained == [("bp", 0), ("repl-k4", 0)]
    runs = _runs(results)
    assert runs.keys() == {(m, s) for m in ("bp", "repl-k4") for s in (0, 1)}
    for method in ("bp", "repl-k4"):
        assert runs[(method, 1)] == finished["vit-mini"][method]
    with pytest.raises(BenchmarkError, match=r"--only-seed 2 is outside the suite's seeds 0 to 1: .*--seeds"):
        train_one_seed(suite, 2, tmp_path)
    with pytest.raises(BenchmarkError, match=r"The transfer suite pretrains its models.*without --only-seed"):
        train_one_seed(get_suite("transfer"), 0, tmp_path)
    assert benchmark_main(["--suite", "quick", "--only-seed", "3", "--output-dir", str(tmp_path)]) == 2
    assert "error: --only-seed 3 is outside the suite's seeds 0 to 2" in capsys.readouterr().err


def test_one_seed_split_by_models_between_processes_is_collected_by_the_whole_suite(tmp_path, monkeypatch):
    suite = _tiny_suite(seeds=1, models=("vit-mini", "convnext-mini"), methods=("bp",))
    finished = {}
    for model in suite.models:  # what `--only-seed 0 --models <model>` runs, one process per model
        finished.update(train_one_seed(dataclasses.replace(suite, models=(model,)), 0, tmp_path))
    trained = []
    monkeypatch.setattr(benchmark_runner, "train_run", lambda *args, **kwargs: trained.append(args[2:4]))
    results = run_benchmark(suite, tmp_path)
    assert trained == []
    for model in suite.models:
        assert results["models"][model]["methods"]["bp"]["runs"] == [finished[model]["bp"]]


def test_a_system_without_load_averages_trains_and_reports_without_them(tmp_path, monkeypatch):
    monkeypatch.delattr(os, "getloadavg", raising=False)  # as on Windows, where it does not exist at all
    assert load_average() is None
    assert describe_load({"before": None, "after": None}) == "load average not reported by this system"
    results = run_benchmark(_tiny_suite(seeds=1, methods=("bp",)), tmp_path)
    assert "load_average" not in _runs(results)[("bp", 0)]
    assert "load average of the machine" not in (tmp_path / "results.md").read_text()


def test_results_made_with_other_settings_are_refused_naming_the_difference(tmp_path):
    suite = _tiny_suite(seeds=1)
    run_benchmark(suite, tmp_path)
    with pytest.raises(BenchmarkError, match=r"bp-seed0\.json holds a result made with other settings \(epochs: 1 on "
                                             r"disk, 2 now\).*--output-dir"):
        run_benchmark(dataclasses.replace(suite, epochs=2), tmp_path)
    with pytest.raises(BenchmarkError, match=r"measurements\.json holds a result made with other settings.*methods"):
        run_benchmark(dataclasses.replace(suite, methods=("bp",)), tmp_path)
    # More seeds with the same settings: the finished seed is reused, the new one trained.
    more = run_benchmark(dataclasses.replace(suite, seeds=2), tmp_path)
    assert len(more["reused_from_earlier_runs"]) == 3 and len(_runs(more)) == 4


def test_run_store_digest_ignores_key_order_and_sequence_type(tmp_path):
    store = RunStore(tmp_path)
    settings = {"lr": 1e-3, "methods": ("bp", "repl-k4"), "model": "vit-mini"}
    store.save("vit-mini", "bp-seed0", settings, {"accuracy": 0.5})
    reordered = {"model": "vit-mini", "methods": ["bp", "repl-k4"], "lr": 1e-3}
    assert settings_digest(settings) == settings_digest(reordered)
    assert store.load("vit-mini", "bp-seed0", reordered) == {"accuracy": 0.5}
    assert store.load("vit-mini", "bp-seed1", reordered) is None
    with pytest.raises(BenchmarkError, match=r"lr: 0\.001 on disk, 0\.002 now"):
        store.load("vit-mini", "bp-seed0", {**reordered, "lr": 2e-3})


@pytest.mark.slow
def test_a_killed_suite_process_continues_where_it_stopped(tmp_path):
    command = [sys.executable, "-m", "benchmarks", "--suite", "quick", "--models", "vit-mini", "--methods", "bp",
               "repl-k4", "--seeds", "2", "--epochs", "20", "--max-train-samples", "256", "--output-dir", str(tmp_path)]
    environment = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    first = tmp_path / "runs" / "vit-mini" / "bp-seed0.json"
    process = subprocess.Popen(command, cwd=ROOT, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not first.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert first.exists() and process.poll() is None, "the first run did not finish while the suite ran"
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait()
    finished = set(os.listdir(first.parent))
    assert len(finished) < 5 and not (tmp_path / "results.json").exists()  # killed mid-way
    record = first.read_bytes()
    completed = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, check=False)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert first.read_bytes() == record  # not trained again
    assert "finished earlier, reused" in completed.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    for method in ("bp", "repl-k4"):
        assert [run["seed"] for run in results["models"]["vit-mini"]["methods"][method]["runs"]] == [0, 1]


def test_fashion_mnist_full_is_the_resolving_budget():
    suite = get_suite("fashion-mnist-full")
    assert suite.dataset == "fashion-mnist" and suite.max_train_samples is None and suite.max_test_samples is None
    assert suite.models == ("vit-mini", "convnext-mini") and suite.image_size == 28 and suite.seeds == 3
    assert suite.trained_methods() == ["bp", "repl-k4", "repl-k4-half", "drop-k4", "tie-k4", "sd"]


def test_gpu_suite_measures_the_baselines_eager_and_compiled():
    suite = get_suite("gpu")
    assert suite.models == ("vit-base", "convnext-tiny") and suite.mixed_precision == "bf16"
    assert {"bp", "repl-k4", "repl-k4-half", "drop-k4", "tie-k4", "sd", "narrow"} <= set(suite.methods)
    assert set(suite.compiled_methods) <= set(suite.methods) and "repl-k4" in suite.compiled_methods
    with pytest.raises(BenchmarkError, match="Unknown method 'nope'"):
        get_suite("gpu", compiled_methods=("nope",))


def test_compiled_measurement_covers_the_compiled_methods_only():
    suite = dataclasses.replace(
        _tiny_suite(), methods=("bp", "repl-k4", "sd"), compiled_methods=("bp", "repl-k4"), compile_backend="eager",
    )
    batch = {"pixel_values": torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(0)),
             "labels": torch.arange(8) % 10}
    results = measure_compiled(suite, "vit-mini", list(suite.methods), batch, 10, torch.device("cpu"))
    assert set(results) == {"bp", "repl-k4"}
    for entry in results.values():
        assert entry["compiled_median_step_s"] > 0 and entry["compile_seconds"] > 0
        assert entry["compiled_train_images_per_s"] == pytest.approx(8 / entry["compiled_median_step_s"])
        assert "compiled_cuda_peak_bytes" not in entry  # CPU: no CUDA peak to report
