"""Feature-based distillation: FitNets, AT, NST, AB and VID (its loss module, :class:`~xkd.distill.vid.VIDLoss`, in ``vid.py``).

Every method here follows one recipe (RepDistiller / mdistiller single-stage training)::

    L = alpha_ce * CE(y, z_s) + beta * sum_pairs L_feat(F_s, F_t) [+ kd_weight * T^2 KL(z_t/T || z_s/T)]

with features captured by forward hooks at ``layers = [[student_path, teacher_path], ...]``
(default: one pair of each model's :func:`~xkd.models.hooks.default_layer`, i.e. the declared
``xkd_default_layer`` or the last ``Conv2d``: the last conv block). When the two maps of a pair have
different spatial sizes, the **student** map is resampled bilinearly to the teacher's ``H x W``
(:func:`~xkd.distill.adapters.match_size`). Adapters (FitNets regressor, AB connector, VID
regressor/variances) are built in :meth:`~xkd.distill.base.Distiller.setup` from shapes probed on
``context.sample`` and trained with the student (``trainable_modules()["adapters"]``); a method
with adapters used without ``setup`` raises a clear error at its first forward.

FitNets, AB and VID also take flattened features ``(N, D)`` of linear layers (both layers of a pair
flat): their adapter is then linear (:func:`~xkd.distill.adapters.linear_adapter`, VID's regressor
two linear layers). AT and NST need spatial maps ``(N, C, H, W)``; another shape is a clear error in
:meth:`~FeatureDistiller.setup` and in the pipeline's check before training (:meth:`preflight`).

Loss terms are returned by name: ``ce``, the method's term (``hint``, ``at``, ``nst``, ``ab``,
``vid``) and ``kd`` when ``kd_weight > 0``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xkd.data.base import Batch, BatchLoader
from xkd.distill.adapters import (
    LayerPairs,
    check_layer_pairs,
    conv_adapter,
    feature_dims,
    linear_adapter,
    match_size,
    model_device,
    probe_features,
    probe_shapes,
    resolve_layer_pairs,
)
from xkd.distill.base import DistillContext, Distiller
from xkd.distill.logits import kd_loss
from xkd.distill.vid import VIDLoss
from xkd.errors import ConfigError
from xkd.models.hooks import capture_features
from xkd.registry import DISTILLERS

# ----------------------------------------------------------------------------------------------
# the losses, as plain functions of two feature maps (VID's, a module with parameters, is in vid.py)


def hint_loss(student_feat: Tensor, teacher_feat: Tensor) -> Tensor:
    """FitNets hint loss (Romero et al., ICLR 2015, eq. 3): ``mean((r(s) - t)^2)`` over every
    element, where ``student_feat`` is already the regressor output ``r(s)``. The paper writes
    ``1/2 ||u_h - r(v_g)||^2``; the mean squared error is RepDistiller's ``HintLoss`` (the scale its
    ``beta = 100`` was tuned for)."""
    return F.mse_loss(match_size(student_feat, teacher_feat.shape), teacher_feat)


def attention_map(feat: Tensor, p: float = 2.0) -> Tensor:
    """Activation-based spatial attention (Zagoruyko & Komodakis, ICLR 2017, §3.1, F^p_mean):
    ``Q = mean_c |F_c|^p``, flattened to ``(N, H*W)`` and L2-normalised per sample (eq. 2)."""
    q = feat.abs().pow(p).mean(1).flatten(1)
    return F.normalize(q, dim=1)


def at_loss(student_feat: Tensor, teacher_feat: Tensor, p: float = 2.0) -> Tensor:
    """``mean_{n, j} (Q_s/||Q_s|| - Q_t/||Q_t||)^2`` for one layer pair: the authors' code and
    RepDistiller's reading of eq. 2 (squared difference averaged over batch and positions rather than
    the paper's un-squared p-norm). The distiller multiplies by ``beta`` (see :class:`AttentionTransfer`)."""
    s = match_size(student_feat, teacher_feat.shape)
    return (attention_map(s, p) - attention_map(teacher_feat, p)).pow(2).mean()


