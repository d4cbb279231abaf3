"""Relation-based distillation: SP, RKD and PKT.

These methods transfer how the teacher relates the samples of a batch to each other, not the
features themselves: each compares a ``b x b`` (or ``b x b x b``) matrix computed from the teacher's
features with the same matrix computed from the student's. The two models' layers may therefore
differ in channels, spatial size, even rank: **no adapter and no resampling is needed** (the only
shared dimension is the batch), so a pair of layers with different spatial sizes is accepted as is.

- SP, Tung & Mori, "Similarity-Preserving Knowledge Distillation", ICCV 2019, eq. (2)-(4).
- RKD, Park et al., "Relational Knowledge Distillation", CVPR 2019, eq. (3)-(9).
- PKT, Passalis & Tefas, "Learning Deep Representations with Probabilistic Knowledge Transfer",
  ECCV 2018, eq. (7)-(10).

Weights and reductions follow RepDistiller (Tian et al., CRD, ICLR 2020), whose CIFAR-100 tables are
the field's yardstick: SP ``beta = 3000``, RKD ``beta = 1`` with internal weights 25 (distance) and 50
(angle) as in Park et al. §4, PKT ``beta = 30000`` (its loss is a *mean* over the ``b^2`` entries,
hence the large weight). Every method also keeps the cross-entropy on the labels (weight
``ce_weight``, 1 in RepDistiller) and adds no Hinton KD term (RepDistiller's ``-a 0``).

Layers: ``layers: [[student_path, teacher_path], ...]`` (the :mod:`xkd.distill.adapters`
convention); ``None`` pairs each model's :func:`~xkd.models.hooks.default_layer` (its declared
``xkd_default_layer``, else its last conv layer). Several pairs add their losses. Features are
reduced per sample to a vector: with ``pool`` a 4-D map ``(N, C, H, W)`` is globally
average-pooled to ``(N, C)``; anything else is flattened to ``(N, -1)``.

- SP uses the whole map (``pool=False``), as Tung & Mori and RepDistiller (last block output).
- RKD and PKT work on the penultimate embedding, the input of the classifier. xkd's default is the
  **globally average-pooled output of the default layer** (``pool=True``): for ``cifar_resnet``
  (``layer3``) and ``resnet18`` (``layer4``) this is exactly the classifier's input; for
  ``densenet121`` (``features.norm5``) it is the classifier's input without its final ReLU; for
  ``kdfmv_cnn`` (last block's ReLU, before its max-pool and flatten) it is the channel summary of
  the last block. It exists for any conv model and does not depend on the image size, unlike a
  hook on the classifier's input of a flatten-then-linear model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xkd.data.base import Batch
from xkd.distill.adapters import LayerPairs, check_layer_pairs, resolve_layer_pairs
from xkd.distill.base import Distiller
from xkd.errors import ConfigError
from xkd.models.hooks import capture_features
from xkd.registry import DISTILLERS

# ----------------------------------------------------------------------------------------------
# losses (pure functions on (b, ...) feature tensors)


def embed(feat: Tensor, pool: bool) -> Tensor:
    """One vector per sample: global average pool of ``(N, C, H, W)`` when ``pool``, then flatten."""
    if not isinstance(feat, Tensor):
        raise TypeError(f"a hooked layer returned {type(feat).__name__}, not a tensor; choose another layer")
    if pool and feat.ndim == 4:
        feat = feat.mean(dim=(2, 3))
    return feat.reshape(feat.shape[0], -1)


def sp_loss(student_feat: Tensor, teacher_feat: Tensor) -> Tensor:
    """Similarity-preserving loss of one layer pair (Tung & Mori 2019, eq. 2-4)::

    G = row_l2_normalise(F F^T),  F = features flattened to (b, -1)
    L = ||G_t - G_s||_F^2 / b^2
    """
    b = student_feat.shape[0]
    fs, ft = student_feat.reshape(b, -1), teacher_feat.reshape(b, -1)
    gs = F.normalize(fs @ fs.t(), p=2, dim=1)
    gt = F.normalize(ft @ ft.t(), p=2, dim=1)
    return (gt - gs).pow(2).sum() / (b * b)


def pairwise_distances(e: Tensor, eps: float = 1e-12) -> Tensor:
    """Euclidean distance matrix ``(b, b)`` of the rows of ``e``, with a zero diagonal (RKD's ``pdist``)."""
    sq = e.pow(2).sum(dim=1)
    d = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2.0 * (e @ e.t())).clamp(min=eps).sqrt()
    return d * (1.0 - torch.eye(e.shape[0], dtype=d.dtype, device=d.device))


