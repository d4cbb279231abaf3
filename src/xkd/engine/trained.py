"""A trained network and how it came to be: what the pipeline hands to evaluation and scoring."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from xkd.engine.trainer import TrainResult


@dataclass
class TrainedModel:
    """A trained network and how it came to be.

    Training time has parts: ``result.seconds`` (the trainer's epoch loop), ``setup_seconds`` (the
    distiller's setup before the loop: adapters, XDistillation's phase 1 of teacher explanations and
    CAE training, including the time cached artefacts took when they were built,
    ``setup_reused_seconds``) and ``assistant_seconds`` (the whole training of the teacher assistant
    the student was distilled from). :attr:`train_seconds` is their sum, the cost compared across
    methods. A model loaded from a checkpoint (``from_cache``; ``loaded_from`` its path) reports the
    time recorded when it was trained, or ``None`` when there is no record. ``teacher_outputs`` says
    how a distiller saw its teacher: ``"cached logits"`` (computed once per training image, read by
    index), ``"forward per batch"``, or ``None`` without a teacher.
    """

    role: str
    model: nn.Module
    model_name: str
    distiller: str | None = None
    distiller_params: dict[str, Any] = field(default_factory=dict)
    result: TrainResult = field(default_factory=TrainResult)
    from_cache: bool = False
    last_test: dict[str, float] | None = None
    assistant: TrainedModel | None = None
    setup_seconds: float | None = None
    setup_reused_seconds: float | None = None
    assistant_seconds: float | None = None
    loaded_from: str | None = None
    teacher_outputs: str | None = None

    @property
    def train_seconds(self) -> float | None:
        """Epoch loop + distiller setup + assistant training (None when the loop time is unknown)."""
        if self.result.seconds is None:
            return None
        return self.result.seconds + (self.setup_seconds or 0.0) + (self.assistant_seconds or 0.0)

    def train_record(self) -> dict[str, Any]:
        """The timing part of the ``train`` entry in ``records/models.json``."""
        return {
            "seconds": self.train_seconds,
            "loop_seconds": self.result.seconds,
            "setup_seconds": self.setup_seconds,
            "setup_reused_seconds": self.setup_reused_seconds,
            "assistant_seconds": self.assistant_seconds,
            "from_cache": self.from_cache,
            "loaded_from": self.loaded_from,
            "teacher_outputs": self.teacher_outputs,
            **self.result.record(),
        }
