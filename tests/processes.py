"""Multi-process tests own their processes: each command runs in its own session (its own process group,
so torchrun's workers go with it), is killed with all its children when the test ends whatever happens,
and a failure shows the command's own output (the child's traceback)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# One thread per process: the processes share the machine's cores.
LAUNCH_ENVIRONMENT = {"OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
# Real multi-process CPU training (gloo DDP): without it Accelerate runs N independent processes.
CPU_ENVIRONMENT = {"ACCELERATE_USE_CPU": "1"}


def torchrun(*arguments: str, processes: int = 2) -> list[str]:
    """`torchrun --standalone`: the rendezvous binds a free port itself (no port chosen here that another
    run could take between the choice and the bind)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
            *arguments]  # fmt: skip


def free_port() -> int:
    """A port free now, for launchers that must be told one (accelerate's two-machine simulation)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_processes(
    commands: list[list[str]], cwd, timeout: float = 300, cpu: bool = True
) -> list[subprocess.CompletedProcess]:
    """Run `commands` concurrently (on the CPU unless `cpu=False`); return their results (rc, output).

    Whatever happens (a timeout, a failed assertion, Ctrl-C), every process and its children are killed
    before this returns, so none outlives the test or holds a port or a CPU the next test needs.
    """
    environment = dict(os.environ, **LAUNCH_ENVIRONMENT, **(CPU_ENVIRONMENT if cpu else {}))
    started: list[subprocess.Popen] = []
    try:
        for command in commands:
            started.append(
                subprocess.Popen(command, env=environment, cwd=cwd, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip
            )
        outputs = [process.communicate(timeout=timeout)[0] for process in started]
    finally:
        for process in started:
            _kill_session(process)
    return [subprocess.CompletedProcess(p.args, p.returncode, output) for p, output in zip(started, outputs)]


def launch(commands: list[list[str]], cwd, timeout: float = 300, cpu: bool = True) -> None:
    """Run `commands` concurrently; fail with each failing command's own output (its traceback)."""
    for finished in run_processes(commands, cwd, timeout, cpu):
        assert finished.returncode == 0, f"{' '.join(finished.args)} exited {finished.returncode}:\n" + (
            finished.stdout[-5000:]
        )


def _kill_session(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)  # the launcher and the workers it started
    except ProcessLookupError:
        pass  # the whole session has ended
    process.wait()
