"""Faithfulness of explanation maps: does the model's decision follow the pixels a map calls salient?

- :func:`fidelity` -- KD-FMV (Jiang, Zhao, Wu & Chaddad, "A Knowledge Distillation-Based Approach to
  Enhance Transparency of Classifier Models") reports fidelity per class without a formula; xkd's
  definition is below.
- :func:`deletion_auc`, :func:`insertion_auc` -- Petsiuk et al., "RISE", BMVC 2018, §4.1.
- ROAD (Rong et al., ICML 2022) lives in :mod:`xkd.metrics.road`.

Pixels are ranked by :func:`xkd.metrics.ranking.saliency_ranks`: decreasing saliency, equal saliency
in a seeded random order (``tie_seed``; the rule and its reasons are in :mod:`xkd.metrics.ranking`).
Perturbed pixels take the ``baseline`` value (a number, or a tensor broadcastable to ``(C, H, W)`` such as a
per-channel mean) in every channel. Models run in eval mode without gradients; their train/eval
flags are restored.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from xkd.metrics.base import Column, metric
from xkd.metrics.ranking import check_maps, saliency_ranks, tie_permutation
from xkd.models.state import eval_mode, model_device


def _probs(model: nn.Module, x: Tensor) -> Tensor:
    return model(x).float().softmax(dim=1)


def fidelity_record(fid: dict[str, Any]) -> dict[str, Any]:
    """The fidelity result in the record's terms.

    ``retained_probability`` is the mean of ``p_masked(c) / p_orig(c)``, not clipped (a ratio above
    1 means the removed pixels were evidence against ``c``); ``retained_clipped`` clips it at 1.
    """

    def one(v: dict[str, Any]) -> dict[str, Any]:
        return {
            "fidelity": v["fidelity"],
            "retained_probability": v["retained"],
            "retained_clipped": v["retained_clipped"],
            "n": v["n"],
        }

    top = one(fid)
    return {
        "mean": top.pop("fidelity"),
        **top,
        "keep": fid["keep"],
        "per_class": {name: one(v) for name, v in fid["per_class"].items()},
    }


@metric(
    "fidelity",
    scope="model",
    # the map must explain the class whose survival is checked: the model's prediction
    inputs=(
        "model",
        "images",
        "labels",
        "prediction_maps",
        "keep=fidelity_keep",
        "batch_size=batch_size",
        "class_names=class_names",
    ),
    higher_is_better=True,
    category="faithfulness",
    label="Fidelity",
    description="share of images whose prediction survives keeping the top pixels",
    default=True,
    record=lambda fid: {"fidelity": fidelity_record(fid)},
    chance=True,
    chance_record=lambda fid: {"fidelity": fid["fidelity"], "retained_probability": fid["retained"]},
    columns=(
        Column("fidelity", "Fidelity", "share of images whose prediction survives keeping the top pixels", "mean"),
    ),
)
def fidelity(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    maps: Tensor,
    keep: float = 0.2,
    baseline: float | Tensor = 0.0,
    batch_size: int = 64,
    class_names: Sequence[str] | None = None,
    tie_seed: int = 0,
) -> dict[str, Any]:
    """Fidelity of explanation ``maps``: does the top-``keep`` fraction of pixels alone keep the decision?

    ``maps`` must explain the class whose survival is checked, the model's prediction ``c`` (a run
    passes each model's maps of its predicted class: the true-class maps where the model is right,
    maps re-explained for the predicted class where it is wrong); ``labels`` only group the images.

    Each image keeps its ``round(keep * H * W)`` most salient pixels (at least one); the others are
    set to ``baseline``. With ``c`` the class predicted on the original image:

    - ``kept`` = 1 if the model still predicts ``c`` on the masked image, else 0;
    - ``retained`` = ``p_masked(c) / p_orig(c)``, the share of the class probability that survives.
      It is **not** clipped: a ratio above 1 means the masked image is *more* confident (the removed
      pixels were evidence against ``c``), which is informative. Its mean is reported as
      ``retained``; the mean of ``min(ratio, 1)`` as ``retained_clipped`` (robust to a few very
      large ratios).

    ``fidelity`` is the mean of ``kept``. Per class, images are grouped by their **true** label (so
    each class's row describes the same images whatever the model predicts, and rows are comparable
    between teacher and student).

    Returns:
        ``{"fidelity", "retained", "retained_clipped", "keep", "n", "per_class": {name: {"fidelity",
        "retained", "retained_clipped", "n"}}}``; classes without images have ``n = 0`` and nan values.
    """
    check_maps(images, maps)
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    n_pix = images.shape[2] * images.shape[3]
    n_keep = max(1, round(keep * n_pix))
    device = model_device(model, images.device)
    # once per call, not per chunk: each host-to-device copy (and each .cpu()) blocks the host on a GPU
    base = torch.as_tensor(baseline, dtype=images.dtype, device=device)
    perm = tie_permutation(n_pix, tie_seed).to(device)
    results = []  # (b, 2): kept, ratio; on the device until the end
    with eval_mode(model), torch.no_grad():
        for s in range(0, images.shape[0], batch_size):
            x = images[s : s + batch_size].to(device)
            ranks = saliency_ranks(maps[s : s + batch_size].to(device), tie_seed, perm)
            keep_mask = (ranks < n_keep).view(x.shape[0], 1, *x.shape[2:])
            p_orig = _probs(model, x)
            p_mask = _probs(model, torch.where(keep_mask, x, base))
            c = p_orig.argmax(dim=1, keepdim=True)
            kept = (p_mask.argmax(dim=1, keepdim=True) == c)[:, 0].double()
            ratio = p_mask.gather(1, c).double() / p_orig.gather(1, c).double().clamp_min(1e-300)
            results.append(torch.stack([kept, ratio[:, 0]], dim=1))
    both = torch.cat(results).cpu() if results else torch.zeros(0, 2, dtype=torch.float64)
    kept, ratio = both[:, 0], both[:, 1]
    labels = torch.as_tensor(labels).long().cpu()

    def summary(sel: Tensor) -> dict[str, Any]:
        n = int(sel.sum())
        if n == 0:
            nan = float("nan")
            return {"fidelity": nan, "retained": nan, "retained_clipped": nan, "n": 0}
        return {
            "fidelity": float(kept[sel].mean()),
            "retained": float(ratio[sel].mean()),
            "retained_clipped": float(ratio[sel].clamp_max(1.0).mean()),
            "n": n,
        }

    classes = range(len(class_names)) if class_names is not None else sorted(set(labels.tolist()))
    names = list(class_names) if class_names is not None else [str(k) for k in classes]
    out = summary(torch.ones_like(labels, dtype=torch.bool))
    out["keep"] = keep
    out["per_class"] = {names[i]: summary(labels == k) for i, k in enumerate(classes)}
    return out


def check_steps(steps: int) -> None:
    """The number of steps of a deletion or insertion path, checked."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")