def _poly_kernel(a: Tensor, b: Tensor, c: float, d: int) -> Tensor:
    """``k(a_i, b_j) = (a_i^T b_j + c)^d`` for rows of ``a (N, I, D)`` and ``b (N, J, D)`` -> ``(N, I, J)``."""
    return (torch.bmm(a, b.transpose(1, 2)) + c).pow(d)


def nst_loss(student_feat: Tensor, teacher_feat: Tensor, c: float = 0.0, d: int = 2) -> Tensor:
    """Neuron selectivity transfer (Huang & Wang 2017, eq. 4-6): squared MMD between the sets of
    channel activation patterns, each channel's ``H*W`` map flattened and L2-normalised, with the
    polynomial kernel ``k(x, y) = (x^T y + c)^d`` (paper: d = 2, c = 0)::

        MMD^2 = mean_{i,i'} k(t_i, t_i') + mean_{j,j'} k(s_j, s_j') - 2 mean_{i,j} k(t_i, s_j)

    per sample (means over channel pairs), averaged over the batch (RepDistiller's ``NSTLoss``).
    Channel counts may differ; the student map is resampled to the teacher's ``H x W``."""
    s = F.normalize(match_size(student_feat, teacher_feat.shape).flatten(2), dim=2)
    t = F.normalize(teacher_feat.flatten(2), dim=2)
    mmd = _poly_kernel(t, t, c, d).mean((1, 2)) + _poly_kernel(s, s, c, d).mean((1, 2))
    mmd = mmd - 2.0 * _poly_kernel(s, t, c, d).mean((1, 2))
    return mmd.mean()


def ab_loss(connector_out: Tensor, teacher_feat: Tensor, margin: float = 1.0) -> Tensor:
    """Activation-boundary transfer, the alternative loss (Heo et al., AAAI 2019, eq. 6)::

        l = rho(T) * relu(m - r(S))^2 + (1 - rho(T)) * relu(m + r(S))^2,   rho(T) = 1[T > 0]

    ``r(S)`` is the connector output (1x1 conv + BN of the student feature), ``m`` the margin. The
    hinge (``relu``, the paper's sigma) means a student response already beyond the margin on the
    teacher's side costs nothing (as in RepDistiller's ``criterion_alternative_L2``). Reduction:
    sum over ``c, h, w``, mean over the batch. RepDistiller's ``ABLoss`` returns, for layer ``i``
    of ``n``, ``2^(i - n + 1) * sum / bsz / 1000 * 3``: for one layer pair (weight 1) that is
    ``3e-3`` times this value, so ``beta = 3e-3`` matches its scale (xkd's default ``beta = 1e-3``
    is a third of it; see :class:`ABParams`)."""
    r = match_size(connector_out, teacher_feat.shape)
    on = (teacher_feat > 0).to(r.dtype)
    loss = on * F.relu(margin - r).pow(2) + (1.0 - on) * F.relu(margin + r).pow(2)
    return loss.flatten(1).sum(1).mean()


# ----------------------------------------------------------------------------------------------
# parameters


@dataclass
class FeatureParams:
    """Parameters shared by the feature methods.

    Attributes:
        beta: weight of the feature term (per method default from RepDistiller).
        alpha_ce: weight of the cross-entropy with the labels, in [0, 1].
        layers: ``[[student_path, teacher_path], ...]``; ``null`` = one pair of each model's
            default layer (the last conv block). RepDistiller hints FitNets at the middle stage and
            sums AT, NST and VID over the three stage outputs of a CIFAR ResNet, the layers its
            ``beta`` defaults were tuned for: name them here to follow it.
        kd_weight: weight of an optional Hinton KD term on the logits (0 = off).
        temperature: KD temperature (> 0), used when ``kd_weight > 0``.
    """

    beta: float = 1.0
    alpha_ce: float = 1.0
    layers: LayerPairs | None = None
    kd_weight: float = 0.0
    temperature: float = 4.0

    def validate(self) -> None:
        if not (self.beta >= 0 and math.isfinite(self.beta)):
            raise ConfigError(f"beta must be a finite number >= 0, got {self.beta}")
        if not 0.0 <= self.alpha_ce <= 1.0:
            raise ConfigError(f"alpha_ce must be in [0, 1], got {self.alpha_ce}")
        if not (self.kd_weight >= 0 and math.isfinite(self.kd_weight)):
            raise ConfigError(f"kd_weight must be a finite number >= 0, got {self.kd_weight}")
        if not self.temperature > 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
        check_layer_pairs(self.layers)


