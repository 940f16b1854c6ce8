"""The PNG figures: test accuracy per epoch, and RepL's coefficients over training."""

from __future__ import annotations

import io
import statistics
from typing import Any

from .report import method_label
from .tasks import task_of


def _figure_bytes(figure: Any) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only; no display here or in CI
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy_curves(results: dict[str, Any]) -> bytes:
    """PNG: the test metric (accuracy, or the task's) per epoch, mean ± std over seeds, a panel per model."""
    plt = _pyplot()
    metric = task_of(results["suite"]).metric
    names = list(results["models"])
    figure, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 4), squeeze=False)
    for axis, model_name in zip(axes[0], names):
        plotted = False
        for method, entry in results["models"][model_name]["methods"].items():
            curves = [run["accuracy_per_epoch"] for run in entry.get("runs", []) if run["accuracy_per_epoch"]]
            if not curves:
                continue
            epochs = range(1, len(curves[0]) + 1)
            mean = [statistics.fmean(values) for values in zip(*curves)]
            std = [statistics.stdev(values) if len(values) > 1 else 0.0 for values in zip(*curves)]
            line = axis.plot(epochs, mean, marker="o", markersize=3, label=method_label(method, results["suite"]))[0]
            low, high = [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)]
            axis.fill_between(epochs, low, high, color=line.get_color(), alpha=0.15)
            plotted = True
        axis.set_title(model_name)
        axis.set_xlabel("epoch")
        axis.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
        axis.set_ylabel(f"test {metric.name}")
        axis.grid(alpha=0.3)
        if plotted:
            axis.legend(fontsize=7)
        else:
            axis.text(0.5, 0.5, "not trained (memory/time only)", ha="center", va="center", transform=axis.transAxes)
    figure.suptitle(f"suite {results['suite']['name']}: {metric.name} per epoch (mean ± std over seeds)")
    return _figure_bytes(figure)


def plot_coefficients(results: dict[str, Any]) -> bytes:
    """PNG: each replaced block's (a, b) over training in seed 0, a panel per trained RepL method."""
    plt = _pyplot()
    panels = [
        (model_name, method, entry["runs"][0]["coefficients"])
        for model_name, model in results["models"].items()
        for method, entry in model["methods"].items()
        if entry.get("runs") and "coefficients" in entry["runs"][0]
    ]
    figure, axes = plt.subplots(1, max(1, len(panels)), figsize=(5 * max(1, len(panels)), 3.8), squeeze=False)
    for axis, (model_name, method, trace) in zip(axes[0], panels):
        for block, values in trace["blocks"].items():
            line = axis.plot(trace["steps"], values["a"], label=f"{block}: a")[0]
            axis.plot(trace["steps"], values["b"], linestyle="--", color=line.get_color(), label=f"{block}: b")
        axis.set_title(f"{model_name} {method}")
        axis.set_xlabel("step")
        axis.set_ylabel("coefficient")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    if not panels:
        axes[0][0].text(0.5, 0.5, "no RepL method trained", ha="center", va="center", transform=axes[0][0].transAxes)
    figure.suptitle("RepL coefficients over training (seed 0): w = a·w(prev) + b·w(next)")
    return _figure_bytes(figure)


def plot_transfer(results: dict[str, Any]) -> bytes:
    """PNG, transfer suites: per model and method, the source accuracy right after conversion and the
    fine-tuned target accuracy (mean ± std over seeds)."""
    plt = _pyplot()
    names = list(results["models"])
    figure, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 4), squeeze=False)
    for axis, model_name in zip(axes[0], names):
        methods = results["models"][model_name]["methods"]
        labels = list(methods)
        positions = range(len(labels))
        source = [100 * methods[m].get("source_accuracy_after_conversion", float("nan")) for m in labels]
        target = [100 * methods[m].get("accuracy_mean", float("nan")) for m in labels]
        spread = [100 * methods[m].get("accuracy_std", 0.0) for m in labels]
        axis.bar([p - 0.2 for p in positions], source, width=0.4, label="source task, right after conversion")
        axis.bar([p + 0.2 for p in positions], target, width=0.4, yerr=spread, capsize=3,
                 label="target task, fine-tuned (mean ± std)")
        axis.set_xticks(list(positions), labels, rotation=20)
        axis.set_ylabel("test accuracy (%)")
        axis.set_ylim(0, 100)
        axis.set_title(model_name)
        axis.grid(alpha=0.3, axis="y")
    handles, labels = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=2, fontsize=8, bbox_to_anchor=(0.5, -0.12))
    source_name = results["suite"]["pretrain"]["dataset"]
    figure.suptitle(f"suite {results['suite']['name']}: pretrained on {source_name}, "
                    f"fine-tuned on {results['suite']['dataset']}")
    return _figure_bytes(figure)
