"""Atomic checkpoint writing: every file lands complete, or the directory keeps what it had."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"  # a sharded save, as Transformers writes it
_WEIGHT_FILE = re.compile(r"^model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?$")
_UMASK = os.umask(0)
os.umask(_UMASK)
# Saved models and results are shared files: the mode an ordinary `open(path, "w")` would give.
FILE_MODE = 0o666 & ~_UMASK
# What `write_checkpoint` leaves behind only when it is killed: `.<name>.<random>.tmp` / `.backup`.
_LEFTOVER = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.(tmp|backup)$")

FileContent = str | bytes | dict[str, torch.Tensor]


def write_checkpoint(directory: str | os.PathLike, files: dict[str, FileContent]) -> None:
    """Write `files` (name -> text, bytes, or a state dict saved as safetensors) into `directory`.

    Each file is first written under a temporary name in the same directory; only when all of
    them are complete are they renamed into place (`os.replace` is atomic on one file system). If
    anything fails, the files already renamed are rolled back to what they were, the temporary files
    are removed and the directory is as before. Leftovers of a writer that was killed are removed first.
    """
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    _remove_leftovers(directory)
    staged: list[tuple[str, str]] = []
    try:
        for name, content in files.items():
            handle, temporary = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
            os.close(handle)
            staged.append((temporary, os.path.join(directory, name)))
            if isinstance(content, dict):
                tensors = {key: value.detach().contiguous() for key, value in content.items()}
                save_file(tensors, temporary, metadata={"format": "pt"})
            else:
                with open(temporary, "wb") as stream:
                    stream.write(content.encode("utf-8") if isinstance(content, str) else content)
            # After writing: safetensors replaces the file it writes, with mode 0600.
            os.chmod(temporary, FILE_MODE)
        _replace_all(staged)
    finally:
        for temporary, _ in staged:
            with contextlib.suppress(OSError):  # a failed clean-up must not hide the error that caused it
                os.remove(temporary)


def _replace_all(staged: list[tuple[str, str]]) -> None:
    """Rename every staged file into place, or none: earlier renames are undone if a later one fails."""
    backups: list[tuple[str, str | None]] = []  # (final, backup of what it held, or None: it did not exist)
    try:
        for temporary, final in staged:
            backup = None
            if os.path.exists(final):
                backup = f"{os.path.dirname(final)}/.{os.path.basename(final)}.{os.urandom(6).hex()[:8]}.backup"
                try:
                    os.link(final, backup)  # a second name: `final` stays readable until the replace
                except OSError:  # a file system without hard links
                    shutil.copy2(final, backup)
            backups.append((final, backup))
            os.replace(temporary, final)
    except BaseException:
        for final, backup in reversed(backups):
            with contextlib.suppress(OSError):
                if backup is not None:
                    os.replace(backup, final)
                elif os.path.exists(final):
                    os.remove(final)
        raise
    finally:
        for _, backup in backups:
            if backup is not None:
                with contextlib.suppress(OSError):
                    os.remove(backup)


def leftover_files(directory: str | os.PathLike) -> list[str]:
    """Temporary files or directories a writer left in `directory` (killed, or unable to remove them)."""
    try:
        return sorted(name for name in os.listdir(directory) if _LEFTOVER.match(name))
    except OSError:
        return []


def _remove_leftovers(directory: str) -> None:
    for name in leftover_files(directory):
        path = os.path.join(directory, name)
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.remove(path)


@contextlib.contextmanager
def staged_directory(directory: str | os.PathLike) -> Iterator[str]:
    """A temporary directory beside `directory`, renamed to it when the block succeeds, removed if not.

    A directory of several files (a training checkpoint) thus appears whole or not at all; one
    already there is replaced as a unit.
    """
    directory = os.path.abspath(os.fspath(directory))
    parent, name = os.path.split(directory)
    os.makedirs(parent, exist_ok=True)
    _remove_leftovers(parent)
    staging = tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=parent)
    try:
        yield staging
        os.chmod(staging, 0o777 & ~_UMASK)  # mkdtemp makes it private
        if os.path.exists(directory):
            retired = tempfile.mkdtemp(prefix=f".{name}.", suffix=".backup", dir=parent)
            os.replace(directory, os.path.join(retired, name))
            try:
                os.replace(staging, directory)
            except BaseException:  # Ctrl-C or a failure between the two renames: the old one goes back
                os.replace(os.path.join(retired, name), directory)
                raise
            finally:
                shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def weight_files(
    state_dict: dict[str, torch.Tensor], max_shard_size: int | str | None = None
) -> dict[str, FileContent]:
    """`model.safetensors`, or with `max_shard_size` (e.g. "5GB") the shards and their index, as
    Transformers names them: the files `write_checkpoint` takes for these weights."""
    if max_shard_size is None:
        return {WEIGHTS_NAME: state_dict}
    split = split_torch_state_dict_into_shards(state_dict, max_shard_size=max_shard_size)
    if not split.is_sharded:
        return {WEIGHTS_NAME: state_dict}
    files: dict[str, FileContent] = {
        name: {key: state_dict[key] for key in keys} for name, keys in split.filename_to_tensors.items()
    }
    index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
    files[WEIGHTS_INDEX_NAME] = json.dumps(index, indent=2, sort_keys=True) + "\n"
    return files


def remove_other_weight_files(directory: str | os.PathLike, kept: Iterable[str]) -> None:
    """Remove weight files of an earlier save (a sharded one over a single file, or the reverse) that
    `kept` does not name, so a directory never holds two sets of weights."""
    kept = set(kept)
    for name in os.listdir(directory):
        if _WEIGHT_FILE.match(name) and name not in kept:
            with contextlib.suppress(OSError):
                os.remove(os.path.join(directory, name))


def load_weights(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict saved in `directory`: `model.safetensors`, or the shards its index names.

    Raises `FileNotFoundError` when there are no weights and `ValueError` for an unreadable file.
    """
    directory = os.fspath(directory)
    index_path = os.path.join(directory, WEIGHTS_INDEX_NAME)
    if os.path.isfile(index_path):
        try:
            with open(index_path, encoding="utf-8") as stream:
                weight_map = json.load(stream)["weight_map"]
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as error:
            raise ValueError(
                f"{index_path} is not a valid weight index ({error}); the checkpoint is corrupt."
            ) from None
        names = sorted(set(weight_map.values()))
    else:
        names = [WEIGHTS_NAME]
    state_dict: dict[str, torch.Tensor] = {}
    for name in names:
        path = os.path.join(directory, name)
        try:
            state_dict.update(load_file(path))
        except FileNotFoundError:
            raise FileNotFoundError(f"{path} is missing: the checkpoint is incomplete.") from None
        except (SafetensorError, OSError) as error:
            raise ValueError(
                f"{path} is not a readable safetensors file ({error}); the checkpoint is corrupt."
            ) from None
    return state_dict


def atomic_write(path: str | os.PathLike, content: FileContent) -> None:
    """Write one file atomically (see `write_checkpoint`): readers never see it half-written."""
    directory, name = os.path.split(os.fspath(path))
    write_checkpoint(directory or ".", {name: content})


__all__ = ["WEIGHTS_NAME", "atomic_write", "leftover_files", "load_weights", "staged_directory", "write_checkpoint"]
