"""Per-process training state under FSDP2: parameter, gradient and optimizer bytes, bp against RepL.

Run from a checkout: `python benchmarks/fsdp_state.py [--models vit-tiny deit-tiny convnext-tiny]
[--methods bp repl-k4] [--processes 2] [--image-size 28] [--output-dir DIR]` (also
`python -m benchmarks.fsdp_state`). Writes `fsdp_state.{json,md}` to `benchmarks/` (or `--output-dir`);
`python -m benchmarks --readme` then shows the table in `benchmarks/README.md`.

Each model of the CPU suite (`fashion-mnist`: 28x28 grayscale, 10 classes) is built as the harness
builds it for each method, sharded with `hf_replacement.shard_model` over `--processes` CPU processes
(gloo), and takes one AdamW step on a random batch of two images. Then every process counts, from the
tensors, the bytes it holds of its own: parameter shards, gradient shards (as they stand after the
update) and AdamW's state (moments and step counts). Bytes depend on shapes and the process count
only, not on the device or timing: a GPU holds the same shards. Also reported: one process training
the unsharded model (the harness's `state_memory`), and the largest block unit FSDP gathers whole
during a step, parameters at their dtype: RepL gathers a replaced block's two neighbours together.
"""

from __future__ import annotations

import argparse
import faulthandler
import gc
import json
import logging
import os
import shlex
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

if __package__ in (None, ""):
    # Run as a script (`python benchmarks/fsdp_state.py`): Python put benchmarks/ on the path, not the
    # checkout that holds the `benchmarks` package this script imports.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from benchmarks.harness.device import machine_info
from benchmarks.harness.meters import state_memory
from benchmarks.harness.methods import build_method_model, resolve_methods
from benchmarks.harness.output import write_report
from benchmarks.harness.paths import BENCHMARKS_DIR, FSDP_STATE_NAME
from benchmarks.harness.suites import SUITES
from hf_replacement import shard_model, sharding_units

logger = logging.getLogger("benchmarks.fsdp_state")

SUITE = SUITES["fashion-mnist"]  # the CPU suite: its models, image size, channels and classes
KINDS = ("parameters", "gradients", "optimizer")


def _local_bytes(tensors: Sequence[torch.Tensor]) -> int:
    """Bytes this process holds of `tensors`: a sharded tensor's local shard, a plain tensor whole."""
    total = 0
    for tensor in {id(t): t for t in tensors}.values():
        local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        total += local.numel() * local.element_size()
    return total


def _one_step(model: nn.Module, image_size: int) -> torch.optim.Optimizer:
    """One AdamW update on a random batch of two; the gradients are kept to be counted."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(2, SUITE.num_channels, image_size, image_size, generator=generator)
    model.train()
    model(pixel_values=pixels, labels=torch.tensor([0, 1])).loss.backward()
    optimizer.step()
    return optimizer


def _build(method: str, model_name: str, image_size: int) -> nn.Module:
    return build_method_model(method, model_name, SUITE.num_labels, image_size, SUITE.num_channels, seed=0).model


def _largest_unit_bytes(model: nn.Module) -> int:
    """Bytes of the largest block unit gathered whole (the root unit, the same for every method, aside)."""
    return max(
        sum(p.numel() * p.element_size() for block in unit for p in block.module.parameters())
        for unit in sharding_units(model)
    )


def measure_sharded(model_name: str, method: str, image_size: int) -> dict[str, Any]:
    """This process's bytes after one sharded step (call in every process of the group)."""
    model = _build(method, model_name, image_size)
    units = [[block.index for block in unit] for unit in sharding_units(model)]
    largest = _largest_unit_bytes(model)
    shard_model(model)
    optimizer = _one_step(model, image_size)
    parameters = list(model.parameters())
    optimizer_tensors = [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    return {
        "parameters": _local_bytes(parameters),
        "gradients": _local_bytes([p.grad for p in parameters if p.grad is not None]),
        "optimizer": _local_bytes(optimizer_tensors),
        "units": units,
        "largest_unit_bytes": largest,
    }


def measure_unsharded(model_name: str, method: str, image_size: int) -> dict[str, int]:
    """One process training the whole model: the harness's exact state bytes."""
    model = _build(method, model_name, image_size)
    memory = state_memory(model, _one_step(model, image_size))
    return {kind: memory[kind] for kind in KINDS}


def _worker(rank: int, world_size: int, store_path: str, settings: dict[str, Any], output: str) -> None:
    # A native abort (a C++ thread alive at exit) then prints every thread's Python stack to stderr.
    faulthandler.enable()
    torch.set_num_threads(1)
    # A file store in this run's own directory: no TCP port to race for with other runs on the machine.
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world_size)
    try:
        measured = []
        for model_name in settings["models"]:
            for method in settings["methods"]:
                local = measure_sharded(model_name, method, settings["image_size"])
                everyone: list[Any] = [None] * world_size
                dist.all_gather_object(everyone, local)
                measured.append({"model": model_name, "method": method, "per_process": everyone})
        if rank == 0:
            with open(output, "w", encoding="utf-8") as handle:
                json.dump(measured, handle)
        dist.barrier()  # no process tears the group down while another still uses it
    finally:
        shutdown_process_group()


def shutdown_process_group() -> None:
    """Destroy the default process group once nothing refers to its communicators any more.

    A sharded model and its optimizer sit in reference cycles (FSDP hooks), which keep the gloo process
    group and its worker threads alive past `destroy_process_group` until the interpreter's final
    teardown, where freeing them aborts the process ("terminate called without an active exception").
    Collecting those cycles first frees them while the interpreter is whole.
    """
    gc.collect()
    dist.destroy_process_group()
    gc.collect()


