"""`benchmarks/README.md`, generated from the results on disk: how to run each benchmark, then their tables.

Never edited by hand: `python -m benchmarks --readme` rewrites it (no training), and every
`python -m benchmarks` run does at its end, so its numbers are always those of the files beside it.
The text depends only on those files, so regenerating without a new run changes nothing.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from hf_replacement.checkpoint import atomic_write

from .methods import METHODS
from .paths import BENCHMARKS_DIR, FSDP_STATE_NAME, SPEED_NAME, SYNTHESIS_OVERHEAD_NAME, TRANSFER_PLOT
from .report import lora_footnote, render_settings, render_tables, render_task, surrogate_summary
from .suites import SUITES
from .verdict import VERDICT_RULES, render_verdict, render_verdict_tally

logger = logging.getLogger(__name__)

RESULT_FILES = ("results.md", "accuracy_curves.png", "coefficients.png")


def _read_json(path: str) -> dict[str, Any] | None:
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _how_to_run() -> list[str]:
    rows = [f"| `python -m benchmarks --suite {name}` | {suite.summary} |" for name, suite in SUITES.items()]
    return [
        "## How to run",
        "",
        "From the root of a checkout (the harness is not part of the installed `hf_replacement` package; "
        "it needs `pip install -e .[benchmark]` for the plots):",
        "",
        "| command | what it runs |",
        "|---|---|",
        *rows,
        "| `python benchmarks/synthesis_overhead.py` | the share of a RepL step spent synthesizing weights: "
        "the shipped fused synthesis against the plain-autograd reference |",
        "| `python -m benchmarks --suite speed` | RepL step time ×bp (IQR over interleaved rounds) against its "
        "analytic limit, each method's FLOPs expectation, synthesis share and per-phase bandwidth against a "
        "streaming triad and against the ceiling of its ATen ops, the slowest ops, saved and state bytes against "
        "bp's and the analytic saving (`--help` for its flags; one torch thread by default; "
        "CUDA: bf16 + torch.compile) |",
        "| `python benchmarks/fsdp_state.py` | parameter, gradient and optimizer bytes per process under FSDP2 "
        "(2 CPU processes), bp against RepL |",
        "| `python benchmarks/sd_ablation.py` | stochastic depth on some of DETR's blocks only (3-epoch smoke, "
        "3 seeds, about 7 min on one core): where the detection suite's `sd` stalls |",
        "| `bash benchmarks/gpu_checks.sh OUTDIR [SECONDS]` | on one CUDA GPU, inside a time budget (540 s), most "
        "wanted first: the CUDA tests, `--suite gpu`, the speed suite on CUDA (to `benchmarks/speed-cuda/`); logs, "
        "a summary and the results packed in OUTDIR |",
        "| `python -m benchmarks --readme` | rewrites this file from the results below, without training |",
        "",
        "A suite writes `results.json`, `results.md`, `accuracy_curves.png` and `coefficients.png` to "
        "`benchmarks/<suite>/` (`--output-dir` elsewhere), then rewrites this file. Other flags: `--seeds`, "
        "`--epochs`, `--methods`, `--models`, `--data-dir`, `--max-train-samples`, `--batch-size`, `--device`, "
        "`--only-seed` (below) "
        "(`python -m benchmarks --help`).",
        "",
        "Every suite is resumable: each finished piece (a model's memory/time measurements, one seed of one "
        "method trained) is written at once to `benchmarks/<suite>/runs/<model>/` with the settings that made it "
        "and their digest. Start the same command again after an interruption and it skips what is finished; a "
        "piece made with other settings (epochs, data, learning rate, a method's definition, ...) is refused with "
        "the differences named, so results of two settings never mix. `--seeds` and `--methods` may grow between "
        "sittings of training runs (the measured methods are part of the measurements' settings). On a machine "
        "with cores to spare, `--only-seed N` trains one seed's runs and nothing else, so that processes given "
        "different seeds share it (e.g. `OMP_NUM_THREADS=1 python -m benchmarks --suite fashion-mnist-full "
        "--only-seed 1 &` and the same with `--only-seed 2`; `--models` splits one seed's runs further); the same "
        "command without either then measures, collects "
        "every run and writes the results. Keep each seed's runs under one load (all in parallel or all alone): "
        "its bp run sets the others' equal-wall-clock budget, and each run records the load average it ran under.",
        "",
        "The `transfer` suite pretrains its models itself (never downloaded) and keeps them in "
        "`benchmarks/transfer/pretrained/` (not committed; reused while the pretraining settings are the same, "
        "`--pretrain-epochs` and `--pretrain-max-train-samples` change them); it also reports each method's "
        "source-task accuracy right after conversion and writes `transfer.png`. A quick check of the whole path: "
        "`python -m benchmarks --suite transfer --seeds 1 --epochs 1 --max-train-samples 256 --pretrain-epochs 1 "
        "--pretrain-max-train-samples 512 --output-dir /tmp/transfer-smoke` (a few minutes).",
        "",
        "The task suites `causal-lm`, `segmentation` and `detection` train the paper's other tasks offline "
        "(`benchmarks/harness/tasks.py`): a tiny GPT-2 on the standard library's `.py` files as bytes "
        "(perplexity per byte on held-out files, lower is better), a SegFormer (mIoU) and a DETR with a ResNet "
        "backbone (mAP@0.5, VOC all-point) on Fashion-MNIST items composed on 56x56 canvases "
        "(`examples/task_data.py`; metrics in `benchmarks/harness/task_metrics.py`). Their tables keep the "
        "column names of the classification suites, the accuracy columns holding the task's metric; the "
        "methods a task model cannot take (the lighter surrogate `half`, `narrow`) are refused with the reason, "
        "listed in each suite's report. A quick check of one: `python -m benchmarks --suite detection --seeds 1 "
        "--epochs 1 --max-train-samples 64 --output-dir /tmp/detection-smoke` (under a minute).",
        "",
        "| method | what it trains |",
        "|---|---|",
        *(f"| `{name}` | {method.describe()} |" for name, method in METHODS.items()),
        "",
    ]


def _suite_section(name: str, results: dict[str, Any]) -> list[str]:
    # Links are relative to benchmarks/, where this README lives.
    transfer = results["suite"].get("pretrain") is not None
    files = RESULT_FILES + ((TRANSFER_PLOT,) if transfer else ())
    links = " · ".join(f"[`{name}/{file}`]({name}/{file})" for file in files)
    return [
        f"## Suite `{name}`",
        "",
        *render_settings(results),
        "",
        f"Full report with findings, and plots: {links}.",
        "",
        *render_task(results),
        *render_tables(results),
        *surrogate_summary(results),
        *lora_footnote(results),
        f"![test accuracy per epoch, suite {name}]({name}/accuracy_curves.png)",
        f"![RepL coefficients over training, suite {name}]({name}/coefficients.png)",
        *([f"![source accuracy after conversion and fine-tuned accuracy, suite {name}]({name}/{TRANSFER_PLOT})"]
          if transfer else []),
        "",
    ]


def _verdict_section(suites: dict[str, dict[str, Any] | None]) -> list[str]:
    return [
        "## Verdict: the paper's claims against each baseline",
        "",
        "Computed from the results below (`benchmarks/harness/verdict.py`); each suite's command is in its section.",
        "In sum (the README's first screen quotes this table), then per suite and model:",
        "",
        *render_verdict_tally(suites),
        "",
        *render_verdict(suites),
        "",
        VERDICT_RULES,
        "",
    ]


def _synthesis_section(overhead: dict[str, Any]) -> list[str]:
    # The script's own renderers, so this section and synthesis_overhead.md always agree.
    from ..synthesis_overhead import render_machine, render_table

    return [
        "## Synthesis overhead",
        "",
        render_machine(overhead) + " Method, notes and the other coefficient granularities: "
        "[`synthesis_overhead.md`](synthesis_overhead.md).",
        "",
        *render_table(overhead["results"]),
        "",
    ]


def _speed_section(speed: dict[str, Any]) -> list[str]:
    # The script's own renderer (its findings included), so this section and speed/speed.md always agree.
    from ..speed import render

    return [
        "## Speed: RepL against its step-time limit",
        "",
        *render(speed).splitlines()[2:],
        "",
    ]


def _fsdp_section(fsdp_state: dict[str, Any]) -> list[str]:
    # The script's own renderers, so this section and fsdp_state.md always agree.
    from ..fsdp_state import render_setting, render_table

    return [
        "## Training state per process under FSDP2",
        "",
        render_setting(fsdp_state) + " Units and notes: [`fsdp_state.md`](fsdp_state.md).",
        "",
        *render_table(fsdp_state),
        "",
    ]


def read_suites(directory: str = BENCHMARKS_DIR) -> dict[str, dict[str, Any] | None]:
    """Each suite's results.json under `directory`, None for a suite not run."""
    return {name: _read_json(os.path.join(directory, name, "results.json")) for name in SUITES}


