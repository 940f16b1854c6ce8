"""The Markdown report: per-model tables, findings computed from them, and what RepL does not save."""

from __future__ import annotations

import math
from typing import Any

from .methods import LORA_FROM_SCRATCH_NOTE, METHODS
from .tasks import ACCURACY, Metric, task_of
from .verdict import EQUAL_COST_TOLERANCE, VERDICT_RULES, render_verdict


def _format_count(count: int) -> str:
    return f"{count / 1e6:.2f}M" if count >= 1e6 else f"{count / 1e3:.1f}k"


def _accuracy(entry: dict[str, Any], metric: Metric = ACCURACY) -> str:
    """Mean ± std of the held-out metric over seeds (accuracy in percent)."""
    return f"{metric.format(entry['accuracy_mean'])} ± {metric.format(entry['accuracy_std'])}"


def _block_flops(entry: dict[str, Any]) -> str:
    """Forward FLOPs per image of a k=4 replaced block as the method runs it, and the ratio to bp's block."""
    flops = entry.get("block_flops_per_image")
    if flops is None:
        return "–"
    ratio = entry.get("block_flops_ratio_vs_bp")
    return f"{flops / 1e6:.2f}M" + (f" ({ratio:.2f})" if ratio is not None else "")


def lora_from_scratch(suite: dict[str, Any]) -> bool:
    """Whether LoRA adapted a random network in this suite: trained, and not from pretrained weights."""
    return suite.get("dataset") is not None and suite.get("pretrain") is None


def method_label(method: str, suite: dict[str, Any]) -> str:
    """The method's name, with a † on LoRA where it was trained from scratch (see LORA_FROM_SCRATCH_NOTE)."""
    return f"{method} †" if method == "lora" and lora_from_scratch(suite) else method


