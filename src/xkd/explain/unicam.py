"""UniCAM (Adhane et al., "On Explaining Knowledge Distillation: Measuring and Visualising the Knowledge
Transfer Process", 2024): Grad-CAM maps of the gradient of a (partial) distance correlation between a model's
features, a second model's features and a class target.

For a batch of n >= 4 images, ``S`` = the explained model's features (the output of ``feature_layer``,
by default the explained ``layer`` itself, flattened per image), ``T`` = the teacher's features at
``teacher_layer``, ``B`` = the *base model*'s features (the student's architecture trained without KD, passed
as ``base=``) at ``base_feature_layer``, ``Y`` = a class-semantic target of the images
(:func:`xkd.stats.class_target`). With U-centred distance matrices and ``R*(P_Z(X), Y)``, the correlation with
the target of X's distance matrix with Z's projected out (Székely & Rizzo 2014, sec. 4.1; :mod:`xkd.stats`):

* ``kind="residual"`` (default): ``f = R*(P_T(S), Y)``, gradient at the student's ``layer``: the
  task-relevant features of the student that the teacher does not explain. The authors'
  ``PDC_Model(student, teacher)`` + ``PDC_CAM.get_loss`` map ``student_given_teacher`` (gadhane/UniCAM
  ``pdCor_model.py``, ``pdCor_CAM.py``, ``main_UniCAM.py``).
* ``kind="kd_given_base"``: ``f = R*(P_B(S), Y)``, gradient at the KD student's ``layer``: the authors'
  ``student_kd_given_base_model``, "the features learned because of KD" (their README).
* ``kind="base_given_kd"``: ``f = R*(P_S(B), Y)``, gradient at the **base model's** ``base_layer`` (the
  authors take the CAM at the first model of ``PDC_Model``'s pair): their ``base_model_given_student_kd``,
  "the features the KD student did not retain". These maps are of the base model (``Attribution.role`` is
  ``"base"``).
* ``kind="distilled"``: ``f = R*(S, T)``, the bias-corrected dCor^2 of the two models' features (xkd's
  ``fss_unbiased`` on the batch), gradient at the student's ``layer``: which of the student's features carry
  the teacher's geometry. **xkd's own variant, not one of the authors' maps** (theirs all correlate a
  residual with the target); kept, documented, for the runs and configs that use it.

The authors' README: the KD-student-vs-base comparison isolates what KD did, "especially important when
teacher and student have different architectures"; with the same architecture, the student-vs-teacher
comparison (``residual``) "is also a reasonable way". Which base model a run uses is the scoring loop's
choice (the run's scratch student, or the teacher when the architectures match); :attr:`UniCAM.needs_base_for`
and :meth:`UniCAM.needs_base` say which kinds need one.

Map (Grad-CAM, Selvaraju et al. 2017, eq. 1-2, with ``f`` in place of the class logit; the authors'
``PDC_CAM.get_cam_weights`` / ``get_cam_image``), per image i::

    w_ik = 1/Z sum_hw  d f / d A_ikhw        L_i = ReLU(sum_k w_ik A_ik), bilinearly upsampled to (H, W)

Deviations from the authors' code:

* The target ``Y`` is one-hot labels or class prototypes of the teacher's features of the batch
  (``class_mean``); the authors' maps use fixed class-name embeddings (``ImageNet_Class_Embedding.pt``), which
  cannot be loaded offline (see :func:`xkd.stats.class_target`). ``distilled`` does not use a target.
* The authors min-max scale each map to [0, 1] (``PDC_CAM.scale_cam_image``); xkd returns the ReLU'd map
  unscaled (the same order of pixels within an image).
* The authors' features (``--feature-depth 1``) are the pooled penultimate features, their CAM layer the
  last residual stage; xkd's features default to the explained layer's output (set ``feature_layer`` to the
  pooling module to match them).
* Numerical guards (epsilons, float32) as listed in :mod:`xkd.stats`; the residual map equals the authors'
  ``P_DC`` gradient (tested: to 3e-11 on maps of size ~1e-4, as are ``kd_given_base`` and ``base_given_kd``).
* The residual statistic projects only the explained model's features (semi-partial), as the authors' ``P_DC``
  and RS; the target is not projected.

**Maps depend on the batch.** ``f`` is a statistic over the images of a batch, so an image's map depends
on which other images share its batch (and ``f`` is translation invariant, so the per-image weights of a
channel sum to zero over the batch). Images are processed in chunks of ``batch_size``; a last chunk
smaller than 4 is merged into the previous one. A chunk whose images all have one class has a constant
target and gives all-zero maps of the target kinds (a warning says so): mix classes in each batch. Near
saturation (a residual that already separates the classes almost perfectly) the gradient mostly tightens
the classes, and the maps become weak and less localised (seen on the hand-built test model with class
signals of varying strength).

The teacher (and the base model, where only its features are used) is frozen: it runs in eval mode under
``torch.no_grad`` and only ``torch.autograd.grad`` with respect to the explained layer's activations is
taken (no ``.grad`` is written anywhere). Eval mode of every model is restored afterwards; hooks live for
one forward pass.
"""

