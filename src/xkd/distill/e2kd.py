"""e2KD: explanation-enhanced knowledge distillation with Grad-CAM.

Source: Parchami-Araghi, Böhle, Rao & Schiele, "Good Teachers Explain: Explanation-Enhanced Knowledge
Distillation", ECCV 2024 (arXiv:2402.03119); the loss as the authors' code computes it
(``TeachersExplainCriterion`` and ``explanation_aware_forward`` in ``bcos/distillation_methods/
TeachersExplain.py`` of m-parchami/GoodTeachersExplain, the ``GradCamPos`` explanation of standard,
non-B-cos networks)::

    L = w_gt * CE(y, z_s)
        + w_t * ( w_exp * mean_i (1 - cos(E_S(x_i), E_T(x_i)))  +  w_logit * T^2 * KL(p_T || p_S) )

with ``p = softmax(z / T)`` and ``E`` the positive Grad-CAM (Selvaraju et al., ICCV 2017, eq. 1-2:
``ReLU(sum_k mean_ij(dz_c / dA^k_ij) A^k)``) of each model at its explained layer, **for the teacher's
top-1 class** ``c`` (for student and teacher alike), upsampled bilinearly to the image size and compared
as flattened vectors. The student's map is computed with ``create_graph=True``, so the explanation
term trains the student through its gradients (a double backward: the classifier weights, for
instance, receive a gradient from the map's channel weights). The teacher is frozen and in eval mode;
its map needs no graph.

Options (:class:`E2KDParams`):

* ``frozen_explanations``: the paper's "frozen explanations" variant (the code's fixed-teacher
  ``ffkd_training``): the teacher's logits and Grad-CAMs are computed once per training image in
  :meth:`E2KD.setup` (batched, on ``context.device``) and read by ``Batch.indices`` during training,
  so the teacher never runs while the student trains. They are cached on disk with
  :class:`xkd.cache.Cache` (``<cache_dir>/e2kd/teacher-<key>.safetensors``) keyed by the teacher's
  weights (``context.teacher_key``), its explained layer and a hash of the training images; maps are
  stored at the layer's resolution and upsampled per batch (the same interpolation as live maps). They
  are only right for **un-augmented** training images: ``data.augment`` is refused by
  :meth:`E2KD.check_data` before anything trains, and the first training batch is checked against a
  per-image checksum (a data set that augments by itself); a mismatch stops training with a
  :class:`~xkd.errors.ConfigError`.
* ``guided_step_interval`` = k: as in the authors' code (``distillation_trainstep``: the explanation
  loss is skipped when ``batch_idx % guided_step_interval != 0``), the explanation term is applied only
  on every k-th training step (steps 1, k+1, 2k+1, ... counted over the whole training; the code counts
  within each epoch) and neither model is explained on the other steps, which then cost about as much as
  KD. The logit and CE terms are applied on every step. A skipped step reports an ``exp`` term of 0, so
  the logged epoch mean of ``exp`` is about 1/k of the applied term's mean. The authors use 16 (ResNets)
  and 4 (ViTs) for their "efficient guidance" runs. With k > 1 the step counter is checkpointed (module
  ``e2kd_state``), so a resumed run keeps the rhythm.
* ``standardize``: z-score both models' logits per sample before the temperature (Sun et al., CVPR
  2024; :func:`xkd.distill.logits.standardize_logits`); the CAMs are unaffected.

Defaults are the authors' ``DEFAULT_TE_CRITERION``: every weight 1 and T = 1. Their ImageNet runs set
``ce_weight`` = 0 and sweep ``exp_weight`` in {1, 5, 10} (plus 0.2 for B-cos) and T in {1, 5}.

What xkd changes: the explained layer is any module (default: each model's default Grad-CAM layer,
:func:`xkd.models.hooks.default_layer`) instead of a hard-wired feature output; frozen explanations are
cached on disk and reused across runs; no B-cos explanations (the models here are standard networks).
Images of a batch are explained by one backward pass of the summed selected logits, as in the authors'
code: in eval mode (the teacher) they are independent, but a student in train mode with BatchNorm
*after* the explained layer couples the images of a batch (the default layers of xkd's students are
followed by pooling and linear layers only).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xkd.cache import Cache
from xkd.data.base import Batch, BatchLoader
from xkd.distill.base import DistillContext, Distiller
from xkd.distill.logits import StepCounter, kd_loss
from xkd.errors import ConfigError, LayerNotFoundError
from xkd.models.hooks import default_layer, get_module
from xkd.models.state import eval_mode, model_device
from xkd.registry import DISTILLERS

log = logging.getLogger("xkd")

CACHE_VERSION = 1

# ----------------------------------------------------------------------------------------------
# Grad-CAM with (or without) a graph


def grad_cam(
    model: nn.Module, layer: str, images: Tensor, targets: Tensor | None = None, *, create_graph: bool = False
) -> tuple[Tensor, Tensor]:
    """One forward pass of ``model``: its logits and the positive Grad-CAM of ``targets`` at ``layer``.

    ``ReLU(sum_k w_k A^k)`` with ``w_k`` the spatial mean of ``d z_target / d A^k`` (Selvaraju et al.
    2017, eq. 1-2), at the layer's resolution ``(N, h, w)`` (upsample with :func:`upsample_maps`).
    ``targets`` None explains each image's top-1 class. The model runs in its current mode.

    Args:
        create_graph: keep the graph of the map, so a loss on it back-propagates into the model's
            parameters through the activations **and** the gradients (double backward). Without it the
            part of the network before the layer runs without autograd and the map is detached:
            exactly :class:`xkd.explain.gradcam.GradCAM`'s computation (same maps after the same
            upsampling), at the cost of about one forward pass.

    Returns:
        ``(logits (N, classes), cams (N, h, w))``; the logits keep their graph when ``create_graph``
        (and grad mode is on).
    """
    module = get_module(model, layer)
    store: dict[str, Tensor] = {}

    def hook(_module: nn.Module, _inputs: object, output: object) -> Tensor:
        if not isinstance(output, Tensor) or output.ndim != 4:
            shape = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
            raise ConfigError(f"layer {layer!r} must output an (N, K, h, w) tensor for a Grad-CAM, got {shape}")
        if create_graph:
            # a layer whose inputs need no gradient (a frozen trunk) still gets a differentiable leaf
            store["a"] = output if output.requires_grad else output.detach().requires_grad_(True)
        else:
            store["a"] = output.detach().requires_grad_(True)
            torch.set_grad_enabled(True)  # record the rest of the forward pass only
        return store["a"].clone()  # later in-place operations do not touch the stored activations

    grad_mode = torch.is_grad_enabled()
    handle = module.register_forward_hook(hook)
    try:
        torch.set_grad_enabled(create_graph)
        logits = model(images)
    finally:
        torch.set_grad_enabled(grad_mode)
        handle.remove()
    if "a" not in store:
        raise ConfigError(f"layer {layer!r} was not called in the forward pass of {type(model).__name__}")
    if not isinstance(logits, Tensor) or logits.ndim != 2:
        raise ConfigError(f"model must return logits of shape (N, classes), got {type(logits).__name__}")
    acts = store["a"]
    if targets is None:
        targets = logits.detach().argmax(dim=1)
    with torch.enable_grad():
        selected = logits.gather(1, targets.to(logits.device).long()[:, None]).sum()
        (grads,) = torch.autograd.grad(selected, acts, create_graph=create_graph, allow_unused=True)
        if grads is None:
            raise ConfigError(
                f"layer {layer!r} of {type(model).__name__} does not feed its logits (its output is not used "
                "on the way to them), so it has no Grad-CAM; name a convolutional layer the logits depend on"
            )
        # fp32 also under autocast (bf16 activations and gradients): live maps then match the frozen
        # ones, which are computed without autocast
        cams = F.relu((grads.float().mean(dim=(2, 3), keepdim=True) * acts.float()).sum(dim=1))
    if not create_graph:
        return logits.detach(), cams.detach()
    return logits, cams


def upsample_maps(cams: Tensor, size: tuple[int, int] | torch.Size) -> Tensor:
    """Maps ``(N, h, w)`` -> ``(N, H, W)``, bilinear, ``align_corners=False`` (as
    :class:`xkd.explain.gradcam.GradCAM`; torchvision's ``resize`` of the authors' code upsamples alike)."""
    return F.interpolate(cams[:, None].float(), size=tuple(size), mode="bilinear", align_corners=False)[:, 0]


def explanation_loss(student_maps: Tensor, teacher_maps: Tensor) -> Tensor:
    """``mean_i (1 - cos(s_i, t_i))`` over the batch, each map flattened (the authors'
    ``_explanation_loss``). An all-zero map has cosine 0 (torch's ``eps``) and gives 1, with no gradient."""
    n = student_maps.shape[0]
    cos = F.cosine_similarity(student_maps.float().reshape(n, -1), teacher_maps.float().reshape(n, -1), dim=1)
    return (1.0 - cos).mean()


# ----------------------------------------------------------------------------------------------
# parameters


@dataclass
class E2KDParams:
    """e2KD options (defaults: the authors' ``DEFAULT_TE_CRITERION``).

    Attributes:
        ce_weight: ``w_gt``, weight of the cross-entropy on the labels (>= 0). The paper's ImageNet
            runs use 0.
        teacher_weight: ``w_t``, weight of the whole teacher part (explanation + logit terms), >= 0.
        exp_weight: ``w_exp``, weight of the explanation term ``mean(1 - cos)`` (>= 0).
        logit_weight: ``w_logit``, weight of the ``T^2 KL`` logit term (>= 0).
        temperature: ``T`` of the logit term, > 0.
        layer: the student's explained module path (None: its default layer, the one Grad-CAM
            explains: :func:`~xkd.models.hooks.default_layer`).
        teacher_layer: the teacher's explained module path (None: its default layer).
        frozen_explanations: teacher logits and Grad-CAMs computed once per training image in
            ``setup`` and read by index (the paper's frozen-explanation variant); un-augmented data
            only.
        guided_step_interval: apply the explanation term on every k-th training step only (>= 1).
        standardize: z-score the logits of both models before the temperature (Sun et al. 2024).
        explain_batch_size: images per teacher pass when ``frozen_explanations`` explains the
            training set.
        cache: read and write the on-disk cache of frozen explanations when the context has a
            ``cache_dir``.
    """

    ce_weight: float = 1.0
    teacher_weight: float = 1.0
    exp_weight: float = 1.0
    logit_weight: float = 1.0
    temperature: float = 1.0
    layer: str | None = None
    teacher_layer: str | None = None
    frozen_explanations: bool = False
    guided_step_interval: int = 1
    standardize: bool = False
    explain_batch_size: int = 256
    cache: bool = True

    def validate(self) -> None:
        for name in ("ce_weight", "teacher_weight", "exp_weight", "logit_weight"):
            value = getattr(self, name)
            if not value >= 0:
                raise ConfigError(f"{name} must be >= 0, got {value}")
        if not self.temperature > 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
        if self.guided_step_interval < 1:
            raise ConfigError(f"guided_step_interval must be >= 1 (1: every step), got {self.guided_step_interval}")
        if self.explain_batch_size < 1:
            raise ConfigError(f"explain_batch_size must be >= 1, got {self.explain_batch_size}")
        for name in ("layer", "teacher_layer"):
            if getattr(self, name) is not None and not getattr(self, name):
                raise ConfigError(f"{name} must be a module path or null, got ''")


# ----------------------------------------------------------------------------------------------
# the distiller


def _explained_layer(model: nn.Module, path: str | None, role: str, key: str) -> str:
    """``path`` checked against ``model``, or the model's default layer; a clear ConfigError when the
    model has no convolutional layer to explain."""
    if path is not None:
        get_module(model, path)  # unknown path -> LayerNotFoundError listing the model's modules
        return path
    try:
        return default_layer(model)
    except LayerNotFoundError:
        raise ConfigError(
            f"e2kd explains the {role} with Grad-CAM at a convolutional layer, but {type(model).__name__} has "
            f"no nn.Conv2d (and no xkd_default_layer); name a layer whose output is (N, K, h, w) with "
            f"params.{key}, or use a logit distiller such as hinton_kd"
        ) from None


def _checksum_weights(numel: int, device: torch.device) -> Tensor:
    # a position-dependent weight, so that flips and crops change the checksum (a plain sum would not)
    return 1.0 + torch.arange(numel, device=device, dtype=torch.float64) / numel


def image_checksums(images: Tensor) -> Tensor:
    """One float64 number per image, ``sum_p x_p (1 + p / P)`` over its flattened pixels ``p``."""
    flat = images.detach().reshape(images.shape[0], -1).double()
    return flat @ _checksum_weights(flat.shape[1], flat.device)


@DISTILLERS.register("e2kd")
class E2KD(Distiller):
    """Explanation-enhanced KD (Parchami-Araghi et al., ECCV 2024), with Grad-CAM explanations.

    Terms: ``ce`` (``w_gt CE``), ``exp`` (``w_t w_exp mean(1 - cos)``, 0 on steps the
    ``guided_step_interval`` skips) and ``kd`` (``w_t w_logit T^2 KL``). Under ``torch.no_grad`` the
    maps are still computed (they need a gradient) and the terms are returned without a graph.
    """

    Params = E2KDParams

    def __init__(self, student: nn.Module, teacher: nn.Module | None = None, params: E2KDParams | None = None) -> None:
        super().__init__(student, teacher, params)
        p: E2KDParams = self.params
        self.student_layer = _explained_layer(student, p.layer, "student", "layer")
        self.teacher_layer = _explained_layer(self.teacher, p.teacher_layer, "teacher", "teacher_layer")
        self.counter = StepCounter()
        self.frozen_logits: Tensor | None = None
        self.frozen_cams: Tensor | None = None
        self.frozen_checksums: Tensor | None = None
        self._checked = False
        self.cache_file: Path | None = None

    def trainable_modules(self) -> nn.ModuleDict:
        modules = super().trainable_modules()
        if self.params.guided_step_interval > 1:
            modules["e2kd_state"] = self.counter
        return modules

    # -- checks ---------------------------------------------------------------------------------
    def preflight(self, sample: Tensor) -> None:
        """A dry run of both models on ``sample`` (eval mode, flags restored): each explained layer is
        called and outputs an ``(N, K, h, w)`` map (a ConfigError naming the layer otherwise)."""
        for role, model, layer in (
            ("student", self.student, self.student_layer),
            ("teacher", self.teacher, self.teacher_layer),
        ):
            with eval_mode(model):
                try:
                    grad_cam(model, layer, sample.to(model_device(model, sample.device)))
                except ConfigError as e:
                    raise ConfigError(f"e2kd {role}: {e}") from None

    # -- frozen explanations --------------------------------------------------------------------
    def setup(self, context: DistillContext) -> None:
        """Check the layers; with ``frozen_explanations``, the teacher's logits and Grad-CAMs of every
        training image, read from the cache or computed (batched, on ``context.device``) and cached."""
        p: E2KDParams = self.params
        self.preflight(context.sample)
        self.setup_reused_seconds = 0.0
        if not p.frozen_explanations:
            return
        if context.train is None:
            raise ConfigError("e2kd with frozen_explanations needs the training split in its DistillContext")
        data_hash, checksums = self._scan(context.train)
        desc = {
            "version": CACHE_VERSION,
            "teacher": context.teacher_key or Cache.key(*self.teacher.state_dict().values()),
            "teacher_layer": self.teacher_layer,
            "images": {"n": len(checksums), "pixels": data_hash},
        }
        key = json.dumps(desc, sort_keys=True)
        cache = Cache(context.cache_dir) if p.cache and context.cache_dir is not None else None
        stored = None
        if cache is not None:
            self.cache_file = cache.file("e2kd", "teacher", Cache.key(key))
            stored = Cache.read(self.cache_file, key)
        if stored is not None:
            logits, cams = stored["logits"], stored["cams"]
            self.setup_reused_seconds = Cache.seconds(self.cache_file)
        else:
            t0 = time.perf_counter()
            logits, cams = self._explain_training_set(context.train, context.device, p.explain_batch_size)
            if cache is not None:
                Cache.write(self.cache_file, key, {"logits": logits, "cams": cams}, time.perf_counter() - t0)
        self.frozen_logits = logits.float().to(context.device)
        self.frozen_cams = cams.float().to(context.device)
        self.frozen_checksums = checksums.to(context.device)
        self._checked = False

    @staticmethod
    def _scan(dataset) -> tuple[str, Tensor]:
        """A hash of every training image (shape and bytes, in index order) and their checksums."""
        h = hashlib.sha256()
        sums = []
        for b in BatchLoader(dataset, 1024):
            images = b.images.float().cpu().contiguous()
            h.update(str(tuple(images.shape[1:])).encode())
            h.update(images.numpy().tobytes())
            sums.append(image_checksums(images))
        return h.hexdigest()[:16], torch.cat(sums) if sums else torch.zeros(0, dtype=torch.float64)

    def _explain_training_set(self, dataset, device: torch.device, batch_size: int) -> tuple[Tensor, Tensor]:
        log.info("e2kd: teacher Grad-CAMs of %d training images", len(dataset))
        teacher = self.teacher.to(device)  # the trainer moves the whole distiller there anyway
        logits, cams = [], []
        for b in BatchLoader(dataset, batch_size):
            z, cam = grad_cam(teacher, self.teacher_layer, b.images.to(device))
            logits.append(z.float().cpu())
            cams.append(cam.float().cpu())
        return torch.cat(logits), torch.cat(cams)

    def check_data(self, train: Any, augmented: bool = False) -> None:
        if self.params.frozen_explanations and augmented:
            raise ConfigError(
                "e2kd: frozen_explanations computes the teacher's explanations once, of the un-augmented training "
                "images, but data.augment is on; turn augmentation off (data.augment.enabled: false) or set "
                "frozen_explanations: false"
            )

    def teacher_outputs(self) -> str | None:
        if self.frozen_logits is None:
            return None
        return "frozen logits and Grad-CAMs (computed once, cached)"

    def _frozen(self, batch: Batch) -> tuple[Tensor, Tensor] | None:
        """The cached teacher logits and layer-resolution maps of ``batch`` (None: not frozen, a batch
        without indices, or evaluation mode, where the indices are not those of the training set; such a
        batch is explained live)."""
        if self.frozen_logits is None or batch.indices is None or not self.training:
            return None
        idx = batch.indices.to(self.frozen_logits.device)
        if not self._checked and self.training:
            expected = self.frozen_checksums[idx]
            got = image_checksums(batch.images).to(expected.device)
            if not torch.allclose(got, expected, rtol=1e-5, atol=1e-3):
                raise ConfigError(
                    "e2kd: frozen_explanations holds the teacher's explanations of the un-augmented training "
                    "images, but this batch's images differ from them (data augmentation?); turn augmentation "
                    "off (data.augment.enabled: false) or set frozen_explanations: false"
                )
            self._checked = True
        device = batch.images.device
        return self.frozen_logits[idx].to(device), self.frozen_cams[idx].to(device)

    # -- the loss -------------------------------------------------------------------------------
    def explains_now(self) -> bool:
        """Whether the current step applies the explanation term: always outside training, else on
        steps 1, k+1, 2k+1, ... (``k`` = ``guided_step_interval``)."""
        k = self.params.guided_step_interval
        if k <= 1 or not self.training:
            return True
        return (self.counter.count - 1) % k == 0

    def forward(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        p: E2KDParams = self.params
        grad_on = torch.is_grad_enabled()
        if self.training and grad_on:
            self.counter.tick()
        explain = self.explains_now() and p.teacher_weight * p.exp_weight > 0
        images = batch.images
        frozen = self._frozen(batch)
        if frozen is not None:
            teacher_logits, teacher_cams = frozen
        elif explain:
            teacher_logits, teacher_cams = grad_cam(self.teacher, self.teacher_layer, images)
        else:
            teacher_logits, teacher_cams = self.teacher_logits(batch), None
        if explain:
            targets = teacher_logits.argmax(dim=1)
            with torch.enable_grad():
                logits, student_cams = grad_cam(self.student, self.student_layer, images, targets, create_graph=grad_on)
            size = images.shape[2:]
            exp = explanation_loss(upsample_maps(student_cams, size), upsample_maps(teacher_cams, size))
        else:
            logits = self.student(images)
            exp = logits.new_zeros((), dtype=torch.float32)
        kd = kd_loss(logits, teacher_logits, p.temperature, p.standardize, weight=p.teacher_weight * p.logit_weight)
        return logits, {
            "ce": p.ce_weight * F.cross_entropy(logits, batch.labels),
            "exp": p.teacher_weight * p.exp_weight * exp,
            "kd": kd,
        }
