"""ROAD -- Rong et al., "A Consistent and Efficient Evaluation Strategy for Attribution Methods"
(Remove And Debias), ICML 2022: removed pixels are filled by noisy linear imputation
(:func:`linear_imputation`) instead of a constant, so the perturbed images stay close to the data
and the score measures the attribution rather than the model's reaction to out-of-distribution
holes. Pixels are ranked by :func:`xkd.metrics.ranking.saliency_ranks`, ties in a seeded random
order (``tie_seed``): an index tie-break would make the LeRF mask of a map with flat regions (a
Grad-CAM's zeros) a band of rows, the mask-shape leak ROAD removes (see :mod:`xkd.metrics.ranking`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from scipy.sparse import coo_matrix
from scipy.sparse.linalg import spsolve
from torch import Tensor, nn

from xkd.metrics.base import Column, headline, metric
from xkd.metrics.ranking import check_maps, saliency_ranks, tie_permutation
from xkd.models.state import eval_mode, model_device

# ROAD's neighbour weights (Rong et al. 2022, §4.2; the reference code's ``NoisyLinearImputer``):
# straight neighbours 1/6, diagonal ones 1/12 (they sum to 1); the 4-neighbour variant weighs each 1/4.
_NEIGHBOURS = {
    8: ((-1, -1, 1 / 12), (-1, 0, 1 / 6), (-1, 1, 1 / 12), (0, -1, 1 / 6), (0, 1, 1 / 6), (1, -1, 1 / 12))
    + ((1, 0, 1 / 6), (1, 1, 1 / 12)),
    4: ((-1, 0, 0.25), (0, -1, 0.25), (0, 1, 0.25), (1, 0, 0.25)),
}


def linear_imputation(
    images: Tensor,
    removed: Tensor,
    noise: float = 0.01,
    neighbours: Literal[4, 8] = 8,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    backend: Literal["torch", "scipy"] = "torch",
    tol: float = 1e-7,
    max_iter: int = 5000,
) -> Tensor:
    """ROAD's noisy linear imputation (Rong et al. 2022, §4.2, eq. 4-5): every removed pixel becomes
    the weighted mean of its in-image neighbours, kept pixels stay fixed, then Gaussian noise is added.

    For each removed pixel ``i`` with in-image neighbours ``N(i)`` (weights ``w_ij``, 1/6 straight and
    1/12 diagonal)::

        sum_{j in N(i)} w_ij (x_i - x_j) = 0,    i.e.  x_i = sum_j w_ij x_j / sum_j w_ij

    a sparse linear system in the removed pixels (the kept ``x_j`` move to the right-hand side); then
    ``x_i += noise * eps``, ``eps ~ N(0, 1)``. The mask is the same for every channel. A linear function
    of the pixel coordinates satisfies these equations exactly away from the image border, so imputing
    a ramp gives the ramp back (plus the noise).

    The matrix (left form, not divided by ``sum_j w_ij``) is ``A = D - W`` restricted to the removed
    pixels: ``W`` holds the symmetric, direction-constant weights, border pixels simply have fewer
    terms and ``D_ii = sum_{j in N(i)} w_ij``. So ``A`` is symmetric, and positive definite when every
    removed region touches a kept pixel (a Dirichlet graph Laplacian) -- which fails only when a whole
    image is removed (a region touching no kept pixel is closed under adjacency, hence the whole grid).

    Backends:

    - ``"torch"`` (default): Jacobi-preconditioned conjugate gradient on ``A``, batched over every
      image and channel, on the images' device (the CPU for MPS, which has no float64), each product
      ``A p`` a masked 3x3 stencil (shifted adds; ``F.conv2d`` in float64 was 15x slower). Mixed
      precision: CG runs in float32, the residual ``b - A u`` is recomputed in float64 and the
      correction re-solved (iterative refinement) until ``||b - A u|| <= tol ||b||`` per system;
      converged systems leave the batch. ``tol = 1e-7`` keeps the result within ~1e-6 of the
      exact solution on 28x28 images (``1e-6`` allowed up to 9e-6 at 90 % removal).
    - ``"scipy"``: the exact reference, one block-diagonal sparse matrix solved by
      :func:`scipy.sparse.linalg.spsolve`. It was written vectorised rather than taken from quantus 0.6
      (``noisy_linear_imputation``, which fills a ``lil_matrix`` in Python image by image): 64 images
      1x28x28, half the pixels removed, 0.19 s vs quantus 0.76 s, same values (max difference 4e-16).

    Measured (ROAD masks of 64 1x28x28 images, 9 percentages x MoRF/LeRF = 1152 systems, one torch
    thread, machine shared, load ~2.5 on 2 cores, min of 3): scipy 21-30 ms per image, torch 4.0-6.6 ms
    per image, max |torch - scipy| 1.1e-6 (tol 1e-7; 1.2e-5 at tol 1e-6, 1.2e-7 at 1e-8). Per system
    CG needs ~25 float32 iterations (up to ~65 at 90 % MoRF) plus ~13 after one refinement. With two
    torch threads both backends slow down several-fold on this shared machine (thread contention).

    Args:
        images: ``(N, C, H, W)``.
        removed: boolean ``(N, H, W)``, True where a pixel is removed.
        noise: standard deviation of the added noise, in the images' units (the reference default 0.01).
        neighbours: 8 (the paper's weights) or 4 (equal weights 1/4).
        generator: noise source: one generator, or one per image (results independent of batching).
        backend: ``"torch"`` (batched CG, default) or ``"scipy"`` (exact sparse solve).
        tol: ``"torch"`` only: relative residual ``||b - A u|| / ||b||`` to reach in every system.
        max_iter: ``"torch"`` only: most CG iterations per system.

    Returns:
        The imputed images, same shape, dtype and device as ``images``.

    Raises:
        ValueError: when a connected removed region touches no kept pixel (i.e. a whole image is removed):
            its values are undetermined.
        RuntimeError: when CG does not reach ``tol`` within ``max_iter`` iterations.
    """
    if images.ndim != 4 or removed.shape != (images.shape[0], *images.shape[2:]):
        raise ValueError(f"removed {tuple(removed.shape)} must be (N, H, W) for images {tuple(images.shape)}")
    if neighbours not in _NEIGHBOURS:
        raise ValueError(f"neighbours must be 4 or 8, got {neighbours}")
    if backend not in ("torch", "scipy"):
        raise ValueError(f"backend must be 'torch' or 'scipy', got {backend!r}")
    n, c, h, w = images.shape
    # the torch solver runs where the images are (float64 residuals: not on MPS, which lacks float64)
    solve_on = images.device if backend == "torch" and images.device.type != "mps" else torch.device("cpu")
    r = removed.detach().to(solve_on).bool()
    if not bool(r.any()):
        return images.clone()
    if bool(r.flatten(1).all(dim=1).any()):
        raise ValueError(
            "linear imputation is undetermined: a removed region touches no kept pixel "
            "(remove less than the whole image)"
        )
    x = images.detach().to(solve_on, torch.float64)
    if backend == "scipy":
        out = _impute_scipy(x, r, neighbours)
    else:
        out = _impute_torch(x, r[:, None].expand(n, c, h, w), neighbours, tol, max_iter)
    if noise:
        ni, hi, wi = torch.nonzero(r, as_tuple=True)  # (n, h, w) order, the order of the scipy equations
        # the noise is drawn on each generator's device (the CPU's by default) and then moved, so a
        # seed gives the same noise whichever device solves
        if generator is None or isinstance(generator, torch.Generator):
            where = None if generator is None else generator.device
            eps = torch.randn(len(ni), c, generator=generator, dtype=torch.float64, device=where).to(solve_on)
        else:
            if len(generator) != n:
                raise ValueError(f"got {len(generator)} generators for {n} images")
            draws = [torch.randn(c, h, w, generator=g, dtype=torch.float64, device=g.device) for g in generator]
            eps = torch.stack(draws).to(solve_on)[ni, :, hi, wi]  # one copy, not one per image
        out[ni, :, hi, wi] += noise * eps
    return out.to(images.device, images.dtype)


def _impute_scipy(x: Tensor, removed: Tensor, neighbours: int) -> Tensor:
    """Exact solve of :func:`linear_imputation`'s system, all images as one block-diagonal sparse matrix."""
    n, c, h, w = x.shape
    xn, r = x.cpu().numpy(), removed.cpu().numpy()
    flat_r = r.reshape(-1)
    m = int(flat_r.sum())
    ids = np.full(flat_r.shape, -1, dtype=np.int64)
    ids[flat_r] = np.arange(m)  # equation k is the k-th removed pixel in (n, h, w) order, as np.nonzero
    ni, hi, wi = np.nonzero(r)
    diag = np.zeros(m)
    rhs = np.zeros((m, c))
    rows, cols, vals = [np.arange(m)], [np.arange(m)], []
    for dy, dx, wt in _NEIGHBOURS[neighbours]:
        hh, ww = hi + dy, wi + dx
        p = np.nonzero((hh >= 0) & (hh < h) & (ww >= 0) & (ww < w))[0]
        q = (ni[p] * h + hh[p]) * w + ww[p]
        diag[p] += wt
        unknown = flat_r[q]
        rows.append(p[unknown])
        cols.append(ids[q[unknown]])
        vals.append(np.full(int(unknown.sum()), -wt))
        known = ~unknown
        rhs[p[known]] += wt * xn[ni[p[known]], :, hh[p[known]], ww[p[known]]]  # one neighbour per offset
    a = coo_matrix((np.concatenate([diag, *vals]), (np.concatenate(rows), np.concatenate(cols))), shape=(m, m))
    out = xn.copy()
    out[ni, :, hi, wi] = np.asarray(spsolve(a.tocsc(), rhs)).reshape(m, c)
    return torch.from_numpy(out)


class _Stencil:
    """``(W p)_i = sum_{j in N(i)} w_ij p_j`` for ``(S, 1, H, W)`` fields like ``like`` (shape, dtype,
    device), zero outside the image, with reusable buffers (fresh multi-MB temporaries cost page faults
    each CG iteration)."""

    def __init__(self, like: Tensor, neighbours: int):
        s, _, h, w = like.shape
        kw = {"dtype": like.dtype, "device": like.device}
        self.pad = torch.zeros(s, 1, h + 2, w + 2, **kw)
        self.rows = torch.empty(s, 1, h + 2, w, **kw)
        self.out = torch.empty(s, 1, h, w, **kw)
        self.neighbours = neighbours

    def __call__(self, p: Tensor) -> Tensor:
        q, t, o = self.pad, self.rows, self.out
        q[..., 1:-1, 1:-1].copy_(p)
        if self.neighbours == 8:  # (1 2 1)^T (1 2 1) / 12 minus 4/12 centre: straight 1/6, diagonal 1/12
            torch.add(q[..., :, :-2], q[..., :, 2:], out=t).add_(q[..., :, 1:-1], alpha=2)
            torch.add(t[..., :-2, :], t[..., 2:, :], out=o).add_(t[..., 1:-1, :], alpha=2)
            return o.sub_(p, alpha=4).mul_(1 / 12)
        torch.add(q[..., 1:-1, :-2], q[..., 1:-1, 2:], out=o).add_(q[..., :-2, 1:-1]).add_(q[..., 2:, 1:-1])
        return o.mul_(0.25)


GPU_CHECK_EVERY = 8
"""CG iterations between two convergence checks off the CPU: each check reads the device (the count of
converged systems), which on a GPU stalls the launch queue. A system that converges between two checks
iterates until the next one and is accepted only if its residual is within tolerance then (CG's error
in the energy norm keeps decreasing, its residual need not); its iteration count is rounded up to the
check. On the CPU every iteration is checked, as reading costs nothing there."""


def _check_every(device: torch.device) -> int:
    return 1 if device.type == "cpu" else GPU_CHECK_EVERY


def _pcg(
    rhs: Tensor, rf: Tensor, deg: Tensor, tol: Tensor, max_iter: int, neighbours: int, check_every: int = 1
) -> tuple[Tensor, Tensor]:
    """Jacobi-preconditioned CG for ``A u = rhs``, ``A p = rf * (deg * p - W p)``, batched over systems.

    ``rhs``, ``rf`` (1 on removed pixels) ``(S, 1, H, W)``; ``tol`` ``(S,)`` relative residual per
    system. Convergence is checked every ``check_every`` iterations (and at the last); systems leave
    the batch once converged. Returns ``(u, iterations used per system)``.
    """
    s = rhs.shape[0]
    dot = lambda a, b: (a * b).flatten(1).sum(dim=1)  # noqa: E731
    tiny = torch.finfo(rhs.dtype).tiny
    u_all, used = torch.zeros_like(rhs), torch.full((s,), max_iter, device=rhs.device)
    idx, r, u = torch.arange(s, device=rhs.device), rhs.clone(), torch.zeros_like(rhs)
    inv = rf / deg
    z = r * inv
    p, ap, rz = z.clone(), torch.empty_like(r), dot(r, z)
    goal = tol * rhs.flatten(1).norm(dim=1)
    stencil = _Stencil(r, neighbours)
    for it in range(1, max_iter + 1):
        torch.mul(deg, p, out=ap).sub_(stencil(p)).mul_(rf)
        alpha = (rz / dot(p, ap).clamp_min(tiny)).view(-1, 1, 1, 1)
        u.addcmul_(alpha, p)
        r.addcmul_(alpha, ap, value=-1)
        if it % check_every == 0 or it == max_iter:
            done = r.flatten(1).norm(dim=1) <= goal
            n_done = int(done.sum())  # the one read of the device
            if n_done * 4 >= len(done) or n_done == len(done):  # drop converged systems once they are 1/4
                u_all[idx[done]], used[idx[done]] = u[done], it
                if n_done == len(done):
                    break
                keep = ~done
                idx, u, r, p, rz, goal, rf, inv, ap, z = (t[keep] for t in (idx, u, r, p, rz, goal, rf, inv, ap, z))
                stencil = _Stencil(r, neighbours)
        torch.mul(r, inv, out=z)
        rz, rz_old = dot(r, z), rz
        p.mul_((rz / rz_old.clamp_min(tiny)).view(-1, 1, 1, 1)).add_(z)
    else:
        u_all[idx] = u
    return u_all, used


def _impute_torch(x: Tensor, removed: Tensor, neighbours: int, tol: float, max_iter: int) -> Tensor:
    """Batched solve of :func:`linear_imputation`'s system: ``x`` float64 ``(N, C, H, W)``, ``removed``
    ``(N, C, H, W)`` (a mask per channel allowed); every channel of every image is one system.

    Mixed-precision iterative refinement: the residual in float64, the correction by float32 CG (to
    relative 1e-5, or less when that is all that is missing), until ``||b - A u|| <= tol ||b||``.
    """
    n, c, h, w = x.shape
    xs = x.reshape(n * c, 1, h, w)
    rf = removed.reshape(n * c, 1, h, w).to(torch.float64)
    ones = torch.ones(1, 1, h, w, dtype=torch.float64, device=x.device)
    deg = _Stencil(ones, neighbours)(ones).clone()
    op = _Stencil(xs, neighbours)
    b = op(xs * (1 - rf)) * rf  # the kept neighbours, on the right-hand side
    kept_mean = (xs * (1 - rf)).sum(dim=(1, 2, 3), keepdim=True) / (1 - rf).sum(dim=(1, 2, 3), keepdim=True)
    u = kept_mean * rf  # start from the image's mean: removes the smoothest, slowest-converging error
    b_norm = b.flatten(1).norm(dim=1)
    # the tolerance is relative to ||b||; where the kept neighbours are all 0 (b = 0, e.g. a hole in a
    # black background) the solution is 0 and ||b|| gives no scale: use the kept pixels' norm instead
    kept_norm = (xs * (1 - rf)).flatten(1).norm(dim=1)
    b_norm = torch.where(b_norm > 0, b_norm, kept_norm).clamp_min(torch.finfo(torch.float64).tiny)
    todo, iters = torch.arange(n * c, device=x.device), torch.zeros(n * c, dtype=torch.long, device=x.device)
    while True:
        u_todo = u[todo]
        res = b[todo] - rf[todo] * (deg * u_todo - _Stencil(u_todo, neighbours)(u_todo))
        res_norm = res.flatten(1).norm(dim=1)
        left = res_norm > tol * b_norm[todo]
        todo, res, res_norm = todo[left], res[left], res_norm[left]
        if len(todo) == 0:
            break
        if bool((iters[todo] >= max_iter).any()):
            worst = float((res_norm / b_norm[todo]).max())
            raise RuntimeError(
                f"linear imputation: CG reached relative residual {worst:.1e} > tol {tol:g} in max_iter "
                f"{max_iter} iterations; raise max_iter or tol, or use backend='scipy'"
            )
        inner_tol = (tol * b_norm[todo] / res_norm).clamp(min=1e-4, max=0.5).float()
        d, used = _pcg(
            res.float(), rf[todo].float(), deg.float(), inner_tol, max_iter, neighbours, _check_every(x.device)
        )
        u[todo] += d.double()
        iters[todo] += used
    return torch.where(rf.bool(), u, xs).view(n, c, h, w)


ROAD_PERCENTAGES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def check_road_params(
    percentages: Sequence[float], noise: float, measure: str, tol: float = 1e-7, max_iter: int = 5000
) -> None:
    """:func:`road`'s arguments that do not depend on the images, checked."""
    ps = [float(p) for p in percentages]
    if not ps or any(not 0.0 <= p < 1.0 for p in ps):
        raise ValueError(
            f"ROAD percentages must lie in [0, 1) (removing every pixel leaves nothing to impute), got {ps}"
        )
    if measure not in ("probability", "accuracy"):
        raise ValueError(f"measure must be 'probability' or 'accuracy', got {measure!r}")
    if noise < 0:
        raise ValueError(f"noise must be >= 0, got {noise}")
    if not tol > 0 or max_iter < 1:
        raise ValueError(f"the solver needs tol > 0 and max_iter >= 1, got tol {tol}, max_iter {max_iter}")


@metric(
    "road",
    scope="model",
    inputs=("model", "images", "maps", "targets=labels", "batch_size=batch_size"),
    higher_is_better=True,
    category="faithfulness",
    label="ROAD",
    description="ROAD: LeRF minus MoRF probability, noisy linear imputation",
    default=True,
    record=lambda r: {"road": {k: headline(v) for k, v in r.items() if k != "per_image"}},
    chance=True,
    columns=(Column("road", "ROAD", "ROAD: LeRF minus MoRF probability, noisy linear imputation", "road"),),
    check=check_road_params,
)
def road(
    model: nn.Module,
    images: Tensor,
    maps: Tensor,
    percentages: Sequence[float] = ROAD_PERCENTAGES,
    noise: float = 0.01,
    measure: Literal["probability", "accuracy"] = "probability",
    targets: Tensor | None = None,
    neighbours: Literal[4, 8] = 8,
    batch_size: int = 64,
    seed: int = 0,
    backend: Literal["torch", "scipy"] = "torch",
    tol: float = 1e-7,
    max_iter: int = 5000,
    tie_seed: int = 0,
) -> dict[str, Any]:
    """ROAD, Remove And Debias (Rong et al., ICML 2022): perturbation curves with noisy linear imputation.

    The paper's definitions (§3-4): a fraction ``p`` of the pixels is removed in the order of the map,
    **MoRF** (most relevant first: a faithful map makes the model's score drop fast, lower is better)
    or **LeRF** (least relevant first: the score should stay, higher is better), and the removed pixels
    are imputed by :func:`linear_imputation` so that the shape of the removal mask leaks no class
    information (the bias ROAD removes) and no retraining is needed (unlike ROAR). The paper reports
    the accuracy at each ``p``; here ``measure`` is the target class probability (default, smoother
    per image) or the 0/1 accuracy.

    Headline (xkd's definition, the "symmetric relevance gain" of Blücher et al., TMLR 2024, on ROAD's
    curves)::

        road = mean_{images, p}  ( LeRF_p - MoRF_p )

    in [-1, 1], higher is better: positive when the map ranks evidence above non-evidence, negative
    for an inverted map, ~0 for a random one. Both curves are returned for the paper's plots.

    Details: pixels are ranked by :func:`saliency_ranks`, ties in the seeded random order of
    ``tie_seed`` (MoRF and LeRF are the two ends of one order, so at one ``p <= 1/2`` they share no
    pixel); ``floor(p * H * W)`` pixels are removed (as the reference code's ``int``). ``targets`` None
    explains the class predicted on the original image. Image ``i``'s noise comes from ``torch.Generator().manual_seed(seed + i)``,
    so results do not depend on ``batch_size``. ``backend``, ``tol``, ``max_iter``: see
    :func:`linear_imputation`. With ``"torch"``, the ``2 P`` masks of up to ``2**20 / (2 P C H W)``
    images are imputed in one batched solve (``"scipy"``: ``batch_size // (2 P + 1)`` images, at least
    one); the ``2 P + 1`` versions of each image (original, MoRF and LeRF at every ``p``) then go
    through the model ``batch_size`` at a time. Ranks, masks and the ``"torch"`` solve run on the
    model's device; the noise is drawn on the CPU, so a GPU run imputes the same images (to the
    solver's tolerance).

    Measured (256 images 1x28x28, 9 percentages, tiny ``kdfmv_cnn`` widths (16, 32, 64), one torch
    thread, machine shared, min of 2, three runs): the 19 forward passes alone 4.8-6.6 ms per image
    (the limit); ``road`` with ``backend="scipy"`` 19-23 ms per image, with ``"torch"`` 9-16 ms per
    image; ROAD scores agree to 6e-9 per image.

    Returns:
        ``{"road", "morf", "lerf" (mean curves (P,)), "percentages", "per_image" (N,),
        "morf_per_image", "lerf_per_image" (N, P), "original" (N,), "measure"}``; tensors float64 on CPU.
    """
    check_maps(images, maps)
    check_road_params(percentages, noise, measure, tol, max_iter)
    ps = [float(p) for p in percentages]
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n, ch, h, w = images.shape
    n_p = len(ps)
    counts = torch.tensor([math.floor(p * h * w + 1e-9) for p in ps])
    device = model_device(model, images.device)
    per_chunk = max(1, batch_size // (2 * n_p + 1))
    if backend == "torch":  # the batched solver gains from many systems at once; 2**20 values ~ 100 MB of CG state
        per_chunk = max(per_chunk, 2**20 // (2 * n_p * ch * h * w))
    counts = counts.to(device)
    perm = tie_permutation(h * w, tie_seed).to(device)
    scores = []
    with eval_mode(model), torch.no_grad():
        for s in range(0, n, per_chunk):
            # masks and imputation where the model is (the "torch" solver runs on the images' device)
            x = images[s : s + per_chunk].detach().to(device)
            b = x.shape[0]
            ranks = saliency_ranks(maps[s : s + per_chunk].detach().to(device), tie_seed, perm)  # (b, HW)
            morf = ranks[None] < counts[:, None, None]  # (P, b, HW)
            lerf = ranks[None] >= (h * w - counts)[:, None, None]
            removed = torch.cat([morf, lerf]).view(2 * n_p * b, h, w)
            gens = [torch.Generator().manual_seed(seed + s + i) for i in range(b)] * (2 * n_p)
            imputed = linear_imputation(
                x.repeat(2 * n_p, 1, 1, 1), removed, noise, neighbours, gens, backend, tol, max_iter
            )
            xs = torch.cat([x, imputed])  # (b + 2 P b, C, H, W): original first
            logits = torch.cat([model(xs[i : i + batch_size]) for i in range(0, xs.shape[0], batch_size)])
            logits = logits.float().view(2 * n_p + 1, b, -1)
            tgt = logits[0].argmax(dim=1) if targets is None else targets[s : s + per_chunk].to(device).long()
            if measure == "probability":
                val = logits.softmax(dim=2).gather(2, tgt.view(1, b, 1).expand(2 * n_p + 1, b, 1))[..., 0]
            else:
                val = (logits.argmax(dim=2) == tgt.view(1, b)).float()
            scores.append(val.double().cpu())  # (2P + 1, b)
    val = torch.cat(scores, dim=1) if scores else torch.zeros(2 * n_p + 1, 0, dtype=torch.float64)
    morf_c, lerf_c = val[1 : 1 + n_p].t(), val[1 + n_p :].t()  # (N, P)
    per_image = (lerf_c - morf_c).mean(dim=1)
    nan = float("nan")
    return {
        "road": float(per_image.mean()) if n else nan,
        "morf": morf_c.mean(dim=0),
        "lerf": lerf_c.mean(dim=0),
        "percentages": ps,
        "per_image": per_image,
        "morf_per_image": morf_c,
        "lerf_per_image": lerf_c,
        "original": val[0],
        "measure": measure,
    }