def rkd_distance_loss(student_emb: Tensor, teacher_emb: Tensor) -> Tensor:
    """RKD distance-wise loss (Park et al. 2019, eq. 3-5)::

        psi_D(t_i, t_j) = ||t_i - t_j||_2 / mu,   mu = mean of the distances over pairs i != j
        L_D = mean over all (i, j) of Huber(psi_D(s_i, s_j) - psi_D(t_i, t_j))

    Huber is smooth L1 with delta = 1. The mean runs over the ``b^2`` entries (diagonal included,
    where both are 0), as the authors' code and RepDistiller do.
    """
    s, t = student_emb.reshape(student_emb.shape[0], -1), teacher_emb.reshape(teacher_emb.shape[0], -1)
    with torch.no_grad():
        td = pairwise_distances(t)
        td = td / _mean_positive(td)
    sd = pairwise_distances(s)
    sd = sd / _mean_positive(sd)
    return F.smooth_l1_loss(sd, td)


def _mean_positive(d: Tensor) -> Tensor:
    pos = d > 0
    return (d * pos).sum() / pos.sum().clamp(min=1) + 1e-12


def rkd_angles(e: Tensor) -> Tensor:
    """``a[i, j, k] = cos`` of the angle at ``e_i`` between ``e_j`` and ``e_k`` (0 where j or k is i)."""
    diff = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2)  # diff[i, j] = unit(e_j - e_i)
    return torch.bmm(diff, diff.transpose(1, 2))


def rkd_angle_loss(student_emb: Tensor, teacher_emb: Tensor) -> Tensor:
    """RKD angle-wise loss (Park et al. 2019, eq. 6-8)::

        psi_A(t_i, t_j, t_k) = <unit(t_j - t_i), unit(t_k - t_i)>
        L_A = mean over all (i, j, k) of Huber(psi_A(s_i, s_j, s_k) - psi_A(t_i, t_j, t_k))

    The mean runs over the ``b^3`` triplets (degenerate ones included), as the authors' code does.
    """
    s, t = student_emb.reshape(student_emb.shape[0], -1), teacher_emb.reshape(teacher_emb.shape[0], -1)
    with torch.no_grad():
        ta = rkd_angles(t)
    return F.smooth_l1_loss(rkd_angles(s), ta)


def pkt_loss(student_emb: Tensor, teacher_emb: Tensor, eps: float = 1e-7) -> Tensor:
    """Probabilistic knowledge transfer (Passalis & Tefas 2018, eq. 7-10) with the cosine kernel::

        K(a, b) = (cos(a, b) + 1) / 2
        p_{i|j} = K(x_i, x_j) / sum_k K(x_k, x_j)     (rows of the b x b kernel matrix, normalised)
        L = mean over (i, j) of p^t_{i|j} log((p^t_{i|j} + eps) / (p^s_{i|j} + eps))

    i.e. ``KL(P_t || P_s)`` divided by ``b^2``. As the authors' code (and RepDistiller) the kernel
    matrix keeps its diagonal (the paper's eq. 7 leaves ``k = j`` out of the sum).
    """
    b = student_emb.shape[0]
    s, t = student_emb.reshape(b, -1), teacher_emb.reshape(b, -1)
    s = s / (s.norm(dim=1, keepdim=True) + eps)
    t = t / (t.norm(dim=1, keepdim=True) + eps)
    ks, kt = (s @ s.t() + 1.0) / 2.0, (t @ t.t() + 1.0) / 2.0
    ps, pt = ks / ks.sum(dim=1, keepdim=True), kt / kt.sum(dim=1, keepdim=True)
    return torch.mean(pt * torch.log((pt + eps) / (ps + eps)))


# ----------------------------------------------------------------------------------------------
# distillers


def _check_weight(name: str, value: float) -> None:
    if not value >= 0:  # also rejects NaN
        raise ConfigError(f"{name} must be >= 0, got {value}")


