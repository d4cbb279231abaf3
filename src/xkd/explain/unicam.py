"""UniCAM (Adhane et al., "On Explaining Knowledge Distillation: Measuring and Visualising the Knowledge
Transfer Process", 2024): Grad-CAM maps of the *distilled* and *residual* features of a model paired with a
reference model, from the gradient of a (partial) distance correlation.

For a batch of n >= 4 images, ``S`` = the explained model's features (the output of ``feature_layer``,
by default the explained ``layer`` itself, flattened per image), ``T`` = the reference model's features
at ``teacher_layer``, ``Y`` = a class-semantic target of the images (:func:`xkd.stats.class_target`).
With U-centred distance matrices and the statistics of :mod:`xkd.stats`:

* ``kind="distilled"``: ``f = R*(S, T)``, the bias-corrected dCor^2 of the two models' features (= FSS on
  the batch): which of the model's features carry the reference model's knowledge.
* ``kind="residual"``: ``f = R*(P_T(S), Y)``, the correlation with the class target of the model's
  distance matrix with the reference's projected out (Székely & Rizzo 2014, sec. 4.1): where the
  task-relevant features that the reference does not explain are.

Map (Grad-CAM, Selvaraju et al. 2017, eq. 1-2, with ``f`` in place of the class logit), per image i::

    w_ik = 1/Z sum_hw  d f / d A_ikhw        L_i = ReLU(sum_k w_ik A_ik), bilinearly upsampled to (H, W)

Choices the paper's text leaves open (documented, not the authors' code):

* The roles. Adhane et al. (2024, abstract) call *distilled* the features "learned with the Teacher's
  guidance" and *residual* those "irrelevant to the task and ignored by the Student", and compare a KD
  student with its base model (same architecture trained without KD). Both readings are covered by the pair
  ``(model, teacher)``: with the teacher as reference, ``distilled`` shows what the student shares with
  the teacher and ``residual`` what it has on its own that is class-relevant. For the base-model reading,
  ``UniCAM(kd_student, {"kind": "residual"}, teacher=base)`` maps ``S | Base`` (what KD added) and
  ``UniCAM(base, {"kind": "residual"}, teacher=kd_student)`` maps ``Base | S`` (what the KD student dropped).
* The target ``Y`` is one-hot labels or class-mean teacher features of the batch (the authors' CLIP text
  embeddings cannot be loaded offline); ``distilled`` does not use it.
* The residual statistic projects only ``S`` (semi-partial), as RS does; the target is not projected.

**Maps depend on the batch.** ``f`` is a statistic over the images of a batch, so an image's map depends
on which other images share its batch (and ``f`` is translation invariant, so the per-image weights of a
channel sum to zero over the batch). Images are processed in chunks of ``batch_size``; a last chunk
smaller than 4 is merged into the previous one. A chunk whose images all have one class has a constant
target and gives all-zero ``residual`` maps (a warning says so): mix classes in each batch. Near
saturation (a residual that already separates the classes almost perfectly) the gradient mostly tightens
the classes, and the ``residual`` maps become weak and less localised (seen on the hand-built test model
with class signals of varying strength).

The reference model is frozen: it runs in eval mode under ``torch.no_grad`` and only
``torch.autograd.grad`` with respect to the explained layer's activations is taken (no ``.grad`` is
written anywhere). Eval mode of both models is restored afterwards; hooks live for one forward pass.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xkd.errors import ConfigError
from xkd.explain.base import Attribution, Explainer, check_inputs
from xkd.models.hooks import capture_features, default_layer, get_module
from xkd.models.state import eval_mode, model_device
from xkd.registry import EXPLAINERS
from xkd.stats import MIN_SAMPLES, class_target, distance_matrix, u_centered, u_correlation, u_residual

KINDS = ("distilled", "residual")


def chunk_bounds(n: int, batch_size: int, minimum: int = MIN_SAMPLES) -> list[tuple[int, int]]:
    """``[start, stop)`` of chunks of ``batch_size``; a last chunk smaller than ``minimum`` joins the previous one."""
    bounds = [(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < minimum:
        bounds[-2:] = [(bounds[-2][0], n)]
    return bounds


@EXPLAINERS.register("unicam")
class UniCAM(Explainer):
    """UniCAM maps of ``model`` (a student) paired with a frozen ``teacher`` (see the module docstring).

    Example:
        >>> with UniCAM(student, {"kind": "residual", "batch_size": 32}, teacher=teacher) as uc:
        ...     attribution = uc.explain(images, labels)
        ...     both = uc.explain_pair(images, labels)  # {"distilled": ..., "residual": ...}
    """

    min_images = MIN_SAMPLES

    needs_teacher = True  # explains a (student, teacher) pair: the pipeline runs it on students only

    @dataclass
    class Params:
        """UniCAM options.

        Attributes:
            layer: module path of the student's explained layer (None: its default layer).
            teacher_layer: module path of the teacher's features (None: the teacher's default layer).
            feature_layer: student module whose output is the student's features in the statistic (None:
                ``layer`` itself); must run at or after ``layer``.
            kind: ``"distilled"`` (gradient of R*(S, T)) or ``"residual"`` (gradient of R*(P_T(S), Y)).
            target: class target Y, ``"onehot"`` labels or ``"class_mean"`` teacher features of the batch.
            batch_size: images per statistic (>= 4); maps depend on the batch composition.
            relu: apply Grad-CAM's ReLU.
        """

        layer: str | None = None
        teacher_layer: str | None = None
        feature_layer: str | None = None
        kind: Literal["distilled", "residual"] = "residual"
        target: Literal["onehot", "class_mean"] = "onehot"
        batch_size: int = 64
        relu: bool = True

        def validate(self) -> None:
            if self.batch_size < MIN_SAMPLES:
                raise ConfigError(
                    f"batch_size must be >= {MIN_SAMPLES} for unicam, got {self.batch_size}: the distance "
                    "correlation is a statistic over the images of a batch (U-centring needs n >= 4); use 32-64"
                )
            for name in ("layer", "teacher_layer", "feature_layer"):
                if getattr(self, name) == "":
                    raise ConfigError(f"{name} must be a module path or null, got ''")
            if self.kind not in KINDS:
                raise ConfigError(f"kind {self.kind!r} is not allowed; allowed values: 'distilled', 'residual'")
            if self.target not in ("onehot", "class_mean"):
                raise ConfigError(f"target {self.target!r} is not allowed; allowed values: 'onehot', 'class_mean'")

    def __init__(self, model: nn.Module, params: Any = None, teacher: nn.Module | None = None) -> None:
        super().__init__(model, params)
        if not isinstance(teacher, nn.Module):
            raise ValueError(
                "unicam explains a (student, teacher) pair: pass the teacher model, "
                "UniCAM(student, params, teacher=teacher_model)"
            )
        self.teacher = teacher
        p = self.params
        self.layer = p.layer if p.layer is not None else default_layer(model)
        self.module = get_module(model, self.layer)  # unknown layer -> LayerNotFoundError
        self.feature_layer = p.feature_layer if p.feature_layer is not None else self.layer
        self.feature_module = get_module(model, self.feature_layer)
        self.teacher_layer = p.teacher_layer if p.teacher_layer is not None else default_layer(teacher)
        get_module(teacher, self.teacher_layer)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def explain(self, images: Tensor, targets: Tensor | None) -> Attribution:
        """Maps of ``params.kind`` for ``images`` ``(N, C, H, W)``, N >= 4, with class ``targets`` ``(N,)``
        (None: the student's predicted classes). Returns float32 maps ``(N, H, W)``."""
        return self._explain(images, targets, (self.params.kind,))[self.params.kind]

    def explain_pair(self, images: Tensor, targets: Tensor | None) -> dict[str, Attribution]:
        """Both maps from one forward pass per chunk: ``{"distilled": Attribution, "residual": Attribution}``."""
        return self._explain(images, targets, KINDS)

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
        with eval_mode(self.model), eval_mode(self.teacher):
            for start, stop in chunk_bounds(n, self.params.batch_size):
                chunk = images[start:stop].to(device)
                tgt = None if targets is None else targets[start:stop].to(device).long()
                for k, cam in self._explain_chunk(chunk, tgt, kinds).items():
                    out[k].append(cam.detach().float().to(images.device))
        return {k: Attribution(torch.cat(v), method=self.registry_name, layer=self.layer) for k, v in out.items()}

    def _teacher_features(self, images: Tensor, device: torch.device) -> Tensor:
        t_device = model_device(self.teacher, images.device)
        with torch.no_grad(), capture_features(self.teacher, [self.teacher_layer], detach=True) as got:
            self.teacher(images.to(t_device))
        if self.teacher_layer not in got:
            raise RuntimeError(
                f"layer {self.teacher_layer!r} was not called in the forward pass of {type(self.teacher).__name__}"
            )
        return got[self.teacher_layer].flatten(1).to(device)

    def _student_forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        store: dict[str, Tensor] = {}

        def layer_hook(_module: nn.Module, _inputs: object, output: object) -> Tensor:
            if not isinstance(output, Tensor) or output.ndim != 4:
                shape = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
                raise ValueError(f"layer {self.layer!r} must output an (N, K, h, w) tensor for a CAM, got {shape}")
            leaf = output.detach().requires_grad_(True)
            store["a"] = leaf
            torch.set_grad_enabled(True)  # record the rest of the forward pass
            return leaf.clone()  # in-place operations after the layer must not touch the leaf

        def feature_hook(_module: nn.Module, _inputs: object, output: object) -> None:
            if isinstance(output, Tensor):
                store["f"] = output

        # registered in this order: when feature_layer == layer, feature_hook sees layer_hook's output
        self._handles += [self.module.register_forward_hook(layer_hook)]
        self._handles += [self.feature_module.register_forward_hook(feature_hook)]
        grad_mode = torch.is_grad_enabled()
        try:
            torch.set_grad_enabled(False)  # nothing before the layer needs a graph
            logits = self.model(images)
        finally:
            torch.set_grad_enabled(grad_mode)
            self.close()
        if "a" not in store:
            raise RuntimeError(
                f"layer {self.layer!r} was not called in the forward pass of {type(self.model).__name__}"
            )
        feats = store.get("f")
        if feats is None or not feats.requires_grad:
            raise ValueError(
                f"feature_layer {self.feature_layer!r} must output a tensor computed from layer {self.layer!r} "
                "(at or after it in the forward pass); set feature_layer to null to use the layer itself"
            )
        return store["a"], feats, logits

    def _explain_chunk(self, images: Tensor, targets: Tensor | None, kinds: tuple[str, ...]) -> dict[str, Tensor]:
        t_feats = self._teacher_features(images, images.device)
        acts, feats, logits = self._student_forward(images)
        if targets is None:
            if not isinstance(logits, Tensor) or logits.ndim != 2:
                raise ValueError("model must return logits (N, classes) to explain predicted classes; pass targets")
            targets = logits.detach().argmax(dim=1)
        with torch.enable_grad():
            u_s = u_centered(distance_matrix(feats.flatten(1)))
            u_t = u_centered(distance_matrix(t_feats))
            stats: dict[str, Tensor] = {}
            if "distilled" in kinds:
                stats["distilled"] = u_correlation(u_s, u_t)
            if "residual" in kinds:
                if int(targets.unique().numel()) < 2:
                    warnings.warn(
                        "unicam: all images of a batch have the same class, so the class target is constant and "
                        "the residual maps are zero; put images of several classes in each batch",
                        stacklevel=4,
                    )
                k = logits.shape[1] if isinstance(logits, Tensor) and logits.ndim == 2 else None
                y = class_target(targets, self.params.target, k, t_feats)
                stats["residual"] = u_correlation(u_residual(u_s, u_t), u_centered(distance_matrix(y)))
            cams = {}
            names = list(stats)
            for i, name in enumerate(names):
                (g,) = torch.autograd.grad(stats[name], acts, retain_graph=i < len(names) - 1, allow_unused=True)
                g = torch.zeros_like(acts) if g is None else g
                cams[name] = self._finish(
                    (g.mean(dim=(2, 3), keepdim=True) * acts.detach()).sum(1, keepdim=True), images
                )
        return cams

    def _finish(self, cam: Tensor, images: Tensor) -> Tensor:
        if self.params.relu:
            cam = F.relu(cam)
        return F.interpolate(cam, size=tuple(images.shape[2:]), mode="bilinear", align_corners=False)[:, 0]

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
