"""Input-gradient explainers: Integrated Gradients, GradientSHAP (expected gradients) and DeepSHAP.

* ``integrated_gradients`` -- Sundararajan et al., ICML 2017, eq. 1 (path integral from a baseline
  ``x'`` to the image ``x``)::

      IG_i(x) = (x_i - x'_i) * int_0^1 dF(x' + a (x - x')) / dx_i da

  computed by ``captum.attr.IntegratedGradients`` (``n_steps`` quadrature points of ``method``).
  Completeness (their Proposition 1): ``sum_i IG_i = F(x) - F(x')`` up to the quadrature error.
* ``gradient_shap`` -- expected gradients (Erion et al., Nature MI 2021, eq. 4; Lundberg & Lee, NeurIPS
  2017, "GradientExplainer"), the estimator of ``captum.attr.GradientShap``::

      EG_i(x) = E_{x' ~ D, a ~ U(0,1), e ~ N(0, stdevs^2)} [ (x~_i - x'_i) dF(x' + a (x~ - x')) / dx_i ],  x~ = x + e

  averaged over ``n_samples`` draws per image. Own vectorised implementation (not captum's): captum
  draws every image's baselines from ONE pool shared by the batch (so per-image baselines such as
  ``"mean"`` or ``"blur"`` are impossible) and seeds through the global numpy and torch generators.
  Here each image has its own baseline distribution and its own ``torch.Generator`` seeded with
  ``(seed, index of the image in the explain call)``, so results do not depend on ``batch_size`` and
  the global random state is untouched. Its expectation is checked against captum's IG in the tests.
* ``deep_shap`` -- DeepSHAP (Lundberg & Lee, NeurIPS 2017, sec. 4.2: DeepLIFT's rescale rule averaged
  over a background set) via the optional ``shap`` library's ``DeepExplainer``. For a network of
  supported modules (``nn.ReLU``, ``nn.Conv2d``, ``nn.Linear``, pooling, batch norm) it is additive:
  ``sum_i phi_i(x) = F(x) - E_b[F(b)]``. Functional activations (``F.relu`` inside ``forward``)
  are invisible to shap's module hooks and break additivity.

Maps are the attribution summed over channels, **signed** (negative = evidence against the class; no
``abs``: the pipeline decides how to normalise). Baselines are chosen by name (:func:`make_baselines`):

* ``"zero"``: all zeros.
* ``"mean"``: each image's per-channel mean (a flat image of the same colour).
* ``"blur"``: the image blurred by a Gaussian of std ``sigma`` pixels (Fong & Vedaldi 2017 style).
* ``"uniform"``: seeded uniform noise within the image's per-channel [min, max].
* ``"batch"`` (``gradient_shap`` and ``deep_shap`` only): images drawn (seeded, without replacement)
  from the images passed to ``explain`` -- a stand-in for the data distribution of expected gradients.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from xkd.errors import ConfigError
from xkd.explain.base import Attribution, Explainer, check_inputs
from xkd.models.state import eval_mode, model_device
from xkd.registry import EXPLAINERS

BASELINES = ("zero", "mean", "blur", "uniform")
IG_METHODS = ("gausslegendre", "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid")


def gaussian_blur(images: Tensor, sigma: float) -> Tensor:
    """``images`` (N, C, H, W) blurred by a separable Gaussian of std ``sigma`` (kernel radius
    ``ceil(3 sigma)``, replicate padding so small images and large ``sigma`` work)."""
    if sigma <= 0:
        return images.clone()
    radius = max(1, math.ceil(3 * sigma))
    k = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    k = torch.exp(-0.5 * (k / sigma) ** 2)
    k = k / k.sum()
    n, c, h, w = images.shape
    x = images.reshape(n * c, 1, h, w)
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), k.view(1, 1, -1, 1))
    return x.reshape(n, c, h, w)


def image_generator(seed: int, index: int, device: torch.device | str = "cpu") -> torch.Generator:
    """Generator of image ``index`` of an explain call, on ``device``: independent of batching, global
    RNG untouched. Draws happen where the images are (no host-side noise copied to the GPU); a CUDA
    generator gives other numbers than a CPU one of the same seed, so maps of the random explainers
    differ between devices by their sampling noise."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + index)


