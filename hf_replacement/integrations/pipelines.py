"""`pipeline("image-classification", model=<ReplacementModel>)` without a false error.

Transformers' pipelines run a `ReplacementModel` as they run its base model: its forward takes the base model's
arguments and it answers for `config`, `device` and `to`. But the pipeline checks the model's class name against
the ~50 image classifiers it knows and logs that whole list as an error for any other name, and the check has no
hook to register a class. This filter drops exactly that record (class `ReplacementModel`, task
image-classification) on the logger that emits it; every other record passes, and the pipeline itself is unchanged.
"""

from __future__ import annotations

import logging

# The logger of transformers/pipelines/base.py, whose `check_model_type` logs the record.
PIPELINE_LOGGER = "transformers.pipelines.base"
_UNSUPPORTED_MODEL = "The model 'ReplacementModel' is not supported for image-classification."


class _ReplacementModelIsAnImageClassifier(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_UNSUPPORTED_MODEL)


def allow_replacement_models_in_pipelines() -> None:
    """Install the filter (once) on the pipelines' logger."""
    pipeline_logger = logging.getLogger(PIPELINE_LOGGER)
    if not any(isinstance(existing, _ReplacementModelIsAnImageClassifier) for existing in pipeline_logger.filters):
        pipeline_logger.addFilter(_ReplacementModelIsAnImageClassifier())