@dataclass
class FitNetsParams(FeatureParams):
    """FitNets: ``beta`` = 100 (RepDistiller).

    ``regressor_relu``: end the regressor with a ReLU. The paper asks the regressor and the hint to
    share their non-linearity (Romero et al. 2015, §2.2), and RepDistiller's and mdistiller's
    ``ConvReg`` end with one, their hints being block outputs after a ReLU; without it the regressor
    is pushed to fit the hint's zeros exactly instead of anywhere below them. ``auto`` (the default):
    a ReLU on a pair whose teacher features are all >= 0 on a batch of training images (a post-ReLU
    hint: the default layers of ``resnet18``, ``cifar_resnet`` and ``kdfmv_cnn``), none where they
    take negative values (a layer before its activation: ``densenet121``'s ``features.norm5``) or
    without training images to look at."""

    beta: float = 100.0
    regressor_relu: bool | Literal["auto"] = "auto"


@dataclass
class ATParams(FeatureParams):
    """AT: ``beta`` = 1000 (paper and RepDistiller), ``p`` the exponent of ``|F|^p`` (paper: 2)."""

    beta: float = 1000.0
    p: float = 2.0

    def validate(self) -> None:
        super().validate()
        if not self.p > 0:
            raise ConfigError(f"p must be > 0, got {self.p}")


@dataclass
class NSTParams(FeatureParams):
    """NST: ``beta`` = 50 (RepDistiller); kernel ``(x^T y + kernel_c)^kernel_degree`` (paper: 0, 2)."""

    beta: float = 50.0
    kernel_c: float = 0.0
    kernel_degree: int = 2

    def validate(self) -> None:
        super().validate()
        if self.kernel_c < 0:
            raise ConfigError(f"kernel_c must be >= 0, got {self.kernel_c}")
        if self.kernel_degree < 1:
            raise ConfigError(f"kernel_degree must be >= 1, got {self.kernel_degree}")


@dataclass
class ABParams(FeatureParams):
    """AB: ``margin`` m (paper: 1.0); ``beta`` weighs the per-sample sum of :func:`ab_loss`.

    The default ``beta = 1e-3`` is RepDistiller's ``/ 1000`` alone: its ``ABLoss`` is
    ``l / bsz / 1000 * 3`` (per layer, weighted ``2^(i - n + 1)``, 1 for the last of ``n`` layers),
    i.e. xkd's term times ``3e-3`` for one pair. ``beta = 3e-3`` reproduces RepDistiller's scale for
    one pair; the default (kept, as the README's runs used it) is a third of it."""

    beta: float = 1e-3
    margin: float = 1.0

    def validate(self) -> None:
        super().validate()
        if not self.margin >= 0:
            raise ConfigError(f"margin must be >= 0, got {self.margin}")


@dataclass
class VIDParams(FeatureParams):
    """VID: ``beta`` = 1 with ``reduction = "mean"`` (RepDistiller's scale); ``reduction = "sum"``
    is the paper's per-sample sum (then lower ``beta``). See :class:`VIDLoss`."""

    beta: float = 1.0
    mid_channels: int | None = None
    init_pred_var: float = 5.0
    eps: float = 1e-5
    reduction: Literal["sum", "mean"] = "mean"

    def validate(self) -> None:
        super().validate()
        if self.mid_channels is not None and self.mid_channels < 1:
            raise ConfigError(f"mid_channels must be >= 1 or null, got {self.mid_channels}")
        if not self.eps > 0:
            raise ConfigError(f"eps must be > 0, got {self.eps}")
        if not self.init_pred_var > self.eps:
            raise ConfigError(f"init_pred_var must be > eps, got {self.init_pred_var}")