def make_baselines(
    images: Tensor, kind: str, sigma: float = 5.0, seed: int = 0, count: int = 1, start: int = 0
) -> Tensor:
    """Baselines ``(N, count, C, H, W)`` for ``images`` (N, C, H, W) chosen by name (module docstring).

    ``start`` is the index of ``images[0]`` in the whole explain call (seeds the per-image generators).
    Deterministic kinds (``zero``, ``mean``, ``blur``) repeat one baseline ``count`` times.
    """
    if kind == "zero":
        base = torch.zeros_like(images)
    elif kind == "mean":
        base = images.mean(dim=(2, 3), keepdim=True).expand_as(images)
    elif kind == "blur":
        base = gaussian_blur(images, sigma)
    elif kind == "uniform":
        lo = images.amin(dim=(2, 3), keepdim=True)
        hi = images.amax(dim=(2, 3), keepdim=True)
        dev = images.device
        u = torch.stack(
            [
                torch.rand((count, *images.shape[1:]), generator=image_generator(seed, start + i, dev), device=dev)
                for i in range(len(images))
            ]
        ).to(images.dtype)
        return lo[:, None] + (hi - lo)[:, None] * u
    else:
        raise ConfigError(f"baseline {kind!r} is not allowed; allowed values: {', '.join(map(repr, BASELINES))}")
    return base[:, None].expand(-1, count, -1, -1, -1)


def _validate_common(p: object, kinds: tuple[str, ...]) -> None:
    if p.batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {p.batch_size}")
    if p.baseline not in kinds:
        raise ConfigError(f"baseline {p.baseline!r} is not allowed; allowed values: {', '.join(map(repr, kinds))}")
    if p.sigma <= 0:
        raise ConfigError(f"sigma (blur baseline std in pixels) must be > 0, got {p.sigma}")


class _InputExplainer(Explainer):
    """Shared loop: eval mode, device, batching by ``batch_size``, targets None = predicted class."""

    def explain(self, images: Tensor, targets: Tensor | None) -> Attribution:
        """Signed maps ``(N, H, W)`` (attribution summed over channels) for class ``targets`` (None: predicted)."""
        check_inputs(images, targets)
        device = model_device(self.model, images.device)
        out = []
        with eval_mode(self.model):
            self._prepare(images.to(device))
            for start in range(0, images.shape[0], self.params.batch_size):
                chunk = images[start : start + self.params.batch_size].to(device)
                if targets is None:
                    with torch.no_grad():
                        tgt = self.model(chunk).argmax(dim=1)
                else:
                    tgt = targets[start : start + self.params.batch_size].to(device).long()
                attr = self._attribute(chunk.detach(), tgt, start)
                out.append(attr.detach().sum(dim=1).float().to(images.device))
        maps = torch.cat(out) if out else images.new_zeros((0, *images.shape[2:]), dtype=torch.float32)
        return Attribution(maps, method=self.registry_name)

    def _prepare(self, images: Tensor) -> None:
        """Hook for state that depends on all images of the call (e.g. a background set)."""

    def _attribute(self, images: Tensor, targets: Tensor, start: int) -> Tensor:
        raise NotImplementedError


@EXPLAINERS.register("integrated_gradients")
class IntegratedGradients(_InputExplainer):
    """Integrated Gradients (Sundararajan et al. 2017, eq. 1) by ``captum.attr.IntegratedGradients``;
    map = attribution summed over channels (signed).

    Example:
        >>> maps = IntegratedGradients(model, {"baseline": "blur", "n_steps": 32}).explain(x, y).maps
    """

    @dataclass
    class Params:
        """Integrated-gradients options.

        Attributes:
            baseline: ``"zero"``, ``"mean"``, ``"blur"`` or ``"uniform"`` (module docstring).
            sigma: std in pixels of the ``"blur"`` baseline.
            n_steps: quadrature points of the path integral.
            method: captum's quadrature rule (``gausslegendre`` or ``riemann_*``).
            batch_size: images per call to captum.
            internal_batch_size: (image, step) rows per forward pass (None: all ``batch_size * n_steps``
                at once); must be >= 2 * batch_size (captum evaluates at least 2 steps per pass).
            seed: seed of the ``"uniform"`` baseline.
        """

        baseline: Literal["zero", "mean", "blur", "uniform"] = "zero"
        sigma: float = 5.0
        n_steps: int = 50
        method: Literal["gausslegendre", "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid"] = (
            "gausslegendre"
        )
        batch_size: int = 16
        internal_batch_size: int | None = 256
        seed: int = 0

        def validate(self) -> None:
            _validate_common(self, BASELINES)
            if self.n_steps < 2:
                raise ConfigError(f"n_steps must be >= 2, got {self.n_steps}")
            if self.method not in IG_METHODS:
                raise ConfigError(f"method {self.method!r} is not allowed; allowed values: {', '.join(IG_METHODS)}")
            if self.internal_batch_size is not None and self.internal_batch_size < 2 * self.batch_size:
                raise ConfigError(
                    f"internal_batch_size ({self.internal_batch_size}) must be >= 2 * batch_size "
                    f"({2 * self.batch_size}) or null; lower batch_size or raise internal_batch_size"
                )

    def _attribute(self, images: Tensor, targets: Tensor, start: int) -> Tensor:
        from captum.attr import IntegratedGradients as CaptumIG

        p = self.params
        base = make_baselines(images, p.baseline, p.sigma, p.seed, 1, start)[:, 0]
        with torch.enable_grad():
            attr = CaptumIG(self.model).attribute(
                images,
                baselines=base,
                target=targets,
                n_steps=p.n_steps,
                method=p.method,
                internal_batch_size=p.internal_batch_size,
            )
        if p.method == "riemann_trapezoid":
            # captum 0.9 bug: trapezoid nodes linspace(0, 1, n) (spacing 1/(n-1)) but weights 1/n (ends 1/2n),
            # which sum to (n-1)/n: every attribution is too small by that factor (measured exactly 1/8 low
            # with n = 8 on a linear model). Rescaling gives the trapezoid rule.
            attr = attr * (p.n_steps / (p.n_steps - 1))
        return attr


