"""The computed verdict: each claim of the paper against each baseline decided by the rule it states (exact counts,
the timing tolerance, the seeds' spread), the accuracy at bp's wall-clock read from the per-epoch times, and the
table at the top of benchmarks/README.md built from the results on disk."""

from __future__ import annotations

import json
import os
import shutil
import statistics

import pytest

from benchmarks.harness import render_readme
from benchmarks.harness.paths import BENCHMARKS_DIR
from benchmarks.harness.readme import read_suites
from benchmarks.harness.verdict import (
    BASELINES,
    EQUAL_COST_TOLERANCE,
    accuracy_at_budget,
    add_equal_time_accuracy,
    model_verdict,
    render_verdict,
    render_verdict_tally,
)


def _run(seed: int, accuracies: list[float], seconds: list[float]) -> dict:
    return {"seed": seed, "accuracy": accuracies[-1], "accuracy_per_epoch": accuracies,
            "train_seconds_at_epoch": seconds}


def _entry(trainable: int, memory_mb: float, step_s: float, accuracies: list[float]) -> dict:
    return {"trainable_params": trainable, "training_memory_mb": memory_mb, "median_step_s": step_s,
            "runs": [_run(seed, [a], [10.0]) for seed, a in enumerate(accuracies)],
            "accuracy_mean": statistics.fmean(accuracies), "accuracy_std": statistics.stdev(accuracies)}


def test_accuracy_at_budget_is_the_last_epoch_finished_in_time():
    run = _run(0, [0.5, 0.6, 0.7], [10.0, 20.0, 30.0])
    assert accuracy_at_budget(run, 30.0) == 0.7
    assert accuracy_at_budget(run, 29.9) == 0.6
    assert accuracy_at_budget(run, 9.9) is None


def test_equal_time_accuracy_uses_bp_of_the_same_seed():
    methods = {
        "bp": {"runs": [_run(0, [0.5, 0.8], [10.0, 20.0]), _run(1, [0.5, 0.9], [15.0, 30.0])]},
        # Slower than bp on seed 0 (its second epoch ends at 21 s > 20 s), as fast on seed 1.
        "repl-k4": {"runs": [_run(0, [0.4, 0.7], [10.5, 21.0]), _run(1, [0.4, 0.8], [15.0, 30.0])]},
        "slow": {"runs": [_run(0, [0.4], [25.0]), _run(1, [0.4], [25.0])]},
    }
    add_equal_time_accuracy(methods)
    assert methods["bp"]["accuracy_at_bp_time"] == [0.8, 0.9]
    assert methods["repl-k4"]["accuracy_at_bp_time"] == [0.4, 0.8]
    assert methods["repl-k4"]["epochs_within_bp_time"] == [1, 2]
    assert methods["repl-k4"]["accuracy_at_bp_time_mean"] == pytest.approx(0.6)
    assert methods["slow"]["accuracy_at_bp_time"] == [None, 0.4] and "accuracy_at_bp_time_mean" not in methods["slow"]


def test_each_claim_is_decided_by_its_rule():
    subject = _entry(900_000, 95.0, 1.0, [0.80, 0.82, 0.84])  # std 0.02
    methods = {
        "repl-k4": subject,
        "bp": _entry(1_000_000, 100.0, 1.0 + EQUAL_COST_TOLERANCE / 2, [0.81, 0.83, 0.85]),  # time within tolerance
        "drop-k4": _entry(899_998, 80.0, 0.8, [0.70, 0.72, 0.74]),  # cheaper, much less accurate
        "tie-k4": _entry(899_994, 95.0, 1.0, [0.90, 0.92, 0.94]),
    }
    verdict = model_verdict(methods)
    assert verdict["fewer trainable parameters"] == {
        "bp": "win (-10.0%)", "drop-k4": "lose (+2 parameters)", "tie-k4": "lose (+6 parameters)",
        "sd": "not run", "narrow": "not run",
    }
    assert verdict["less training memory"]["bp"] == "win (-5.0%)"
    assert verdict["less training memory"]["tie-k4"] == "tie (+0.0%)"  # exact bytes: equal is a tie
    methods["tie-k4"]["training_memory_mb"] = 95.0 - 48 / 2**20  # two coefficients' weight, gradient, AdamW state
    assert model_verdict(methods)["less training memory"]["tie-k4"] == "lose (+48 bytes)"
    assert verdict["less time per step"]["bp"].startswith("tie") and verdict["less time per step"]["drop-k4"] == (
        "lose (+25.0%)")
    accuracy = verdict["equal or better accuracy (equal epochs)"]
    spread = 100 * (2 * 0.02**2) ** 0.5
    assert accuracy["bp"] == f"tie (-1.0 ± {spread:.1f} pts)"
    assert accuracy["drop-k4"] == f"win (+10.0 ± {spread:.1f} pts)"
    assert accuracy["tie-k4"] == f"lose (-10.0 ± {spread:.1f} pts)"
    assert verdict["equal or better accuracy (bp's wall-clock)"]["bp"] == "not recorded"
    add_equal_time_accuracy(methods)
    assert model_verdict(methods)["equal or better accuracy (bp's wall-clock)"]["drop-k4"].startswith("win (+10.0")


