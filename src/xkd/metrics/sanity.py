"""Sanity checks for saliency maps (Adebayo et al., "Sanity Checks for Saliency Maps", NeurIPS 2018).

An explanation that does not change when the model's parameters (§3) or the training labels (§4)
are randomised cannot be explaining what the model learned: it explains the input (the paper's
edge detector passes for a saliency map visually but fails both checks).

- :func:`randomisation_sanity` -- model-parameter randomisation, **cascading** from the top layer
  (logits) to the bottom: after each layer's re-initialisation the maps of the same images are
  compared with the original maps.
- :func:`data_randomisation_sanity` -- data randomisation: the maps of the model against those of
  the same architecture trained on randomly permuted labels (the caller trains it).

Similarity of an original map ``E`` and a randomised one ``E'`` (the paper's §3 measures):

- Spearman rank correlation of ``|E|`` and ``|E'|`` (the paper's "absolute value" variant: the
  sign of many maps is arbitrary), per image, averaged;
- SSIM (:func:`skimage.metrics.structural_similarity`) of ``|E|`` and ``|E'|`` each min-max scaled
  to [0, 1], ``data_range=1``, window 7 (or the largest odd size the map allows, at least 3).

A map that becomes constant (e.g. an all-zero Grad-CAM once the logits are random) has changed: its
rank correlation counts as 0, unlike in :mod:`xkd.metrics.agreement`, where constant maps are left
out; an image whose original and randomised maps are equal counts as 1.

Verdict: **PASS** when the mean rank correlation after randomising every layer (the end of the
cascade; for the data check, between the two models) is below ``threshold`` (default 0.5), else
**FAIL**. In the paper, methods sensitive to the model (gradients, Grad-CAM) fall to near 0 at the
end of the cascade, while insensitive ones (Guided Backprop, the edge detector) stay high; 0.5 is
midway between "unrelated" (0) and "unchanged" (1), far from both, so noise on a few images does not
flip the verdict. The curves are returned for the paper's plots; read them, not only the verdict.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from xkd.explain.base import normalize_maps
from xkd.metrics.agreement import map_spearman
from xkd.metrics.base import headline, metric
from xkd.models.state import eval_mode, model_device

MakeExplainer = Callable[[nn.Module], Any]


def _maps(make: MakeExplainer, model: nn.Module, images: Tensor, targets: Tensor | None) -> Tensor:
    """Maps of ``images`` by the explainer ``make(model)`` (an Explainer, used as a context manager)."""
    explainer = make(model)
    with explainer:
        out = explainer.explain(images, targets)
    maps = out.maps if hasattr(out, "maps") else out
    if not isinstance(maps, Tensor) or maps.shape != (images.shape[0], *images.shape[2:]):
        got = tuple(maps.shape) if isinstance(maps, Tensor) else type(maps).__name__
        raise ValueError(f"the explainer must return maps (N, H, W) for images {tuple(images.shape)}, got {got}")
    return maps.detach().float().cpu()


SSIM_MIN_SIDE = 3  # skimage's smallest (odd) window


def _ssim(a: Tensor, b: Tensor) -> Tensor:
    from skimage.metrics import structural_similarity

    h, w = a.shape[1:]
    win = min(7, min(h, w) - (1 - min(h, w) % 2))  # largest odd window <= min side
    if win < SSIM_MIN_SIDE:
        raise ValueError(f"SSIM needs maps of at least {SSIM_MIN_SIDE}x{SSIM_MIN_SIDE} pixels, got {h}x{w}")
    x, y = normalize_maps(a.abs()).double().cpu().numpy(), normalize_maps(b.abs()).double().cpu().numpy()
    vals = [structural_similarity(p, q, data_range=1.0, win_size=win) for p, q in zip(x, y, strict=True)]
    return torch.tensor(np.array(vals, dtype=np.float64))


def similarity(original: Tensor, other: Tensor) -> dict[str, Any]:
    """Per-image rank correlation of absolute maps and SSIM (module docstring), and their means."""
    rank = map_spearman(original.abs(), other.abs(), reduction="none")
    assert isinstance(rank, Tensor)
    equal = (original.flatten(1) == other.flatten(1)).all(dim=1)
    rank = torch.where(rank.isnan(), equal.double(), rank)  # constant maps: 1 if unchanged else 0
    ssim = _ssim(original, other)
    return {"rank_correlation": float(rank.mean()), "ssim": float(ssim.mean()), "per_image": rank}


def cascade_layers(model: nn.Module, images: Tensor) -> list[str]:
    """Paths of the layers the cascade re-initialises, top (last called in the forward pass) first.

    A layer is a module with a ``reset_parameters()`` method and parameters of its own; the order is
    that of the first call in one forward pass of ``images[:1]`` (layers never called are left out:
    they cannot change the output).
    """
    names = {m: n for n, m in model.named_modules()}
    layers = [
        m
        for m in model.modules()
        if callable(getattr(m, "reset_parameters", None)) and next(m.parameters(recurse=False), None) is not None
    ]
    order: list[nn.Module] = []

    def hook(module: nn.Module, _inputs: object) -> None:
        if module not in order:
            order.append(module)

    handles = [m.register_forward_pre_hook(hook) for m in layers]
    try:
        with eval_mode(model), torch.no_grad():
            model(images[:1].to(model_device(model, images.device)))
    finally:
        for h in handles:
            h.remove()
    if not order:
        raise ValueError(f"{type(model).__name__} has no layer with reset_parameters() and parameters to randomise")
    return [names[m] for m in reversed(order)]


def _reset(module: nn.Module, seed: int) -> None:
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):  # leave the caller's random state alone
        torch.manual_seed(seed)
        module.reset_parameters()  # type: ignore[operator]


def _verdict(value: float, threshold: float) -> str:
    return "PASS" if value < threshold else "FAIL"


def check_sanity_params(threshold: float, max_steps: int | None = None) -> None:
    """The sanity checks' arguments, checked."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    if max_steps is not None and max_steps < 1:
        raise ValueError(f"max_steps must be >= 1 or None, got {max_steps}")