def render_readme(directory: str = BENCHMARKS_DIR) -> str:
    """The README text for the results found under `directory` (the `benchmarks` package directory)."""
    lines = [
        "# Benchmarks",
        "",
        "<!-- Generated by `python -m benchmarks --readme` (benchmarks/harness/readme.py) from the results "
        "in this directory: do not edit by hand. -->",
        "",
        "RepL against ordinary training and its alternatives, on the same model, data and seeds in one run: "
        "parameters, training memory, step time with the share spent synthesizing weights, accuracy over "
        "seeds, checkpoint size and inference throughput of the merged model. What the numbers say, in words "
        "(training from scratch, fine-tuning, the lighter surrogates): [docs/results.md](../docs/results.md).",
        "",
    ]
    suites = read_suites(directory)
    lines += _verdict_section(suites)
    lines += _how_to_run()
    missing = []
    for name, results in suites.items():
        if results is None:
            missing.append(f"`{name}`")
        else:
            lines += _suite_section(name, results)
    if missing:
        lines += [f"Not run yet (no `results.json`): {', '.join(missing)}.", ""]
    overhead = _read_json(os.path.join(directory, f"{SYNTHESIS_OVERHEAD_NAME}.json"))
    if overhead is not None:
        lines += _synthesis_section(overhead)
    speed = _read_json(os.path.join(directory, SPEED_NAME, f"{SPEED_NAME}.json"))
    if speed is not None:
        lines += _speed_section(speed)
    fsdp_state = _read_json(os.path.join(directory, f"{FSDP_STATE_NAME}.json"))
    if fsdp_state is not None:
        lines += _fsdp_section(fsdp_state)
    return "\n".join(lines)


def write_readme(directory: str = BENCHMARKS_DIR) -> str:
    """Rewrite `<directory>/README.md` from the results there; returns its path."""
    path = os.path.join(directory, "README.md")
    atomic_write(path, render_readme(directory))
    logger.info("Wrote %s", path)
    return path