# ----------------------------------------------------------------------------------------------
# distillers


class FeatureDistiller(Distiller):
    """Common machinery: hooks on the layer pairs, CE + beta * feature term (+ optional KD).

    Subclasses set ``term`` (the loss-dict key), ``needs_setup`` (adapters to build), ``spatial``
    (False: flattened ``(N, D)`` features of linear layers are accepted too) and implement
    :meth:`pair_loss` (and :meth:`build_adapter` when ``needs_setup``).
    """

    Params = FeatureParams
    term: ClassVar[str] = "feat"
    needs_setup: ClassVar[bool] = False
    spatial: ClassVar[bool] = True

    def __init__(self, student: nn.Module, teacher: nn.Module | None = None, params: FeatureParams | None = None):
        super().__init__(student, teacher, params)
        self.pairs = resolve_layer_pairs(self.params.layers, student, self.teacher)
        self.adapters = nn.ModuleList()
        self._ready = not self.needs_setup

    def pair_dims(self, sample: Tensor) -> list[tuple[int, int, bool]]:
        """``(c_s, c_t, spatial)`` per pair from a dry run on ``sample``: channels of ``(N, C, H, W)``
        maps (``spatial`` True) or widths of ``(N, D)`` features. Raises a clear ``ValueError`` for a
        shape the method cannot use or a pair mixing a map with a flat feature."""
        s_paths = list(dict.fromkeys(s for s, _ in self.pairs))
        t_paths = list(dict.fromkeys(t for _, t in self.pairs))
        s_shapes = probe_shapes(self.student, s_paths, sample)
        t_shapes = probe_shapes(self.teacher, t_paths, sample)
        name = self.registry_name or type(self).__name__
        dims = []
        for s, t in self.pairs:
            c_s = feature_dims(s_shapes[s], s, "student", name, self.spatial)
            c_t = feature_dims(t_shapes[t], t, "teacher", name, self.spatial)
            if len(s_shapes[s]) != len(t_shapes[t]):
                raise ValueError(
                    f"{name}: student layer {s!r} outputs {tuple(s_shapes[s])} but teacher layer {t!r} outputs "
                    f"{tuple(t_shapes[t])}; pair a conv layer with a conv layer (N, C, H, W) or a linear layer "
                    "with a linear layer (N, D)"
                )
            dims.append((c_s, c_t, len(s_shapes[s]) == 4))
        return dims

    def preflight(self, sample: Tensor) -> None:
        """The shape checks of :meth:`setup` (a dry run of both models), without building anything."""
        self.pair_dims(sample)

    def setup(self, context: DistillContext) -> None:
        """Probe the feature shapes of every pair on ``context.sample`` and build the adapters."""
        dims = self.pair_dims(context.sample)
        adapters = [self.build_adapter(c_s, c_t, spatial) for c_s, c_t, spatial in dims] if self.needs_setup else []
        self.adapters = nn.ModuleList(adapters).to(model_device(self.student))
        self._ready = True

    def build_adapter(self, c_s: int, c_t: int, spatial: bool = True) -> nn.Module:
        """The adapter of one pair: ``spatial`` for ``(N, C, H, W)`` maps, else ``(N, D)`` features."""
        raise NotImplementedError

    def trainable_modules(self) -> nn.ModuleDict:
        return nn.ModuleDict({"student": self.student, "adapters": self.adapters})

    def pair_loss(self, i: int, student_feat: Tensor, teacher_feat: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        if not self._ready:
            raise RuntimeError(
                f"distiller {self.registry_name!r}: setup(context) was not run, so its adapters do not exist; "
                "build it with build_distiller(..., context=DistillContext(sample=...)) or call setup() before training"
            )
        p: FeatureParams = self.params
        s_paths = [s for s, _ in self.pairs]
        t_paths = [t for _, t in self.pairs]
        with capture_features(self.student, s_paths) as fs:
            logits = self.student(batch.images)
        with torch.no_grad(), capture_features(self.teacher, t_paths, detach=True) as ft:
            teacher_logits = self.teacher(batch.images)
        feat = sum(self.pair_loss(i, fs[s], ft[t]) for i, (s, t) in enumerate(self.pairs))
        terms = {
            "ce": p.alpha_ce * F.cross_entropy(logits, batch.labels),
            self.term: p.beta * feat,
        }
        if p.kd_weight > 0:
            terms["kd"] = kd_loss(logits, teacher_logits, p.temperature, weight=p.kd_weight)
        return logits, terms


@DISTILLERS.register("fitnets")
class FitNets(FeatureDistiller):
    """FitNets (Romero et al., ICLR 2015): a 1x1-conv + BN (+ ReLU) regressor maps the student's guided layer
    to the teacher's hint layer; term ``hint = beta * mean((r(F_s) - F_t)^2)`` (eq. 3).

    The paper trains in two stages (hint pre-training of the student's lower layers, then KD); xkd,
    like RepDistiller and mdistiller, trains one stage: ``CE + beta * hint`` (beta = 100).

    A pair of linear layers (flattened ``(N, D)`` features) gets a linear regressor without BN
    (:func:`~xkd.distill.adapters.linear_adapter`): the paper's regressor is a plain linear map.
    Either ends with a ReLU where the hint is non-negative (``regressor_relu``, see
    :class:`FitNetsParams`); ``relu_pairs`` says which pairs got one."""

    Params = FitNetsParams
    term = "hint"
    needs_setup = True
    spatial = False

    def setup(self, context: DistillContext) -> None:
        """Build the regressors (:meth:`FeatureDistiller.setup`), each ending with a ReLU where
        ``regressor_relu`` asks for one (``auto``: the teacher's features on up to 64 training images
        of ``context.train`` are all >= 0; without training images, none: ``context.sample`` is zeros,
        which tell nothing of the hint's sign)."""
        super().setup(context)
        relu = self.params.regressor_relu
        if relu != "auto":
            self.relu_pairs = [bool(relu)] * len(self.pairs)
        elif context.train is None or len(context.train) == 0:
            self.relu_pairs = [False] * len(self.pairs)
        else:
            images = next(iter(BatchLoader(context.train, 64))).images
            feats = probe_features(self.teacher, list(dict.fromkeys(t for _, t in self.pairs)), images)
            self.relu_pairs = [bool(feats[t].min() >= 0) for _, t in self.pairs]
        for adapter, on in zip(self.adapters, self.relu_pairs):
            if on:
                adapter.append(nn.ReLU())

    def build_adapter(self, c_s: int, c_t: int, spatial: bool = True) -> nn.Module:
        return conv_adapter(c_s, c_t, bn=True) if spatial else linear_adapter(c_s, c_t, bn=False)

    def pair_loss(self, i: int, student_feat: Tensor, teacher_feat: Tensor) -> Tensor:
        return hint_loss(self.adapters[i](student_feat), teacher_feat)


@DISTILLERS.register("at")
class AttentionTransfer(FeatureDistiller):
    """Attention transfer (Zagoruyko & Komodakis, ICLR 2017, eq. 2)::

        at = beta * sum_pairs mean_{n,j} (Q_s/||Q_s||_2 - Q_t/||Q_t||_2)_j^2,  Q = mean_c |F_c|^p

    as the authors' code (``cifar.py``: ``opt.beta * sum(loss_groups)``, ``at_loss`` the mean squared
    difference) and RepDistiller's ``Attention`` compute it, with their ``beta`` = 1000. The paper's
    eq. 2 writes ``beta / 2`` and an un-squared norm; its ``beta`` ("10^3 divided by the number of
    elements in the attention map and batch size") is the code's 1000 with the mean. p = 2. No
    adapters (channel counts may differ); several layer pairs allowed (the authors and RepDistiller
    sum over the three stage outputs of a CIFAR ResNet; xkd's default is one pair, see
    :class:`FeatureParams`)."""

    Params = ATParams
    term = "at"

    def pair_loss(self, i: int, student_feat: Tensor, teacher_feat: Tensor) -> Tensor:
        return at_loss(student_feat, teacher_feat, self.params.p)


@DISTILLERS.register("nst")
class NST(FeatureDistiller):
    """Neuron selectivity transfer (Huang & Wang 2017, eq. 6): ``nst = beta * MMD^2`` with the
    polynomial kernel (d = 2, c = 0), see :func:`nst_loss`. beta = 50. No adapters."""

    Params = NSTParams
    term = "nst"

    def pair_loss(self, i: int, student_feat: Tensor, teacher_feat: Tensor) -> Tensor:
        return nst_loss(student_feat, teacher_feat, self.params.kernel_c, self.params.kernel_degree)


@DISTILLERS.register("ab")
class ActivationBoundaries(FeatureDistiller):
    """Activation-boundary transfer (Heo et al., AAAI 2019, eq. 6, see :func:`ab_loss`) with a
    1x1 conv + BN connector.

    The paper (and RepDistiller) uses AB only in an *initialisation* stage: the student's layers up
    to the matched layer are trained with the AB loss alone, then the whole student is trained with
    CE (or KD) without it. xkd trains one stage, ``CE + beta * ab`` from the start (beta = 1e-3 on
    the per-sample sum, a third of RepDistiller's ``/ 1000 * 3``; ``beta = 3e-3`` matches it for one
    pair, see :class:`ABParams`); set ``alpha_ce = 0`` for an AB-only phase.
    The teacher's sign is read at the hooked layer: choose a pre-ReLU layer (e.g. a BN) for the
    paper's exact "activation boundary"; a post-ReLU layer gives ``rho = 1[T > 0]`` as well.
    A pair of linear layers (``(N, D)``: the paper's neurons of a fully connected layer) gets a
    linear connector without BN (BatchNorm1d cannot train on a batch of one sample)."""

    Params = ABParams
    term = "ab"
    needs_setup = True
    spatial = False

    def build_adapter(self, c_s: int, c_t: int, spatial: bool = True) -> nn.Module:
        return conv_adapter(c_s, c_t, bn=True) if spatial else linear_adapter(c_s, c_t, bn=False)

    def pair_loss(self, i: int, student_feat: Tensor, teacher_feat: Tensor) -> Tensor:
        return ab_loss(self.adapters[i](student_feat), teacher_feat, self.params.margin)


@DISTILLERS.register("vid")
class VID(FeatureDistiller):
    """Variational information distillation (Ahn et al., CVPR 2019, eq. 5): one :class:`VIDLoss`
    (mean regressor + per-channel variance) per layer pair; ``vid = beta * sum_pairs VIDLoss``.
    Default reduction ``"mean"`` with beta = 1 (RepDistiller's scale; its regressor has three bias-free
    1x1 convs where xkd's has two with bias, see :class:`VIDLoss`). Flattened ``(N, D)`` features of
    linear layers work too (the regressor is then two linear layers)."""

    Params = VIDParams
    term = "vid"
    needs_setup = True
    spatial = False

    def build_adapter(self, c_s: int, c_t: int, spatial: bool = True) -> nn.Module:
        p: VIDParams = self.params
        return VIDLoss(c_s, c_t, p.mid_channels, p.init_pred_var, p.eps, p.reduction, spatial=spatial)

    def pair_loss(self, i: int, student_feat: Tensor, teacher_feat: Tensor) -> Tensor:
        return self.adapters[i](student_feat, teacher_feat)
