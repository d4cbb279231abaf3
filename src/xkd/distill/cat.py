"""CAT-KD: class activation transfer (Guo, Yan, Li & Lin, "Class Attention Transfer Based Knowledge
Distillation", CVPR 2023, arXiv:2304.12777; the authors' code is GzyAftermath/CAT-KD, built on
mdistiller).

The student learns to reproduce the teacher's **class activation maps** (CAMs, Zhou et al., CVPR
2016): one map per class, the classifier's weights applied at every position of the last feature
map. The authors turn each network's ``GAP -> fc`` head into ``1x1 conv -> GAP`` (their ``*_test``
models: the teacher's ``conv_test`` weight is its ``fc`` weight, without the bias), so the ``K``
CAMs are the 1x1 convolution's output and the logits their spatial mean. Their loss (the paper's
CAT loss, their ``CAT_loss``) pools both sets of maps to ``r x r`` with adaptive average pooling, optionally
L2-normalises each map over its positions, and takes the mean squared error::

    CAM_k(F) = sum_c W_kc F_c                    (K maps of h x w, K = classes, no bias)
    cat      = mean (pool_r(CAM(F_s)) - pool_r(CAM(F_t)))^2
    L        = ce_weight * CE(y, z_s) + beta * cat

Since each model's CAMs come from its **own** classifier, there are ``K`` maps on both sides
whatever the channel counts: no adapter. Maps of different sizes are matched by the pooling (not by
resampling the student's map, unlike xkd's other feature methods).

xkd leaves the models as they are and reads the CAMs from them (:func:`find_cam_source`):

- the **classifier** is the model's last ``nn.Linear``; a dry run checks that it produces the logits;
- the **last feature map** is the output of the module the classifier reads, found by the dry run: the
  last-called module whose ``(N, C, H, W)`` output, after global average pooling (``kind = "gap"``,
  ``C`` = the classifier's inputs: ``cifar_resnet``, ``resnet18``) or flattening (``kind =
  "flatten"``: ``kdfmv_cnn``'s ``flatten -> linear`` head), and with or without a ReLU (DenseNet
  applies a functional ReLU after ``features.norm5``), gives the classifier's input. The largest such
  map is taken (ResNet's ``layer4``, not its ``1 x 1`` average-pool output).
- For a ``flatten`` head the weight ``W (K, C*H*W)`` is read as ``(K, C, H, W)`` and
  ``CAM_k = H*W * sum_c W_kc,hw F_c,hw``: the same convention as a GAP head, the logit minus its bias
  is the spatial **mean** of the class's map, so a GAP teacher and a flatten student compare on one
  scale.

Departures from the authors' code: the student keeps its classifier's bias (their ``*_test`` student
has a bias-free 1x1 conv); its CAMs, like the teacher's, leave the bias out, so both are exactly the
maps whose mean is the logit without bias. The experiments that transfer only some classes' CAMs
(``IF_OnlyTransferPartialCAMs``) are not implemented.

Parameters (:class:`CATParams`) and defaults: the authors' CIFAR-100 config for the ResNet pair
closest to xkd's ``cifar_resnet`` (``res56_res20.yaml``): ``beta`` (their ``CAT_loss_weight``) 0.7,
``resolution`` (``CAM_RESOLUTION``) 2, ``normalize`` (``IF_NORMALIZE``) false, ``ce_weight``
(``CE_WEIGHT``) 1; ``ce_weight: 0`` is their ``onlyCAT: True`` (CAT alone). Their configs use
``beta`` from 0.5 (ImageNet, ``r = 4``) to 600 (ShuffleNet students with ``IF_NORMALIZE``); their
README asks to tune ``beta`` so that the CAT term is roughly 1 to 50 after the first epoch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xkd.data.base import Batch
from xkd.distill.adapters import LayerPairs, check_layer_pairs, model_device, resolve_layer_pairs
from xkd.distill.base import DistillContext, Distiller
from xkd.errors import ConfigError
from xkd.models.hooks import capture_features
from xkd.registry import DISTILLERS

# ----------------------------------------------------------------------------------------------
# the classifier and the map it reads


def last_linear(model: nn.Module, role: str = "model") -> str:
    """Module path of ``model``'s last ``nn.Linear`` (in registration order): its classifier.
    :class:`~xkd.errors.ConfigError` when it has none."""
    paths = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not paths:
        raise ConfigError(
            f"the {role} ({type(model).__name__}) has no nn.Linear layer; this method reads the classifier's "
            "weights (CAT-KD) or its input (CRD): use a model whose logits come from a linear classifier"
        )
    return paths[-1]


@contextmanager
def capture_input(module: nn.Module) -> Iterator[dict[str, Tensor]]:
    """Record the (first) input and the output of ``module`` during forward passes inside the block
    (``"input"`` and ``"output"`` keys, the last call wins); the hook is removed on exit."""
    seen: dict[str, Tensor] = {}

    def hook(_m: nn.Module, inputs: tuple, output: Tensor) -> None:
        seen["input"], seen["output"] = inputs[0], output

    handle = module.register_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def dry_run_input(sample: Tensor, model: nn.Module) -> Tensor:
    """A seeded random batch of ``sample``'s shape on ``model``'s device (zeros would make many
    layers' outputs coincide)."""
    g = torch.Generator().manual_seed(0)
    return torch.rand(sample.shape, generator=g).to(model_device(model))


@dataclass(frozen=True)
class CamSource:
    """Where a model's class activation maps come from.

    Attributes:
        layer: module path of the last feature map (the map the classifier reads).
        classifier: module path of the classifier (the last ``nn.Linear``).
        kind: ``"gap"`` (classifier on the global average of the map) or ``"flatten"`` (on the
            flattened map).
        relu: a ReLU sits between the layer's output and the pooling (DenseNet's ``features``).
        shape: ``(C, H, W)`` of the map in the dry run (``flatten`` heads need the same ``H, W``
            at training time).
    """

    layer: str
    classifier: str
    kind: Literal["gap", "flatten"]
    relu: bool
    shape: tuple[int, int, int]


def _same(a: Tensor, b: Tensor) -> bool:
    scale = float(b.abs().max()) if b.numel() else 0.0
    return a.shape == b.shape and torch.allclose(a, b, rtol=1e-4, atol=1e-5 * max(1.0, scale))


@torch.no_grad()
def find_cam_source(model: nn.Module, sample: Tensor, layer: str | None = None, role: str = "model") -> CamSource:
    """Find the classifier and the last feature map of ``model`` by one eval-mode dry run on a seeded
    random batch of ``sample``'s shape (see the module docstring for the rule).

    With ``layer`` only that module's output is considered. Raises
    :class:`~xkd.errors.ConfigError` naming the model when no ``nn.Linear`` produces the logits or
    no ``(N, C, H, W)`` map gives the classifier's input (e.g. a model with no conv layer, or a head
    with more than one linear layer)."""
    name = type(model).__name__
    cls_path = last_linear(model, role)
    classifier = model.get_submodule(cls_path)
    d = classifier.in_features
    outputs: dict[str, tuple[int, Tensor]] = {}  # path -> (call order, output), last call wins
    counter = [0]
    handles = []

    def make_hook(path: str):
        def hook(_m: nn.Module, _inputs: tuple, out: object) -> None:
            counter[0] += 1
            if isinstance(out, Tensor) and out.ndim == 4 and (out.shape[1] == d or out[0].numel() == d):
                outputs[path] = (counter[0], out.detach().clone())  # a later in-place op must not change it

        return hook

    candidates = [(p, m) for p, m in model.named_modules() if p and (layer is None or p == layer)]
    flags = {m: m.training for m in model.modules()}
    try:
        model.eval()
        for p, m in candidates:
            handles.append(m.register_forward_hook(make_hook(p)))
        with capture_input(classifier) as seen:
            logits = model(dry_run_input(sample, model))
    finally:
        for h in handles:
            h.remove()
        for m, flag in flags.items():
            m.training = flag
    if "output" not in seen or not isinstance(logits, Tensor) or not _same(seen["output"], logits):
        raise ConfigError(
            f"the {role}'s last nn.Linear {cls_path!r} ({name}) does not produce its logits; CAT-KD needs a "
            "model whose logits are a linear classifier applied to its last feature map"
        )
    x = seen["input"].flatten(1)
    matches = []
    for path, (order, f) in outputs.items():
        for relu in (False, True):
            g = F.relu(f) if relu else f
            for kind, v in (("gap", g.mean(dim=(2, 3))), ("flatten", g.flatten(1))):
                if v.shape == x.shape and _same(v, x):
                    matches.append((f.shape[2] * f.shape[3], order, not relu, path, kind, relu, tuple(f.shape[1:])))
    if not matches:
        where = f"layer {layer!r}'s output" if layer is not None else "no (N, C, H, W) feature map"
        raise ConfigError(
            f"the {role} ({name}): {where} gives the input of its classifier {cls_path!r} by global average "
            "pooling or flattening (with or without a ReLU); CAT-KD needs a conv model whose classifier is one "
            "linear layer on its last feature map" + ("" if layer is None else "; set layers: null to find it")
        )
    _, _, _, path, kind, relu, shape = max(matches)  # the largest map, then the last called, then no ReLU
    return CamSource(path, cls_path, kind, relu, shape)


def class_activation_maps(feat: Tensor, weight: Tensor, kind: str, relu: bool = False) -> Tensor:
    """The ``K`` class activation maps ``(N, K, H, W)`` of a feature map ``(N, C, H, W)`` under the
    classifier weight ``(K, D)``, without the bias (Zhou et al. 2016; CAT-KD's ``conv_test``).

    ``kind="gap"`` (``D = C``): ``CAM_k = sum_c W_kc F_c``, a 1x1 convolution.
    ``kind="flatten"`` (``D = C*H*W``): ``CAM_k,hw = H*W * sum_c W_k,chw F_c,hw``.
    In both the spatial mean of ``CAM_k`` is the class's logit minus its bias."""
    if relu:
        feat = F.relu(feat)
    if kind == "gap":
        return torch.einsum("nchw,kc->nkhw", feat, weight)
    n, c, h, w = feat.shape
    return torch.einsum("nchw,kchw->nkhw", feat, weight.view(weight.shape[0], c, h, w)) * (h * w)


def binarize_cams(cams: Tensor) -> Tensor:
    """CAT-KD's binarised maps (``IF_BINARIZE``): 1 where a map exceeds its mean absolute value
    (``||CAM_k||_1 / (h w)``), else 0."""
    threshold = cams.abs().mean(dim=(2, 3), keepdim=True)
    return (cams > threshold).to(cams.dtype)


def cat_loss(cam_student: Tensor, cam_teacher: Tensor, resolution: int = 2, normalize: bool = False) -> Tensor:
    """CAT-KD's transfer loss (Guo et al. 2023; the authors' ``CAT_loss``): both sets of maps
    average-pooled to ``resolution x resolution`` (``adaptive_avg_pool2d``, so the two maps may have
    different sizes), with ``normalize`` each map divided by its L2 norm over the positions, then the
    mean squared error over batch, classes and positions."""
    s = F.adaptive_avg_pool2d(cam_student, resolution)
    t = F.adaptive_avg_pool2d(cam_teacher, resolution)
    if normalize:
        s, t = F.normalize(s, dim=(2, 3)), F.normalize(t, dim=(2, 3))
    return F.mse_loss(s, t)


# ----------------------------------------------------------------------------------------------
# the distiller


@dataclass
class CATParams:
    """CAT-KD's parameters (defaults: the authors' ``res56_res20.yaml``; see the module docstring).

    Attributes:
        beta: weight of the CAT term (``CAT_loss_weight``), >= 0.
        ce_weight: weight of the cross-entropy with the labels (``CE_WEIGHT``; 0 = the authors'
            ``onlyCAT``).
        resolution: side ``r`` of the pooled maps (``CAM_RESOLUTION``), >= 1.
        normalize: L2-normalise each pooled map (``IF_NORMALIZE``).
        binarize: compare with the teacher's binarised maps (``IF_BINARIZE``, their ablation).
        layers: ``null`` (find each model's last feature map) or one ``[[student_path, teacher_path]]``
            pair naming it; each must be the map the model's classifier reads.
    """

    beta: float = 0.7
    ce_weight: float = 1.0
    resolution: int = 2
    normalize: bool = False
    binarize: bool = False
    layers: LayerPairs | None = None

    def validate(self) -> None:
        for key in ("beta", "ce_weight"):
            value = getattr(self, key)
            if not (value >= 0 and math.isfinite(value)):
                raise ConfigError(f"{key} must be a finite number >= 0, got {value}")
        if self.resolution < 1:
            raise ConfigError(f"resolution must be >= 1, got {self.resolution}")
        check_layer_pairs(self.layers)
        if self.layers is not None and len(self.layers) != 1:
            raise ConfigError(
                f"layers: CAT-KD transfers the maps of one layer per model (the last feature map), got "
                f"{len(self.layers)} pairs; give one [student_path, teacher_path] pair or null"
            )


@DISTILLERS.register("cat_kd")
class CATKD(Distiller):
    """Class activation transfer (Guo et al., CVPR 2023): ``ce_weight * CE + beta * cat`` with
    :func:`cat_loss` on the CAMs of each model's last feature map under its own classifier
    (:func:`class_activation_maps`). Terms ``ce`` and ``cat``.

    :meth:`setup` (or the pipeline's :meth:`preflight`) finds the maps by a dry run
    (:func:`find_cam_source`); a model without a usable conv map and linear classifier is a
    :class:`~xkd.errors.ConfigError` there, before training. The student's CAMs carry gradients into
    its features and its classifier's weights; the teacher's are computed without gradients."""

    Params = CATParams

    def __init__(self, student: nn.Module, teacher: nn.Module | None = None, params: CATParams | None = None):
        super().__init__(student, teacher, params)
        p: CATParams = self.params
        self.pair = None if p.layers is None else resolve_layer_pairs(p.layers, self.student, self.teacher)[0]
        self.sources: tuple[CamSource, CamSource] | None = None

    def find_sources(self, sample: Tensor) -> tuple[CamSource, CamSource]:
        """The student's and the teacher's :class:`CamSource`, from dry runs on ``sample``'s shape."""
        s_layer, t_layer = self.pair if self.pair is not None else (None, None)
        return (
            find_cam_source(self.student, sample, s_layer, "student"),
            find_cam_source(self.teacher, sample, t_layer, "teacher"),
        )

    def preflight(self, sample: Tensor) -> None:
        self.find_sources(sample)

    def setup(self, context: DistillContext) -> None:
        self.sources = self.find_sources(context.sample)

    def cams(self, model: nn.Module, source: CamSource, feat: Tensor) -> Tensor:
        """``model``'s class activation maps from its captured feature map ``feat``."""
        weight = model.get_submodule(source.classifier).weight
        if source.kind == "flatten" and tuple(feat.shape[1:]) != source.shape:
            raise ValueError(
                f"cat_kd: layer {source.layer!r} gave a {tuple(feat.shape[1:])} map, but the classifier reads a "
                f"flattened {source.shape} map; train on images of the size setup() saw"
            )
        # fp32 also under autocast (the einsum would run in bf16/fp16), as the maps of a run without amp
        with torch.autocast(feat.device.type, enabled=False):
            return class_activation_maps(feat.float(), weight.float(), source.kind, source.relu)

    def forward(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        if self.sources is None:
            raise RuntimeError(
                "distiller 'cat_kd': setup(context) was not run, so the maps to transfer are not known; build it "
                "with build_distiller(..., context=DistillContext(sample=...)) or call setup() before training"
            )
        p: CATParams = self.params
        src_s, src_t = self.sources
        with capture_features(self.student, [src_s.layer]) as fs:
            logits = self.student(batch.images)
        with torch.no_grad(), capture_features(self.teacher, [src_t.layer], detach=True) as ft:
            self.teacher(batch.images)
            cam_t = self.cams(self.teacher, src_t, ft[src_t.layer])
            if p.binarize:
                cam_t = binarize_cams(cam_t)
        cam_s = self.cams(self.student, src_s, fs[src_s.layer])
        terms = {
            "ce": p.ce_weight * F.cross_entropy(logits, batch.labels),
            "cat": p.beta * cat_loss(cam_s.float(), cam_t.float(), p.resolution, p.normalize),
        }
        return logits, terms
