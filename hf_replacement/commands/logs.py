"""The launcher's logger: Accelerate's, with its `[RANK i]` tag only when there are several processes."""

from __future__ import annotations

import logging
from collections.abc import MutableMapping
from typing import Any

from accelerate.logging import MultiProcessAdapter
from accelerate.logging import get_logger as accelerate_logger
from accelerate.state import PartialState


class _RankTaggedAdapter(MultiProcessAdapter):
    """`main_process_only` as Accelerate's; a single process's messages carry no rank, which would say nothing."""

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        if PartialState().num_processes > 1:
            return super().process(msg, kwargs)
        msg, kwargs = logging.LoggerAdapter.process(self, msg, kwargs)
        kwargs.setdefault("stacklevel", 2)  # as Accelerate's: report the caller's line, not ours
        return msg, kwargs


def get_logger(name: str) -> MultiProcessAdapter:
    """Like `accelerate.logging.get_logger` (it honours `ACCELERATE_LOG_LEVEL`), rank tag only across processes."""
    return _RankTaggedAdapter(accelerate_logger(name).logger, {})