@EXPLAINERS.register("gradient_shap")
class GradientSHAP(_InputExplainer):
    """GradientSHAP / expected gradients (Erion et al. 2021, eq. 4), the estimator of captum's
    ``GradientShap`` with per-image baseline distributions (module docstring); map = attribution
    summed over channels (signed). Each image's baseline distribution is ``n_baselines`` baselines
    of kind ``baseline`` (one distinct baseline for the deterministic kinds ``zero``/``mean``/``blur``,
    where the method is a Monte-Carlo IG with input noise ``stdevs``; ``uniform`` draws
    ``n_baselines`` noise images; ``batch`` draws ``n_baselines`` of the explained images).
    """

    @dataclass
    class Params:
        """GradientSHAP options.

        Attributes:
            baseline: ``"zero"``, ``"mean"``, ``"blur"``, ``"uniform"`` or ``"batch"`` (module docstring).
            n_baselines: size of each image's baseline distribution (``uniform``, ``batch``).
            sigma: std in pixels of the ``"blur"`` baseline.
            n_samples: draws (baseline, alpha, noise) per image.
            stdevs: std of the Gaussian noise added to the image for every draw (0: none).
            batch_size: images per chunk.
            internal_batch_size: gradient evaluations (image x draw) per forward pass.
            seed: seed of every random draw.
        """

        baseline: Literal["zero", "mean", "blur", "uniform", "batch"] = "uniform"
        n_baselines: int = 10
        sigma: float = 5.0
        n_samples: int = 20
        stdevs: float = 0.0
        batch_size: int = 16
        internal_batch_size: int = 256
        seed: int = 0

        def validate(self) -> None:
            _validate_common(self, (*BASELINES, "batch"))
            for name in ("n_baselines", "n_samples", "internal_batch_size"):
                if getattr(self, name) < 1:
                    raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
            if self.stdevs < 0:
                raise ConfigError(f"stdevs must be >= 0, got {self.stdevs}")

    def _prepare(self, images: Tensor) -> None:
        self._all = images if self.params.baseline == "batch" else None

    def _attribute(self, images: Tensor, targets: Tensor, start: int) -> Tensor:
        p = self.params
        n, s = images.shape[0], p.n_samples
        dev = images.device
        gens = [image_generator(p.seed, start + i, dev) for i in range(n)]
        if p.baseline == "batch":
            pool = self._all
            pick = torch.stack([torch.randperm(len(pool), generator=g, device=dev)[: p.n_baselines] for g in gens])
            dist = pool[pick.to(pool.device)]  # (n, min(B, N), C, H, W)
        else:
            count = p.n_baselines if p.baseline == "uniform" else 1
            dist = make_baselines(images, p.baseline, p.sigma, p.seed, count, start)
            # make_baselines consumed fresh generators of the same seeds; draw the samples from new ones
            gens = [image_generator(p.seed + 7919, start + i, dev) for i in range(n)]
        idx = torch.stack([torch.randint(dist.shape[1], (s,), generator=g, device=dev) for g in gens])
        alpha = torch.stack([torch.rand(s, generator=g, device=dev) for g in gens]).to(images.dtype)
        x = images[:, None].expand(-1, s, -1, -1, -1)
        if p.stdevs > 0:
            noise = torch.stack([torch.randn((s, *images.shape[1:]), generator=g, device=dev) for g in gens])
            noise = noise.to(images.dtype)
            x = x + p.stdevs * noise
        base = torch.gather(dist, 1, idx.view(n, s, 1, 1, 1).expand(-1, -1, *images.shape[1:]))
        delta = (x - base).reshape(n * s, *images.shape[1:])
        points = base.reshape(n * s, *images.shape[1:]) + alpha.view(-1, 1, 1, 1) * delta
        tgt = targets.repeat_interleave(s)
        grads = torch.empty_like(points)
        for lo in range(0, n * s, p.internal_batch_size):
            hi = lo + p.internal_batch_size
            pt = points[lo:hi].detach().requires_grad_(True)
            with torch.enable_grad():
                out = self.model(pt).gather(1, tgt[lo:hi, None]).sum()
                (grads[lo:hi],) = torch.autograd.grad(out, pt)
        return (grads * delta).view(n, s, *images.shape[1:]).mean(dim=1)


