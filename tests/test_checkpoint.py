"""Atomic writes: all files land or none, failures report their cause, modes are a shared file's."""

from __future__ import annotations

import os

import pytest
import torch

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


def test_weights_and_json_get_the_mode_of_an_ordinary_file(tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    write_checkpoint(tmp_path, NEW)
    atomic_write(tmp_path / "results.json", b"{}")
    for name in ("model.safetensors", "replacement_config.json", "results.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


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
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o777 & ~umask
