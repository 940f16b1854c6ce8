"""`pipeline(task, model=<ReplacementModel>)` without a false error.

Transformers' pipelines run a `ReplacementModel` as they run its base model: its forward takes the base model's
arguments and it answers for `config`, `device`, `to` and `generate`. But each pipeline checks the model's class
name against the models it knows for its task and logs that whole list as an error for any other name, and the
check has no hook to register a class. This filter drops exactly that record (class `ReplacementModel`, any task)
on the logger that emits it; every other record passes, and the pipeline itself is unchanged.
"""

from __future__ import annotations

import logging

# The logger of transformers/pipelines/base.py, whose `check_model_type` logs the record.
PIPELINE_LOGGER = "transformers.pipelines.base"
_UNSUPPORTED_MODEL = "The model 'ReplacementModel' is not supported for "


class _ReplacementModelIsSupported(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_UNSUPPORTED_MODEL)


def allow_replacement_models_in_pipelines() -> None:
    """Install the filter (once) on the pipelines' logger."""
    pipeline_logger = logging.getLogger(PIPELINE_LOGGER)
    if not any(isinstance(existing, _ReplacementModelIsSupported) for existing in pipeline_logger.filters):
        pipeline_logger.addFilter(_ReplacementModelIsSupported())
