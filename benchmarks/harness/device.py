"""The device a run uses: choosing it, describing it, and running on it (autocast, synchronisation)."""

from __future__ import annotations

import contextlib
import os
import platform
import time
from collections.abc import Callable
from typing import Any

import torch

from .errors import BenchmarkError
from .suites import SuiteSpec


def resolve_device(suite: SuiteSpec, device: str | torch.device | None = None) -> torch.device:
    """The device to run on; the gpu suite (and an explicit cuda device) needs CUDA and says so."""
    if suite.requires_cuda and not torch.cuda.is_available():
        raise BenchmarkError(
            f"Suite {suite.name!r} measures memory/time at 224x224 in bf16 and needs a CUDA GPU, but "
            "torch.cuda.is_available() is False here. Run --suite quick or --suite fashion-mnist on CPU."
        )
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BenchmarkError("device 'cuda' was asked for but torch.cuda.is_available() is False.")
    return device


def machine_info(device: torch.device) -> dict[str, Any]:
    """What the numbers were measured on: CPU, device, library versions."""
    import peft
    import transformers

    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    info = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "platform": platform.platform(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def load_average() -> list[float] | None:
    """The machine's 1, 5 and 15-minute load averages; None where the system keeps none (Windows)."""
    try:
        return list(os.getloadavg())
    except (AttributeError, OSError):  # AttributeError: Windows has no os.getloadavg
        return None


def describe_load(load: dict[str, list[float] | None]) -> str:
    """The 1-minute load average before and after a measurement (`load_average` at each), in words."""
    if load["before"] is None or load["after"] is None:
        return "load average not reported by this system"
    return f"load average (1 min) {load['before'][0]:.2f} before, {load['after'][0]:.2f} after"


def autocast(device: torch.device, mixed_precision: str | None) -> contextlib.AbstractContextManager:
    """bf16 autocast where the suite asks for it, else no change."""
    if mixed_precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def synchronize(device: torch.device) -> None:
    """Wait for queued CUDA kernels, so a wall-clock interval covers the work it times."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_clock(device: torch.device) -> tuple[Callable[[], float], str]:
    """The clock to time training steps with, and its name. On a CPU with one torch thread every step's work runs
    on this thread (autograd runs CPU backward on the calling thread), so its CPU time (`time.thread_time`) leaves
    out the time other processes take the core from it: measured with three CPU-bound processes on 2 cores, a
    ViT-tiny step read 1.11 s wall-clock and 0.54 s CPU time against 0.48 s on the idle machine. Elsewhere (several
    threads, CUDA) wall-clock (`time.perf_counter`), with the work synchronized by the caller."""
    if device.type == "cpu" and torch.get_num_threads() == 1:
        return time.thread_time, "thread CPU time"
    return time.perf_counter, "wall-clock"
