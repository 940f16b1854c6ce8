"""Atomic writes: all files land or none, failures report their cause, modes are a shared file's."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
from file_modes import expected_modes, modes_under
from safetensors.torch import save_file

import hf_replacement.checkpoint as checkpoint
from hf_replacement.checkpoint import atomic_write, staged_directory, write_checkpoint

OLD = {"replacement_config.json": "old config", "model.safetensors": {"w": torch.zeros(3)}}
NEW = {"replacement_config.json": "new config", "model.safetensors": {"w": torch.ones(3)}}


def snapshot(directory) -> dict[str, bytes]:
    return {name: (directory / name).read_bytes() for name in sorted(os.listdir(directory))}


def test_a_failed_rename_rolls_back_the_files_already_replaced(tmp_path, monkeypatch):
    write_checkpoint(tmp_path, OLD)
    (tmp_path / "results.json").write_text("kept")
    before = snapshot(tmp_path)
    real_replace, calls = os.replace, []

    def second_rename_fails(source, target):
        calls.append(target)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_replace(source, target)

    monkeypatch.setattr(checkpoint.os, "replace", second_rename_fails)
    with pytest.raises(OSError, match="disk full"):
        write_checkpoint(tmp_path, NEW)
    monkeypatch.undo()
    assert snapshot(tmp_path) == before  # the first file's new content was rolled back; no temporary left


def test_a_failing_clean_up_does_not_hide_the_cause(tmp_path, monkeypatch):
    def failing_save(*args, **kwargs):
        raise RuntimeError("the real cause")

    def failing_remove(path):
        raise PermissionError(f"cannot remove {path}")

    monkeypatch.setattr(checkpoint, "save_file", failing_save)
    monkeypatch.setattr(checkpoint.os, "remove", failing_remove)
    with pytest.raises(RuntimeError, match="the real cause"):
        write_checkpoint(tmp_path, NEW)


def test_leftovers_of_a_killed_writer_are_removed_on_the_next_save(tmp_path):
    leftovers = [".model.safetensors.k1ll3d_x.tmp", ".replacement_config.json.a1b2c3d4.backup"]
    for name in leftovers:
        (tmp_path / name).write_bytes(b"half")
    (tmp_path / ".keep-me.tmp").write_text("not ours")
    write_checkpoint(tmp_path, NEW)
    assert sorted(os.listdir(tmp_path)) == [".keep-me.tmp", "model.safetensors", "replacement_config.json"]


def test_weights_and_json_get_the_mode_of_an_ordinary_file(tmp_path, umask):
    write_checkpoint(tmp_path, NEW)
    atomic_write(tmp_path / "results.json", b"{}")
    assert checkpoint.current_umask() == umask
    assert modes_under(tmp_path) | {".": 0} == expected_modes(tmp_path, umask) | {".": 0}


def test_a_staged_directory_shares_what_any_writer_put_in_it(tmp_path, umask):
    """safetensors' save_file makes 0600 files and mkdtemp 0700 directories: the staged result is shared."""
    target = tmp_path / "checkpoint-2"
    with staged_directory(target) as staging:
        save_file({"w": torch.ones(2)}, os.path.join(staging, "model.safetensors"))
        inner = tempfile.mkdtemp(dir=staging)
        save_file({"w": torch.ones(2)}, os.path.join(inner, "shard.safetensors"))
        assert os.stat(os.path.join(staging, "model.safetensors")).st_mode & 0o777 == 0o600  # the trap itself
    assert modes_under(target) == expected_modes(target, umask)


def test_a_staged_directory_appears_whole_or_not_at_all(tmp_path):
    target = tmp_path / "checkpoint-4"
    with staged_directory(target) as staging:
        write_checkpoint(staging, OLD)
    before = snapshot(target)
    with pytest.raises(RuntimeError, match="killed mid-save"):
        with staged_directory(target) as staging:
            write_checkpoint(staging, NEW)
            raise RuntimeError("killed mid-save")
    assert snapshot(target) == before and sorted(os.listdir(tmp_path)) == ["checkpoint-4"]
    with staged_directory(target) as staging:  # a re-run replaces the whole directory
        write_checkpoint(staging, {"model.safetensors": NEW["model.safetensors"]})
    assert sorted(os.listdir(target)) == ["model.safetensors"] and sorted(os.listdir(tmp_path)) == ["checkpoint-4"]


def test_merged_models_get_the_modes_of_ordinary_files(tmp_path, umask):
    """`hf-replacement merge` and `save_merged` write through Transformers' save_pretrained (weights 0600)."""
    from tiny_models import build

    from hf_replacement import ReplacementConfig, get_replacement_model
    from hf_replacement.commands.merge import merge_checkpoint

    model = get_replacement_model(build("vit"), ReplacementConfig(replace_interval=2))
    model.save_pretrained(tmp_path / "repl")
    (tmp_path / "merged").mkdir()  # an empty directory is replaced as a whole
    merge_checkpoint(str(tmp_path / "repl"), str(tmp_path / "merged"))
    model.save_merged(tmp_path / "saved-merged")
    for directory in ("repl", "merged", "saved-merged"):
        root = tmp_path / directory
        assert "model.safetensors" in os.listdir(root)
        assert modes_under(root) | {".": 0} == expected_modes(root, umask) | {".": 0}, directory
    assert modes_under(tmp_path / "merged")["."] == 0o777 & ~umask  # made in a private staging directory
