"""Logit-based distillation: scratch, Hinton KD, label smoothing and decoupled KD.

Sources: Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network", NIPS 2014 Deep
Learning Workshop (arXiv:1503.02531, 2015); KD-FMV (Jiang, Zhao, Wu & Chaddad, "A Knowledge
Distillation-Based Approach to Enhance Transparency of Classifier Models", arXiv 2025); Han, Kim, Choi &
Yoon, "On the Impact of Knowledge Distillation for Model Interpretability", ICML 2023, for label
smoothing ``y_LS = (1 - eps) y + eps / K``; Zhao et al., "Decoupled Knowledge Distillation",
CVPR 2022 (DKD, as in mdistiller); Sun, Ren, Li, Wang & Cao, "Logit Standardization in Knowledge
Distillation", CVPR 2024, for the ``standardize`` option of ``hinton_kd`` and ``dkd``
(:func:`standardize_logits`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xkd.data.base import Batch
from xkd.distill.base import Distiller, NoParams
from xkd.errors import ConfigError
from xkd.registry import DISTILLERS

STANDARDIZE_EPS = 1e-7


def standardize_logits(logits: Tensor, eps: float = STANDARDIZE_EPS) -> Tensor:
    """Z-score each sample's logits over the classes: ``(z - mean(z)) / (eps + std(z))``.

    Sun et al., "Logit Standardization in Knowledge Distillation", CVPR 2024, Algorithm 1 (the
    Z-score pre-process), computed as the authors' code (``normalize`` in their mdistiller fork)
    does: the standard deviation is the unbiased one (``ddof = 1``, torch's default) and ``eps`` =
    1e-7 is added to it, not under the square root. (A population std, ``ddof = 0``, would only
    rescale every z-scored logit by ``sqrt((K - 1) / K)``, i.e. act as a slightly different
    temperature.) Applied to teacher and student alike before dividing by the temperature, it lets
    the student match the teacher's logit *relations* without matching their range. Needs at least
    2 classes.
    """
    if logits.ndim != 2 or logits.shape[1] < 2:
        raise ValueError(
            f"logit standardization z-scores each sample's logits over its classes, so it needs logits of "
            f"shape (N, classes >= 2), got {tuple(logits.shape)}; set standardize: false for such a model"
        )
    z = logits.float()
    return (z - z.mean(dim=1, keepdim=True)) / (eps + z.std(dim=1, keepdim=True))


def soft_log_targets(teacher_logits: Tensor, temperature: float, standardize: bool = False) -> Tensor:
    """KD's soft targets as log-probabilities, ``log softmax(z_t / T)`` in fp32 (z-scored first with
    ``standardize``): what :func:`kd_loss` computes from the teacher's logits, for callers that compute
    it once (a cache of every training image's logits) instead of at every step."""
    zt = teacher_logits.float()  # in fp32 also under autocast
    if standardize:
        zt = standardize_logits(zt)
    return F.log_softmax(zt / temperature, dim=1)


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor | None,
    temperature: float,
    standardize: bool = False,
    weight: float = 1.0,
    log_targets: Tensor | None = None,
) -> Tensor:
    """``weight * T^2 * KL(softmax(z_t / T) || softmax(z_s / T))``, mean over the batch.

    The ``T^2`` factor keeps the soft term's gradient scale independent of ``T`` (Hinton 2015, §2).
    Both distributions are computed from **logits** (the code published with KD-FMV, Jiang et al.
    2025, applies the temperature to probabilities, which we do not copy). With ``standardize`` both
    logit vectors are z-scored first (:func:`standardize_logits`, Sun et al. 2024), so ``T`` is then a
    base temperature applied to unit-variance logits. ``log_targets``: the teacher's side already
    computed (:func:`soft_log_targets` with the same ``T`` and ``standardize``); ``teacher_logits`` is
    then not read.

    The KL is summed and scaled once by ``weight * T^2 / batch``: on a GPU a small student's step is
    bound by kernel launches, and "batchmean" followed by two products cost four kernels more per step
    (forward and backward) for the same value.
    """
    t = temperature
    # in fp32 also under autocast: bf16's 8-bit mantissa loses the soft targets' small probabilities
    zs = student_logits.float()
    if standardize:
        zs = standardize_logits(zs)
    log_p_s = F.log_softmax(zs / t, dim=1)
    if log_targets is None:
        if teacher_logits is None:
            raise ValueError("kd_loss needs the teacher's logits or its log_targets")
        log_targets = soft_log_targets(teacher_logits, t, standardize)
    kl = F.kl_div(log_p_s, log_targets, reduction="sum", log_target=True)
    return kl * (weight * t * t / max(zs.shape[0], 1))


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

    ``standardize``: z-score both models' logits per sample before the temperature (Sun et al.,
    CVPR 2024; :func:`standardize_logits`). Off by default. The authors pair it with a small base
    temperature and a heavier KD term (CIFAR-100: T = 2, KD weight 9 against CE weight 1; the same
    1:9 ratio is ``alpha`` = 0.1 here, with ``temperature`` = 2).
    """

    alpha: float = 0.7
    temperature: float = 5.0
    standardize: bool = False

    def validate(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")


@DISTILLERS.register("hinton_kd")
class HintonKD(Distiller):
    """Hinton KD on logits (the L_distill equation of KD-FMV, Jiang et al. 2025)::

        L = alpha * CE(y, softmax(z_s)) + (1 - alpha) * T^2 * KL(softmax(z_t/T) || softmax(z_s/T))

    Returns the two weighted terms ``ce`` and ``kd``.
    """

    Params = HintonKDParams
    teacher_logits_only = True

    def teacher_table(self, logits: Tensor, labels: Tensor | None) -> Tensor:
        """The soft targets (:func:`soft_log_targets`), so a step reads its rows instead of dividing and
        normalising the teacher's logits again."""
        p: HintonKDParams = self.params
        return soft_log_targets(logits, p.temperature, p.standardize)

    def forward(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        p: HintonKDParams = self.params
        logits = self.student(batch.images)
        log_targets, teacher_logits = self.teacher_rows(batch)
        kd = kd_loss(logits, teacher_logits, p.temperature, p.standardize, 1.0 - p.alpha, log_targets)
        return logits, {"ce": p.alpha * F.cross_entropy(logits, batch.labels), "kd": kd}


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


def _dkd_log_probs(z: Tensor, y: Tensor, gt: Tensor) -> Tensor:
    """``(N, K + 2)``: the log non-target distribution (0 at the target) and the log binary
    distribution ``(log p_target, log (1 - p_target))`` of logits ``z`` (already divided by ``T``),
    from log-sum-exps (not mdistiller's ``- 1000 * gt_mask`` trick; the values are the same)."""
    others = z.masked_fill(gt, float("-inf"))
    log_q = F.log_softmax(others, dim=1).masked_fill(gt, 0.0)
    log_b = torch.cat([z.gather(1, y), torch.logsumexp(others, dim=1, keepdim=True)], 1)
    return torch.cat([log_q, log_b - torch.logsumexp(z, dim=1, keepdim=True)], 1)


def _target_mask(z: Tensor, y: Tensor) -> Tensor:
    # by scatter: F.one_hot may check the labels' range on the host (a sync per step)
    return torch.zeros_like(z, dtype=torch.bool).scatter_(1, y, True)


def dkd_teacher_side(teacher_logits: Tensor, labels: Tensor, temperature: float, standardize: bool = False) -> Tensor:
    """What Decoupled KD reads of the teacher, per image, as one fp32 table ``(N, K + 2)``: the log
    non-target distribution (K columns, 0 at the target) and the log binary distribution (2), at
    temperature ``T`` (z-scored first with ``standardize``); as large as the logits it replaces.
    :func:`dkd_terms` computes it from the teacher's logits at every step; a cache of every training
    image's logits, with their labels, lets :class:`DKD` compute it once."""
    zt = teacher_logits.float()  # in fp32 also under autocast
    if standardize:
        zt = standardize_logits(zt)
    z, y = zt / temperature, labels.long()[:, None]
    return _dkd_log_probs(z, y, _target_mask(z, y))


def dkd_terms(
    student_logits: Tensor,
    teacher_logits: Tensor | None,
    labels: Tensor,
    temperature: float,
    standardize: bool = False,
    weights: tuple[float, float] = (1.0, 1.0),
    teacher_side: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Decoupled KD's two parts, ``(TCKD, NCKD)``, each ``T^2 * KL`` averaged over the batch and
    multiplied by its weight of ``weights`` (one product each instead of two more per step).

    Zhao et al., "Decoupled Knowledge Distillation", CVPR 2022, eq. (1)-(3), at temperature ``T``:

    - TCKD = ``KL(b_t || b_s)`` between the binary distributions ``b = [p_target, 1 - p_target]``;
    - NCKD = ``KL(p^_t || p^_s)`` between the distributions over the non-target classes alone,
      ``p^_i = exp(z_i/T) / sum_{j != target} exp(z_j/T)``.

    Hinton's KD decomposes as ``KL(p_t || p_s) = TCKD + (1 - p_t,target) * NCKD`` (their eq. 3). Both
    are computed in log space (log-sum-exp) rather than by mdistiller's ``- 1000 * gt_mask`` trick;
    the values are the same. Needs at least 2 classes (NCKD is 0 with exactly 2). With
    ``standardize`` both logit vectors are z-scored over all classes first (:func:`standardize_logits`,
    Sun et al. 2024, as their DKD code does), then divided by ``T``. ``teacher_side``: the teacher's
    part already computed (:func:`dkd_teacher_side` with the same labels, ``T`` and ``standardize``);
    ``teacher_logits`` is then not read.
    """
    t = temperature
    zs = student_logits.float()  # fp32 also under autocast
    if standardize:
        zs = standardize_logits(zs)
    s, y = zs / t, labels.long()[:, None]
    if teacher_side is None:
        if teacher_logits is None:
            raise ValueError("dkd_terms needs the teacher's logits or its teacher_side")
        teacher_side = dkd_teacher_side(teacher_logits, labels, t, standardize)
    k = s.shape[1]
    gt = _target_mask(s, y)
    # the teacher's probabilities, 0 at the target of the non-target part (its log is 0 there)
    p_t = torch.cat([teacher_side[:, :k].exp().masked_fill(gt, 0.0), teacher_side[:, k:].exp()], 1)
    # the log-ratios of the teacher's and the student's distributions, summed weighted by the teacher's
    ratio = p_t * (teacher_side - _dkd_log_probs(s, y, gt))
    scale = t * t / s.shape[0]
    return ratio[:, k:].sum() * (weights[0] * scale), ratio[:, :k].sum() * (weights[1] * scale)


@dataclass
class DKDParams:
    """Defaults of Zhao et al. / mdistiller on CIFAR-100: ``alpha`` = 1 (TCKD weight), ``beta`` = 8
    (NCKD weight; the paper uses other values for some teacher-student pairs, 0.5 on ImageNet),
    ``temperature`` = 4, ``ce_weight`` = 1.

    ``warmup_steps``: the DKD term is multiplied by ``min(step / warmup_steps, 1)``, ``step`` = 1, 2,
    ... counting training forward passes (= optimiser steps); 0 (the default) means no warm-up.
    mdistiller ramps per epoch, ``min(epoch / 20, 1)`` over its 240 epochs, but a distiller does not
    know the epoch or the number of steps per epoch; to reproduce it set ``warmup_steps`` to
    ``20 * ceil(train_size / batch_size)`` (the ramp is then linear per step instead of a staircase).
    xkd's short budgets train for a few epochs, hence no warm-up unless asked.

    ``standardize``: z-score both models' logits per sample before the temperature (Sun et al.,
    CVPR 2024; :func:`standardize_logits`). Off by default.
    """

    alpha: float = 1.0
    beta: float = 8.0
    temperature: float = 4.0
    ce_weight: float = 1.0
    warmup_steps: int = 0
    standardize: bool = False

    def validate(self) -> None:
        for name in ("alpha", "beta", "ce_weight"):
            value = getattr(self, name)
            if not value >= 0:
                raise ConfigError(f"{name} must be >= 0, got {value}")
        if not self.temperature > 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
        if self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps must be >= 0, got {self.warmup_steps}")


class StepCounter(nn.Module):
    """Counts training steps on the host (``count``), so reading it never waits for a GPU; the buffer
    ``step`` carries the count into checkpoints (written when the state dict is taken) and back on
    resume (read from the loaded state dict, a CPU tensor as checkpoints are loaded)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.count = 0

    def tick(self) -> int:
        """Count one training step; returns the new count."""
        self.count += 1
        return self.count

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        self.step.fill_(self.count)  # a host scalar: no synchronisation
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if isinstance(state_dict.get(prefix + "step"), Tensor):
            self.count = int(state_dict[prefix + "step"])


@DISTILLERS.register("dkd")
class DKD(Distiller):
    """Decoupled KD (Zhao et al., CVPR 2022, eq. 4; mdistiller's ``DKD``)::

        L = ce_weight * CE(y, z_s) + ramp * (alpha * TCKD + beta * NCKD)

    ``ramp`` = ``min(step / warmup_steps, 1)`` (1 without warm-up). Terms: ``ce``, ``tckd``, ``nckd``
    (each already weighted, ramp included). With ``warmup_steps`` > 0 the step counter is a
    trainable module ``dkd_state`` (a buffer, no parameters) so that resuming continues the ramp.
    """

    Params = DKDParams
    teacher_logits_only = True

    def __init__(self, student: nn.Module, teacher: nn.Module | None = None, params: DKDParams | None = None) -> None:
        super().__init__(student, teacher, params)
        self.counter = StepCounter()

    def trainable_modules(self) -> nn.ModuleDict:
        modules = super().trainable_modules()
        if self.params.warmup_steps > 0:
            modules["dkd_state"] = self.counter
        return modules

    def teacher_table(self, logits: Tensor, labels: Tensor | None) -> Tensor | None:
        """With the training images' labels, the teacher's side of both KLs (:func:`dkd_teacher_side`),
        so a step reads its rows instead of recomputing it; without them the logits."""
        p: DKDParams = self.params
        return None if labels is None else dkd_teacher_side(logits, labels, p.temperature, p.standardize)

    def ramp(self) -> float:
        """The warm-up factor for the current step (1 without warm-up)."""
        w = self.params.warmup_steps
        return 1.0 if w <= 0 else min(self.counter.count / w, 1.0)

    def forward(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        p: DKDParams = self.params
        logits = self.student(batch.images)
        side, teacher_logits = self.teacher_rows(batch)
        if self.training and torch.is_grad_enabled():
            self.counter.tick()
        r = self.ramp()
        tckd, nckd = dkd_terms(
            logits, teacher_logits, batch.labels, p.temperature, p.standardize, (r * p.alpha, r * p.beta), side
        )
        return logits, {"ce": p.ce_weight * F.cross_entropy(logits, batch.labels), "tckd": tckd, "nckd": nckd}


def _pearson_rows(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    """Pearson correlation of each row of ``a`` with the same row of ``b`` (DIST's ``eps`` in the
    denominator, as the authors' code)."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def dist_terms(
    student_logits: Tensor,
    teacher_logits: Tensor | None,
    temperature: float,
    weights: tuple[float, float] = (1.0, 1.0),
    teacher_probs: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """DIST's two relations (Huang, You, Wang, Qian & Xu, "Knowledge Distillation from A Stronger
    Teacher", NeurIPS 2022, eq. 5-7), each ``T^2 * (1 - mean Pearson correlation)`` of the
    temperature-softened probabilities ``softmax(z / T)``, multiplied by its weight of ``weights``
    (one product each):

    - inter-class: per image, the correlation across classes of student and teacher (rows);
    - intra-class: per class, the correlation across the batch's images (columns).

    Pearson correlation is invariant to shift and scale, so the student matches the teacher's
    ranking of classes and of images, not its exact probabilities (the relaxed match DIST argues for
    with a much stronger teacher). Computed in fp32 also under autocast. ``teacher_probs``: the
    teacher's ``softmax(z_t / T)`` already computed (fp32, same ``T``); ``teacher_logits`` is then not
    read.
    """
    t = temperature
    ys = F.softmax(student_logits.float() / t, dim=1)
    if teacher_probs is None and teacher_logits is None:
        raise ValueError("dist_terms needs the teacher's logits or its teacher_probs")
    yt = F.softmax(teacher_logits.float() / t, dim=1) if teacher_probs is None else teacher_probs
    inter = (1.0 - _pearson_rows(ys, yt).mean()) * (t * t * weights[0])
    intra = (1.0 - _pearson_rows(ys.t(), yt.t()).mean()) * (t * t * weights[1])
    return inter, intra


@dataclass
class DISTParams:
    """DIST: ``L = ce_weight * CE + beta * inter + gamma * intra``.

    Attributes:
        beta, gamma: weights of the inter- and intra-class relations (the authors' DIST module
            defaults to 1 and 1).
        temperature: ``T`` of the softened probabilities (4 in the common CIFAR recipes).
        ce_weight: weight of the cross-entropy on the labels (1, as the authors train).
    """

    beta: float = 1.0
    gamma: float = 1.0
    temperature: float = 4.0
    ce_weight: float = 1.0

    def validate(self) -> None:
        for name in ("beta", "gamma", "ce_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")


@DISTILLERS.register("dist")
class DIST(Distiller):
    """DIST (Huang et al., NeurIPS 2022): the student matches the teacher's inter-class and
    intra-class relations, measured by Pearson correlation (:func:`dist_terms`). Returns the terms
    ``ce``, ``inter`` and ``intra``. Reads only the teacher's logits (cached during training)."""

    Params = DISTParams
    teacher_logits_only = True

    def teacher_table(self, logits: Tensor, labels: Tensor | None) -> Tensor:
        """The teacher's softened probabilities ``softmax(z_t / T)``, read by a step instead of its logits."""
        return F.softmax(logits.float() / self.params.temperature, dim=1)

    def forward(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        p: DISTParams = self.params
        logits = self.student(batch.images)
        probs, teacher_logits = self.teacher_rows(batch)
        inter, intra = dist_terms(logits, teacher_logits, p.temperature, (p.beta, p.gamma), probs)
        return logits, {"ce": p.ce_weight * F.cross_entropy(logits, batch.labels), "inter": inter, "intra": intra}