def _check(images: Tensor, threshold: float, max_steps: int | None = None) -> None:
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"images must be a non-empty (N, C, H, W) batch, got {tuple(images.shape)}")
    check_sanity_params(threshold, max_steps)


def sanity_record(res: dict[str, Any]) -> dict[str, Any]:
    """The weight-randomisation check in the record's terms."""
    return {
        "verdict": res["verdict"],
        "final_rank_correlation": headline(res["randomisation_sanity"]),
        "threshold": res["threshold"],
        "layers": res["layers"],
        "compared_after": res["compared_after"],
        "rank_correlation": headline(res["rank_correlation"]),
        "ssim": headline(res["ssim"]),
        "n_images": res["n_images"],
    }


def label_sanity_record(res: dict[str, Any]) -> dict[str, Any]:
    """The data-label randomisation check in the record's terms."""
    return {
        "verdict": res["verdict"],
        "rank_correlation": headline(res["data_randomisation_sanity"]),
        "ssim": headline(res["ssim"]),
        "threshold": res["threshold"],
        "n_images": res["n_images"],
    }


@metric(
    "randomisation_sanity",
    scope="model",
    inputs=("model", "images", "make_explainer", "targets=labels"),
    higher_is_better=False,
    category="sanity",
    label="Weight randomisation",
    default=True,
    subset="sanity_images",
    record=lambda r: {"sanity": sanity_record(r)},
    columns=(),  # shown by the report's sanity section
    min_side=SSIM_MIN_SIDE,
    check=check_sanity_params,
)
def randomisation_sanity(
    model: nn.Module,
    images: Tensor,
    make: MakeExplainer,
    targets: Tensor | None = None,
    threshold: float = 0.5,
    seed: int = 0,
    max_steps: int | None = 6,
) -> dict[str, Any]:
    """Cascading model-parameter randomisation (Adebayo et al. 2018, §3.1).

    A deep copy of ``model`` has its layers (:func:`cascade_layers`) re-initialised one by one from
    the top, each with its own ``reset_parameters()`` under ``torch.manual_seed(seed + step)``; the
    randomisation is cumulative (step ``s`` has the top ``s + 1`` layers random). After each step the
    maps of ``images`` are computed with ``make(randomised_copy)`` and compared with the original
    maps. The explained class is ``targets`` or, if None, the class the **original** model predicts,
    fixed along the cascade (the paper explains the same class throughout). ``model`` is not changed.

    Args:
        model: the trained model.
        images: a few images ``(N, C, H, W)`` (the check is per image; 8-16 are plenty).
        make: ``make(model) -> Explainer``, e.g. ``lambda m: GradCAM(m)``; for a model whose
            explained layer is named, the copy has the same module paths.
        targets: classes to explain ``(N,)``.
        threshold: the verdict's rank-correlation threshold (module docstring).
        seed: seed of the re-initialisations.
        max_steps: compare maps after at most this many cascade steps, evenly spaced over the
            layers, the last (every layer random) always included; the randomisation itself still
            goes layer by layer. None compares after every layer (the paper's full curve; costly
            for deep models and slow explainers: a ResNet-20 has ~40 such layers).

    Returns:
        ``{"randomisation_sanity": mean rank correlation with every layer randomised (lower is
        better), "verdict": "PASS" | "FAIL", "threshold", "layers": paths in the order randomised,
        "compared_after": number of layers randomised at each comparison, "rank_correlation",
        "ssim": one value per comparison, "per_image": final per-image rank correlations, "n_images"}``.
    """
    _check(images, threshold, max_steps)
    if targets is None:
        with eval_mode(model), torch.no_grad():
            targets = model(images.to(model_device(model, images.device))).argmax(dim=1).to(images.device)
    original = _maps(make, model, images, targets)
    randomised = copy.deepcopy(model)
    layers = cascade_layers(randomised, images)
    modules = dict(randomised.named_modules())
    n = len(layers)
    if max_steps is None or max_steps >= n:
        compare = set(range(n))
    else:  # evenly spaced, the last step (everything random) always included
        compare = {round((i + 1) * n / max_steps) - 1 for i in range(max_steps)}
    ranks, ssims, sim, after = [], [], {}, []
    for step, name in enumerate(layers):
        _reset(modules[name], seed + step)
        if step in compare:
            sim = similarity(original, _maps(make, randomised, images, targets))
            ranks.append(sim["rank_correlation"])
            ssims.append(sim["ssim"])
            after.append(step + 1)
    return {
        "randomisation_sanity": ranks[-1],
        "verdict": _verdict(ranks[-1], threshold),
        "threshold": threshold,
        "layers": layers,
        "compared_after": after,
        "rank_correlation": ranks,
        "ssim": ssims,
        "per_image": sim["per_image"],
        "n_images": images.shape[0],
    }