def render_table(model_name: str, model: dict[str, Any], suite: dict[str, Any]) -> str:
    """One model's Markdown table: a row per method."""
    methods = model["methods"]
    metric = task_of(suite).metric
    cuda = any("cuda_peak_mb" in entry for entry in methods.values())
    transfer = any("source_accuracy_after_conversion" in entry for entry in methods.values())
    compiled = any("compiled_median_step_s" in entry for entry in methods.values())
    equal_time = any("accuracy_at_bp_time" in entry for entry in methods.values())
    header = [
        "method", "trainable params", "block FLOPs/img (×bp)", "state MB", "saved act. MB", "memory ×bp",
        "analytic ×bp",
        *(["CUDA peak MB", "peak ×bp"] if cuda else []),
        "median step ms", "step ×bp", *(["train img/s"] if cuda else []), "synthesis % of step",
        *(["compiled step ms", "compiled img/s", "compiled peak MB"] if compiled else []),
        *(["source acc. after conversion", "fit error (a=b=0.5)"] if transfer else []),
        "fine-tuned accuracy (mean ± std)" if transfer else f"{metric.name} (mean ± std)",
        *([f"{metric.name} at bp's wall-clock"] if equal_time else []), "checkpoint MB",
        "inference img/s",
    ]
    lines = [f"### {model_name}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, entry in methods.items():
        accuracy = "not trained"
        if "accuracy_mean" in entry:
            accuracy = f"{_accuracy(entry, metric)} (n={len(entry['accuracies'])})"
        elif method.endswith("-recompute") and "accuracy_mean" in methods.get(method.removesuffix("-recompute"), {}):
            accuracy = f"= {method.removesuffix('-recompute')} (same arithmetic, not retrained)"
        synthesis = f"{entry['synthesis_percent']:.1f}" if "synthesis_percent" in entry else "–"
        ratio = lambda key, digits=2: f"{entry[key]:.{digits}f}" if key in entry else "–"  # noqa: E731
        row = [
            method_label(method, suite),
            f"{_format_count(entry['trainable_params'])} / {_format_count(entry['total_params'])}",
            _block_flops(entry),
            f"{entry['state_memory_mb']:.2f}",
            f"{entry['saved_activations_mb']:.2f}",
            ratio("memory_ratio_vs_bp", 3),
            ratio("analytic_memory_ratio_vs_bp", 3),
            *([f"{entry.get('cuda_peak_mb', float('nan')):.0f}", ratio("cuda_peak_ratio_vs_bp")] if cuda else []),
            f"{entry['median_step_ms']:.1f}",
            ratio("step_ratio_vs_bp"),
            *([f"{entry['train_images_per_s']:.0f}"] if cuda else []),
            synthesis,
            *(_compiled_cells(entry) if compiled else []),
            *([_source_accuracy(entry), _fit_errors(entry)] if transfer else []),
            accuracy,
            *([_equal_time_accuracy(entry, metric)] if equal_time else []),
            f"{entry['checkpoint_mb']:.2f}",
            f"{entry['inference_images_per_s']:.0f}",
        ]
        lines.append("| " + " | ".join(row) + " |")
    any_entry = next(iter(methods.values()))
    lines.append("")
    lines.append(
        f"{any_entry['num_blocks']} blocks; replaced/dropped/frozen blocks: "
        + "; ".join(f"{m}: {e['affected_blocks']}" for m, e in methods.items() if e["affected_blocks"])
        + f". Memory and step time at batch {any_entry['batch_size']}."
    )
    if "pretrained" in model:
        pretrained = model["pretrained"]
        how = "reused from an earlier run" if pretrained.get("cached") else f"{pretrained['train_seconds']:.0f} s"
        lines.append(
            f"Pretrained: {100 * pretrained['source_accuracy']:.1f}% source test accuracy after "
            f"{len(pretrained['accuracy_per_epoch'])} epochs ({how})."
        )
    return "\n".join(lines)


def _compiled_cells(entry: dict[str, Any]) -> list[str]:
    """Step ms, images/s and CUDA peak MB under torch.compile ("not compiled" for the methods left eager)."""
    if "compiled_median_step_s" not in entry:
        return ["not compiled", "–", "–"]
    peak = entry.get("compiled_cuda_peak_mb")
    return [f"{1e3 * entry['compiled_median_step_s']:.1f}", f"{entry['compiled_train_images_per_s']:.0f}",
            "–" if peak is None else f"{peak:.0f}"]


def _equal_time_accuracy(entry: dict[str, Any], metric: Metric = ACCURACY) -> str:
    """The metric reached within bp's training time (same seed), mean ± std, and the epochs that fit in it."""
    if "accuracy_at_bp_time_mean" in entry:
        epochs = "/".join(str(n) for n in entry["epochs_within_bp_time"])
        return (f"{metric.format(entry['accuracy_at_bp_time_mean'])} ± "
                f"{metric.format(entry['accuracy_at_bp_time_std'])} ({epochs} epochs)")
    return "no epoch within bp's time" if "accuracy_at_bp_time" in entry else "–"


def _source_accuracy(entry: dict[str, Any]) -> str:
    value = entry.get("source_accuracy_after_conversion")
    return "–" if value is None else f"{100 * value:.1f}"


def _fit_errors(entry: dict[str, Any]) -> str:
    """Each replaced block's relative reconstruction error with the fitted coefficients (with a=b=0.5)."""
    fits = entry.get("coefficient_fit")
    if not fits:
        return "–"
    return "; ".join(
        f"{index}: {fit['relative_error']:.2f} ({fit['default_relative_error']:.2f})" for index, fit in fits.items()
    )


WHERE_REPL_DOES_NOT_SAVE_TIME = (
    "With the default `surrogate=\"block\"`, a replaced block still runs its full forward and backward, with "
    "synthesized instead of stored weights: "
    "RepL removes only that block's weight gradients and AdamW update, and adds the synthesis (a few "
    "element-wise passes over two neighbours' weights, forward and backward). So a RepL step costs about "
    "what a bp step costs: it cannot approach the time of dropping the blocks (which skips their compute "
    "entirely), and `recompute_replaced=True` adds a second forward of each replaced block. What RepL "
    "saves is memory that scales with parameters (weights, gradients, optimizer state, checkpoint size): "
    "large when parameters dominate memory (big models, small batches, optimizer state), small when "
    "activations dominate (small models, large batches, high resolution). Synthesized weights are not held "
    "for backward: autograd keeps a recipe, and backward synthesizes each replaced block's weights once "
    "more, so RepL saves the activations bp saves, for one more synthesis forward per step. For "
    "ConvNeXt, a replaced block next to a stage boundary fuses a neighbour of another width through "
    "resampling (small interpolation tables held as buffers, counted in state MB), which costs more "
    "synthesis time than a same-shape neighbour: on tiny blocks that is a fixed few µs per operation, "
    "a visible share of a short step. The lighter surrogates (`surrogate=\"mlp\"` or `\"half\"`, rows "
    "repl-k4-mlp and repl-k4-half) skip part of a replaced block's compute (the block FLOPs column): their step "
    "lies between RepL's and dropping's."
)


def _difference_units(metric: Metric) -> tuple[int, int, str]:
    """How a difference of `metric` is shown: the scale, decimals and unit (percentages in points)."""
    return (100, 1, "points") if metric.percent else (1, 3, metric.name)


def _verdict(
    entry: dict[str, Any], other: dict[str, Any], subject: str, other_name: str, metric: Metric = ACCURACY
) -> str:
    """Whether `entry`'s metric beats `other`'s by more than their combined seed spread, in words."""
    difference = entry["accuracy_mean"] - other["accuracy_mean"]
    scale, digits, unit = _difference_units(metric)
    if min(len(entry["accuracies"]), len(other["accuracies"])) < 2:
        return f"{scale * difference:+.{digits}f} {unit} with one seed, no spread to judge by: not evidence either way"
    spread = math.hypot(entry["accuracy_std"], other["accuracy_std"])
    gain = metric.gain(difference)
    verdict = "beats" if gain > spread else "loses to" if gain < -spread else "is within the seed spread of"
    shown = f"{scale * difference:+.{digits}f} {unit}, spread {scale * spread:.{digits}f}"
    return f"{subject} {verdict} {other_name} ({shown})"


def _transfer_findings(model_name: str, model: dict[str, Any]) -> list[str]:
    """What conversion keeps of the pretrained model, and whether fitted coefficients pay off after fine-tuning."""
    methods, pretrained = model["methods"], model.get("pretrained")
    if pretrained is None:
        return []
    kept = ", ".join(
        f"{name} {100 * entry['source_accuracy_after_conversion']:.1f}%"
        for name, entry in methods.items()
        if "source_accuracy_after_conversion" in entry and name != "bp"
    )
    lines = [
        f"- {model_name}: pretrained to {100 * pretrained['source_accuracy']:.1f}% source accuracy; right after "
        f"conversion, before any fine-tuning step: {kept}."
    ]
    fit, plain = methods.get("repl-k4-fit"), methods.get("repl-k4")
    if fit is not None and plain is not None and "accuracy_mean" in fit and "accuracy_mean" in plain:
        parts = [f"fine-tuned, repl-k4-fit {_accuracy(fit)} vs repl-k4 {_accuracy(plain)}: "
                 + _verdict(fit, plain, "the fit", "a=b=0.5")]
        for name in ("bp", "drop-k4", "lora"):
            if "accuracy_mean" in methods.get(name, {}):
                parts.append(f"vs {name} {_accuracy(methods[name])}: " + _verdict(fit, methods[name], "it", name))
        lines.append(f"- {model_name}: " + "; ".join(parts) + ".")
    return lines


def _pair_findings(
    model_name: str, methods: dict[str, Any], interval: int, metric: Metric = ACCURACY
) -> list[str]:
    repl, drop = methods.get(f"repl-k{interval}"), methods.get(f"drop-k{interval}")
    recompute = methods.get(f"repl-k{interval}-recompute")
    bp = methods.get("bp")
    lines = []
    if repl is None or bp is None:
        return lines
    fewer = 100 * (1 - repl["trainable_params"] / bp["trainable_params"])
    state = 100 * (repl["state_memory_mb"] / bp["state_memory_mb"] - 1)
    activations = 100 * (repl["saved_activations_mb"] / bp["saved_activations_mb"] - 1)
    text = (
        f"- {model_name}, repl-k{interval}: {fewer:.1f}% fewer trainable parameters than bp; state memory "
        f"{state:+.1f}%, saved activations {activations:+.1f}%, step time ×{repl['step_ratio_vs_bp']:.2f}"
    )
    if "synthesis_percent" in repl:
        text += f" (synthesis {repl['synthesis_percent']:.1f}% of the step)"
    if drop is not None:
        text += f"; drop-k{interval} steps at ×{drop['step_ratio_vs_bp']:.2f}"
    if "analytic_memory_ratio_vs_bp" in repl:
        measured, analytic = repl["memory_ratio_vs_bp"], repl["analytic_memory_ratio_vs_bp"]
        text += (
            f"; memory ×{measured:.3f} of bp against ×{analytic:.3f} analytic (bp less the replaced blocks' "
            f"weights, gradients and AdamW state): {100 * (measured - analytic):+.2f} points"
        )
    lines.append(text + ".")
    if "accuracy_mean" in repl and "accuracy_mean" in bp:
        parts = [f"{metric.name} repl-k{interval} {_accuracy(repl, metric)} vs bp {_accuracy(bp, metric)}"]
        if drop is not None and "accuracy_mean" in drop:
            verdict = _verdict(repl, drop, "RepL", "the shallower model", metric)
            parts.append(f"vs drop-k{interval} {_accuracy(drop, metric)}: {verdict}")
        lines.append(f"- {model_name}: " + "; ".join(parts) + ".")
    if recompute is not None:
        saved = repl["saved_activations_mb"] - recompute["saved_activations_mb"]
        slower = 100 * (recompute["median_step_s"] / repl["median_step_s"] - 1)
        lines.append(
            f"- {model_name}, repl-k{interval}-recompute: {saved:.2f} MB fewer saved activations "
            f"({100 * saved / repl['saved_activations_mb']:.1f}%) for {slower:+.1f}% step time vs repl-k{interval}."
        )
    return lines


def _resolution(model_name: str, methods: dict[str, Any], metric: Metric = ACCURACY) -> list[str]:
    """bp's standard deviation over the seeds: differences of that order are what the budget cannot resolve."""
    bp = methods.get("bp", {})
    if "accuracy_mean" not in bp or len(bp["accuracies"]) < 2:
        return []
    scale, digits, unit = _difference_units(metric)
    return [
        f"- {model_name}: bp's {metric.name} has a standard deviation of {scale * bp['accuracy_std']:.{digits}f} "
        f"{unit} over {len(bp['accuracies'])} seeds: at this budget, differences of that order are the seeds', "
        "not the methods'."
    ]


def _findings(model_name: str, model: dict[str, Any], metric: Metric = ACCURACY) -> list[str]:
    methods = model["methods"]
    return (
        _resolution(model_name, methods, metric)
        + _transfer_findings(model_name, model)
        + _pair_findings(model_name, methods, 4, metric)
        + _pair_findings(model_name, methods, 3, metric)
    )


def _accuracy_verdict(entry: dict[str, Any], other: dict[str, Any]) -> str | None:
    """"beats", "loses to" or "is within the seed spread of" `other` (difference against the combined std);
    None without accuracies or spread (fewer than two seeds)."""
    if "accuracy_mean" not in entry or "accuracy_mean" not in other:
        return None
    if min(len(entry["accuracies"]), len(other["accuracies"])) < 2:
        return None
    difference = entry["accuracy_mean"] - other["accuracy_mean"]
    spread = math.hypot(entry["accuracy_std"], other["accuracy_std"])
    return "beats" if difference > spread else "loses to" if difference < -spread else "is within the seed spread of"


def _surrogate_lines(results: dict[str, Any]) -> tuple[list[str], list[str], list[str], bool]:
    """Each lighter surrogate against drop-k4, per model: (finding lines, winners at equal cost, winners at a
    higher cost, whether any accuracy could be judged: two seeds or more)."""
    lines, equal_cost, higher_cost, judged = [], [], [], False
    for model_name, model in results["models"].items():
        methods = model["methods"]
        drop = methods.get("drop-k4")
        for name, entry in methods.items():
            method = METHODS.get(name)
            if method is None or method.surrogate == "block" or drop is None or "step_ratio_vs_bp" not in entry:
                continue
            flops = entry.get("block_flops_ratio_vs_bp")
            text = f"- {model_name}, {name}: a replaced block costs " + (
                f"×{flops:.2f} of a plain block's forward FLOPs" if flops is not None else "(FLOPs not measured)"
            )
            text += f"; step ×{entry['step_ratio_vs_bp']:.2f} of bp against ×{drop['step_ratio_vs_bp']:.2f} for drop-k4"
            if "memory_ratio_vs_bp" in entry:
                text += f", memory ×{entry['memory_ratio_vs_bp']:.2f} (drop-k4 ×{drop['memory_ratio_vs_bp']:.2f})"
            verdict = _accuracy_verdict(entry, drop)
            judged = judged or verdict is not None
            if "accuracy_mean" in entry and "accuracy_mean" in drop:
                text += f"; accuracy {_accuracy(entry)} vs drop-k4 {_accuracy(drop)}"
                text += f": {verdict} drop-k4" if verdict else " (one seed: no spread to judge by)"
            lines.append(text + ".")
            if verdict == "beats":
                cheap = entry["median_step_s"] <= drop["median_step_s"] * (1 + EQUAL_COST_TOLERANCE)
                (equal_cost if cheap else higher_cost).append(f"{name} on {model_name}")
    return lines, equal_cost, higher_cost, judged


def surrogate_summary(results: dict[str, Any]) -> list[str]:
    """The plain answer: does a lighter surrogate beat dropping the same blocks at equal cost? (Markdown lines;
    none when the run measured no surrogate next to drop-k4.)"""
    lines, equal_cost, higher_cost, judged = _surrogate_lines(results)
    if not lines:
        return []
    answer = ", ".join(equal_cost) if equal_cost else "none"
    if not judged:
        answer = "not judged in this run (accuracies over two or more seeds are needed)"
    summary = (
        f"**Lighter surrogates against dropping the blocks (drop-k4):** beating it in accuracy by more than the "
        f"seed spread at equal cost (step time within {EQUAL_COST_TOLERANCE:.0%} of drop-k4's): {answer}."
    )
    if higher_cost:
        summary += f" Beating it in accuracy at a higher cost: {', '.join(higher_cost)}."
    return [summary, "", *lines, ""]


def render_settings(results: dict[str, Any]) -> list[str]:
    """Markdown bullets: the command, machine, data, training settings, runtime and the suite's notes."""
    suite = results["suite"]
    machine = results["machine"]
    phases = results.get("phase_seconds", {})
    gpu = f" ({machine['gpu']})" if "gpu" in machine else ""
    precision = f", {suite['mixed_precision']} autocast" if suite.get("mixed_precision") else ", fp32"
    return [
        f"- command: `{results.get('command') or 'run_benchmark(...)'}`",
        f"- machine: {machine['cpu']} ({machine['cpu_count']} CPUs, {machine['torch_threads']} torch threads), "
        f"device {machine['device']}{gpu}; torch {machine['torch']}, transformers {machine['transformers']}, "
        f"peft {machine['peft']}",
        f"- data: {results['data']}; epochs {suite['epochs']}, batch {suite['batch_size']}, AdamW lr {suite['lr']} "
        f"(cosine, {suite['warmup_ratio']:.0%} warm-up), weight decay {suite['weight_decay']}, seeds {suite['seeds']}"
        + precision,
        f"- runtime: {phases.get('total', float('nan')):.0f} s in all "
        f"(memory/time {phases.get('memory_and_speed', float('nan')):.0f} s, "
        + (f"pretraining {phases['pretraining']:.0f} s, " if "pretraining" in phases else "")
        + f"training {phases.get('training', float('nan')):.0f} s)"
        + _reused_training_time(results),
        *_training_load(results),
        *(f"- {note}" for note in suite.get("notes", ())),
        *([f"- resumed: {len(results['reused_from_earlier_runs'])} finished pieces (measurements, training runs) "
           "reused from earlier sittings with the same settings (`runs/`)"]
          if results.get("reused_from_earlier_runs") else []),
    ]


def _reused_training_time(results: dict[str, Any]) -> str:
    """For a suite finished over several sittings, whose runtime above is only the last sitting's: the training
    time of every run, as each recorded it when it ran."""
    if not results.get("reused_from_earlier_runs"):
        return ""
    seconds = [
        run["train_seconds"]
        for model in results["models"].values() for entry in model["methods"].values()
        for run in entry.get("runs", ())
    ]
    return f" in this sitting; the {len(seconds)} training runs took {sum(seconds):.0f} s of training in all"


def _training_load(results: dict[str, Any]) -> list[str]:
    """A bullet with the load averages the training runs recorded: what else ran while their wall clocks, which
    the equal-time accuracy compares, were measured."""
    loads = [
        run["load_average"]
        for model in results["models"].values() for entry in model["methods"].values()
        for run in entry.get("runs", ()) if "load_average" in run
    ]
    if not loads:
        return []
    ends = [value for load in loads for value in (load["before"][0], load["after"][0])]
    last_15_minutes = [load["after"][2] for load in loads]
    return [f"- load average of the machine ({results['machine']['torch_threads']} torch threads per run), "
            f"recorded by {len(loads)} training run{'s' * (len(loads) != 1)}: over 1 minute at their start and end "
            f"{min(ends):.2f} to {max(ends):.2f}, over the 15 minutes before their end "
            f"{min(last_15_minutes):.2f} to {max(last_15_minutes):.2f}"]


COLUMNS = (
    "Columns: trainable / total parameters held in memory; state MB = parameters + buffers + gradients + AdamW state "
    "(exact, from the tensors); block FLOPs/img = forward FLOPs per image of one of the blocks repl-k4 replaces, "
    "as the method computes it (mean over those blocks; matrix products and convolutions counted by "
    "torch's FlopCounterMode), and its ratio to bp's plain block (0 for drop-k4, – where not comparable); "
    "saved act. MB = bytes autograd keeps for backward during one forward (each storage "
    "once, parameters excluded); memory ×bp = (state + saved activations) relative to bp; analytic ×bp = bp's less "
    "the replaced blocks' weights, gradients and AdamW state, relative to bp: RepL's if freeing them changed nothing "
    "else; median step = forward + backward + AdamW, warm-up excluded, methods interleaved in rounds in this run; "
    "synthesis % = time to build the replaced blocks' weights (forward + backward, measured alone, and the forward "
    "again for the synthesis in backward: weights rebuilt for backward, or the recompute) over the median RepL "
    "step; checkpoint = what save_pretrained writes (RepL: compact, without the replaced blocks; LoRA: adapters "
    "+ classifier, the base model is needed as well); inference = images/s of the deployed model (RepL and LoRA "
    "merged), eval, no grad. Where present: train img/s = batch / median step; compiled = the same training step "
    "under torch.compile, each method alone (compiling excluded); accuracy at bp's wall-clock = the accuracy "
    "each run had reached when bp's run of the same seed finished training (whole epochs)."
)


def render_task(results: dict[str, Any]) -> list[str]:
    """A task suite's metric, the methods that cannot apply to its model and those that fail to train it, each with
    the reason (none for image classification)."""
    task = task_of(results["suite"])
    if task.metric is ACCURACY:
        return []
    lines = [f"Task `{task.name}`: the accuracy columns hold the {task.metric.name}, {task.metric.description}."
             + (" The per-image columns (block FLOPs/img, inference img/s) count samples: blocks of text."
                if task.input_name == "input_ids" else ""), ""]
    if task.not_applicable:
        lines += ["Not applicable to this task's model, so not in this suite:", "",
                  *(f"- {method}: {reason}." for method, reason in task.not_applicable.items()), ""]
    if task.untrainable:
        lines += ["Run, but not judged in the verdict's accuracy rows:", "",
                  *(f"- {method}: {reason}." for method, reason in task.untrainable.items()), ""]
    return lines


def render_tables(results: dict[str, Any]) -> list[str]:
    """A table per model, each followed by a blank line."""
    lines = []
    for model_name, model in results["models"].items():
        lines += [render_table(model_name, model, results["suite"]), ""]
    return lines


def lora_footnote(results: dict[str, Any]) -> list[str]:
    """The † note, where LoRA was trained from scratch in this run (none otherwise)."""
    if "lora" in results["methods"] and lora_from_scratch(results["suite"]):
        return [f"† {LORA_FROM_SCRATCH_NOTE}.", ""]
    return []


def render_markdown(results: dict[str, Any]) -> str:
    """results.md: the run's settings, a table per model, findings and the limits of RepL's savings."""
    lines = [f"# RepL benchmark: suite `{results['suite']['name']}`", "", *render_settings(results), "", COLUMNS, ""]
    lines += render_task(results)
    lines += render_tables(results)
    lines += ["## Verdict: the paper's claims against each baseline", "",
              *render_verdict({results["suite"]["name"]: results}), "", VERDICT_RULES, ""]
    task = task_of(results["suite"])
    findings = [
        line for model_name, model in results["models"].items() for line in _findings(model_name, model, task.metric)
    ]
    if findings:
        lines += ["## Findings (computed from the numbers above)", "", *findings, ""]
    lines += surrogate_summary(results)
    lines += ["## Where RepL does not save time", "", WHERE_REPL_DOES_NOT_SAVE_TIME, ""]
    lines += [
        "The synthesis cost per model size and granularity, against the plain-autograd reference implementation, "
        "is measured by `benchmarks/synthesis_overhead.py` (results in `benchmarks/synthesis_overhead.md`).",
        "",
    ]
    lines += lora_footnote(results)
    lines.append(
        f"Plots: `accuracy_curves.png` (test {task.metric.name} per epoch, mean ± std over seeds), `coefficients.png` "
        "(a, b of each replaced block over training, seed 0)"
        + (", `transfer.png` (source accuracy right after conversion, fine-tuned accuracy)."
           if results["suite"].get("pretrain") is not None else ".")
    )
    lines.append("")
    return "\n".join(lines)
