"""Metrics shipped with the package, loadable without the Hugging Face Hub.

`evaluate.load("accuracy")` downloads the metric script from the Hub and fails offline; loading
the same script from a local path needs no network.
"""

import os

import evaluate

METRICS_DIR = os.path.dirname(os.path.abspath(__file__))


def metric_path(name: str) -> str:
    """Path of a shipped metric script, e.g. `metric_path("accuracy")`."""
    return os.path.join(METRICS_DIR, name, f"{name}.py")


def load_accuracy(**kwargs) -> evaluate.EvaluationModule:
    """The accuracy metric (same results as the Hub's `accuracy`), loaded from the package."""
    return evaluate.load(metric_path("accuracy"), **kwargs)


__all__ = ["METRICS_DIR", "load_accuracy", "metric_path"]
