"""Every error xkd reports to a user: one hierarchy under :class:`XkdError`.

A leaf of the package: it imports nothing of xkd, so every layer can raise these. The CLI catches
:class:`XkdError` and prints its one-line message (exit code 2); anything else is a bug and keeps
its traceback. Each class also derives from the built-in exception a caller would expect (a bad
value is a ``ValueError``, a missing record a ``FileNotFoundError``), so ``except ValueError`` in
user code keeps working.
"""

from __future__ import annotations


class XkdError(Exception):
    """A problem the user can fix; the message names the problem and the fix."""


class ConfigError(XkdError, ValueError):
    """A config value that is missing, unknown or of the wrong type/range."""


class UnknownNameError(XkdError, KeyError):
    """A name that is not in a registry. The message lists the registered names."""

    def __str__(self) -> str:  # KeyError quotes its message; show it plainly.
        return str(self.args[0])


class RegistryError(XkdError, ValueError):
    """A registration that cannot be accepted: a name already taken, an entry of the wrong kind."""


class ContractError(XkdError, ValueError):
    """A model, distiller or explainer (typically a user's) that returns what xkd cannot use: logits of
    the wrong width, no loss terms, maps of the wrong shape. The message names it and the contract."""


class DataError(XkdError, ValueError):
    """A dataset that cannot be built as configured. The message names the problem and the fix."""


class ImageInputError(XkdError, ValueError):
    """An image given to ``xkd explain`` that cannot be used (unreadable, wrong channel count)."""


class LayerNotFoundError(XkdError, KeyError):
    """A module path that does not exist in a model. The message lists candidate paths."""

    def __str__(self) -> str:
        return str(self.args[0])


class PretrainedUnavailableError(XkdError, RuntimeError):
    """Pretrained weights were asked for and could not be obtained."""


class CheckpointError(XkdError, RuntimeError):
    """A checkpoint that cannot be used (missing, unreadable, or from another architecture)."""


class NonFiniteLossError(XkdError, FloatingPointError):
    """The training loss became NaN or infinite; the last good checkpoint is kept."""


class DeviceMemoryError(XkdError, RuntimeError):
    """The device ran out of memory while training; the message names the batch size to lower. The
    last checkpoint is kept, so ``--resume`` continues from it."""


class NonFiniteAttributionError(XkdError, ValueError):
    """An explainer produced NaN or inf; the message names the method and the first bad images
    (``indices``: their positions in the explained batch)."""

    def __init__(self, message: str, indices: list[int] | None = None) -> None:
        super().__init__(message)
        self.indices = list(indices or [])


class ThetaUnavailableError(XkdError, ValueError):
    """The model has no importance map Θ (it was not trained by MED-TEX or MED-EX)."""


class DissectionError(XkdError, ValueError):
    """Data or parameters network dissection cannot work with. The message names the fix."""


class RunExistsError(XkdError, FileExistsError):
    """The run directory already holds a run."""


class ReportError(XkdError, FileNotFoundError):
    """A record the report needs is missing: the run is incomplete (``xkd run --resume``)."""


class ReportSchemaError(ReportError, ValueError):
    """A record has another schema version or kind than this xkd reads."""
