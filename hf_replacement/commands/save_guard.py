"""A save that fails (full disk, read-only directory) or is interrupted (Ctrl-C) ends in one line.

The writers (`checkpoint.write_checkpoint`, `staged_directory`) already keep every file whole and
remove their temporary files; this turns what stopped them into a message that says what happened
and which checkpoint the user can resume from, instead of a traceback.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator

from safetensors import SafetensorError

from ..checkpoint import leftover_files
from .training_state import STATE_JSON

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# safetensors reports an OS error inside its own message: `IoError(Os { code: 28, ..., message: "No space ..." })`.
_RUST_OS_MESSAGE = re.compile(r'message: "([^"]+)"')


class SaveError(RuntimeError):
    """Writing a checkpoint or the final model failed; what was there before is intact."""


class SaveInterrupted(KeyboardInterrupt):
    """Ctrl-C arrived while a checkpoint or the final model was being written."""


def last_complete_checkpoint(output_dir: str) -> str | None:
    """The newest `checkpoint-N/` in `output_dir` (they appear whole or not at all), or None."""
    try:
        names = os.listdir(output_dir)
    except OSError:
        return None
    steps = [
        int(match.group(1))
        for match in map(_CHECKPOINT.match, names)
        if match and os.path.isfile(os.path.join(output_dir, match.group(0), STATE_JSON))
    ]
    return os.path.join(output_dir, f"checkpoint-{max(steps)}") if steps else None


def what_is_intact(output_dir: str) -> str:
    """The part of the message that tells the user where to go on from."""
    checkpoint = last_complete_checkpoint(output_dir)
    if checkpoint is None:
        return "no checkpoint had been written before (--checkpointing-steps N writes them)"
    return f"the last complete checkpoint, {checkpoint}, is intact: go on with --resume-from {checkpoint}"


def _reason(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror:
        return f"{error.strerror}: {error.filename}" if error.filename else error.strerror
    found = _RUST_OS_MESSAGE.search(str(error))
    return found.group(1) if found else (str(error).strip().splitlines() or [type(error).__name__])[0][:200]


@contextlib.contextmanager
def guarded_save(what: str, output_dir: str, kept: str = "nothing of it was kept") -> Iterator[None]:
    """Run the save of `what` (e.g. "checkpoint-40"); a failure or Ctrl-C becomes one clear line.

    `kept`: what the writer guarantees was left of `what` when it stopped.
    """
    try:
        yield
    except KeyboardInterrupt:
        raise SaveInterrupted(
            f"interrupted (Ctrl-C) while saving {what}: {kept}; {what_is_intact(output_dir)}."
        ) from None
    except (OSError, SafetensorError) as error:
        raise SaveError(
            f"could not save {what} to {output_dir} ({_reason(error)}): {kept}; {what_is_intact(output_dir)}."
            f"{_unremovable(output_dir)} Free space or fix the directory's permissions, then run again."
        ) from None


def _unremovable(output_dir: str) -> str:
    """The writers remove their temporary files on failure; name those a read-only directory kept."""
    left = leftover_files(output_dir)
    if not left:
        return ""
    return (
        f" The directory could not be written, so {', '.join(left)} could not be removed: the next run into it "
        "removes it."
    )


__all__ = ["SaveError", "SaveInterrupted", "guarded_save", "last_complete_checkpoint", "what_is_intact"]
