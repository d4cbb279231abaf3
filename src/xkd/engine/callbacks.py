"""Hooks into training and into a whole run, for tracking (TensorBoard, MLflow) and tuning (an
Optuna trial reports each epoch's validation accuracy and may stop the run).

Every method is optional: subclass :class:`Callback` and override what you need. A callback may
raise to stop training (an Optuna pruner raises ``optuna.TrialPruned``); the epoch's checkpoints are
written before :meth:`Callback.on_epoch_end` is called, so nothing is lost.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


class Callback:
    """Base class of the hooks the trainer and the pipeline call (no-ops by default)."""

    def on_train_start(self, role: str, epochs: int) -> None:
        """Training of model ``role`` (``teacher``, a student's name) starts; ``epochs`` is its budget."""

    def on_epoch_end(self, role: str, epoch: int, stats: dict[str, Any]) -> None:
        """Epoch ``epoch`` of ``role`` ended; ``stats`` is its history entry (``train_loss``,
        ``terms``, ``train_accuracy``, ``val_loss``, ``val_accuracy``, ``val_macro_f1``, ``lr``,
        ``seconds``, ``images``)."""

    def on_train_end(self, role: str, history: list[dict[str, Any]]) -> None:
        """Training of ``role`` ended (also when it resumed or was loaded with nothing left to run)."""

    def on_run_end(self, run_dir: Path) -> None:
        """The run's records are written under ``run_dir`` (called on the writing rank only)."""


def call(callbacks: Sequence[Callback], hook: str, *args: Any) -> None:
    """Call ``hook`` on every callback, in order."""
    for cb in callbacks:
        getattr(cb, hook)(*args)
