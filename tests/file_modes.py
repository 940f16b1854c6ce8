"""Permission bits of what a test wrote, and those an ordinary `open(path, "w")` / `os.mkdir` would give."""

from __future__ import annotations


def modes_under(root) -> dict[str, int]:
    """Permission bits of `root` and of everything under it, by path relative to `root`."""
    found = {".": root.stat().st_mode & 0o777}
    for path in root.rglob("*"):
        found[str(path.relative_to(root))] = path.stat().st_mode & 0o777
    return found


def expected_modes(root, umask: int) -> dict[str, int]:
    """What `open(path, "w")` and `os.mkdir` give under `umask`."""
    found = {".": 0o777 & ~umask}
    for path in root.rglob("*"):
        found[str(path.relative_to(root))] = (0o777 if path.is_dir() else 0o666) & ~umask
    return found