@EXPLAINERS.register("deep_shap")
class DeepSHAP(_InputExplainer):
    """DeepSHAP (Lundberg & Lee 2017, sec. 4.2) by the optional ``shap`` library's ``DeepExplainer``;
    map = SHAP values summed over channels (signed). Needs ``pip install 'xkd[shap]'``.

    Quirks handled here: shap's rules need non-inplace activations, so the model is deep-copied and
    every ``ReLU(inplace=True)`` of the copy is made non-inplace (the user's model is untouched, also
    its hooks); ``shap_values(..., ranked_outputs=1)`` fails with this shap version, so the values
    of ALL outputs are computed (one backward pass per image and class, over ``2 * n_background``
    rows) and each image's target class is selected. Background (shared by all images of the call):

    * ``"zero"``: one all-zero image (DeepLIFT rescale with a zero reference).
    * ``"batch"``: ``n_background`` images drawn with ``seed`` (without replacement) from the images
      passed to ``explain`` -- pass a representative batch.
    """

    requires = (("shap", "shap"),)

    @dataclass
    class Params:
        """DeepSHAP options.

        Attributes:
            background: ``"zero"`` or ``"batch"`` (class docstring).
            n_background: size of the ``"batch"`` background.
            batch_size: images per call to shap.
            check_additivity: let shap assert ``sum phi = F(x) - E[F(b)]`` (fails loudly on models
                with functional activations).
            seed: seed of the background draw.
        """

        background: Literal["zero", "batch"] = "batch"
        n_background: int = 16
        batch_size: int = 16
        check_additivity: bool = False
        seed: int = 0

        def validate(self) -> None:
            if self.background not in ("zero", "batch"):
                raise ConfigError(f"background {self.background!r} is not allowed; allowed values: 'zero', 'batch'")
            if self.n_background < 1:
                raise ConfigError(f"n_background must be >= 1, got {self.n_background}")
            if self.batch_size < 1:
                raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")

    def _prepare(self, images: Tensor) -> None:
        try:
            import shap
        except ImportError as e:
            raise ImportError("deep_shap needs the optional 'shap' package: pip install 'xkd[shap]'") from e
        p = self.params
        if p.background == "zero":
            background = torch.zeros_like(images[:1])
        else:
            pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(p.seed))[: p.n_background]
            background = images[pick.to(images.device)]
        self._copy = copy.deepcopy(self.model).eval()
        for m in self._copy.modules():
            if hasattr(m, "inplace") and m.inplace:
                m.inplace = False
        for m in self._copy.modules():  # hooks of the user's model are not shap's business
            m._forward_hooks.clear()
            m._forward_pre_hooks.clear()
            m._backward_hooks.clear()
        self._background = background.detach()
        with torch.no_grad():
            self._shap = shap.DeepExplainer(self._copy, self._background)

    def _attribute(self, images: Tensor, targets: Tensor, start: int) -> Tensor:
        with torch.enable_grad():
            values = self._shap.shap_values(images, check_additivity=self.params.check_additivity)
        values = torch.as_tensor(values, dtype=torch.float32, device=images.device)  # (N, C, H, W, classes)
        return values[torch.arange(len(images), device=images.device), ..., targets]

    def close(self) -> None:
        self._copy = self._shap = self._background = None