from __future__ import annotations

import warnings
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xkd.errors import ConfigError
from xkd.explain.base import Attribution, Explainer, check_inputs
from xkd.models.hooks import capture_features, default_layer, get_module
from xkd.models.state import eval_mode, model_device
from xkd.registry import EXPLAINERS
from xkd.stats import MIN_SAMPLES, class_target, distance_matrix, u_centered, u_correlation, u_residual

KINDS = ("distilled", "residual", "kd_given_base", "base_given_kd")
BASE_KINDS = ("kd_given_base", "base_given_kd")  # kinds that compare the KD student with its base model
TARGET_KINDS = ("residual", "kd_given_base", "base_given_kd")  # kinds that correlate with the class target


def chunk_bounds(n: int, batch_size: int, minimum: int = MIN_SAMPLES) -> list[tuple[int, int]]:
    """``[start, stop)`` of chunks of ``batch_size``; a last chunk smaller than ``minimum`` joins the previous one."""
    bounds = [(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < minimum:
        bounds[-2:] = [(bounds[-2][0], n)]
    return bounds


@EXPLAINERS.register("unicam")
class UniCAM(Explainer):
    """UniCAM maps of ``model`` (a student) paired with a frozen ``teacher`` and, for the kinds in
    :attr:`needs_base_for`, its ``base`` model (see the module docstring).

    Example:
        >>> with UniCAM(student, {"kind": "residual", "batch_size": 32}, teacher=teacher) as uc:
        ...     attribution = uc.explain(images, labels)
        ...     both = uc.explain_pair(images, labels)  # {"distilled": ..., "residual": ...}
        >>> with UniCAM(kd_student, {"kind": "kd_given_base"}, teacher=teacher, base=scratch_student) as uc:
        ...     learned_by_kd = uc.explain(images, labels)
    """

    min_images = MIN_SAMPLES

    needs_teacher = True  # explains a (student, teacher) pair: the pipeline runs it on students only

    #: kinds that need the base model (``base=``: the student's architecture trained without KD)
    needs_base_for: ClassVar[tuple[str, ...]] = BASE_KINDS

    @dataclass
    class Params:
        """UniCAM options.

        Attributes:
            layer: module path of the student's explained layer (None: its default layer).
            teacher_layer: module path of the teacher's features (None: the teacher's default layer).
            feature_layer: student module whose output is the student's features in the statistic (None:
                ``layer`` itself); must run at or after ``layer``.
            kind: ``"residual"`` (R*(P_T(S), Y)), ``"kd_given_base"`` (R*(P_B(S), Y)), ``"base_given_kd"``
                (R*(P_S(B), Y), a map of the base model) or ``"distilled"`` (R*(S, T), xkd's own variant).
            target: class target Y, ``"onehot"`` labels or ``"class_mean"`` prototypes of the teacher's features.
            base_layer: module path of the base model's explained layer for ``base_given_kd`` (None: the
                student's ``layer`` path, as the base has the student's architecture).
            base_feature_layer: base module whose output is the base's features (None: the student's
                ``feature_layer`` path).
            batch_size: images per statistic (>= 4); maps depend on the batch composition.
            relu: apply Grad-CAM's ReLU.
        """

        layer: str | None = None
        teacher_layer: str | None = None
        feature_layer: str | None = None
        kind: Literal["distilled", "residual", "kd_given_base", "base_given_kd"] = "residual"
        target: Literal["onehot", "class_mean"] = "onehot"
        base_layer: str | None = None
        base_feature_layer: str | None = None
        batch_size: int = 64
        relu: bool = True

        def validate(self) -> None:
            if self.batch_size < MIN_SAMPLES:
                raise ConfigError(
                    f"batch_size must be >= {MIN_SAMPLES} for unicam, got {self.batch_size}: the distance "
                    "correlation is a statistic over the images of a batch (U-centring needs n >= 4); use 32-64"
                )
            for name in ("layer", "teacher_layer", "feature_layer", "base_layer", "base_feature_layer"):
                if getattr(self, name) == "":
                    raise ConfigError(f"{name} must be a module path or null, got ''")
            if self.kind not in KINDS:
                allowed = ", ".join(repr(k) for k in KINDS)
                raise ConfigError(f"kind {self.kind!r} is not allowed; allowed values: {allowed}")
            if self.target not in ("onehot", "class_mean"):
                raise ConfigError(f"target {self.target!r} is not allowed; allowed values: 'onehot', 'class_mean'")

    @classmethod
    def needs_base(cls, params: Any) -> bool:
        """Whether an explainer with ``params`` needs ``base=`` (its kind is in :attr:`needs_base_for`).

        ``params``: validated :class:`Params`, the superpixel form's params (which wrap them as ``.inner``),
        a dict, or None (the default kind, ``residual``: no).
        """
        p = getattr(params, "inner", params)
        kind = (p or {}).get("kind", cls.Params.kind) if isinstance(p, dict) or p is None else p.kind
        return kind in cls.needs_base_for

    def __init__(
        self, model: nn.Module, params: Any = None, teacher: nn.Module | None = None, base: nn.Module | None = None
    ) -> None:
        super().__init__(model, params)
        if not isinstance(teacher, nn.Module):
            raise ValueError(
                "unicam explains a (student, teacher) pair: pass the teacher model, "
                "UniCAM(student, params, teacher=teacher_model)"
            )
        p = self.params
        if base is None and p.kind in self.needs_base_for:
            raise ConfigError(
                f"unicam kind {p.kind!r} compares the KD student with its base model (the student's architecture "
                "trained without KD) and got none: pass it as UniCAM(student, params, teacher=teacher, "
                "base=base_model) (the scoring loop passes the run's scratch student, or the teacher when the "
                "architectures match), or use kind 'residual' (student given teacher)"
            )
        if base is not None and not isinstance(base, nn.Module):
            raise ValueError(f"base must be an nn.Module (the base model), got {type(base).__name__}")
        self.teacher = teacher
        self.base = base
        self.layer = p.layer if p.layer is not None else default_layer(model)
        self.module = get_module(model, self.layer)  # unknown layer -> LayerNotFoundError
        self.feature_layer = p.feature_layer if p.feature_layer is not None else self.layer
        self.feature_module = get_module(model, self.feature_layer)
        self.teacher_layer = p.teacher_layer if p.teacher_layer is not None else default_layer(teacher)
        get_module(teacher, self.teacher_layer)
        self.base_layer = p.base_layer if p.base_layer is not None else self.layer
        self.base_feature_layer = p.base_feature_layer if p.base_feature_layer is not None else self.feature_layer
        if base is not None:
            self.base_module = get_module(base, self.base_layer)
            self.base_feature_module = get_module(base, self.base_feature_layer)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def explain(self, images: Tensor, targets: Tensor | None) -> Attribution:
        """Maps of ``params.kind`` for ``images`` ``(N, C, H, W)``, N >= 4, with class ``targets`` ``(N,)``
        (None: the student's predicted classes, for every kind). Returns float32 maps ``(N, H, W)``; for
        ``base_given_kd`` they are maps of the base model's ``base_layer`` (``role="base"``)."""
        return self._explain(images, targets, (self.params.kind,))[self.params.kind]

    def explain_pair(self, images: Tensor, targets: Tensor | None) -> dict[str, Attribution]:
        """Both maps from one forward pass per chunk: ``{"distilled": Attribution, "residual": Attribution}``."""
        return self._explain(images, targets, ("distilled", "residual"))

    def explain_kinds(self, images: Tensor, targets: Tensor | None, kinds: tuple[str, ...]) -> dict[str, Attribution]:
        """Maps of several ``kinds`` from one forward pass of each model per chunk: ``{kind: Attribution}``."""
        unknown = [k for k in kinds if k not in KINDS]
        if unknown:
            raise ValueError(f"unknown unicam kinds {unknown}; kinds: {', '.join(KINDS)}")
        if self.base is None and any(k in self.needs_base_for for k in kinds):
            raise ConfigError("unicam kinds kd_given_base and base_given_kd need the base model: pass base=")
        return self._explain(images, targets, tuple(kinds))

    def _explain(self, images: Tensor, targets: Tensor | None, kinds: tuple[str, ...]) -> dict[str, Attribution]:
        check_inputs(images, targets)
        n = images.shape[0]
        if n < MIN_SAMPLES:
            raise ValueError(
                f"unicam needs at least {MIN_SAMPLES} images, got {n}: its distance correlation is a statistic "
                "over a batch of images; explain the image together with others (e.g. a batch of 32)"
            )
        device = model_device(self.model, images.device)
        out: dict[str, list[Tensor]] = {k: [] for k in kinds}
        with ExitStack() as stack:
            for m in (self.model, self.teacher, self.base):
                if m is not None:
                    stack.enter_context(eval_mode(m))
            one_class: list[Tensor] = []  # per chunk, on the device: read once below, not once per chunk
            for start, stop in chunk_bounds(n, self.params.batch_size):
                chunk = images[start:stop].to(device)
                tgt = None if targets is None else targets[start:stop].to(device).long()
                for k, cam in self._explain_chunk(chunk, tgt, kinds, one_class).items():
                    out[k].append(cam.detach().float().to(images.device))
        uses_target = [k for k in kinds if k in TARGET_KINDS]
        if uses_target and bool(torch.stack(one_class).any()):
            warnings.warn(
                "unicam: all images of a batch have the same class, so the class target is constant and "
                f"the {', '.join(uses_target)} maps of that batch are zero; put images of several classes in each "
                f"batch (unicam.batch_size: {self.params.batch_size})",
                stacklevel=3,
            )
        return {
            k: Attribution(
                torch.cat(v),
                method=self.registry_name,
                layer=self.base_layer if k == "base_given_kd" else self.layer,
                role="base" if k == "base_given_kd" else None,
            )
            for k, v in out.items()
        }

    @staticmethod
    def _frozen_features(model: nn.Module, layer: str, images: Tensor, device: torch.device) -> Tensor:
        """Flattened features of a frozen model's ``layer`` (no graph), on ``device``."""
        m_device = model_device(model, images.device)
        with torch.no_grad(), capture_features(model, [layer], detach=True) as got:
            model(images.to(m_device))
        if layer not in got:
            raise RuntimeError(f"layer {layer!r} was not called in the forward pass of {type(model).__name__}")
        return got[layer].flatten(1).to(device)

    def _grad_forward(
        self, model: nn.Module, names: tuple[str, str], modules: tuple[nn.Module, nn.Module], images: Tensor
    ) -> tuple[Tensor, Tensor, Any]:
        """One forward pass of ``model`` recording a graph from the explained layer's activations (a leaf) to
        its features: returns ``(activations, features, output)``. ``names``/``modules``: (layer, feature layer)."""
        (layer, feature_layer), (module, feature_module) = names, modules
        store: dict[str, Tensor] = {}

        def layer_hook(_module: nn.Module, _inputs: object, output: object) -> Tensor:
            if not isinstance(output, Tensor) or output.ndim != 4:
                shape = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
                raise ValueError(f"layer {layer!r} must output an (N, K, h, w) tensor for a CAM, got {shape}")
            leaf = output.detach().requires_grad_(True)
            store["a"] = leaf
            torch.set_grad_enabled(True)  # record the rest of the forward pass
            return leaf.clone()  # in-place operations after the layer must not touch the leaf

        def feature_hook(_module: nn.Module, _inputs: object, output: object) -> None:
            if isinstance(output, Tensor):
                store["f"] = output

        # registered in this order: when feature_layer == layer, feature_hook sees layer_hook's output
        self._handles += [module.register_forward_hook(layer_hook)]
        self._handles += [feature_module.register_forward_hook(feature_hook)]
        grad_mode = torch.is_grad_enabled()
        try:
            torch.set_grad_enabled(False)  # nothing before the layer needs a graph
            output = model(images.to(model_device(model, images.device)))
        finally:
            torch.set_grad_enabled(grad_mode)
            self.close()
        if "a" not in store:
            raise RuntimeError(f"layer {layer!r} was not called in the forward pass of {type(model).__name__}")
        feats = store.get("f")
        if feats is None or not feats.requires_grad:
            raise ValueError(
                f"feature_layer {feature_layer!r} must output a tensor computed from layer {layer!r} "
                "(at or after it in the forward pass); set feature_layer to null to use the layer itself"
            )
        return store["a"], feats, output

    def _explain_chunk(
        self, images: Tensor, targets: Tensor | None, kinds: tuple[str, ...], one_class: list[Tensor]
    ) -> dict[str, Tensor]:
        """The maps of ``kinds`` for one chunk; appends to ``one_class`` whether its images (when a kind
        uses the class target) are all of one class, as a device tensor (no host sync per chunk)."""
        device = images.device
        acts, feats, logits = self._grad_forward(
            self.model, (self.layer, self.feature_layer), (self.module, self.feature_module), images
        )
        if targets is None:
            if not isinstance(logits, Tensor) or logits.ndim != 2:
                raise ValueError("model must return logits (N, classes) to explain predicted classes; pass targets")
            targets = logits.detach().argmax(dim=1)
        uses_target = [k for k in kinds if k in TARGET_KINDS]
        t_feats = None
        if "distilled" in kinds or "residual" in kinds or (uses_target and self.params.target == "class_mean"):
            t_feats = self._frozen_features(self.teacher, self.teacher_layer, images, device)
        base_acts = b_feats = None
        if "base_given_kd" in kinds:
            names = (self.base_layer, self.base_feature_layer)
            base_acts, b_feats, _ = self._grad_forward(
                self.base, names, (self.base_module, self.base_feature_module), images
            )
            b_feats = b_feats.to(device)  # differentiable: the gradient still reaches base_acts
        elif "kd_given_base" in kinds:
            b_feats = self._frozen_features(self.base, self.base_feature_layer, images, device)
        with torch.enable_grad():
            u_s = u_centered(distance_matrix(feats.flatten(1)))
            stats: dict[str, tuple[Tensor, Tensor]] = {}  # kind -> (statistic, activations it is mapped at)
            u_y = u_t = None
            if uses_target:
                one_class.append((targets == targets[0]).all())
                k = logits.shape[1] if isinstance(logits, Tensor) and logits.ndim == 2 else None
                u_y = u_centered(distance_matrix(class_target(targets, self.params.target, k, t_feats)))
            if t_feats is not None:
                u_t = u_centered(distance_matrix(t_feats))
            if "distilled" in kinds:
                stats["distilled"] = (u_correlation(u_s, u_t), acts)
            if "residual" in kinds:
                stats["residual"] = (u_correlation(u_residual(u_s, u_t), u_y), acts)
            if "kd_given_base" in kinds:
                u_b = u_centered(distance_matrix(b_feats.detach().flatten(1)))
                stats["kd_given_base"] = (u_correlation(u_residual(u_s, u_b), u_y), acts)
            if "base_given_kd" in kinds:
                u_b = u_centered(distance_matrix(b_feats.flatten(1)))
                u_s_frozen = u_centered(distance_matrix(feats.detach().flatten(1)))
                stats["base_given_kd"] = (u_correlation(u_residual(u_b, u_s_frozen), u_y), base_acts)
            cams = {}
            names_ = list(stats)
            for i, name in enumerate(names_):
                f, a = stats[name]
                (g,) = torch.autograd.grad(f, a, retain_graph=i < len(names_) - 1, allow_unused=True)
                g = torch.zeros_like(a) if g is None else g
                cam = (g.mean(dim=(2, 3), keepdim=True) * a.detach()).sum(1, keepdim=True)
                cams[name] = self._finish(cam.to(device), images)
        return cams

    def _finish(self, cam: Tensor, images: Tensor) -> Tensor:
        if self.params.relu:
            cam = F.relu(cam)
        return F.interpolate(cam, size=tuple(images.shape[2:]), mode="bilinear", align_corners=False)[:, 0]

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