def test_one_seed_and_missing_runs_are_not_judged():
    subject, bp = _entry(9, 1.0, 1.0, [0.8, 0.8]), _entry(10, 1.0, 1.0, [0.7, 0.7])
    for entry in (subject, bp):
        entry["runs"] = entry["runs"][:1]
    verdict = model_verdict({"repl-k4": subject, "bp": bp})
    assert verdict["equal or better accuracy (equal epochs)"]["bp"] == "not judged (+10.0 pts, 1 seed)"
    untrained = {k: v for k, v in bp.items() if not k.startswith("accuracy")}
    assert model_verdict({"repl-k4": subject, "bp": untrained})["equal or better accuracy (equal epochs)"]["bp"] == (
        "not trained")
    assert model_verdict({"bp": bp}) is None


def test_verdict_table_rows_and_not_run_suites():
    with open(os.path.join(BENCHMARKS_DIR, "quick", "results.json"), encoding="utf-8") as handle:
        quick = json.load(handle)
    lines = render_verdict({"quick": quick, "gpu": None})
    assert lines[0] == "| suite | model | claim (RepL = repl-k4) | " + " | ".join(f"vs {b}" for b in BASELINES) + " |"
    rows = lines[2:]
    assert len(rows) == 5 * len(quick["models"]) + 1
    assert rows[-1] == "| `gpu` | – | not run (no results.json) |" + " – |" * len(BASELINES)
    bp_params = quick["models"]["vit-mini"]["methods"]["bp"]["trainable_params"]
    repl_params = quick["models"]["vit-mini"]["methods"]["repl-k4"]["trainable_params"]
    assert rows[0].startswith(
        f"| `quick` | vit-mini | fewer trainable parameters | win ({100 * (repl_params / bp_params - 1):+.1f}%) |"
    )


def test_the_tally_counts_each_outcome_and_leaves_out_what_judges_nothing():
    methods = {
        "repl-k4": _entry(900_000, 95.0, 1.0, [0.80, 0.82, 0.84]),
        "bp": _entry(1_000_000, 100.0, 1.5, [0.81, 0.83, 0.85]),
        "drop-k4": _entry(899_998, 80.0, 0.8, [0.70, 0.72, 0.74]),
    }
    other = {**methods, "bp": _entry(1_000_000, 90.0, 1.0, [0.60, 0.62, 0.64])}
    suites = {
        "quick": {"suite": {}, "models": {"a": {"methods": methods}, "b": {"methods": other}}},
        "gpu": None,
    }
    lines = render_verdict_tally(suites)
    assert lines[0] == "| claim (RepL k=4; 2 suite × model pairs) | " + " | ".join(f"vs {b}" for b in BASELINES) + " |"
    rows = {line.split(" | ")[0][2:]: line.split(" | ")[1:] for line in lines[2:]}
    assert rows["fewer trainable parameters"][:3] == ["2 win", "2 lose", "–"]
    assert rows["less training memory"][:2] == ["1 win, 1 lose", "2 lose"]
    assert rows["less time per step"][:2] == ["1 win, 1 tie", "2 lose"]
    assert rows["equal or better accuracy (equal epochs)"][:2] == ["1 win, 1 tie", "2 win"]
    assert rows["equal or better accuracy (bp's wall-clock)"][:2] == ["–", "–"]  # not recorded: not counted


def test_readme_opens_with_the_verdict_of_every_suite(tmp_path):
    (tmp_path / "quick").mkdir()
    shutil.copy(os.path.join(BENCHMARKS_DIR, "quick", "results.json"), tmp_path / "quick" / "results.json")
    text = render_readme(str(tmp_path))
    verdict, how_to = text.index("## Verdict"), text.index("## How to run")
    assert verdict < how_to < text.index("## Suite `quick`")
    table = text[verdict:how_to]
    assert "| `quick` | vit-mini | fewer trainable parameters |" in table
    for suite in ("fashion-mnist", "transfer", "fashion-mnist-full", "gpu"):
        assert f"| `{suite}` | – | not run (no results.json) |" in table


def test_the_readme_first_screen_quotes_the_tally_of_the_committed_results():
    tally = "\n".join(render_verdict_tally(read_suites()))
    with open(os.path.join(BENCHMARKS_DIR, os.pardir, "README.md"), encoding="utf-8") as handle:
        first_screen = handle.read().split("## Quick start")[0]
    assert tally in first_screen, "README.md's first table is the verdict tally: copy it from benchmarks/README.md"
