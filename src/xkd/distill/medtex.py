"""MED-TEX and its ablation MED-EX: an explainer masks the input, the student learns from the masked input.

Source: Nguyen-Duc, Zhao, Cai & Phung, "MED-TEX: Transfer and Explain Knowledge with Less Data from
Pretrained Medical Imaging Models", IEEE ISBI 2022 (equation numbers below are the paper's).

An explainer ``E`` (an under-complete U-Net-like auto-encoder with skip connections whose last layer
is a 1x1 convolution + sigmoid) maps an image ``X`` to an importance map ``Θ = E(X) ∈ [0, 1]^{C×H×W}``;
the student ``S`` sees ``X' = Θ ⊙ X`` (eq. 3). Explainer and student are trained jointly with (eq. 7)::

    L = L^N + λ Σ_i L^i
    L^N = -Σ_l p_T(l | X) log q_S(l | X')                                   (eq. 2, T = 1)
    L^i = Σ_{c,h,w} log σ_c + (T^i(X)_{chw} - μ^i(S^i(X'))_{chw})² / (2 σ_c²)    (eq. 6, VID)

with ``σ_c² = softplus(α_c) + ε`` learned per teacher channel and ``μ^i`` a small 1x1-conv network
(:class:`xkd.distill.vid.VIDLoss`). Eq. 6 prints ``log σ_c²``; the Gaussian negative
log-likelihood it derives from (eq. 5, and VID's own loss, Ahn et al. 2019) has ``log σ_c =
½ log σ_c²``, which is what xkd uses. Labels are not used: the student imitates the teacher.

What is evaluated after training is the :class:`MaskedStudent` wrapper ``x -> S(E(x) ⊙ x)``; its
``theta(x)`` is the map the ``medtex_theta`` explainer (:mod:`xkd.explain.theta`) returns and the
top-K IoU/Dice against lesion masks scores. MED-EX (``medex``) is the same without the
intermediate losses. MED-TEX's third variant, "the student (only) without the explainer and
intermediate layer losses, which is only trained on the input image X" (§3, "Compared methods"), is
``medtex_student_only`` (:class:`MedTexStudentOnly`): what remains of eq. 7 is ``L^N`` on raw ``X``,
the cross-entropy to the teacher's distribution -- not ``scratch``'s cross-entropy to the true labels
(the post-hoc metrics score agreement with the teacher, so the supervision matters).

Layer pairs (``layers: [[student_path, teacher_path], ...]``, paths inside the inner student and
the teacher) default to the models' **conv blocks matched by relative depth**
(:func:`conv_blocks`, :func:`default_layer_pairs`). Where a pair's spatial sizes differ, the
student's map is resampled bilinearly to the teacher's ``h x w`` (:func:`~xkd.distill.adapters.match_size`),
so any pair of conv layers works; a layer whose output is not ``(N, C, H, W)`` is a clear error.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xkd.data.base import Batch
from xkd.distill.adapters import LayerPairs, channels_of, check_layer_pairs, match_size, probe_shapes
from xkd.distill.base import DistillContext, Distiller, num_classes_of
from xkd.distill.vid import VIDLoss
from xkd.errors import ConfigError
from xkd.models.hooks import LayerNotFoundError, capture_features, default_layer, get_module
from xkd.registry import DISTILLERS


class ExplainerNet(nn.Module):
    """MED-TEX's explainer ``E`` (§3, "auto encoder with skip connections"; eq. 3): ``Θ = E(X)``.

    A small U-Net: level ``i`` is a 3x3 conv + ReLU with ``widths[i]`` channels, each level after the
    first runs at half the previous resolution (2x2 max-pool, ``ceil_mode`` so odd sizes work); the
    decoder upsamples bilinearly **to the exact size of the matching encoder level** (so any ``H, W``
    works, odd or not), concatenates that level's output (skip connection) and applies a 3x3 conv +
    ReLU; the last layer is a 1x1 conv to ``in_channels`` channels + sigmoid, so ``Θ`` has the
    shape of ``X`` and lies in ``[0, 1]``. Under-complete in the sense of the paper: the code at the
    bottom has ``2^(L-1)`` times less resolution than the input (the skips still pass detail, as in
    any U-Net).

    Args:
        in_channels: channels ``C`` of the images (1 or 3, any number works).
        widths: channels per level, shallow to deep (one level = no downsampling at all).
    """

    def __init__(self, in_channels: int, widths: Sequence[int] = (4, 8, 16)) -> None:
        super().__init__()
        widths = [int(w) for w in widths]
        if not widths or any(w < 1 for w in widths):
            raise ConfigError(f"explainer widths must be a non-empty list of positive integers, got {widths}")
        self.down = nn.ModuleList()
        cin = in_channels
        for w in widths:
            self.down.append(nn.Sequential(nn.Conv2d(cin, w, 3, padding=1), nn.ReLU()))
            cin = w
        self.pool = nn.MaxPool2d(2, ceil_mode=True)
        self.up = nn.ModuleList(
            nn.Sequential(nn.Conv2d(widths[i + 1] + widths[i], widths[i], 3, padding=1), nn.ReLU())
            for i in reversed(range(len(widths) - 1))
        )
        self.head = nn.Conv2d(widths[0], in_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        skips = []
        h = x
        for i, block in enumerate(self.down):
            h = block(self.pool(h) if i else h)
            skips.append(h)
        for block, skip in zip(self.up, reversed(skips[:-1])):
            h = F.interpolate(h, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            h = block(torch.cat([h, skip], dim=1))
        return torch.sigmoid(self.head(h))


class MaskedStudent(nn.Module):
    """The model MED-TEX evaluates: ``forward(x) = student(theta(x) * x)`` with ``theta = explainer``.

    State-dict keys are ``explainer.*`` and ``student.*``. ``num_classes`` is the inner student's,
    and ``xkd_default_layer`` (honoured by :func:`xkd.models.hooks.default_layer`) is the inner
    student's default layer under the ``student.`` prefix, so Grad-CAM and the other layer
    explainers explain the student part of the wrapper by default.
    """

    def __init__(self, explainer: nn.Module, student: nn.Module) -> None:
        super().__init__()
        self.explainer = explainer
        self.student = student
        self.num_classes = num_classes_of(student)
        try:
            self.xkd_default_layer = f"student.{default_layer(student)}"
        except LayerNotFoundError:  # a student without Conv2d: explainers must name a layer
            pass

    def theta(self, x: Tensor) -> Tensor:
        """The importance map ``Θ = E(x)``, same shape as ``x``, values in ``[0, 1]`` (eq. 3)."""
        return self.explainer(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.student(self.theta(x) * x)


def teacher_cross_entropy(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """``-T² Σ_l p_T(l) log q_S(l)`` with ``p_T = softmax(z_t / T)``, ``q_S = softmax(z_s / T)``, mean
    over the batch. With ``T = 1`` this is MED-TEX eq. 2 (cross-entropy to the teacher's
    distribution; it differs from the KL of Hinton KD by the teacher's entropy, a constant)."""
    t = temperature
    p_t = F.softmax(teacher_logits.float() / t, dim=1)  # fp32 also under autocast
    return -(p_t * F.log_softmax(student_logits.float() / t, dim=1)).sum(dim=1).mean() * (t * t)


def _has_conv(m: nn.Module) -> bool:
    return any(isinstance(x, nn.Conv2d) for x in m.modules())


def conv_blocks(model: nn.Module) -> list[str]:
    """The model's conv blocks, shallow to deep: the children, at the shallowest level of the module
    tree where at least two children hold a ``Conv2d``, that hold one.

    A lone container (``features``, ``blocks``) is descended into; a bare ``Conv2d`` child next to
    containers (a stem conv) is left out. Examples: ``kdfmv_cnn`` -> ``blocks.0, blocks.1, ...``;
    ``cifar_resnet`` -> ``layer1, layer2, layer3``; torchvision ``resnet18`` -> ``layer1 .. layer4``.
    A model with a single conv gives that conv; one without any raises
    :class:`~xkd.models.hooks.LayerNotFoundError`.
    """
    node, prefix = model, ""
    while True:
        kids = [(n, m) for n, m in node.named_children() if _has_conv(m)]
        containers = [(n, m) for n, m in kids if not isinstance(m, nn.Conv2d)]
        if len(containers) >= 2:
            return [prefix + n for n, _ in containers]
        if len(containers) == 1:
            node, prefix = containers[0][1], f"{prefix}{containers[0][0]}."
            continue
        if kids:  # only bare convolutions at this level
            return [prefix + n for n, _ in kids]
        if isinstance(node, nn.Conv2d) and prefix:
            return [prefix[:-1]]
        raise LayerNotFoundError(f"{type(model).__name__} has no Conv2d layer; set `layers` explicitly")


def default_layer_pairs(student: nn.Module, teacher: nn.Module) -> list[tuple[str, str]]:
    """Pairs of conv blocks (:func:`conv_blocks`) matched by relative depth (MED-TEX matches layer
    ``i`` with layer ``i``). With ``n_s`` student and ``n_t`` teacher blocks, ``m = min(n_s, n_t)``
    pairs are made; the model with more blocks contributes ``m`` of them evenly spaced from its first
    to its last (``round(k (n - 1) / (m - 1))``, k = 0..m-1), so the last blocks are always paired.
    E.g. a 3-block ``kdfmv_cnn`` and ``cifar_resnet``: ``(blocks.0, layer1), (blocks.1, layer2),
    (blocks.2, layer3)``."""
    s, t = conv_blocks(student), conv_blocks(teacher)
    m = min(len(s), len(t))

    def pick(names: list[str]) -> list[str]:
        if m == 1:
            return [names[-1]]
        return [names[round(k * (len(names) - 1) / (m - 1))] for k in range(m)]

    return list(zip(pick(s), pick(t)))


def _in_channels(student: nn.Module, given: int | None) -> int:
    if given is not None:
        return given
    for m in student.modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels
    raise ConfigError(
        f"cannot tell how many image channels {type(student).__name__} takes (it has no Conv2d); "
        "set the distiller's `in_channels` parameter"
    )


@dataclass
class MedExParams:
    """Parameters of MED-EX (and the shared part of MED-TEX).

    Attributes:
        temperature: ``T`` of the cross-entropy to the teacher; MED-TEX uses 1 (eq. 2). With
            ``T != 1`` both distributions are softened and the term is scaled by ``T²``.
        explainer_widths: channels per level of the explainer U-Net (:class:`ExplainerNet`); the
            default ``[4, 8, 16]`` has 3.7 k parameters for 1-channel images (the paper gives no
            size; its student has 1.7 k).
        in_channels: image channels for the explainer (None: the student's first conv's input).
    """

    temperature: float = 1.0
    explainer_widths: list[int] = field(default_factory=lambda: [4, 8, 16])
    in_channels: int | None = None

    def validate(self) -> None:
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
        if not self.explainer_widths or any(w < 1 for w in self.explainer_widths):
            raise ConfigError(f"explainer_widths must be positive integers, got {self.explainer_widths}")
        if self.in_channels is not None and self.in_channels < 1:
            raise ConfigError(f"in_channels must be >= 1, got {self.in_channels}")


@dataclass
class MedTexParams(MedExParams):
    """Parameters of MED-TEX: MED-EX's plus the intermediate VID losses (eq. 4-7).

    Attributes:
        lam: ``λ`` of eq. 7, the weight of the summed VID terms (paper: 0.01). 0 turns MED-TEX into MED-EX.
        layers: ``[[student_path, teacher_path], ...]``, paths inside the inner student and the
            teacher (None: :func:`default_layer_pairs`, the conv blocks matched by depth).
        vid_mid_channels: hidden channels of each VID regressor ``μ^i`` (None: VIDLoss's default).
        vid_init_pred_var: initial ``σ_c²`` of every channel.
        vid_eps: ``ε`` in ``σ_c² = softplus(α_c) + ε``.
        vid_reduction: ``"sum"`` over ``c, h, w`` per image, then the batch mean (eq. 6 as written;
            the term then scales with the layers' sizes) or ``"mean"`` over every element
            (RepDistiller's scale). See :class:`~xkd.distill.vid.VIDLoss`.
    """

    lam: float = 0.01
    layers: LayerPairs | None = None
    vid_mid_channels: int | None = None
    vid_init_pred_var: float = 5.0
    vid_eps: float = 1e-5
    vid_reduction: Literal["sum", "mean"] = "sum"

    def validate(self) -> None:
        super().validate()
        if self.lam < 0:
            raise ConfigError(f"lam must be >= 0, got {self.lam}")
        check_layer_pairs(self.layers)
        if self.vid_mid_channels is not None and self.vid_mid_channels < 1:
            raise ConfigError(f"vid_mid_channels must be >= 1, got {self.vid_mid_channels}")
        if self.vid_init_pred_var <= 0:
            raise ConfigError(f"vid_init_pred_var must be > 0, got {self.vid_init_pred_var}")
        if not 0 < self.vid_eps < self.vid_init_pred_var:
            raise ConfigError(f"vid_eps must be in (0, vid_init_pred_var), got {self.vid_eps}")


@dataclass
class MedTexStudentOnlyParams:
    """Parameters of MED-TEX's student-only ablation.

    Attributes:
        temperature: ``T`` of the cross-entropy to the teacher; MED-TEX uses 1 (eq. 2), as for
            MED-EX and MED-TEX. With ``T != 1`` both distributions are softened and the term is
            scaled by ``T²``.
    """

    temperature: float = 1.0

    def validate(self) -> None:
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")


@DISTILLERS.register("medtex_student_only")
class MedTexStudentOnly(Distiller):
    """MED-TEX's "student (only)" ablation (§3, "Compared methods": "without the explainer and
    intermediate layer losses, which is only trained on the input image X")::

        L = L^N = -Σ_l p_T(l | X) log q_S(l | X)        (eq. 2 on raw X, T = 1; eq. 7 with the λ terms gone)

    The student is trained on the teacher's softmax distribution, not on the true labels (labels
    are not read), and sees ``X`` itself: no explainer, no ``Θ``, no intermediate-layer terms. The
    student is not wrapped, so the ``medtex_theta`` explainer does not apply to it. It reads nothing
    of the teacher but its logits (:meth:`~xkd.distill.base.Distiller.teacher_logits`), so the
    pipeline may cache them (``teacher_logits_only``). Term: ``ce_teacher``, computed in fp32 (as
    :func:`~xkd.distill.logits.kd_loss`) also under autocast.
    """

    Params = MedTexStudentOnlyParams
    teacher_logits_only = True

    def forward(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        logits = self.student(batch.images)
        teacher_logits = self.teacher_logits(batch)
        ce = teacher_cross_entropy(logits.float(), teacher_logits.float(), self.params.temperature)
        return logits, {"ce_teacher": ce}


@DISTILLERS.register("medex")
class MedEx(Distiller):
    """MED-EX: MED-TEX without the intermediate losses (§3, "Compared methods")::

        L = -Σ_l p_T(l | X) log q_S(l | Θ ⊙ X)        (eq. 2)

    ``self.student`` becomes the :class:`MaskedStudent` ``(explainer, student)``, so the trainer
    trains and checkpoints both and the pipeline evaluates (and explains) the wrapper. Term: ``ce_teacher``.
    """

    Params = MedExParams

    def __init__(self, student: nn.Module, teacher: nn.Module | None = None, params: MedExParams | None = None) -> None:
        super().__init__(student, teacher, params)
        p = self.params
        self.student = MaskedStudent(ExplainerNet(_in_channels(student, p.in_channels), p.explainer_widths), student)
        self.pairs: list[tuple[str, str]] = []

    def forward(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        x = batch.images
        with torch.no_grad(), capture_features(self.teacher, [t for _, t in self.pairs]) as t_feats:
            teacher_logits = self.teacher(x)
        with capture_features(self.student.student, [s for s, _ in self.pairs]) as s_feats:
            logits = self.student(x)
        terms = {"ce_teacher": teacher_cross_entropy(logits, teacher_logits, self.params.temperature)}
        terms.update(self.intermediate_terms(s_feats, t_feats))
        return logits, terms

    def intermediate_terms(self, s_feats: dict[str, Tensor], t_feats: dict[str, Tensor]) -> dict[str, Tensor]:
        """Extra loss terms from the hooked features (none for MED-EX)."""
        return {}


@DISTILLERS.register("medtex")
class MedTex(MedEx):
    """MED-TEX (eq. 7): ``L = L^N + λ Σ_i L^i``, the cross-entropy to the teacher on ``Θ ⊙ X`` plus
    VID (eq. 6) between the teacher's features on ``X`` and the student's on ``Θ ⊙ X`` at each
    pair of ``layers``.

    One :class:`~xkd.distill.vid.VIDLoss` per pair (regressor ``μ^i`` and variances ``α^i``) is
    built in :meth:`setup` from shapes probed with a dry run and trained with the student and
    explainer: ``trainable_modules() == {"student": MaskedStudent, "vid": ModuleList}``. Terms:
    ``ce_teacher`` and ``vid`` (already multiplied by ``λ``).
    """

    Params = MedTexParams

    def __init__(
        self, student: nn.Module, teacher: nn.Module | None = None, params: MedTexParams | None = None
    ) -> None:
        super().__init__(student, teacher, params)
        p: MedTexParams = self.params
        if p.lam > 0:
            if p.layers is None:
                self.pairs = default_layer_pairs(student, teacher)
            else:
                for s_path, t_path in p.layers:
                    get_module(student, s_path)  # unknown path -> LayerNotFoundError listing the paths
                    get_module(teacher, t_path)
                self.pairs = [(s, t) for s, t in p.layers]
        self.vid = nn.ModuleList()

    def pair_channels(self, sample: Tensor) -> list[tuple[int, int]]:
        """``(c_s, c_t)`` per layer pair from a dry run on ``sample``; a layer whose output is not an
        ``(N, C, H, W)`` map is a clear ``ValueError``."""
        inner = self.student.student
        s_shapes = probe_shapes(inner, [s for s, _ in self.pairs], sample)
        t_shapes = probe_shapes(self.teacher, [t for _, t in self.pairs], sample)
        return [(channels_of(s_shapes[s], s, "student"), channels_of(t_shapes[t], t, "teacher")) for s, t in self.pairs]

    def preflight(self, sample: Tensor) -> None:
        if self.pairs:
            self.pair_channels(sample)

    def setup(self, context: DistillContext) -> None:
        """Build one VID module per layer pair from the channels seen in a dry run on ``context.sample``."""
        if not self.pairs or len(self.vid):
            return
        p: MedTexParams = self.params
        for c_s, c_t in self.pair_channels(context.sample):
            self.vid.append(
                VIDLoss(
                    c_s,
                    c_t,
                    mid_channels=p.vid_mid_channels,
                    init_pred_var=p.vid_init_pred_var,
                    eps=p.vid_eps,
                    reduction=p.vid_reduction,
                ).to(context.device)
            )

    def trainable_modules(self) -> nn.ModuleDict:
        return nn.ModuleDict({"student": self.student, "vid": self.vid})

    def intermediate_terms(self, s_feats: dict[str, Tensor], t_feats: dict[str, Tensor]) -> dict[str, Tensor]:
        if not self.pairs:
            return {}
        if len(self.vid) != len(self.pairs):
            raise RuntimeError(
                "medtex: the VID modules are built by setup(); create the distiller with "
                "build_distiller(..., context=DistillContext(sample=...)) or call distiller.setup(context) first"
            )
        total = sum(
            vid(match_size(s_feats[s], t_feats[t].shape), t_feats[t]) for vid, (s, t) in zip(self.vid, self.pairs)
        )
        return {"vid": self.params.lam * total}
