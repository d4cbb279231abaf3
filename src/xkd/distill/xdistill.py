"""XDistillation: teacher explanations -> superpixel sums -> a frozen conv auto-encoder fused into the student.

Source: Alharbi, Vu & Thai, "Learning Interpretation with Explainable Knowledge Distillation", IEEE
BigData 2021 (section and equation numbers below are the paper's).

Phase 1 (:meth:`XDistillation.setup`, run once before the optimiser exists):

1. The teacher explains at most ``max_images`` training images for their TRUE class (SHAP by default;
   LIME, Grad-CAM or any registered explainer selectable).
2. §III-A1: each explanation becomes its superpixel form: SLIC (``k`` = 19) and every pixel takes the
   **sum** of the attributions of its superpixel (:func:`superpixel_targets`). KernelSHAP and LIME
   already use those very superpixels as features: their map holds each superpixel's coefficient,
   i.e. the total effect of the superpixel, which is used as it is (summing it again would multiply
   it by the superpixel's area).
3. The targets are cached on disk (:class:`xkd.cache.Cache`: safetensors, written atomically) under
   ``context.cache_dir``, keyed by the teacher's weights, the explainer and its parameters, the SLIC
   parameters and the selected images (their indices and a hash of their pixels and labels). The
   file stores its key; a file whose stored key differs (e.g. written for another teacher) is
   ignored and rebuilt. It also stores how long building it took: a run reusing it counts that time
   as its setup time (``setup_reused_seconds``), so a cached phase 1 is not free in comparisons.
4. §III-A2, eq. 1-2 and 4, Table I: a conv auto-encoder (CAE, tanh activations) learns image -> target
   map with the L1 loss (the paper's MAE, eq. 4), Adam lr 1e-3, ``cae_epochs`` epochs; ``small``
   (2 conv + 2 max-pool, 2 transposed conv, 1,077 parameters for one channel, exactly Table I) or
   ``large`` (4 conv stride 2, 4 transposed conv stride 2, ~0.2 M parameters for RGB). Then it is
   FROZEN (``requires_grad=False``, kept in eval mode). Its weights are cached with the same key plus
   the CAE's options and the seed. The CAE and its training live in :mod:`xkd.distill.cae`.

Phase 2 (training, eq. 3, 5, 6): the evaluated model is :class:`XDistillStudent`: the student network
with its last ``nn.Linear`` replaced by ``nn.Identity`` (the CNN branch: the features its classifier
would see), the frozen CAE's output average-pooled to ``cae_grid x cae_grid`` and flattened (the CAE
branch; ``cae_grid`` = image side is the paper's plain flatten), concatenated ``[cnn, cae]`` and fed
to one linear classifier. Loss (eq. 6)::

    L = CE(y, z_s) + (1 - alpha) * tau^2 * KL(softmax(z_t / tau) || softmax(z_s / tau)) + lambda * ||c||^2

with ``c`` = the classifier weights on the CNN-branch part of the concatenation (the "feature
reduction" gate F_R: a large lambda lets more of the signal come from the explanation branch).
Terms ``{"ce", "kd", "fr"}``. The paper's eq. 5 writes the KD term as a cross-entropy
``-tau^2 sum p_t log p_s``; we use the KL divergence, which differs by the teacher's entropy (a
constant: same gradients). Defaults alpha = 0.9, tau = 1, lambda = 5e-4 (§IV-A).
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xkd.cache import Cache
from xkd.data.base import Batch
from xkd.distill.base import DistillContext, Distiller
from xkd.distill.cae import CAE, train_cae
from xkd.distill.logits import kd_loss
from xkd.errors import ConfigError
from xkd.explain.base import build_explainer, explainer_params, map_form
from xkd.explain.superpixel import SuperpixelParams, slic_segments, superpixel_maps
from xkd.models.hooks import default_layer
from xkd.models.state import model_device
from xkd.registry import DISTILLERS, EXPLAINERS
from xkd.schema import to_dict

log = logging.getLogger("xkd")

CACHE_VERSION = 1

# ----------------------------------------------------------------------------------------------
# the evaluated model


def _last_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    last = None
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            last = (name, m)
    if last is None:
        raise ConfigError(
            f"xdistill needs a student whose last nn.Linear is its classifier; {type(model).__name__} has no nn.Linear"
        )
    return last


def _first_conv_channels(model: nn.Module) -> int:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels
    raise ConfigError(f"xdistill cannot tell the input channels of {type(model).__name__}: it has no nn.Conv2d")


class XDistillStudent(nn.Module):
    """The XDistillation model (Fig. 2): CNN branch + frozen CAE branch, concatenated, one linear classifier.

    Args:
        cnn: the student network with its classifier replaced by ``nn.Identity`` (returns features).
        cae: the explanation auto-encoder; frozen here (``requires_grad=False``, always in eval mode).
        classifier: ``nn.Linear(cnn_features + cae_grid**2, num_classes)`` on ``[cnn, cae]``.
        cae_grid: the CAE output ``(N, 1, H, W)`` is average-pooled to ``cae_grid x cae_grid``
            (adaptive) before flattening, so the classifier's size does not depend on the image size
            (the pipeline rebuilds this model without seeing data).
        default_layer: module path explainers use by default (the inner CNN's default layer).

    Gradients still flow through the frozen CAE to the input (input-gradient explainers see both
    branches). Attributes ``num_classes`` and ``xkd_default_layer`` follow xkd's model convention.
    """

    def __init__(
        self, cnn: nn.Module, cae: CAE, classifier: nn.Linear, cae_grid: int, default_layer: str | None = None
    ) -> None:
        super().__init__()
        self.cnn, self.cae, self.classifier = cnn, cae, classifier
        self.cae_grid = cae_grid
        self.cnn_features = classifier.in_features - cae_grid * cae_grid
        self.num_classes = classifier.out_features
        if default_layer is not None:
            self.xkd_default_layer = default_layer
        self.cae.requires_grad_(False)
        self.cae.eval()

    @classmethod
    def from_student(
        cls, student: nn.Module, cae: Literal["small", "large"] = "small", cae_grid: int = 28
    ) -> XDistillStudent:
        """Build from an ordinary student: a deep copy whose last ``nn.Linear`` (its classifier) becomes
        ``nn.Identity``; the CAE reads the student's input channels (its first ``nn.Conv2d``)."""
        try:
            layer = default_layer(student)
        except KeyError:
            layer = None
        cnn = copy.deepcopy(student)
        path, linear = _last_linear(cnn)
        if not path:
            raise ConfigError("xdistill needs a student network, not a bare nn.Linear")
        parent_path, _, attr = path.rpartition(".")
        setattr(cnn.get_submodule(parent_path) if parent_path else cnn, attr, nn.Identity())
        classifier = nn.Linear(linear.in_features + cae_grid * cae_grid, linear.out_features)
        return cls(
            cnn,
            CAE(_first_conv_channels(student), cae),
            classifier,
            cae_grid,
            None if layer is None else f"cnn.{layer}",
        )

    def train(self, mode: bool = True) -> XDistillStudent:
        super().train(mode)
        self.cae.eval()  # frozen: eval mode whatever the wrapper's mode (like the teacher in Distiller)
        return self

    def cae_features(self, x: Tensor) -> Tensor:
        """The CAE branch: the explanation map, pooled to ``cae_grid``^2 and flattened ``(N, cae_grid**2)``."""
        return F.adaptive_avg_pool2d(self.cae(x), self.cae_grid).flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(torch.cat([self.cnn(x).flatten(1), self.cae_features(x)], dim=1))

    def cnn_weight(self) -> Tensor:
        """``c`` of eq. 6: the classifier weights on the CNN-branch part of the concatenation."""
        return self.classifier.weight[:, : self.cnn_features]


# ----------------------------------------------------------------------------------------------
# parameters


@dataclass
class XDistillParams:
    """XDistillation options (defaults: the paper's, §IV-A and Table I).

    Attributes:
        alpha: eq. 6 weighs the KD term by ``1 - alpha`` (CE is unweighted), in [0, 1]. Paper: 0.9.
        temperature: tau of eq. 3 and 5, > 0. Paper: 1.
        lam: lambda of the feature-reduction penalty ``lambda ||c||^2``, >= 0. Paper: 5e-4.
        explainer: registered explainer giving the teacher's explanations (``kernel_shap``,
            ``gradient_shap``, ``lime``, ``grad_cam``, ...; no ``+superpixel`` suffix).
        explainer_params: its parameters; for explainers with SLIC features (kernel_shap, lime) the
            ``superpixel`` entry is set from ``superpixel`` below (do not give it here). Default for
            kernel_shap: ``n_samples`` 100, ``batch_size`` 64.
        superpixel: SLIC options of the targets (k = ``n_segments`` = 19).
        max_images: explain and fit the CAE on at most this many training images (a seeded, fixed
            selection independent of the run's seed, so runs with several seeds share the cache).
        target_norm: ``"dataset"`` divides all targets by their largest absolute value (so they fit the
            CAE's tanh range while keeping their relative sizes), ``"image"`` each image by its own,
            ``"none"`` keeps the raw sums (SHAP of probabilities already lies in [-1, 1]).
        cae: ``"small"`` or ``"large"`` (Table I).
        cae_epochs: epochs of phase-1 CAE training (>= 0; 0 leaves the CAE at its initialisation).
        cae_lr: Adam learning rate of the CAE (paper: 1e-3).
        cae_batch_size: CAE mini-batch size.
        cae_grid: side of the pooled CAE map fed to the classifier (28 = MNIST's plain flatten).
        cache: read and write the on-disk caches (targets and CAE) when the context has a cache_dir.
    """

    alpha: float = 0.9
    temperature: float = 1.0
    lam: float = 5e-4
    explainer: str = "kernel_shap"
    explainer_params: dict[str, Any] = field(default_factory=dict)
    superpixel: SuperpixelParams = field(default_factory=SuperpixelParams)
    max_images: int = 2000
    target_norm: Literal["dataset", "image", "none"] = "dataset"
    cae: Literal["small", "large"] = "small"
    cae_epochs: int = 10
    cae_lr: float = 1e-3
    cae_batch_size: int = 64
    cae_grid: int = 28
    cache: bool = True

    def validate(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
        if self.lam < 0:
            raise ConfigError(f"lam (the feature-reduction lambda) must be >= 0, got {self.lam}")
        if self.max_images < 1:
            raise ConfigError(f"max_images must be >= 1, got {self.max_images}")
        if self.cae_epochs < 0:
            raise ConfigError(f"cae_epochs must be >= 0, got {self.cae_epochs}")
        if self.cae_lr <= 0:
            raise ConfigError(f"cae_lr must be > 0, got {self.cae_lr}")
        if self.cae_batch_size < 1:
            raise ConfigError(f"cae_batch_size must be >= 1, got {self.cae_batch_size}")
        if self.cae_grid < 1:
            raise ConfigError(f"cae_grid must be >= 1, got {self.cae_grid}")
        if self.explainer.endswith("+superpixel"):
            raise ConfigError(
                f"explainer {self.explainer!r}: give the plain name; xdistill applies the superpixel sums itself"
            )
        if "superpixel" in self.explainer_params:
            raise ConfigError("explainer_params.superpixel: set the SLIC options with the top-level `superpixel` key")
        self.superpixel.validate()
        self.resolved_explainer_params()  # validates the explainer's name and parameters

    def uses_superpixel_features(self) -> bool:
        """Whether the explainer's features are the SLIC superpixels themselves (kernel_shap, lime)."""
        if self.explainer not in EXPLAINERS:
            raise ConfigError(
                f"explainer {self.explainer!r} is not registered; registered explainers: {', '.join(EXPLAINERS.names())}"
            )
        return map_form(self.explainer) == "superpixel"

    def resolved_explainer_params(self) -> Any:
        """The explainer's validated ``Params`` (defaults above, SLIC options from ``superpixel``)."""
        raw = dict(self.explainer_params)
        if self.explainer == "kernel_shap":
            raw = {"n_samples": 100, "batch_size": 64, **raw}
        if self.uses_superpixel_features():
            raw["superpixel"] = to_dict(self.superpixel)
        return explainer_params(self.explainer, raw, "params.explainer_params")


# ----------------------------------------------------------------------------------------------
# phase 1: targets (the CAE is in xkd.distill.cae, the cache in xkd.cache)


def superpixel_targets(maps: Tensor, images: Tensor, superpixel: SuperpixelParams) -> Tensor:
    """§III-A1: pixel attributions ``maps`` (N, H, W) -> every pixel takes the sum of its SLIC superpixel."""
    return superpixel_maps(maps, slic_segments(images, superpixel).to(maps.device))


def teacher_targets(teacher: nn.Module, images: Tensor, labels: Tensor, params: XDistillParams) -> Tensor:
    """The CAE's targets ``(N, H, W)``: the teacher's explanations of ``labels`` in superpixel-sum form
    (raw, not normalised). Maps of SLIC-feature explainers (kernel_shap, lime) are already per superpixel."""
    explainer_args = to_dict(params.resolved_explainer_params())
    with build_explainer(params.explainer, teacher, explainer_args) as ex:
        maps = ex.explain(images, labels).maps
    if params.uses_superpixel_features():
        return maps.float()
    return superpixel_targets(maps, images, params.superpixel)


def normalise_targets(targets: Tensor, how: str) -> Tensor:
    """Scale targets into the CAE's tanh range: by the largest ``|value|`` of the set, of each image, or not."""
    if how == "none":
        return targets
    if how == "image":
        return targets / targets.flatten(1).abs().amax(dim=1).clamp_min(1e-12).view(-1, 1, 1)
    return targets / targets.abs().max().clamp_min(1e-12)


def select_indices(n: int, max_images: int) -> Tensor:
    """At most ``max_images`` indices of ``n`` training images: all of them, or a fixed seeded subset (sorted)."""
    if n <= max_images:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(0))[:max_images].sort().values


# ----------------------------------------------------------------------------------------------
# the distiller


@DISTILLERS.register("xdistill")
class XDistillation(Distiller):
    """XDistillation (Alharbi et al. 2021, eq. 6): ``CE + (1 - alpha) KD(tau) + lambda ||c||^2`` for the
    :class:`XDistillStudent` built around the given student; the CAE is trained in :meth:`setup`.

    ``self.student`` is the wrapper (the pipeline evaluates and checkpoints it, CAE included);
    ``build_distiller("xdistill", student, teacher, params).student`` rebuilds its architecture
    without setup, so a checkpoint loads into it. The given student is deep-copied, not modified.
    """

    Params = XDistillParams
    teacher_logits_only = True

    def __init__(self, student: nn.Module, teacher: nn.Module | None = None, params: Any = None) -> None:
        p = params if params is not None else XDistillParams()
        super().__init__(XDistillStudent.from_student(student, p.cae, p.cae_grid), teacher, p)
        self.cae_history: list[float] = []
        self.cache_files: dict[str, Path] = {}

    def setup(self, context: DistillContext) -> None:
        """Phase 1: cached teacher targets, then the CAE trained (or loaded from its cache) and frozen."""
        p: XDistillParams = self.params
        wrapper: XDistillStudent = self.student
        self._check_cnn(context.sample)
        if context.train is None:
            raise ConfigError("xdistill needs the training split in its DistillContext (context.train)")
        device = model_device(self.teacher, context.device)
        idx = select_indices(len(context.train), p.max_images)
        items = [context.train[int(i)] for i in idx]
        images = torch.stack([it[0] for it in items]).float()
        labels = torch.tensor([int(it[1]) for it in items], dtype=torch.long)
        teacher_key = context.teacher_key or Cache.key(*self.teacher.state_dict().values())
        desc = {
            "version": CACHE_VERSION,
            "teacher": teacher_key,
            "explainer": p.explainer,
            "explainer_params": to_dict(p.resolved_explainer_params()),
            "superpixel": to_dict(p.superpixel),
            "images": {"indices": Cache.key(idx), "pixels": Cache.key(images, labels), "n": len(idx)},
        }
        key = json.dumps(desc, sort_keys=True)
        use_cache = p.cache and context.cache_dir is not None
        cache = Cache(context.cache_dir) if use_cache else None
        cached = None
        if cache is not None:
            self.cache_files["targets"] = cache.file("xdistill", "targets", Cache.key(key))
            cached = Cache.read(self.cache_files["targets"], key)
        self.setup_reused_seconds = 0.0
        if cached is not None:
            targets = cached["targets"]
            self.setup_reused_seconds += Cache.seconds(self.cache_files["targets"])
        else:
            t0 = time.perf_counter()
            log.info("xdistill: %s explanations of %d training images by the teacher", p.explainer, len(idx))
            chunks = [
                teacher_targets(self.teacher, images[s : s + 256].to(device), labels[s : s + 256].to(device), p).cpu()
                for s in range(0, len(idx), 256)
            ]
            targets = torch.cat(chunks)
            if cache is not None:
                tensors = {"targets": targets, "indices": idx}
                Cache.write(self.cache_files["targets"], key, tensors, time.perf_counter() - t0)
        targets = normalise_targets(targets.float(), p.target_norm)
        cae_desc = dict(desc, cae=p.cae, epochs=p.cae_epochs, lr=p.cae_lr, batch=p.cae_batch_size)
        cae_desc.update(norm=p.target_norm, seed=context.seed, in_channels=images.shape[1])
        cae_key = json.dumps(cae_desc, sort_keys=True)
        state = None
        if cache is not None:
            self.cache_files["cae"] = cache.file("xdistill", "cae", Cache.key(cae_key))
            state = Cache.read(self.cache_files["cae"], cae_key)
        if state is not None:
            wrapper.cae.load_state_dict(state)
            self.setup_reused_seconds += Cache.seconds(self.cache_files["cae"])
        else:
            t0 = time.perf_counter()
            with torch.random.fork_rng(devices=[]):  # a seeded CAE init, the global RNG untouched
                torch.manual_seed(context.seed)
                fresh = CAE(images.shape[1], p.cae)
            wrapper.cae.load_state_dict(fresh.state_dict())
            wrapper.cae.to(device)
            self.cae_history = train_cae(
                wrapper.cae, images.to(device), targets.to(device),
                epochs=p.cae_epochs, lr=p.cae_lr, batch_size=p.cae_batch_size, seed=context.seed,
            )  # fmt: skip
            if cache is not None:
                Cache.write(self.cache_files["cae"], cae_key, wrapper.cae.state_dict(), time.perf_counter() - t0)
        wrapper.cae.requires_grad_(False)
        wrapper.cae.eval()

    def preflight(self, sample: Tensor) -> None:
        """The cheap check of :meth:`setup` (the student's CNN branch on ``sample``), no explanations."""
        self._check_cnn(sample)

    def _check_cnn(self, sample: Tensor) -> None:
        wrapper: XDistillStudent = self.student
        with torch.no_grad():
            was = wrapper.cnn.training
            wrapper.cnn.eval()
            try:
                out = wrapper.cnn(sample.to(model_device(wrapper, sample.device)))
            finally:
                wrapper.cnn.train(was)
        if out.ndim < 2 or out[0].numel() != wrapper.cnn_features:
            raise ConfigError(
                f"xdistill: with its last nn.Linear removed the student returns {tuple(out.shape)}, not "
                f"(N, {wrapper.cnn_features}) features; its last nn.Linear must be its final layer"
            )

    def forward(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        p: XDistillParams = self.params
        logits = self.student(batch.images)
        teacher_logits = self.teacher_logits(batch)
        return logits, {
            "ce": F.cross_entropy(logits, batch.labels),
            "kd": kd_loss(logits, teacher_logits, p.temperature, weight=1.0 - p.alpha),
            "fr": p.lam * self.student.cnn_weight().pow(2).sum(),
        }