class _RelationDistiller(Distiller):
    """Shared machinery: layer pairs resolved at construction, features hooked on both models.

    Subclasses implement :meth:`relation_terms` on the per-pair embeddings.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module | None = None, params=None) -> None:
        super().__init__(student, teacher, params)
        self.pairs = resolve_layer_pairs(self.params.layers, self.student, self.teacher)

    def features(self, images: Tensor) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """Student logits and the reduced (:func:`embed`) student and teacher features per pair."""
        s_paths = list(dict.fromkeys(p for p, _ in self.pairs))
        t_paths = list(dict.fromkeys(p for _, p in self.pairs))
        with capture_features(self.student, s_paths) as fs:
            logits = self.student(images)
        with torch.no_grad(), capture_features(self.teacher, t_paths) as ft:
            self.teacher(images)
        pool = self.params.pool
        return logits, [embed(fs[s], pool) for s, _ in self.pairs], [embed(ft[t], pool) for _, t in self.pairs]

    def relation_terms(self, s_embs: list[Tensor], t_embs: list[Tensor]) -> dict[str, Tensor]:
        raise NotImplementedError

    def forward(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        logits, s_embs, t_embs = self.features(batch.images)
        terms = {"ce": self.params.ce_weight * F.cross_entropy(logits, batch.labels)}
        # fp32 also under autocast, which would run the Gram matrices in bf16/fp16: RKD's distances
        # (|a|^2 + |b|^2 - 2 a.b) and PKT's kernels (all near 1) cancel away their digits in bf16
        # (PKT's KL came out negative on ResNet-20 -> 8), and SP's Gram matrix overflows fp16
        with torch.autocast(batch.images.device.type, enabled=False):
            terms.update(self.relation_terms([e.float() for e in s_embs], [t.float() for t in t_embs]))
        return logits, terms


@dataclass
class SPParams:
    """``weight``: gamma of Tung & Mori (3000 on CIFAR, as RepDistiller); ``ce_weight``: the label
    term's weight; ``layers``: ``[[student_path, teacher_path], ...]`` or null (default layers);
    ``pool``: compare globally pooled features instead of whole maps (off, as the paper)."""

    weight: float = 3000.0
    ce_weight: float = 1.0
    layers: LayerPairs | None = None
    pool: bool = False

    def validate(self) -> None:
        _check_weight("weight", self.weight)
        _check_weight("ce_weight", self.ce_weight)
        check_layer_pairs(self.layers)


@DISTILLERS.register("sp")
class SP(_RelationDistiller):
    """Similarity-preserving KD (Tung & Mori, ICCV 2019, eq. 4)::

        L = ce_weight * CE(y, z_s) + gamma * sum_pairs ||G_t - G_s||_F^2 / b^2

    Terms: ``ce``, ``sp``.
    """

    Params = SPParams

    def relation_terms(self, s_embs: list[Tensor], t_embs: list[Tensor]) -> dict[str, Tensor]:
        return {"sp": self.params.weight * sum(sp_loss(s, t) for s, t in zip(s_embs, t_embs))}


@dataclass
class RKDParams:
    """``distance_weight`` / ``angle_weight``: lambda_D = 25 and lambda_A = 50 (Park et al. §4.1, as
    RepDistiller); ``ce_weight``, ``layers``: as :class:`SPParams`; ``pool`` (on): use the pooled
    embedding (see the module docstring)."""

    distance_weight: float = 25.0
    angle_weight: float = 50.0
    ce_weight: float = 1.0
    layers: LayerPairs | None = None
    pool: bool = True

    def validate(self) -> None:
        _check_weight("distance_weight", self.distance_weight)
        _check_weight("angle_weight", self.angle_weight)
        _check_weight("ce_weight", self.ce_weight)
        check_layer_pairs(self.layers)


@DISTILLERS.register("rkd")
class RKD(_RelationDistiller):
    """Relational KD (Park et al., CVPR 2019, eq. 9)::

        L = ce_weight * CE(y, z_s) + lambda_D * L_RKD-D + lambda_A * L_RKD-A

    on the penultimate embeddings (default: pooled output of each model's default layer).
    Terms: ``ce``, ``rkd_distance``, ``rkd_angle``.
    """

    Params = RKDParams

    def relation_terms(self, s_embs: list[Tensor], t_embs: list[Tensor]) -> dict[str, Tensor]:
        p: RKDParams = self.params
        pairs = list(zip(s_embs, t_embs))
        return {
            "rkd_distance": p.distance_weight * sum(rkd_distance_loss(s, t) for s, t in pairs),
            "rkd_angle": p.angle_weight * sum(rkd_angle_loss(s, t) for s, t in pairs),
        }


@dataclass
class PKTParams:
    """``weight``: 30000 as RepDistiller (whose loss, like ours, averages over the b^2 kernel
    entries; Passalis & Tefas give no weight for this combined setting); ``ce_weight``, ``layers``:
    as :class:`SPParams`; ``pool`` (on): use the pooled embedding (see the module docstring)."""

    weight: float = 30000.0
    ce_weight: float = 1.0
    layers: LayerPairs | None = None
    pool: bool = True

    def validate(self) -> None:
        _check_weight("weight", self.weight)
        _check_weight("ce_weight", self.ce_weight)
        check_layer_pairs(self.layers)


@DISTILLERS.register("pkt")
class PKT(_RelationDistiller):
    """Probabilistic knowledge transfer (Passalis & Tefas, ECCV 2018, eq. 10)::

        L = ce_weight * CE(y, z_s) + weight * sum_pairs KL(P_t || P_s) / b^2

    Terms: ``ce``, ``pkt``.
    """

    Params = PKTParams

    def relation_terms(self, s_embs: list[Tensor], t_embs: list[Tensor]) -> dict[str, Tensor]:
        return {"pkt": self.params.weight * sum(pkt_loss(s, t) for s, t in zip(s_embs, t_embs))}
