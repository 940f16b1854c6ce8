"""Writing a run's results: JSON, Markdown and plots, each file atomically."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import Any

from .plots import plot_accuracy_curves, plot_coefficients
from .report import render_markdown


def atomic_write(path: str, data: bytes | str) -> None:
    """Write to a temporary file beside `path`, then rename: readers never see a half-written file."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.chmod(temporary, 0o644)  # mkstemp makes it private; these are results to share
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def write_outputs(results: dict[str, Any], output_dir: str) -> None:
    """results.json, results.md, accuracy_curves.png and coefficients.png in `output_dir`."""
    atomic_write(os.path.join(output_dir, "results.json"), json.dumps(results, indent=1, default=str) + "\n")
    atomic_write(os.path.join(output_dir, "results.md"), render_markdown(results))
    atomic_write(os.path.join(output_dir, "accuracy_curves.png"), plot_accuracy_curves(results))
    atomic_write(os.path.join(output_dir, "coefficients.png"), plot_coefficients(results))
