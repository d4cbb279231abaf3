"""DiffROAR: do a model's attributions highlight the features that discriminate the classes?

Source: Shah, Jain & Netrapalli, "Do Input Gradients Highlight Discriminative Features?", NeurIPS
2021, §3 (built on ROAR, Hooker et al., NeurIPS 2019); used by Han et al., ICML 2023
to compare KD, label smoothing and scratch students.

For a fraction ``k`` of pixels, every train, validation and test image is reduced to the ``k``
pixels its attribution map ranks **highest** (``keep_top``), or to the ``k`` ranked **lowest**
(``keep_bottom``). Pixels are ranked by the attribution's **magnitude** ``|value|``, as the authors'
code does (harshays/inputgradients, ``get_attribution_indices``: ``np.abs`` then ``argsort``): strong
negative evidence counts as salient, so a signed map's keep-bottom keeps the pixels nearest 0, not its
most negative ones. Both sides come from one ordering, equal magnitudes in the seeded random order of
:mod:`xkd.metrics.ranking` (``tie_seed``), so keep-top and keep-bottom never share a pixel while
``k <= 1/2``. Removed pixels take the training set's per-channel mean (ROAR's fill, so a removed
pixel carries no information). A fresh model of a fixed architecture is trained from scratch on each
reduced training set and its test accuracy measured on the equally reduced test set::

    DiffROAR(k) = acc(keep_top k) - acc(keep_bottom k)

Positive: the top-ranked pixels carry more class information than the bottom-ranked ones, i.e. the
attributions highlight discriminative features; about 0: they do not. (Shah et al.'s sign; "keep the
top k" is "remove the bottom 1 - k".) Maps explain the true class of each image.

Retraining is the expensive part: each ``(explained model, explainer, k, side)`` result is cached as
JSON next to its checkpoint under ``cache_dir/diffroar/<key>/``, keyed by the explained model's
weights, the explainer and its parameters, ``k``, the side, the data config, the retrained
architecture and its budget, the seed, and the ranking rule and its tie seed. Re-running a study
only retrains what changed.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from xkd.cache import Cache
from xkd.config import DiffROARConfig, ModelConfig, OptimizerConfig, TrainConfig
from xkd.data import make_loader
from xkd.data.base import TensorImageDataset
from xkd.distill import build_distiller
from xkd.engine.trainer import Trainer
from xkd.explain import build_explainer
from xkd.files import read_json, write_json
from xkd.metrics.classification import evaluate_model
from xkd.metrics.ranking import saliency_ranks
from xkd.models import build_model
from xkd.schema import to_dict

log = logging.getLogger("xkd")


def keep_pixels(images: Tensor, maps: Tensor, fraction: float, side: str, fill: Tensor, tie_seed: int = 0) -> Tensor:
    """``images`` with only each map's top (``side="top"``) or bottom (``"bottom"``) ``fraction`` of
    pixels by ``|value|`` kept; every other pixel (all channels) set to ``fill`` ``(C,)``. Both sides
    are the two ends of one ranking, ties in the seeded random order of ``tie_seed`` (see the module
    docstring)."""
    if side not in ("top", "bottom"):
        raise ValueError(f"side must be 'top' or 'bottom', got {side!r}")
    n, c, h, w = images.shape
    if maps.shape != (n, h, w):
        raise ValueError(f"maps {tuple(maps.shape)} must be (N, H, W) = {(n, h, w)}")
    ranks = saliency_ranks(maps.detach().flatten(1).float().abs(), tie_seed)
    count = max(1, round(fraction * h * w))
    keep = (ranks < count if side == "top" else ranks >= h * w - count).view(n, 1, h, w)
    return torch.where(keep.to(images.device), images, fill.view(1, c, 1, 1).to(images))


def retrain_accuracy(
    model_cfg: ModelConfig,
    num_classes: int,
    train: TensorImageDataset,
    val: TensorImageDataset,
    test: TensorImageDataset,
    cfg: DiffROARConfig,
    seed: int,
    device: torch.device,
    out_dir: Path,
) -> dict[str, Any]:
    """Train a fresh ``model_cfg`` from scratch on ``train`` (best validation epoch kept) and return
    its test accuracy."""
    torch.manual_seed(seed)
    c, h, w = train.images.shape[1:]
    model = build_model(model_cfg, num_classes, c, h if h == w else (h, w))
    budget = TrainConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, optimizer=OptimizerConfig("adam", cfg.lr))
    trainer = Trainer(
        build_distiller("scratch", model), train, val, budget, checkpoint_dir=out_dir, seed=seed, device=device,
        role="diffroar", progress=False,
    )  # fmt: skip
    trainer.fit_and_restore()
    loader = make_loader(test, batch_size=256, shuffle=False, seed=seed)
    return {"accuracy": evaluate_model(model, loader, num_classes, device)["accuracy"]}


def diffroar(
    model: nn.Module,
    model_key: str,
    splits: dict[str, TensorImageDataset],
    num_classes: int,
    cfg: DiffROARConfig,
    retrain_model: ModelConfig,
    data_key: Any,
    seed: int,
    device: torch.device,
    cache_dir: Path,
    tie_seed: int = 0,
) -> dict[str, Any]:
    """DiffROAR of ``model``'s ``cfg.explainer`` maps at every ``cfg.fractions`` (see the module doc).

    Args:
        model: the explained model (eval mode).
        model_key: identifies its weights (:func:`xkd.pipeline.weights_key`), for the cache.
        splits: ``{"train", "val", "test"}`` tensor datasets of the study's data.
        data_key: anything that identifies the data (its config), for the cache.
        tie_seed: the seed of the tie-break order among equal magnitudes (see :func:`keep_pixels`).

    Returns:
        ``{"fractions", "keep_top", "keep_bottom", "diffroar", "cached"}`` (lists aligned with
        ``fractions``; accuracies of the retrained models).
    """
    splits = {name: ds.scaled() for name, ds in splits.items()}
    fill = splits["train"].images.float().mean(dim=(0, 2, 3))
    maps: dict[str, Tensor] = {}
    out: dict[str, Any] = {
        "fractions": list(cfg.fractions),
        "keep_top": [],
        "keep_bottom": [],
        "diffroar": [],
        "cached": [],
    }
    for fraction in cfg.fractions:
        accs = {}
        for side in ("top", "bottom"):
            what = dict(
                model=model_key, explainer=cfg.explainer, explainer_params=cfg.explainer_params, fraction=fraction,
                side=side, data=data_key, retrain=to_dict(retrain_model), epochs=cfg.epochs,
                batch_size=cfg.batch_size, lr=cfg.lr, seed=seed, ranking="magnitude", tie_seed=tie_seed,
            )  # fmt: skip
            if device.type != "cpu":  # a GPU retrains in bf16 (amp: auto): its results are its own
                what["device"] = device.type
            key = Cache.key(what)
            folder = Cache(cache_dir).folder("diffroar", key)
            result_path = folder / "result.json"
            if result_path.is_file():
                accs[side] = read_json(result_path)["accuracy"]
                out["cached"].append(True)
                continue
            if not maps:
                with build_explainer(cfg.explainer, model, cfg.explainer_params) as ex:
                    for name, ds in splits.items():
                        maps[name] = torch.cat(
                            [
                                ex.explain(
                                    ds.images[s : s + 256].to(device), ds.labels[s : s + 256].to(device)
                                ).maps.cpu()
                                for s in range(0, len(ds), 256)
                            ]
                        )
            reduced = {
                name: TensorImageDataset(keep_pixels(ds.images, maps[name], fraction, side, fill, tie_seed), ds.labels)
                for name, ds in splits.items()
            }
            log.info("DiffROAR: retraining on the %s %.0f%% pixels (%s)", side, 100 * fraction, key)
            res = retrain_accuracy(
                retrain_model, num_classes, reduced["train"], reduced["val"], reduced["test"], cfg, seed, device, folder
            )
            write_json(result_path, {"key": key, "fraction": fraction, "side": side, **res})
            accs[side] = res["accuracy"]
            out["cached"].append(False)
        out["keep_top"].append(accs["top"])
        out["keep_bottom"].append(accs["bottom"])
        out["diffroar"].append(accs["top"] - accs["bottom"])
    return out
