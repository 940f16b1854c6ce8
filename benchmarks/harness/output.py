"""Writing a run's results: JSON, Markdown and plots, replaced together."""

from __future__ import annotations

import json
import os
from typing import Any

from hf_replacement.checkpoint import atomic_write, write_checkpoint

from .paths import TRANSFER_PLOT
from .plots import plot_accuracy_curves, plot_coefficients, plot_transfer
from .report import render_markdown


def write_outputs(results: dict[str, Any], output_dir: str | os.PathLike) -> None:
    """results.json, results.md, accuracy_curves.png and coefficients.png in `output_dir` (and for a
    transfer suite transfer.png).

    All are staged and renamed into place together, so the tables and plots a reader finds
    always come from the same run.
    """
    files = {
        "results.json": json.dumps(results, indent=1, default=str) + "\n",
        "results.md": render_markdown(results),
        "accuracy_curves.png": plot_accuracy_curves(results),
        "coefficients.png": plot_coefficients(results),
    }
    if results["suite"].get("pretrain") is not None:
        files[TRANSFER_PLOT] = plot_transfer(results)
    write_checkpoint(output_dir, files)
    write_checkpoint(output_dir, files)


def write_report(output_dir: str | os.PathLike, name: str, report: dict[str, Any], markdown: str) -> None:
    """A stand-alone script's report: `<name>.json` and `<name>.md` in `output_dir`, each written atomically."""
    base = os.path.join(output_dir, name)
    atomic_write(f"{base}.json", json.dumps(report, indent=1, default=str) + "\n")
    atomic_write(f"{base}.md", markdown)
