"""The launcher's errors that callers catch by type, in a module of their own so that code without `datasets`
(`idx_files.py`) raises the same ones as `data.py`."""

from __future__ import annotations


class DataError(ValueError):
    """A data set could not be found, read, or does not look like image classification."""


__all__ = ["DataError"]
