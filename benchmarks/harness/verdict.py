"""The paper's claims decided from a suite's numbers: RepL (repl-k4) against each baseline, per claim, win / tie /
lose; and every trained method's accuracy at bp's wall-clock (equal time instead of equal epochs).

Ties: parameter counts and CPU memory are exact counts (tie only when equal); CUDA peak memory ties within
`CUDA_PEAK_TOLERANCE`; step times tie within `EQUAL_COST_TOLERANCE` (the timing noise of a shared machine);
accuracies tie within the seeds' spread (the two standard deviations combined), and are not judged with one seed.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterator
from typing import Any

from .tasks import ACCURACY, Metric, task_of

# Step times within this fraction of each other count as equal cost: the timing noise of a shared machine.
EQUAL_COST_TOLERANCE = 0.05
SUBJECT = "repl-k4"
BASELINES = ("bp", "drop-k4", "tie-k4", "sd", "narrow")
# The caching allocator rounds blocks up (to 512 B, and 2 MB segments): peaks within 1% are the same memory.
CUDA_PEAK_TOLERANCE = 0.01

Entry = dict[str, Any]


def accuracy_at_budget(run: dict[str, Any], budget_seconds: float) -> float | None:
    """The test accuracy a run had reached within `budget_seconds` of training (the last epoch that ended by
    then; evaluation time not counted), None when its first epoch took longer."""
    reached = [
        accuracy for accuracy, seconds in zip(run["accuracy_per_epoch"], run["train_seconds_at_epoch"])
        if seconds <= budget_seconds
    ]
    return reached[-1] if reached else None


def add_equal_time_accuracy(methods: dict[str, Entry]) -> None:
    """Each trained method's accuracy at bp's wall-clock, seed by seed (bp's run of the same seed sets the
    budget: same initialisation and data order): `accuracy_at_bp_time` per seed, with mean and std when every
    seed finished an epoch within it. Needs the per-epoch times (runs recorded since they are kept)."""
    bp_runs = {run["seed"]: run for run in methods.get("bp", {}).get("runs", []) if "train_seconds_at_epoch" in run}
    if not bp_runs:
        return
    for entry in methods.values():
        runs = [run for run in entry.get("runs", []) if run["seed"] in bp_runs and "train_seconds_at_epoch" in run]
        if not runs:
            continue
        budgets = [bp_runs[run["seed"]]["train_seconds_at_epoch"][-1] for run in runs]
        values = [accuracy_at_budget(run, budget) for run, budget in zip(runs, budgets)]
        entry["accuracy_at_bp_time"] = values
        entry["epochs_within_bp_time"] = [
            sum(seconds <= budget for seconds in run["train_seconds_at_epoch"]) for run, budget in zip(runs, budgets)
        ]
        if all(value is not None for value in values):
            entry["accuracy_at_bp_time_mean"] = statistics.fmean(values)
            entry["accuracy_at_bp_time_std"] = statistics.stdev(values) if len(values) > 1 else 0.0


def _relative(subject: float, baseline: float) -> str:
    return f"{100 * (subject / baseline - 1):+.1f}%"


def _by_size(subject: float, baseline: float, tolerance: float, tiny: Callable[[float], str] | None = None) -> str:
    """win when smaller, lose when larger, tie within `tolerance` (relative); with the relative difference, or
    `tiny(difference)` where that rounds to 0.0% (RepL's coefficients against tying or dropping)."""
    ratio = subject / baseline
    word = "tie" if abs(ratio - 1) <= tolerance else "win" if ratio < 1 else "lose"
    if tiny is not None and subject != baseline and abs(ratio - 1) < 5e-4:
        return f"{word} ({tiny(subject - baseline)})"
    return f"{word} ({_relative(subject, baseline)})"


def _parameters(subject: Entry, baseline: Entry) -> str:
    return _by_size(subject["trainable_params"], baseline["trainable_params"], 0.0, lambda d: f"{d:+d} parameters")


def _memory(subject: Entry, baseline: Entry) -> str:
    if "cuda_peak_mb" in subject and "cuda_peak_mb" in baseline:
        return _by_size(subject["cuda_peak_mb"], baseline["cuda_peak_mb"], CUDA_PEAK_TOLERANCE)
    return _by_size(subject["training_memory_mb"], baseline["training_memory_mb"], 0.0,
                    lambda d: f"{round(d * 2**20):+d} bytes")


def _time(subject: Entry, baseline: Entry) -> str:
    return _by_size(subject["median_step_s"], baseline["median_step_s"], EQUAL_COST_TOLERANCE)


def _by_spread(subject: Entry, baseline: Entry, key: str, metric: Metric = ACCURACY) -> str:
    """win / tie / lose in the task's metric (`key`: accuracy or accuracy_at_bp_time, the keys results keep it
    under), against the combined seed spread; better is higher or lower as `metric` says."""
    if f"{key}_mean" not in subject or f"{key}_mean" not in baseline:
        if "accuracy_mean" not in subject or "accuracy_mean" not in baseline:
            return "not trained"
        cut = [e for e in (subject, baseline) if key in e and f"{key}_mean" not in e]
        return "no epoch within bp's time" if cut else "not recorded"
    seeds = min(len(subject.get("runs", [])), len(baseline.get("runs", [])))
    difference = subject[f"{key}_mean"] - baseline[f"{key}_mean"]
    if seeds < 2:
        return f"not judged ({metric.difference(difference)}, 1 seed)"
    spread = math.hypot(subject[f"{key}_std"], baseline[f"{key}_std"])
    gain = metric.gain(difference)
    word = "win" if gain > spread else "lose" if gain < -spread else "tie"
    return f"{word} ({metric.difference(difference, spread)})"


# Each claim's judge: (RepL's entry, the baseline's, the suite's metric) -> the cell.
CLAIMS: dict[str, Callable[[Entry, Entry, Metric], str]] = {
    "fewer trainable parameters": lambda s, b, m: _parameters(s, b),
    "less training memory": lambda s, b, m: _memory(s, b),
    "less time per step": lambda s, b, m: _time(s, b),
    "equal or better accuracy (equal epochs)": lambda s, b, m: _by_spread(s, b, "accuracy", m),
    "equal or better accuracy (bp's wall-clock)": lambda s, b, m: _by_spread(s, b, "accuracy_at_bp_time", m),
}


ACCURACY_CLAIMS = frozenset(claim for claim in CLAIMS if "accuracy" in claim)


def claim_label(claim: str, metric: Metric) -> str:
    """The claim as a suite of `metric` states it ("equal or better perplexity (equal epochs)")."""
    return claim.replace("accuracy", metric.name) if metric is not ACCURACY else claim


def model_verdict(methods: dict[str, Entry], metric: Metric = ACCURACY) -> dict[str, dict[str, str]] | None:
    """Claim -> baseline -> verdict cell for one model of a suite; None without RepL (repl-k4) in it."""
    subject = methods.get(SUBJECT)
    if subject is None:
        return None
    return {
        claim: {name: judge(subject, methods[name], metric) if name in methods else "not run" for name in BASELINES}
        for claim, judge in CLAIMS.items()
    }


# (suite, model, claim, the claim in the suite's metric, a cell per baseline)
Row = tuple[str, str | None, str | None, str, list[str]]


def _judged_rows(suites: dict[str, dict[str, Any] | None]) -> Iterator[Row]:
    """The verdict's rows in table order; model None: the suite was not run; claim None: the model has no RepL run."""
    for suite_name, results in suites.items():
        if results is None:
            yield suite_name, None, None, "", []
            continue
        task = task_of(results["suite"])
        for model_name, model in results["models"].items():
            verdict = model_verdict(model["methods"], task.metric)
            if verdict is None:
                yield suite_name, model_name, None, "", []
                continue
            for claim, cells in verdict.items():
                yield suite_name, model_name, claim, claim_label(claim, task.metric), [
                    "not applicable" if name in task.not_applicable
                    else "did not train" if name in task.untrainable and claim in ACCURACY_CLAIMS
                    else cell
                    for name, cell in cells.items()
                ]


def render_verdict(suites: dict[str, dict[str, Any] | None]) -> list[str]:
    """One Markdown table: for each suite (None: not run) and model, each claim of the paper, RepL (repl-k4)
    against each baseline."""
    header = ["suite", "model", "claim (RepL = repl-k4)", *(f"vs {name}" for name in BASELINES)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for suite_name, model_name, claim, label, cells in _judged_rows(suites):
        if model_name is None:
            lines.append(f"| `{suite_name}` | – | not run (no results.json) |" + " – |" * len(BASELINES))
        elif claim is None:
            lines.append(f"| `{suite_name}` | {model_name} | {SUBJECT} not run |" + " – |" * len(BASELINES))
        else:
            lines.append(f"| `{suite_name}` | {model_name} | {label} | " + " | ".join(cells) + " |")
    return lines


OUTCOMES = ("win", "tie", "lose")


def render_verdict_tally(suites: dict[str, dict[str, Any] | None]) -> list[str]:
    """The verdict table summed up: per claim (a task suite's metric counted as its accuracy) and baseline, in
    how many (suite, model) pairs RepL wins, ties or loses. Cells that judge nothing (not run, not trained, not
    applicable, ...) are not counted. The README's first screen quotes these lines."""
    counts = {claim: {name: dict.fromkeys(OUTCOMES, 0) for name in BASELINES} for claim in CLAIMS}
    pairs = set()
    for suite_name, model_name, claim, _, cells in _judged_rows(suites):
        if claim is None:
            continue
        pairs.add((suite_name, model_name))
        for name, cell in zip(BASELINES, cells):
            outcome = cell.split(" ", 1)[0]
            if outcome in OUTCOMES:
                counts[claim][name][outcome] += 1
    header = [f"claim (RepL k=4; {len(pairs)} suite × model pairs)", *(f"vs {name}" for name in BASELINES)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for claim, by_baseline in counts.items():
        cells = [
            ", ".join(f"{n} {outcome}" for outcome, n in tally.items() if n) or "–" for tally in by_baseline.values()
        ]
        lines.append(f"| {claim} | " + " | ".join(cells) + " |")
    return lines


VERDICT_RULES = (
    "Each cell: does RepL (repl-k4) win, tie or lose that claim against that baseline, with RepL's difference. "
    "Parameters: trainable parameters (exact); memory: training state + saved activations (exact bytes), or the "
    "CUDA peak on a GPU (tie within 1%); time: median training step, tie within "
    f"{EQUAL_COST_TOLERANCE:.0%}; accuracy: test accuracy mean over seeds (a task suite: its held-out metric, "
    "perplexity lower is better, mIoU and mAP higher), tie when the difference is within the "
    "seeds' spread (both standard deviations combined); at bp's wall-clock: the accuracy each run had reached "
    "when bp's run of the same seed finished (whole epochs, evaluation time not counted; the cosine schedule "
    "was set for all epochs, so a run cut short is a lower bound of what a schedule fitted to that time gives). "
    "\"not applicable\": the method cannot apply to that task's model (the reason is in the suite's results.md); "
    "\"did not train\": the baseline ran but failed to train that task's model (measured; the suite's notes give "
    "the runs), so its metric judges nothing; "
    "\"not run\": the baseline was not in that suite's run; \"not trained\": measured for memory/time only; "
    "\"not recorded\": results from before per-epoch times were kept."
)


__all__ = [
    "BASELINES", "CLAIMS", "claim_label", "EQUAL_COST_TOLERANCE", "SUBJECT", "VERDICT_RULES", "accuracy_at_budget",
    "add_equal_time_accuracy", "model_verdict", "render_verdict", "render_verdict_tally",
]
