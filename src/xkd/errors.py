"""The errors xkd reports to a user as one clear message (no traceback) from the CLI."""

from __future__ import annotations

from xkd.config import ConfigError
from xkd.data.base import DataError
from xkd.engine.checkpoint import CheckpointError
from xkd.engine.trainer import NonFiniteLossError
from xkd.models.hooks import LayerNotFoundError
from xkd.models.zoo import PretrainedUnavailableError
from xkd.registry import UnknownNameError


class ImageInputError(ValueError):
    """An image given to ``xkd explain`` that cannot be used (unreadable, wrong channel count)."""


def _user_errors() -> tuple[type[BaseException], ...]:
    from xkd.explain.base import NonFiniteAttributionError
    from xkd.metrics.dissection import DissectionError
    from xkd.pipeline import RunExistsError
    from xkd.report.render import ReportError

    return (
        ConfigError,
        DataError,
        CheckpointError,
        NonFiniteLossError,
        LayerNotFoundError,
        PretrainedUnavailableError,
        UnknownNameError,
        ImageInputError,
        RunExistsError,
        ReportError,
        DissectionError,
        NonFiniteAttributionError,
    )


USER_ERRORS = _user_errors()
