"""Teacher assistant: teacher -> assistant -> student as a chain of runs in one config.

Source: Mirzadeh et al., "Improved Knowledge Distillation via Teacher Assistant", AAAI 2020 (TAKD); used
by UniCAM (Adhane, Dehshibi, Vetter, Masip & Roig, "On Explaining Knowledge Distillation: Measuring and
Visualising the Knowledge Transfer Process", WACV 2025) to test whether an intermediate-size model
bridges a large teacher-student capacity gap.

A ``teacher_assistant`` student names an **assistant** architecture. The pipeline
(:func:`xkd.pipeline.train_students`) first distils the assistant from the teacher with
``assistant_distiller`` (same data and budget as the students, checkpoints under
``checkpoints/<name>.assistant/``), then distils the student from the trained assistant with
``distiller``. This class is the second link: it wraps the inner distiller whose teacher is the
assistant, so its loss terms, adapters and evaluated model are the inner method's.

With ``hinton_kd`` both links use xkd's KD term, ``T^2 * KL`` averaged over the batch (Hinton 2015).
The TAKD authors' code (``train.py``) takes ``nn.KLDivLoss()`` with its default element-wise mean,
i.e. the same KL divided by the number of classes as well: a weight copied from their searched
settings (``search_space.json``) weighs the soft term ``K`` times less there than here.

Config example::

    students:
      - name: ta
        distiller: teacher_assistant
        params:
          assistant: {name: cifar_resnet, params: {depth: 8, width: 16}}
          assistant_distiller: hinton_kd
          distiller: hinton_kd
          params: {alpha: 0.7, temperature: 5.0}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

import xkd.models  # noqa: F401  (registers the models assistant.name is checked against)
from xkd.config import ModelConfig
from xkd.data.base import Batch
from xkd.distill.base import DistillContext, Distiller, build_distiller, distiller_params
from xkd.errors import ConfigError
from xkd.registry import DISTILLERS, MODELS
from xkd.schema import from_dict


@dataclass
class TeacherAssistantParams:
    """Attributes:
    assistant: the assistant's architecture (a model config: ``{name, params}``); required.
    assistant_distiller: how the assistant learns from the teacher (a registered distiller).
    assistant_params: that distiller's parameters.
    distiller: how the student learns from the assistant (a registered distiller).
    params: that distiller's parameters.
    """

    assistant: dict[str, Any] = field(default_factory=dict)
    assistant_distiller: str = "hinton_kd"
    assistant_params: dict[str, Any] = field(default_factory=dict)
    distiller: str = "hinton_kd"
    params: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        if not self.assistant:
            raise ConfigError(
                "assistant: the assistant's model is required, e.g. assistant: {name: cifar_resnet, params: {depth: 8}}"
            )
        model = self.assistant_model()
        if ":" not in model.name and "." not in model.name and model.name not in MODELS:
            raise ConfigError(f"assistant.name: unknown model {model.name!r}; registered: {', '.join(MODELS.names())}")
        for key in ("assistant_distiller", "distiller"):
            name = getattr(self, key)
            if name == "teacher_assistant":
                raise ConfigError(f"{key}: a chain of assistants is not supported; name a one-step distiller")
            if name not in DISTILLERS:
                raise ConfigError(f"{key}: unknown distiller {name!r}; registered: {', '.join(DISTILLERS.names())}")
        distiller_params(self.assistant_distiller, self.assistant_params, "assistant_params")
        distiller_params(self.distiller, self.params, "params")

    def assistant_model(self) -> ModelConfig:
        return from_dict(ModelConfig, self.assistant, "assistant")


@DISTILLERS.register("teacher_assistant")
class TeacherAssistant(Distiller):
    """The student distilled from a trained assistant by the inner method ``params.distiller``.

    Args:
        student: the student network.
        teacher: the **trained assistant** (the pipeline trains it from the real teacher first).
            Outside the pipeline (rebuilding a finished run's student) any model with the right
            number of classes will do: only the student's architecture is used.
        params: :class:`TeacherAssistantParams`.
    """

    Params = TeacherAssistantParams
    needs_assistant = True

    def __init__(self, student: nn.Module, teacher: nn.Module | None, params: TeacherAssistantParams) -> None:
        super().__init__(student, teacher, params)
        self.inner = build_distiller(params.distiller, student, teacher, params.params)
        self.student = self.inner.student  # the evaluated model is the inner method's (it may wrap the student)

    def setup(self, context: DistillContext) -> None:
        self.inner.setup(context)
        self.setup_reused_seconds = self.inner.setup_reused_seconds
        ignored = getattr(self.inner, "_ddp_params_and_buffers_to_ignore", None)
        if ignored:  # DDP reads the list of the module it wraps, this one (e.g. CRD's memory banks)
            names = [f"inner.{n}" for n in ignored]
            nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(self, names)

    def preflight(self, sample: Tensor) -> None:
        self.inner.preflight(sample)

    def trainable_modules(self) -> nn.ModuleDict:
        return self.inner.trainable_modules()

    def forward(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        return self.inner(batch)
