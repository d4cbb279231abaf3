"""Variational information distillation's loss for one layer pair, a module with parameters (the
mean regressor and the per-channel variances): used by the ``vid`` distiller and by MED-TEX."""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xkd.distill.adapters import match_size


class VIDLoss(nn.Module):
    """Variational information distillation for one layer pair (Ahn et al., CVPR 2019, eq. 2-5;
    Nguyen-Duc et al., MED-TEX, IEEE ISBI 2022, eq. 6-7).

    The teacher feature ``t`` is modelled as a Gaussian with mean ``mu(s)`` (a small 1x1-conv net
    on the student feature: conv 1x1 -> ReLU -> conv 1x1) and a learned per-channel variance
    ``sigma_c^2 = softplus(alpha_c) + eps``; the loss is the negative log-likelihood without the
    constant ``log sqrt(2 pi)``::

        l_{n,c,h,w} = log sigma_c + (t_{n,c,h,w} - mu(s)_{n,c,h,w})^2 / (2 sigma_c^2)

    Differences from RepDistiller's ``VIDLoss`` (taken "from the author", Ahn et al.), documented, not
    copied: its regressor ``mu`` has **three** 1x1 convs **without bias** (conv -> ReLU -> conv ->
    ReLU -> conv, ``bias=False``, hidden width ``mid_channels``), xkd's has **two with bias**; and
    where the two maps' sizes differ it average-pools the larger map (student's or teacher's) down
    to the smaller (``adaptive_avg_pool2d``), where xkd resamples the student's map to the teacher's
    (:func:`match_size`). The variance, its initialisation and the loss formula are the same.

    Args:
        student_channels: channels of the student feature.
        teacher_channels: channels of the teacher feature.
        mid_channels: hidden channels of ``mu`` (default: ``teacher_channels``, as RepDistiller).
        init_pred_var: initial ``sigma_c^2`` (RepDistiller's 5.0); ``alpha_c`` starts at
            ``log(exp(init_pred_var - eps) - 1)``.
        eps: variance floor.
        reduction: ``"sum"`` (default, the paper's and MED-TEX's eq.): sum over ``c, h, w`` per
            sample, then mean over the batch. ``"mean"``: mean over every element (RepDistiller's
            ``VIDLoss``; the scale its ``beta = 1`` was tuned for). ``sum = mean * C * H * W``.

    ``forward(student_feat, teacher_feat)`` takes ``(N, C_s, h, w)`` and ``(N, C_t, H, W)`` maps; the
    student map is resampled to ``H x W`` first if they differ (:func:`match_size`). Returns a scalar.
    With ``spatial=False`` it takes flattened features ``(N, D_s)`` and ``(N, D_t)`` (1x1 convs
    become linear layers, ``sigma_d`` per feature).
    """

    def __init__(
        self,
        student_channels: int,
        teacher_channels: int,
        mid_channels: int | None = None,
        init_pred_var: float = 5.0,
        eps: float = 1e-5,
        reduction: Literal["sum", "mean"] = "sum",
        spatial: bool = True,
    ) -> None:
        super().__init__()
        if init_pred_var <= eps:
            raise ValueError(f"init_pred_var must be > eps ({eps}), got {init_pred_var}")
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
        mid = teacher_channels if mid_channels is None else mid_channels
        self.spatial = spatial
        if spatial:
            first, second = nn.Conv2d(student_channels, mid, 1), nn.Conv2d(mid, teacher_channels, 1)
        else:  # flattened (N, D) features: the same network with linear layers
            first, second = nn.Linear(student_channels, mid), nn.Linear(mid, teacher_channels)
        self.regressor = nn.Sequential(first, nn.ReLU(), second)
        init = math.log(math.expm1(init_pred_var - eps))
        self.log_scale = nn.Parameter(torch.full((teacher_channels,), init))
        self.eps = eps
        self.reduction = reduction

    def variance(self) -> Tensor:
        """``sigma_c^2 = softplus(alpha_c) + eps``, shape ``(C_t,)``."""
        return F.softplus(self.log_scale) + self.eps

    def forward(self, student_feat: Tensor, teacher_feat: Tensor) -> Tensor:
        s = match_size(student_feat, teacher_feat.shape) if self.spatial else student_feat
        mu = self.regressor(s)
        var = self.variance().view(1, -1, *([1] * (teacher_feat.ndim - 2)))
        nll = 0.5 * torch.log(var) + (teacher_feat - mu) ** 2 / (2.0 * var)
        if self.reduction == "mean":
            return nll.mean()
        return nll.flatten(1).sum(1).mean()
