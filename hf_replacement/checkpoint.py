"""Atomic checkpoint writing: every file lands complete, or the directory keeps what it had."""

from __future__ import annotations

import os
import tempfile
from typing import Union

import torch
from safetensors.torch import save_file

WEIGHTS_NAME = "model.safetensors"
_UMASK = os.umask(0)
os.umask(_UMASK)

FileContent = Union[str, dict[str, torch.Tensor]]


def write_checkpoint(directory: str | os.PathLike, files: dict[str, FileContent]) -> None:
    """Write `files` (name -> text, or a state dict saved as safetensors) into `directory`.

    Each file is first written under a temporary name in the same directory; only when all of
    them are complete are they renamed into place (`os.replace` is atomic on one file system).
    If anything fails before that, the temporary files are removed and the directory is untouched.
    """
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    staged: list[tuple[str, str]] = []
    try:
        for name, content in files.items():
            handle, temporary = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
            os.close(handle)
            os.chmod(temporary, 0o666 & ~_UMASK)  # mkstemp creates 0600; saved models are shared files
            staged.append((temporary, os.path.join(directory, name)))
            if isinstance(content, str):
                with open(temporary, "w", encoding="utf-8") as stream:
                    stream.write(content)
            else:
                tensors = {key: value.detach().contiguous() for key, value in content.items()}
                save_file(tensors, temporary, metadata={"format": "pt"})
    except BaseException:
        for temporary, _ in staged:
            if os.path.exists(temporary):
                os.remove(temporary)
        raise
    for temporary, final in staged:
        os.replace(temporary, final)