def perturbation_curves(
    model: nn.Module,
    images: Tensor,
    maps: Tensor,
    mode: str,
    steps: int = 20,
    baseline: float | Tensor = 0.0,
    batch_size: int = 64,
    targets: Tensor | None = None,
    tie_seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """Class probability along a deletion or insertion path (RISE, Petsiuk et al. 2018).

    Step ``s = 0..steps`` perturbs the ``round(s / steps * H * W)`` most salient pixels: ``"deletion"``
    sets them to ``baseline`` in the original image; ``"insertion"`` copies them from the original
    into an all-``baseline`` image (RISE blurs instead; xkd uses the same baseline for both). The
    probability is that of ``targets`` or, if None, of the class predicted on the original image.
    All steps of ``batch_size // (steps + 1)`` images (at least one) go through one forward pass.

    Returns:
        ``(curves (N, steps + 1), fractions (steps + 1,))`` on the CPU, float64.
    """
    check_maps(images, maps)
    if mode not in ("deletion", "insertion"):
        raise ValueError(f"mode must be 'deletion' or 'insertion', got {mode!r}")
    check_steps(steps)
    n, ch, h, w = images.shape
    device = model_device(model, images.device)
    counts = torch.linspace(0, h * w, steps + 1, device=device).round().long()
    per_chunk = max(1, batch_size // (steps + 1))
    # once per call, not per chunk: each host-to-device copy (and each .cpu()) blocks the host on a GPU
    base = torch.as_tensor(baseline, dtype=images.dtype, device=device)
    perm = tie_permutation(h * w, tie_seed).to(device)
    targets = targets.to(device).long() if targets is not None else None
    curves = []  # on the device until the end
    with eval_mode(model), torch.no_grad():
        for s in range(0, n, per_chunk):
            x = images[s : s + per_chunk].to(device)
            b = x.shape[0]
            top = saliency_ranks(maps[s : s + per_chunk].to(device), tie_seed, perm)[None] < counts[:, None, None]
            top = top.view(steps + 1, b, 1, h, w)
            xs = torch.where(top, base, x[None]) if mode == "deletion" else torch.where(top, x[None], base)
            probs = _probs(model, xs.reshape((steps + 1) * b, ch, h, w)).view(steps + 1, b, -1)
            if targets is not None:
                tgt = targets[s : s + per_chunk]
            else:  # the original image is step 0 of deletion and the last step of insertion
                tgt = probs[0 if mode == "deletion" else -1].argmax(dim=1)
            curves.append(probs.gather(2, tgt.view(1, b, 1).expand(steps + 1, b, 1))[..., 0].t().double())
    curve = torch.cat(curves).cpu() if curves else torch.zeros(0, steps + 1, dtype=torch.float64)
    return curve, counts.double().cpu() / (h * w)


def _auc_result(name: str, curve: Tensor, fractions: Tensor) -> dict[str, Any]:
    per_image = torch.trapezoid(curve, fractions, dim=1)
    return {
        name: float(per_image.mean()) if len(per_image) else float("nan"),
        "per_image": per_image,
        "curve": curve.mean(dim=0),
        "fractions": fractions,
    }


@metric(
    "deletion_auc",
    scope="model",
    inputs=("model", "images", "maps", "batch_size=batch_size", "targets=labels"),
    higher_is_better=False,
    category="faithfulness",
    label="Deletion AUC",
    description="RISE deletion, true class",
    default=True,
    chance=True,
    check=check_steps,
)
def deletion_auc(
    model: nn.Module,
    images: Tensor,
    maps: Tensor,
    steps: int = 20,
    baseline: float | Tensor = 0.0,
    batch_size: int = 64,
    targets: Tensor | None = None,
    tie_seed: int = 0,
) -> dict[str, Any]:
    """Deletion AUC (RISE, Petsiuk et al. 2018, §4.1): area under the class probability as the most
    salient pixels are removed, trapezoid rule over the removed fraction in [0, 1]. Lower is better:
    a faithful map removes the evidence first.

    Returns:
        ``{"deletion_auc": mean over images, "per_image": (N,), "curve": mean curve (steps + 1,),
        "fractions": (steps + 1,)}``.
    """
    curve, fractions = perturbation_curves(
        model, images, maps, "deletion", steps, baseline, batch_size, targets, tie_seed
    )
    return _auc_result("deletion_auc", curve, fractions)


@metric(
    "insertion_auc",
    scope="model",
    inputs=("model", "images", "maps", "batch_size=batch_size", "targets=labels"),
    higher_is_better=True,
    category="faithfulness",
    label="Insertion AUC",
    description="RISE insertion, true class",
    default=True,
    chance=True,
    check=check_steps,
)
def insertion_auc(
    model: nn.Module,
    images: Tensor,
    maps: Tensor,
    steps: int = 20,
    baseline: float | Tensor = 0.0,
    batch_size: int = 64,
    targets: Tensor | None = None,
    tie_seed: int = 0,
) -> dict[str, Any]:
    """Insertion AUC (RISE, Petsiuk et al. 2018, §4.1): area under the class probability as the most
    salient pixels are inserted into a baseline image, trapezoid rule over the inserted fraction in
    [0, 1]. Higher is better.

    Returns:
        ``{"insertion_auc": mean over images, "per_image": (N,), "curve": mean curve (steps + 1,),
        "fractions": (steps + 1,)}``.
    """
    curve, fractions = perturbation_curves(
        model, images, maps, "insertion", steps, baseline, batch_size, targets, tie_seed
    )
    return _auc_result("insertion_auc", curve, fractions)


__all__ = ["deletion_auc", "fidelity", "insertion_auc", "perturbation_curves"]