def measure(models: Sequence[str], methods: Sequence[str], processes: int, image_size: int) -> list[dict[str, Any]]:
    """Sharded bytes per process (spawned processes) and unsharded bytes (this process), per model and method."""
    settings = {"models": list(models), "methods": list(methods), "image_size": image_size}
    with tempfile.TemporaryDirectory() as directory:
        output = os.path.join(directory, "measured.json")
        store_path = os.path.join(directory, "process_group_store")
        # A child's exception comes back as a ProcessRaisedException carrying the child's traceback.
        torch.multiprocessing.spawn(_worker, args=(processes, store_path, settings, output), nprocs=processes)
        with open(output, encoding="utf-8") as handle:
            measured = json.load(handle)
    for entry in measured:
        entry["unsharded"] = measure_unsharded(entry["model"], entry["method"], image_size)
        per_process = entry["per_process"]
        entry["units"] = per_process[0].pop("units")
        entry["largest_unit_bytes"] = per_process[0].pop("largest_unit_bytes")
        for other in per_process[1:]:
            del other["units"], other["largest_unit_bytes"]
        for rank in per_process:
            rank["total"] = sum(rank[kind] for kind in KINDS)
        entry["unsharded"]["total"] = sum(entry["unsharded"][kind] for kind in KINDS)
    return measured


def _mib(value: int) -> str:
    return f"{value / 2**20:.2f}"


def render_table(report: dict[str, Any]) -> list[str]:
    """One row per model and method (also shown in benchmarks/README.md)."""
    processes = report["processes"]
    lines = [
        f"| model | method | per process (largest of {processes}), MiB: parameters / gradients / optimizer / total "
        "| 1 process, total MiB | total vs bp | largest block unit gathered, MiB |",
        "|---|---|---|---|---|---|",
    ]
    by_model: dict[str, dict[str, Any]] = {}
    for entry in report["results"]:
        by_model.setdefault(entry["model"], {})[entry["method"]] = entry
    for model_name, entries in by_model.items():
        bp = entries.get("bp")
        for method, entry in entries.items():
            largest = max(entry["per_process"], key=lambda rank: rank["total"])
            cells = " / ".join(_mib(largest[kind]) for kind in (*KINDS, "total"))
            if bp is not None:
                bp_total = max(rank["total"] for rank in bp["per_process"])
                ratio = f"{largest['total'] / bp_total:.3f}"
            else:
                ratio = "-"
            lines.append(
                f"| {model_name} | {method} | {cells} | {_mib(entry['unsharded']['total'])} | {ratio} | "
                f"{_mib(entry['largest_unit_bytes'])} |"
            )
    return lines


def render_setting(report: dict[str, Any]) -> str:
    """How the numbers were produced (also shown in benchmarks/README.md)."""
    machine = report["machine"]
    return (
        f"FSDP2 over {report['processes']} CPU processes (gloo), {report['image_size']}x{report['image_size']} "
        f"grayscale, {SUITE.num_labels} classes, fp32, AdamW, one update; torch {machine['torch']}. Bytes are "
        f"counted from the tensors each process holds, not timed: the same on any machine and device. "
        f"Produced by `{report['command']}`."
    )


def render(report: dict[str, Any]) -> str:
    """fsdp_state.md: the setting, the table, the units."""
    lines = [
        "# Training state per process under FSDP2: bp vs RepL",
        "",
        render_setting(report) + " Method: the docstring of `benchmarks/fsdp_state.py`.",
        "",
        *render_table(report),
        "",
        "Parameters and gradients are sharded along their first dimension across the processes; AdamW's "
        "moments follow their parameters, and its step counts (one scalar per parameter tensor) are held "
        "whole by every process. RepL's saving (the replaced blocks hold no weights, gradients or moments) "
        "divides by the process count like the rest. The price of RepL under FSDP is the last column: a "
        "replaced block shares its unit with both neighbours, so FSDP gathers two blocks' weights at once "
        "where bp gathers one.",
        "",
        "FSDP units (block indices; the root unit holds the rest):",
        "",
        "| model | method | units |",
        "|---|---|---|",
    ]
    for entry in report["results"]:
        units = ", ".join("+".join(str(index) for index in unit) for unit in entry["units"])
        lines.append(f"| {entry['model']} | {entry['method']} | {units} |")
    lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Measure, write fsdp_state.{json,md}, print the Markdown."""
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
    parser = argparse.ArgumentParser(prog="python benchmarks/fsdp_state.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(SUITE.models), help="presets (default: the CPU suite's)")
    parser.add_argument("--methods", nargs="+", default=["bp", "repl-k4"], choices=["bp", "repl-k4", "repl-k3"])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=SUITE.image_size)
    parser.add_argument("--output-dir", default=BENCHMARKS_DIR)
    args = parser.parse_args(argv)
    if args.processes < 2:
        parser.error(f"--processes {args.processes}: FSDP shards across processes; give 2 or more.")
    arguments = sys.argv[1:] if argv is None else list(argv)
    report = {
        "command": " ".join([parser.prog, *(shlex.quote(a) for a in arguments)]),
        "machine": machine_info(torch.device("cpu")),
        "processes": args.processes,
        "image_size": args.image_size,
        "results": measure(args.models, resolve_methods(args.methods), args.processes, args.image_size),
    }
    markdown = render(report)
    write_report(args.output_dir, FSDP_STATE_NAME, report, markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
