"""KernelSHAP and LIME with SLIC superpixels as features, batched over many images.

Features are the XDistillation superpixels (:mod:`xkd.explain.superpixel`, SLIC with ``k`` = 19): a
coalition ``z in {0, 1}^M`` keeps superpixel ``s`` of the image where ``z_s = 1`` and replaces it by
the baseline where ``z_s = 0``. ``f(z)`` is the model's probability (``output="prob"``, as shap and
lime explain) or logit of the target class on that perturbed image.

**KernelSHAP** (Lundberg & Lee, NeurIPS 2017, Theorem 2): the Shapley values are the solution of the
weighted linear regression ``min_phi sum_z pi(z) (f(z) - f(0) - sum_s z_s phi_s)^2`` with the Shapley
kernel ``pi(z) = (M - 1) / (C(M, |z|) |z| (M - |z|))``; the empty and full coalitions (infinite
weight) are imposed as the constraint ``sum_s phi_s = f(1) - f(0)`` (efficiency), exactly, as shap
does (captum approximates it with weight 1e6). Coalitions are drawn as shap's ``KernelExplainer``
draws them: whole subset sizes (with their complements) are enumerated from the smallest while the
budget covers their kernel mass, the rest is sampled from the Shapley kernel distribution over sizes
with duplicates merged into weights. When ``2^M <= n_samples`` every coalition is enumerated and the
result is the EXACT Shapley value of each superpixel (of the game ``f(z)``).

**LIME** (Ribeiro et al., KDD 2016, eq. 1-2 with lime_image's choices): ``n_samples - 1`` uniform
random coalitions plus the original image (``z = 1``), weights ``pi(z) = sqrt(exp(-d(z)^2 / w^2))``
with ``d`` the cosine distance from ``z`` to the all-ones vector (``1 - sqrt(|z| / M)``; 1 for the
empty coalition, as sklearn counts it) and ``w = kernel_width = 0.25``, then a weighted ridge
regression with intercept and ``alpha = 1`` (lime's ``Ridge(alpha=1)``; sklearn's weighted-ridge
formula). No feature selection (lime_image keeps all features with its default ``num_features``).

The budget ``n_samples`` has captum's meaning: model evaluations per image, counting the original
image (and, for KernelSHAP, the baseline). Output maps are in "superpixel form": every pixel holds
its superpixel's coefficient (for KernelSHAP: the Shapley value of the whole superpixel; the map's
values are not divided by the superpixel's area).

Speed. The perturbed inputs of ``batch_size`` images are built with ``torch.where`` on the gathered
segment masks, ``internal_batch_size`` at a time, and run through the model in few large no-grad forward
passes; all the regressions of a group are solved together with one batched ``torch.linalg.solve``.
Coalitions depend only on ``(seed, M, n_samples)``, so an image gets the same samples whether it is
explained alone or in a batch (and they are drawn once per distinct ``M``, then cached).

Why not captum / shap / lime (measured with ``bench/perturbation_bench.py``: 2 shared CPU cores,
1 torch thread, process CPU time, best of 3 interleaved rounds; 6 mnist5k digits (shap and
lime_image: 2), the same SLIC segments (M = 15-19), budget 200, zero baseline, probabilities;
ms per image; "limit" = bare no-grad forward passes of the 200 perturbed inputs per image):

=========================  =====  ===========  ======  ======  ========  =====  ==========
model                      limit  xkd KS       captum  shap    xkd LIME  captum lime_image
                                               KS      Kernel            Lime
=========================  =====  ===========  ======  ======  ========  =====  ==========
kdfmv_cnn 1x28x28          282    294 (1.04x)  314     282     259       290    249
cifar_resnet 1x28x28       371    410 (1.11x)  470     417     411       480    453
linear 784->10 (overhead)  0.5    2.5          100     23      2.3       78     35
=========================  =====  ===========  ======  ======  ========  =====  ==========

With real models every library is forward-bound and within ~1.0-1.3x of the limit, so xkd gains only
1.0-1.17x there; its own overhead is ~2 ms per image (200 samples), against captum's 80-100 ms
(Python sampling loop, one sklearn fit per image), shap's 23 ms and lime_image's 35 ms (the linear
row): 9-40x less. Other reasons: captum approximates the efficiency constraint with weight 1e6 and,
given a batch, gives every image the batch's largest ``M`` as feature count; shap's
``shap_values`` selects 10 features by default (``l1_reg="num_features(10)"``); lime_image wants
HWC RGB numpy images. The per-superpixel values agree (Pearson, different random coalitions):
xkd vs shap 0.97-1.00, vs captum 0.92-1.00; LIME vs lime_image 0.95-1.00.

Why normal equations and ``solve`` rather than ``lstsq``: the KernelSHAP constraint is a KKT system
``[[A, 1], [1^T, 0]] [phi, mu] = [b, D]`` which ``solve`` handles directly (``lstsq`` would need the
shap-style elimination of one feature, whose index varies with each image's ``M``); padding images
with fewer superpixels is an identity block. The systems are ``M + 1`` <= ~50 wide and formed in
float64, so squaring the condition number costs nothing measurable; a ridge of ``1e-9 * trace(A) / M``
keeps them non-singular when a small budget leaves a direction unsampled (relative bias ~1e-9).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xkd.errors import ConfigError
from xkd.explain.base import Attribution, Explainer, check_inputs
from xkd.explain.superpixel import SuperpixelParams, slic_segments
from xkd.models.state import eval_mode, model_device
from xkd.registry import EXPLAINERS
from xkd.schema import from_dict

BASELINES = ("zero", "mean", "blur")


@dataclass
class PerturbationParams:
    """Options shared by KernelSHAP and LIME.

    Attributes:
        n_samples: model evaluations per image (captum's meaning: includes the original image and,
            for KernelSHAP, the baseline). Default 1000 = lime_image's ``num_samples``.
        superpixel: SLIC options of the features (:class:`SuperpixelParams`; a mapping in config).
        baseline: what a removed superpixel becomes: ``"zero"``, ``"mean"`` (the image's per-channel
            mean) or ``"blur"`` (the image blurred by a Gaussian of ``blur_sigma`` pixels).
        blur_sigma: standard deviation in pixels of the ``"blur"`` baseline.
        output: explain the target's ``"prob"`` (softmax; shap/lime's choice) or its ``"logit"``.
        batch_size: images whose perturbations are evaluated and solved together.
        internal_batch_size: perturbed inputs per forward pass (bounds memory).
        seed: seed of the coalition sampler.
    """

    n_samples: int = 1000
    superpixel: SuperpixelParams = field(default_factory=SuperpixelParams)
    baseline: Literal["zero", "mean", "blur"] = "mean"
    blur_sigma: float = 3.0
    output: Literal["prob", "logit"] = "prob"
    batch_size: int = 32
    internal_batch_size: int = 256
    seed: int = 0

    def validate(self) -> None:
        if self.n_samples < 2:
            raise ConfigError(
                f"n_samples must be >= 2 (the original image and at least one perturbation), got {self.n_samples}"
            )
        if self.baseline not in BASELINES:
            raise ConfigError(f"baseline {self.baseline!r} is not allowed; allowed values: 'zero', 'mean', 'blur'")
        if self.output not in ("prob", "logit"):
            raise ConfigError(f"output {self.output!r} is not allowed; allowed values: 'prob', 'logit'")
        if self.blur_sigma <= 0:
            raise ConfigError(f"blur_sigma must be > 0 pixels, got {self.blur_sigma}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.internal_batch_size < 1:
            raise ConfigError(f"internal_batch_size must be >= 1, got {self.internal_batch_size}")
        if isinstance(self.superpixel, dict):
            self.superpixel = from_dict(SuperpixelParams, self.superpixel, "superpixel")
        self.superpixel.validate()


def baseline_images(images: Tensor, kind: str, blur_sigma: float = 3.0) -> Tensor:
    """The image every removed superpixel is taken from: zeros, the per-image per-channel mean, or a
    Gaussian blur (separable, ``sigma = blur_sigma`` px, radius ``ceil(3 sigma)``, edges replicated)."""
    if kind == "zero":
        return torch.zeros_like(images)
    if kind == "mean":
        return images.mean(dim=(2, 3), keepdim=True).expand_as(images).contiguous()
    if kind == "blur":
        radius = max(1, math.ceil(3 * blur_sigma))
        t = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
        k = torch.exp(-(t**2) / (2 * blur_sigma**2))
        k = k / k.sum()
        c = images.shape[1]
        x = F.pad(images, (radius, radius, radius, radius), mode="replicate")
        x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
        return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    raise ValueError(f"baseline {kind!r} is not allowed; allowed values: 'zero', 'mean', 'blur'")


# ----------------------------------------------------------------------------------------------
# coalition designs: (Z bool (n, M), kernel weights float64 (n,)), depending only on (seed, M, budget)


def shap_design(m: int, budget: int, seed: int) -> tuple[Tensor, Tensor]:
    """KernelSHAP coalitions for ``m`` features and ``budget`` coalitions (full and empty excluded),
    drawn exactly as ``shap.KernelExplainer.explain`` draws them (complete subset sizes first, then
    kernel-distributed sizes with paired complements; repeated draws add weight). Weights sum to 1."""
    budget = min(budget, 2**m - 2) if m <= 30 else budget
    if m < 2 or budget < 1:
        return torch.zeros(0, m, dtype=torch.bool), torch.zeros(0, dtype=torch.float64)
    rng = np.random.default_rng([seed, m, budget])
    n_sizes = (m - 1 + 1) // 2  # ceil((m-1)/2)
    n_paired = (m - 1) // 2
    weight_vector = np.array([(m - 1.0) / (i * (m - i)) for i in range(1, n_sizes + 1)])
    weight_vector[:n_paired] *= 2
    weight_vector /= weight_vector.sum()
    rows: list[np.ndarray] = []
    weights: list[float] = []
    left = budget
    remaining = weight_vector.copy()
    n_full = 0
    for size in range(1, n_sizes + 1):
        n_subsets = math.comb(m, size) * (2 if size <= n_paired else 1)
        if left * remaining[size - 1] / n_subsets < 1.0 - 1e-8:
            break
        n_full += 1
        left -= n_subsets
        if remaining[size - 1] < 1.0:
            remaining /= 1 - remaining[size - 1]
        w = weight_vector[size - 1] / math.comb(m, size) / (2 if size <= n_paired else 1)
        for inds in itertools.combinations(range(m), size):
            mask = np.zeros(m, dtype=bool)
            mask[list(inds)] = True
            rows.append(mask)
            weights.append(w)
            if size <= n_paired:
                rows.append(~mask)
                weights.append(w)
    n_fixed = len(rows)
    if n_full != n_sizes and left > 0:
        rem = weight_vector.copy()
        rem[:n_paired] /= 2
        rem = rem[n_full:]
        rem /= rem.sum()
        draws = rng.choice(len(rem), 4 * left, p=rem)
        used: dict[bytes, int] = {}
        for ind in draws:
            if left <= 0:
                break
            size = int(ind) + n_full + 1
            mask = np.zeros(m, dtype=bool)
            mask[rng.permutation(m)[:size]] = True
            key = mask.tobytes()
            new = key not in used
            if new:
                used[key] = len(rows)
                left -= 1
                rows.append(mask)
                weights.append(1.0)
            else:
                weights[used[key]] += 1.0
            if left > 0 and size <= n_paired:
                if new:
                    left -= 1
                    rows.append(~mask)
                    weights.append(1.0)
                else:
                    weights[used[key] + 1] += 1.0
        w_left = weight_vector[n_full:].sum()
        sampled = np.asarray(weights[n_fixed:])
        weights[n_fixed:] = list(sampled * (w_left / sampled.sum()))
    return torch.from_numpy(np.stack(rows)), torch.tensor(weights, dtype=torch.float64)


def lime_design(m: int, n: int, seed: int, kernel_width: float) -> tuple[Tensor, Tensor]:
    """LIME's neighbourhood: ``n`` uniform random coalitions (lime_image's ``randint(0, 2)``) and
    their kernel weights ``sqrt(exp(-d^2 / w^2))``, ``d = 1 - sqrt(|z| / m)`` the cosine distance to
    the all-ones vector (1 for the empty coalition, as sklearn's ``pairwise_distances``)."""
    rng = np.random.default_rng([seed, m, n])
    z = torch.from_numpy(rng.integers(0, 2, size=(n, m)).astype(bool))
    return z, lime_kernel(z, kernel_width)


def lime_kernel(z: Tensor, kernel_width: float) -> Tensor:
    """lime_image's kernel of coalitions ``z`` (n, M) against the original (all ones)."""
    d = 1.0 - torch.sqrt(z.double().sum(dim=1) / z.shape[1])
    return torch.sqrt(torch.exp(-(d**2) / kernel_width**2))


# ----------------------------------------------------------------------------------------------
# batched solvers (float64); ``valid`` (B, M) marks each image's real features, padding gets 0


def solve_kernel_shap(z: Tensor, w: Tensor, y: Tensor, delta: Tensor, valid: Tensor) -> Tensor:
    """Constrained weighted least squares of KernelSHAP for a batch of images.

    ``min_phi sum_k w_k (y_k - z_k . phi)^2`` subject to ``sum phi = delta``, solved as the KKT
    system ``[[A + r I, v], [v^T, 0]] [phi; mu] = [Z^T W y; delta]`` with ``A = Z^T W Z``.

    Args:
        z: coalitions (B, n, M) (padded rows carry weight 0). w: weights (B, n). y: ``f(z) - f(0)``
        (B, n). delta: ``f(1) - f(0)`` (B,). valid: (B, M) bool.
    Returns:
        phi (B, M) float64, 0 on padding.
    """
    b, _, m = z.shape
    zf, v = z.double(), valid.double()
    zw = zf * w[..., None]
    a = zw.transpose(1, 2) @ zf
    rhs = (zw.transpose(1, 2) @ y[..., None])[..., 0]
    scale = a.diagonal(dim1=1, dim2=2).sum(dim=1).clamp_min(1e-300) / v.sum(dim=1).clamp_min(1)
    a = a + torch.diag_embed(1e-9 * scale[:, None] * v + (1 - v))
    kkt = torch.zeros(b, m + 1, m + 1, dtype=torch.float64, device=z.device)
    kkt[:, :m, :m] = a
    kkt[:, :m, m] = v
    kkt[:, m, :m] = v
    sol = torch.linalg.solve(kkt, torch.cat([rhs, delta[:, None].double()], dim=1))
    return sol[:, :m] * v


def solve_weighted_ridge(z: Tensor, w: Tensor, y: Tensor, valid: Tensor, alpha: float) -> tuple[Tensor, Tensor]:
    """Weighted ridge regression with intercept, as sklearn's ``Ridge(alpha).fit(z, y, sample_weight=w)``:
    centre ``z`` and ``y`` at their weighted means, solve ``(Zc^T W Zc + alpha I) beta = Zc^T W yc``.

    Returns:
        (coefficients (B, M), intercepts (B,)) in float64; coefficients 0 on padding.
    """
    zf, v, wd, yd = z.double(), valid.double(), w.double(), y.double()
    sw = wd.sum(dim=1, keepdim=True)
    zm = (wd[..., None] * zf).sum(dim=1) / sw
    ym = (wd * yd).sum(dim=1) / sw[:, 0]
    zc = (zf - zm[:, None]) * v[:, None]
    zw = zc * wd[..., None]
    a = zw.transpose(1, 2) @ zc + torch.diag_embed(alpha * v + (1 - v))
    rhs = (zw.transpose(1, 2) @ (yd - ym[:, None])[..., None])[..., 0]
    coef = torch.linalg.solve(a, rhs) * v
    return coef, ym - (zm * coef).sum(dim=1)


# ----------------------------------------------------------------------------------------------


class SuperpixelPerturbation(Explainer):
    """Template of perturbation explainers on superpixel features (batched evaluation and solve).

    Subclasses set ``Params``, :meth:`design` (coalitions and weights for ``M`` features) and
    :meth:`solve`. ``explain(images, targets, segments=None)`` computes SLIC segments unless given.
    """

    map_form = "superpixel"

    #: whether f(baseline) is evaluated as a separate input (KernelSHAP's empty coalition)
    needs_baseline_output: ClassVar[bool] = False

    def __init__(self, model: nn.Module, params: Any = None) -> None:
        super().__init__(model, params)
        self._designs: dict[int, tuple[Tensor, Tensor]] = {}

    def design(self, m: int) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def solve(self, z: Tensor, w: Tensor, y: Tensor, fx: Tensor, fb: Tensor, valid: Tensor) -> Tensor:
        raise NotImplementedError

    def _design(self, m: int) -> tuple[Tensor, Tensor]:
        if m not in self._designs:
            self._designs[m] = self.design(m)
        return self._designs[m]

    def explain(self, images: Tensor, targets: Tensor | None, segments: Tensor | None = None) -> Attribution:
        """Superpixel-form maps (N, H, W) for ``targets`` (None: the predicted class).

        Args:
            images: (N, C, H, W); SLIC needs C in (1, 3) unless ``segments`` is given.
            targets: class indices (N,) or None.
            segments: optional integer labels (N, H, W) to use as features instead of SLIC (any
                labels; relabelled to 0..M-1 per image).
        """
        check_inputs(images, targets)
        segments = self._segments(images, segments)
        device = model_device(self.model, images.device)
        p = self.params
        out = []
        with eval_mode(self.model), torch.no_grad():
            for start in range(0, images.shape[0], p.batch_size):
                sl = slice(start, start + p.batch_size)
                tgt = None if targets is None else targets[sl].to(device).long()
                maps = self._explain_group(images[sl].to(device), tgt, segments[sl].to(device))
                out.append(maps.to(images.device))
        maps = torch.cat(out) if out else images.new_zeros((0, *images.shape[2:]), dtype=torch.float32)
        return Attribution(maps, method=self.registry_name)

    def _segments(self, images: Tensor, segments: Tensor | None) -> Tensor:
        if segments is None:
            return slic_segments(images, self.params.superpixel)
        expected = (images.shape[0], *images.shape[2:])
        if tuple(segments.shape) != expected or segments.dtype.is_floating_point or segments.dtype == torch.bool:
            raise ValueError(
                f"segments must be integer labels of shape {expected} (N, H, W), got {segments.dtype} "
                f"{tuple(segments.shape)}; pass None to compute SLIC superpixels"
            )
        flat = segments.detach().cpu().long().flatten(1)
        return torch.stack([torch.unique(s, return_inverse=True)[1] for s in flat]).view(expected)

    def _scores(self, logits: Tensor) -> Tensor:
        if not isinstance(logits, Tensor) or logits.ndim != 2:
            shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
            raise ValueError(f"model must return logits of shape (N, classes), got {shape}")
        logits = logits.float()
        return logits.softmax(dim=1) if self.params.output == "prob" else logits

    def _forward(self, x: Tensor) -> Tensor:
        return torch.cat([self._scores(self.model(c)) for c in x.split(self.params.internal_batch_size)])

    def _explain_group(self, x: Tensor, targets: Tensor | None, seg: Tensor) -> Tensor:
        b, _, h, wd = x.shape
        p = self.params
        base = baseline_images(x, p.baseline, p.blur_sigma)
        seg = seg.flatten(1)
        ms = (seg.amax(dim=1) + 1).tolist()
        m_max = max(ms)
        first = self._forward(torch.cat([x, base]) if self.needs_baseline_output else x)
        if targets is None:
            targets = first[:b].argmax(dim=1)
        picked = first.gather(1, torch.cat([targets, targets])[: first.shape[0], None])[:, 0]
        fx, fb = picked[:b], picked[b:]
        designs = [self._design(m) for m in ms]
        n_max = max(len(d[0]) for d in designs)
        z = torch.zeros(b, n_max, m_max, dtype=torch.bool)
        w = torch.zeros(b, n_max, dtype=torch.float64)
        for i, (zi, wi) in enumerate(designs):
            z[i, : len(zi), : zi.shape[1]] = zi
            w[i, : len(wi)] = wi
        z, w = z.to(x.device), w.to(x.device)
        rows = torch.tensor([len(d[0]) for d in designs], device=x.device)
        used = torch.arange(n_max, device=x.device)[None] < rows[:, None]
        valid = torch.arange(m_max, device=x.device)[None] < torch.tensor(ms, device=x.device)[:, None]
        full = (z | ~valid[:, None, :]).all(dim=2) & used  # the original image (LIME's row 0): f(x) is known
        flat = (used & ~full).flatten().nonzero()[:, 0]  # (image, row) pairs to evaluate, image-major
        y = torch.where(full, fx[:, None], torch.zeros((), device=x.device)).flatten()
        z_flat = z.view(b * n_max, m_max)
        for idx in flat.split(p.internal_batch_size):
            img = idx // n_max
            keep = z_flat.index_select(0, idx).gather(1, seg.index_select(0, img))  # (c, H*W): pixel kept?
            inputs = torch.where(keep.view(-1, 1, h, wd), x.index_select(0, img), base.index_select(0, img))
            scores = self._scores(self.model(inputs))
            y[idx] = scores.gather(1, targets.index_select(0, img)[:, None])[:, 0]
        y = y.view(b, n_max)
        coef = self.solve(z, w, y.double(), fx.double(), fb.double(), valid)
        return coef.gather(1, seg).float().view(b, h, wd)


@EXPLAINERS.register("kernel_shap")
class KernelSHAP(SuperpixelPerturbation):
    """KernelSHAP on SLIC superpixels (Lundberg & Lee 2017, Theorem 2), efficiency enforced exactly.

    Each pixel's value is the Shapley value of its whole superpixel; the values of an image sum over
    superpixels to ``f(x) - f(baseline)``. Exact when ``2^M <= n_samples``.

    Example:
        >>> with KernelSHAP(model, {"n_samples": 500, "baseline": "zero"}) as ks:
        ...     maps = ks.explain(images, labels).maps
    """

    needs_baseline_output = True

    @dataclass
    class Params(PerturbationParams):
        """KernelSHAP options: see :class:`PerturbationParams` (the full and empty coalitions count
        in ``n_samples``, as in captum)."""

        def validate(self) -> None:
            if self.n_samples < 3:
                raise ConfigError(
                    "n_samples must be >= 3 for kernel_shap (the image, the baseline and one coalition), "
                    f"got {self.n_samples}"
                )
            super().validate()

    def design(self, m: int) -> tuple[Tensor, Tensor]:
        return shap_design(m, self.params.n_samples - 2, self.params.seed)

    def solve(self, z: Tensor, w: Tensor, y: Tensor, fx: Tensor, fb: Tensor, valid: Tensor) -> Tensor:
        return solve_kernel_shap(z, w, y - fb[:, None], fx - fb, valid)


@EXPLAINERS.register("lime")
class LIME(SuperpixelPerturbation):
    """LIME on SLIC superpixels (Ribeiro et al. 2016; lime_image's kernel and ``Ridge(alpha=1)``).

    Each pixel's value is its superpixel's coefficient in the weighted ridge surrogate.

    Example:
        >>> with LIME(model, {"n_samples": 500}) as lime:
        ...     maps = lime.explain(images, labels).maps
    """

    @dataclass
    class Params(PerturbationParams):
        """LIME options: see :class:`PerturbationParams`, plus

        Attributes:
            kernel_width: width ``w`` of the exponential kernel on the cosine distance (lime_image: 0.25).
            alpha: ridge penalty of the surrogate (lime: ``Ridge(alpha=1)``; 0 is plain weighted least squares).
        """

        kernel_width: float = 0.25
        alpha: float = 1.0

        def validate(self) -> None:
            if self.kernel_width <= 0:
                raise ConfigError(f"kernel_width must be > 0, got {self.kernel_width}")
            if self.alpha < 0:
                raise ConfigError(f"alpha (ridge penalty) must be >= 0, got {self.alpha}")
            super().validate()

    def design(self, m: int) -> tuple[Tensor, Tensor]:
        p = self.params
        z, w = lime_design(m, p.n_samples - 1, p.seed, p.kernel_width)
        ones = torch.ones(1, m, dtype=torch.bool)  # the original image, row 0 as in lime_image
        return torch.cat([ones, z]), torch.cat([lime_kernel(ones, p.kernel_width), w])

    def solve(self, z: Tensor, w: Tensor, y: Tensor, fx: Tensor, fb: Tensor, valid: Tensor) -> Tensor:
        return solve_weighted_ridge(z, w, y, valid, self.params.alpha)[0]