@metric(
    "data_randomisation_sanity",
    scope="model",
    inputs=("model", "random_label_model", "images", "make_explainer", "targets=labels"),
    higher_is_better=False,
    category="sanity",
    label="Label randomisation",
    subset="sanity_images",
    record=lambda r: {"label_sanity": label_sanity_record(r)},
    columns=(),  # shown by the report's sanity section
    min_side=SSIM_MIN_SIDE,
    check=check_sanity_params,
)
def data_randomisation_sanity(
    model: nn.Module,
    random_label_model: nn.Module,
    images: Tensor,
    make: MakeExplainer,
    targets: Tensor | None = None,
    threshold: float = 0.5,
) -> dict[str, Any]:
    """Data randomisation test (Adebayo et al. 2018, §4): maps of ``model`` against those of the same
    architecture trained on randomly permuted labels (``random_label_model``, trained by the caller
    until it fits the permuted training labels, as in the paper).

    Each model explains ``targets`` or, if None, its own predicted class. Same similarity measures and
    verdict rule as :func:`randomisation_sanity`: PASS when the mean rank correlation of the absolute
    maps is below ``threshold``.

    Returns:
        ``{"data_randomisation_sanity": mean rank correlation (lower is better), "verdict",
        "threshold", "ssim", "per_image", "n_images"}``.
    """
    _check(images, threshold)
    sim = similarity(_maps(make, model, images, targets), _maps(make, random_label_model, images, targets))
    return {
        "data_randomisation_sanity": sim["rank_correlation"],
        "verdict": _verdict(sim["rank_correlation"], threshold),
        "threshold": threshold,
        "ssim": sim["ssim"],
        "per_image": sim["per_image"],
        "n_images": images.shape[0],
    }
