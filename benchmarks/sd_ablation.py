"""Where does stochastic depth stall DETR? The `sd` baseline skipped on some of DETR's blocks only.

The detection suite's `sd` (every skippable block of detr-tiny skipped with p = 0.3 per batch, drop-k4's
expected compute) did not train DETR. This script trains detr-tiny on a few detection canvases with the suite's
settings, `sd`'s skipping restricted to one group of blocks at a time (the others always run), and a control:
every block through `sd`'s arithmetic at p = 1e-9, which differs from bp only in rounding and so shows how far
two runs of this short budget drift apart by chance. Final training loss and mAP@0.5 of each seed. Writes
`sd_ablation.json` and `sd_ablation.md` beside this file (or `--output-dir`). Run from the repository root:

    OMP_NUM_THREADS=1 python benchmarks/sd_ablation.py
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shlex
import statistics
import sys
import time
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable from the repository root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.harness.baselines import apply_stochastic_depth, remove_stochastic_depth, skippable_blocks
from benchmarks.harness.data import TensorData
from benchmarks.harness.device import machine_info
from benchmarks.harness.errors import BenchmarkError
from benchmarks.harness.methods import build_method_model
from benchmarks.harness.paths import BENCHMARKS_DIR
from benchmarks.harness.suites import SuiteSpec, get_suite
from benchmarks.harness.tasks import task_of
from benchmarks.harness.training import train_model
from hf_replacement.checkpoint import write_checkpoint

NAME = "sd_ablation"
MODEL = "detr-tiny"
CONTROL_PROBABILITY = 1e-9
# Variant -> the prefixes of the block names skipped (None: no stochastic depth; () : every skippable block).
VARIANTS: dict[str, tuple[str, ...] | None] = {
    "bp": None,
    "control (every block, p = 1e-9)": (),
    "sd (every block)": (),
    "encoder layers": ("model.encoder.layers.",),
    "decoder layers": ("model.decoder.layers.",),
    "decoder layer 0": ("model.decoder.layers.0",),
    "decoder layers 1-3": ("model.decoder.layers.1", "model.decoder.layers.2", "model.decoder.layers.3"),
    "backbone blocks": ("model.backbone.",),
    "backbone block in stage 0": ("model.backbone.model.encoder.stages.0.",),
    "backbone block in stage 2": ("model.backbone.model.encoder.stages.2.",),
}


def restrict_stochastic_depth(model: nn.Module, prefixes: tuple[str, ...], probability: float) -> list[str]:
    """Stochastic depth with `probability` on the skippable blocks of `model` whose names start with one of
    `prefixes` (every skippable block when empty), in place; the names of those blocks."""
    names = {module: name for name, module in model.named_modules()}
    # Listed on the plain model: a ResNet stage holding a swapped and a plain block is no chain `find_blocks` sees.
    blocks = skippable_blocks(remove_stochastic_depth(model))
    chosen = [block for block in blocks if not prefixes or names[block].startswith(prefixes)]
    if not chosen:
        raise BenchmarkError(
            f"No skippable block of {type(model).__name__} starts with {prefixes}; its skippable blocks are "
            f"{', '.join(names[block] for block in blocks)}."
        )
    apply_stochastic_depth(model, probability)
    for block in blocks:
        if block not in chosen:
            block.drop_probability = 0.0
    return [names[block] for block in chosen]


def run_variant(variant: str, suite: SuiteSpec, data: TensorData, seed: int) -> dict[str, Any]:
    """Train detr-tiny under `variant` (a key of VARIANTS); its blocks, probability and training record."""
    # The suite's sd model (its p, drop-k4's expected compute), its skipping then removed: bp's model and weights.
    built = build_method_model("sd", MODEL, data.num_labels, suite.image_size, suite.num_channels, seed,
                               data.id2label, None)
    model = remove_stochastic_depth(built.model)
    prefixes = VARIANTS[variant]
    probability = CONTROL_PROBABILITY if variant.startswith("control") else built.details["drop_probability"]
    blocks = [] if prefixes is None else restrict_stochastic_depth(model, prefixes, probability)
    run = train_model(suite, model, seed, data, torch.device("cpu"))
    return {"blocks": blocks, "drop_probability": probability if blocks else 0.0, **run}


def render(results: dict[str, Any]) -> str:
    settings = results["settings"]
    lines = [
        "# Stochastic depth on some of DETR's blocks only",
        "",
        f"Produced by `{results['command']}` on {results['machine']['cpu']} ({results['machine']['torch_threads']} "
        f"torch threads). {results['data']}; {settings['epochs']} epochs, the detection suite's other settings; "
        f"seeds {', '.join(map(str, settings['seeds']))} (initialisation, data order and the skips). Method and "
        "reading: this script's docstring.",
        "",
        "| variant | blocks with sd | p | final training loss per seed | mean | final mAP@0.5 per seed | mean |",
        "|---|---|---|---|---|---|---|",
    ]
    for variant, runs in results["variants"].items():
        losses = [run["train_loss_per_epoch"][-1] for run in runs]
        maps = [100 * run["accuracy_per_epoch"][-1] for run in runs]
        lines.append(
            f"| {variant} | {len(runs[0]['blocks'])} | {runs[0]['drop_probability']:g} | "
            f"{', '.join(f'{loss:.2f}' for loss in losses)} | {statistics.fmean(losses):.2f} | "
            f"{', '.join(f'{value:.1f}' for value in maps)} | {statistics.fmean(maps):.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--canvases", type=int, default=2048, help="training canvases (the suite trains 12288)")
    parser.add_argument("--test-canvases", type=int, default=500)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seeds", type=int, default=3, help="runs per variant, seeds 0, 1, ...")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--output-dir", default=BENCHMARKS_DIR)
    args = parser.parse_args(argv)
    suite = get_suite("detection", max_train_samples=args.canvases, max_test_samples=args.test_canvases,
                      epochs=args.epochs, seeds=1)
    data = task_of(suite).load(suite, None)
    results: dict[str, Any] = {
        "command": " ".join(["python benchmarks/sd_ablation.py", *map(shlex.quote, sys.argv[1:] if argv is None
                                                                        else argv)]),
        "machine": machine_info(torch.device("cpu")),
        "data": data.description,
        "settings": {**dataclasses.asdict(suite), "seeds": list(range(args.seeds))},
        "variants": {},
    }
    started = time.perf_counter()
    runs = [(variant, seed) for variant in args.variants for seed in range(args.seeds)]
    for variant, seed in tqdm(runs, desc="sd ablation", disable=None):
        results["variants"].setdefault(variant, []).append(run_variant(variant, suite, data, seed))
    results["seconds"] = time.perf_counter() - started
    write_checkpoint(args.output_dir, {
        f"{NAME}.json": json.dumps(results, indent=1, default=str) + "\n",
        f"{NAME}.md": render(results),
    })
    print(render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
