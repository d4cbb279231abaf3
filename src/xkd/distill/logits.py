"""Logit-based distillation: scratch, Hinton KD and label smoothing.

Sources: Hinton et al., "Distilling the Knowledge in a Neural Network" (2015); KD-FMV
(``shared/seeds/000_kd-fmv.txt``, SEEDS.md §1); Han et al., ICML 2023 (SEEDS.md §3) for label
smoothing ``y_LS = (1 - eps) y + eps / K``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from xkd.config import ConfigError
from xkd.data.base import Batch
from xkd.distill.base import Distiller, NoParams
from xkd.registry import DISTILLERS


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """``T^2 * KL(softmax(z_t / T) || softmax(z_s / T))``, mean over the batch.

    The ``T^2`` factor keeps the soft term's gradient scale independent of ``T`` (Hinton 2015, §2).
    Both distributions are computed from **logits** (SEEDS.md §1: the KD-FMV seed code applies the
    temperature to probabilities, which we do not copy).
    """
    t = temperature
    log_p_s = F.log_softmax(student_logits / t, dim=1)
    log_p_t = F.log_softmax(teacher_logits / t, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * (t * t)


@DISTILLERS.register("scratch")
class Scratch(Distiller):
    """The student trained alone with cross-entropy on the labels (no teacher)."""

    Params = NoParams
    needs_teacher = False

    def forward(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        logits = self.student(batch.images)
        return logits, {"ce": F.cross_entropy(logits, batch.labels)}


@dataclass
class HintonKDParams:
    """``alpha`` weighs the hard-label term; ``temperature`` softens both distributions.

    Note the conventions differ between sources: KD-FMV weighs the hard term by alpha (as here),
    Han et al. weigh the soft term by alpha. KD-FMV's runs use (alpha, T) in {(0.7, 5), (0.4, 15),
    (0.7, 10)}.
    """

    alpha: float = 0.7
    temperature: float = 5.0

    def validate(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")


@DISTILLERS.register("hinton_kd")
class HintonKD(Distiller):
    """Hinton KD on logits (KD-FMV eq. for L_distill, SEEDS.md §1)::

        L = alpha * CE(y, softmax(z_s)) + (1 - alpha) * T^2 * KL(softmax(z_t/T) || softmax(z_s/T))

    Returns the two weighted terms ``ce`` and ``kd``.
    """

    Params = HintonKDParams

    def forward(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        p: HintonKDParams = self.params
        logits = self.student(batch.images)
        with torch.no_grad():
            teacher_logits = self.teacher(batch.images)
        return logits, {
            "ce": p.alpha * F.cross_entropy(logits, batch.labels),
            "kd": (1.0 - p.alpha) * kd_loss(logits, teacher_logits, p.temperature),
        }


@dataclass
class LabelSmoothingParams:
    """``epsilon``: mass spread uniformly over the K classes, ``y_LS = (1 - eps) y + eps / K``."""

    epsilon: float = 0.1

    def validate(self) -> None:
        if not 0.0 <= self.epsilon < 1.0:
            raise ConfigError(f"epsilon must be in [0, 1), got {self.epsilon}")


@DISTILLERS.register("label_smoothing")
class LabelSmoothing(Distiller):
    """Cross-entropy against smoothed labels ``(1 - eps) y + eps / K`` (Szegedy et al. 2016;
    the baseline of Han et al. 2023). No teacher."""

    Params = LabelSmoothingParams
    needs_teacher = False

    def forward(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        logits = self.student(batch.images)
        return logits, {"ce_smooth": F.cross_entropy(logits, batch.labels, label_smoothing=self.params.epsilon)}
