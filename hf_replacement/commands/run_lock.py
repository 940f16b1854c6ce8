"""One `hf-replacement train` per output directory at a time.

Two runs writing the same `--output-dir` would each print "saved" while the directory holds
whichever saved last. A run holds an exclusive `fcntl.flock` on `.hf-replacement.lock` inside the
directory for its whole life; the operating system releases it when the process ends in any way
(SIGKILL included), so a killed run never leaves the directory stuck. The file itself stays: it
only names the last owner, and removing it while another run waits to lock it would let two runs
hold two different files.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import os
import socket
from collections.abc import Iterator

LOCK_NAME = ".hf-replacement.lock"


class OutputDirInUseError(ValueError):
    """Another live run owns the output directory."""


@contextlib.contextmanager
def output_dir_lock(directory: str, *, enabled: bool = True) -> Iterator[None]:
    """Own `directory` (which must exist) while the block runs; refuse at once if a live run owns it.

    `enabled=False` (the processes of a distributed run other than rank 0, which write nothing)
    takes no lock.
    """
    if not enabled:
        yield
        return
    path = os.path.join(directory, LOCK_NAME)
    with open(path, "a+", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "owner not yet recorded"
            raise OutputDirInUseError(
                f"--output-dir {directory} is in use by another hf-replacement train ({owner}): two runs would "
                "overwrite each other's model and checkpoints. Wait for that run to end, or choose another "
                "--output-dir."
            ) from None
        handle.seek(0)
        handle.truncate()
        started = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}, since {started}\n")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


__all__ = ["LOCK_NAME", "OutputDirInUseError", "output_dir_lock"]
