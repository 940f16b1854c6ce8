"""How the fault study runs one command: in this process through `cli.main` (as the console script
does), or in a process of its own; output, logs, exit code, time and a hang all captured."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

from hf_replacement.commands.cli import main

REPO = Path(__file__).resolve().parents[1]


class Hang(BaseException):
    """The case's time limit passed (raised by SIGALRM; not an Exception, so nothing in the CLI catches it)."""


@dataclasses.dataclass
class Outcome:
    code: int | None
    stdout: str
    stderr: str
    logs: str
    seconds: float
    escaped: str | None = None  # an exception that left `main` (a traceback the user would see)
    hang: bool = False


def run_in_process(argv: list[str], timeout: int) -> Outcome:
    """`hf-replacement *argv` through `cli.main`, with its output, logs and exit code captured."""
    out, err, logs = io.StringIO(), io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(logs)
    logging.getLogger().addHandler(handler)
    code, escaped, hang = None, None, False

    def expire(signum, frame):
        raise Hang

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(timeout)
    started = time.perf_counter()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(argv)
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    except Hang:
        hang = True
    except BaseException:  # noqa: BLE001  what the user would see as a traceback
        escaped = traceback.format_exc(limit=-3)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        logging.getLogger().removeHandler(handler)
    return Outcome(code, out.getvalue(), err.getvalue(), logs.getvalue(), time.perf_counter() - started, escaped, hang)


def run_command(argv: list[str], timeout: int, **popen) -> Outcome:
    """`python -m hf_replacement.commands.cli *argv` in a process of its own (what the console script runs)."""
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "hf_replacement.commands.cli", *argv],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=subprocess_environment(),
        **popen,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        stdout, stderr = process.communicate()
        return Outcome(None, stdout, stderr, "", time.perf_counter() - started, hang=True)
    return Outcome(process.returncode, stdout, stderr, stderr, time.perf_counter() - started)


def subprocess_environment() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


