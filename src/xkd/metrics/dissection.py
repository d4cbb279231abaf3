"""Network dissection: how many units of a layer are detectors of a human-readable concept.

Bau, Zhou, Khosla, Oliva, Torralba, "Network Dissection: Quantifying Interpretability of Deep Visual
Representations", CVPR 2017, §3.1, as used by Han et al., "On the Impact of Knowledge Distillation
for Model Interpretability", ICML 2023, to measure the interpretability of distilled students. For unit ``k`` of the layer and concept ``c``:

1. ``T_k`` = the ``quantile`` (0.995: the top 0.5 %) of unit k's activations over every spatial
   position of every image of the data set (raw activations, before upsampling);
2. each activation map ``A_k(x)`` is upsampled (bilinear) to the image size and binarised,
   ``M_k(x) = A_k(x) >= T_k``;
3. ``IoU_{k,c} = sum_x |M_k(x) ∩ L_c(x)| / sum_x |M_k(x) ∪ L_c(x)|``, the intersections and unions
   summed over the data set (not a mean of per-image IoUs), ``L_c(x)`` the concept's pixel mask;
4. unit k is a detector of its best concept ``argmax_c IoU_{k,c}`` when that IoU exceeds
   ``iou_threshold`` (0.05). The headline is the number of detectors; they are also counted per
   concept and per concept category.

Decisions:

* **Ties at the threshold.** Bau et al.'s code (NetDissect) binarises with ``A > T``;
  re-implementations of Han et al.'s (ICML 2023) procedure with ``A >= T``. They differ only when
  activations tie at ``T_k``: a unit that is 0 on more than 99.5 % of the pixels (a sparse ReLU
  unit) has ``T_k = 0``, and ``A >= 0`` would mark every pixel; a unit with binary outputs has
  ``T_k`` = its maximum, and ``A > T`` would mark nothing. xkd uses ``A >= T_k`` except when ``T_k``
  equals the unit's smallest activation, where it uses ``A > T_k`` (recorded per unit as ``rule``),
  so the binarised region is never "everything".
* **Streaming, exact quantile.** ``T_k`` is an order statistic of the top tail, so
  :class:`xkd.metrics.quantile.StreamingTopQuantile` keeps only the ``N - floor(q (N - 1))`` largest
  activations of each unit (``N`` = images x positions), merged batch by batch with ``topk``: exact,
  in one pass, and holding ``units x ((1 - q) N + 1)`` values, 0.5 % of the activations at the
  default instead of all of them; ``max_buffer`` caps that (a quantile that would need more is
  refused with the fix). The interpolation is torch.quantile's ``linear`` rule, the rank computed in
  float64 (torch computes it in the input's dtype).
* **Empty concepts.** A concept without a positive pixel in the data has no IoU (0/0 at best): it
  is listed in ``empty_concepts``, its IoUs are ``None`` and it is never a unit's best concept.
* **Two passes** over the data run the model up to the layer only (the forward stops there):
  pass 1 the thresholds, pass 2 the IoUs. Batches are fed in channels-last memory format (1.4x
  faster convolutions on CPU; the model is not changed), falling back to contiguous inputs if the
  model rejects them.
* **Data.** Any map-style dataset of ``(image, label, mask)`` items (or a ``DataLoader`` of one,
  read in index order with its batch size). Its concepts: the dataset's ``concept_names``,
  ``concept_categories`` and ``concept_masks(i)`` (``concepts``; also through a ``Subset``);
  otherwise the item mask as the single concept ``mask`` of category ``object`` (``lesions``, an
  ``imagefolder`` with masks).

Speed: the default teacher (untrained ResNet-20 of ``configs/default.yaml``, ``layer3``: 64 units at
16x16) on 2000 ``concepts`` images of 64x64 took 43-45 s on a shared 2-core CPU under a load of ~3
(the two forward passes are ~85 % of it; the quantile buffer holds 64 x 2561 values). Quantile
error on that layer's activations (400 images, q = 0.99 / 0.995 / 0.999): at most 1e-8 from
numpy's float64 quantile of the same values, 6e-7 from ``torch.quantile`` (which rounds the rank
to float32).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from xkd.errors import DissectionError
from xkd.metrics.base import metric
from xkd.metrics.quantile import MAX_BUFFER, StreamingTopQuantile
from xkd.models.hooks import default_layer, get_module
from xkd.models.state import eval_mode, model_device

MASK_CONCEPT = "mask"
_UPSAMPLE_BUDGET = 2**24  # upsampled activations handled at once (64 MiB of float32)
_NO_MASKS_FIX = (
    "network dissection needs pixel masks of concepts; use a dataset that has them: `concepts` (object, part, "
    "texture and colour masks; data.name: concepts), `lesions` (one concept: the lesion mask) or an `imagefolder` "
    "with a masks/ folder (one concept: the mask) or a concepts/<category>/<concept>/<class>/ mask tree (one "
    "concept per folder)"
)


class DissectionResult(dict):
    """The record of one dissection (a dict, so :func:`xkd.metrics.as_result` finds the headline
    ``concept_detectors``); :meth:`to_record` gives a plain JSON-able copy.

    Keys: ``concept_detectors`` and ``n_detectors`` (the number of detectors), ``layer``,
    ``n_units``, ``n_images``, ``image_size``, ``feature_size``, ``quantile``, ``iou_threshold``,
    ``concepts``, ``categories`` (concept -> category), ``per_concept`` and ``per_category``
    (detector counts, every concept and category listed), ``empty_concepts``, ``thresholds``,
    ``units`` (per unit: ``unit``, ``concept``, ``category``, ``iou``, ``detector``, ``threshold``,
    ``rule``), ``iou`` (per unit, per concept; ``None`` for empty concepts), ``top_images`` (per
    unit, the dataset indices of its most activating images), ``seconds``.
    """

    def to_record(self) -> dict[str, Any]:
        return copy.deepcopy(dict(self))

    @property
    def n_detectors(self) -> int:
        return int(self["n_detectors"])

    def detectors(self) -> list[dict[str, Any]]:
        """The units that are detectors, best IoU first."""
        return sorted((u for u in self["units"] if u["detector"]), key=lambda u: -u["iou"])


# ----------------------------------------------------------------------------------------------
# data and features


def _concept_source(data: Any, batch_size: int) -> tuple[Any, int, list[str], dict[str, str], Callable]:
    """``(dataset, batch_size, names, categories, load)``; ``load(index, masks)`` returns the float
    images ``(B, C, H, W)`` and, when ``masks`` is true, the concept masks bool ``(B, K, H, W)``."""
    if isinstance(data, DataLoader):
        batch_size = data.batch_size or batch_size
        data = data.dataset
    if not hasattr(data, "__len__") or not hasattr(data, "__getitem__"):
        hint = "; pass one of its splits, e.g. bundle.test" if hasattr(data, "train") else ""
        raise DissectionError(f"expected a map-style dataset or a DataLoader, got {type(data).__name__}{hint}")
    if len(data) == 0:
        raise DissectionError("the dataset is empty; dissection needs images")
    base, remap = data, None
    if isinstance(data, Subset) and hasattr(data.dataset, "concept_masks"):
        base, remap = data.dataset, torch.as_tensor(list(data.indices), dtype=torch.long)
    if hasattr(base, "concept_masks"):
        names = list(base.concept_names)
        categories = {c: base.concept_categories.get(c, "concept") for c in names}
        batched = getattr(base, "concept_masks_batch", None)

        def load(index: Tensor, masks: bool) -> tuple[Tensor, Tensor | None]:
            images = torch.stack([torch.as_tensor(data[int(i)][0]) for i in index]).float()
            if not masks:
                return images, None
            j = index if remap is None else remap[index]
            m = batched(j) if batched is not None else torch.stack([base.concept_masks(int(i)) for i in j])
            return images, m

        return data, batch_size, names, categories, load
    item = data[0]
    if not isinstance(item, (tuple, list)) or len(item) < 3 or item[2] is None:
        raise DissectionError(f"{type(data).__name__} has no concept masks (its items carry no mask): {_NO_MASKS_FIX}")

    def load_items(index: Tensor, masks: bool) -> tuple[Tensor, Tensor | None]:
        items = [data[int(i)] for i in index]  # read once: lazy datasets decode files on access
        images = torch.stack([torch.as_tensor(it[0]) for it in items]).float()
        return images, torch.stack([torch.as_tensor(it[2]).bool() for it in items])[:, None] if masks else None

    return data, batch_size, [MASK_CONCEPT], {MASK_CONCEPT: "object"}, load_items


def check_concept_data(data: Any) -> None:
    """Raise :class:`DissectionError` (naming the data sets that have masks) unless ``data`` can be
    dissected: a non-empty map-style dataset with concept masks."""
    _concept_source(data, 1)


class _Stop(Exception):
    """Raised by the hook to end a forward pass once the dissected layer has run."""


class _LayerReader:
    """Runs ``model`` up to ``layer`` and returns that layer's output (hook removed on exit)."""

    def __init__(self, model: nn.Module, layer: str, device: torch.device) -> None:
        self.model, self.layer, self.device = model, layer, device
        self.module = get_module(model, layer)  # LayerNotFoundError listing the module paths
        self.channels_last: bool | None = None  # decided on the first batch
        self.out: Any = None

    @contextmanager
    def attached(self) -> Iterator[_LayerReader]:
        def hook(_m: nn.Module, _i: object, output: Any) -> None:
            self.out = output
            raise _Stop

        handle = self.module.register_forward_hook(hook)
        try:
            yield self
        finally:
            handle.remove()

    def _run(self, images: Tensor, channels_last: bool) -> Tensor:
        self.out = None
        x = images.to(self.device)
        if channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        try:
            self.model(x)
        except _Stop:
            pass
        out = self.out
        if out is None:
            raise DissectionError(f"layer {self.layer!r} did not run in the model's forward pass; pick a layer it uses")
        if not isinstance(out, Tensor) or out.ndim != 4:
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise DissectionError(
                f"layer {self.layer!r} outputs {shape}; dissection needs a (N, units, H, W) activation map: "
                "pick a convolutional layer or block"
            )
        return out.detach().float()

    def __call__(self, images: Tensor) -> Tensor:
        if self.channels_last is None:
            try:
                out = self._run(images, True)
                self.channels_last = True
                return out
            except RuntimeError:  # e.g. a model that calls .view() on its input
                self.channels_last = False
        return self._run(images, self.channels_last)


def _binarise(up: Tensor, thresholds: Tensor, strict: Tensor) -> Tensor:
    """``up >= T`` per unit (``up > T`` where ``strict``); ``up`` (B, U, H, W), the rest (U,)."""
    t, s = thresholds[None, :, None, None], strict[None, :, None, None]
    return (up > t) | ((up == t) & ~s)


def _progress(enabled: bool) -> Any:
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    return Progress(*columns, console=Console(stderr=True), disable=not enabled, transient=True)


# ----------------------------------------------------------------------------------------------
# the metric


@metric(
    "concept_detectors",
    scope="study",
    inputs=("model", "concept_data"),
    higher_is_better=True,
    category="interpretability",
    label="Concept detectors",
    description="Network dissection: units of a layer whose top activations match a concept (IoU > 0.05)",
)
def concept_detectors(
    model: nn.Module,
    data: Dataset | DataLoader,
    layer: str | None = None,
    quantile: float = 0.995,
    iou_threshold: float = 0.05,
    batch_size: int = 128,
    top_images: int = 8,
    progress: bool = False,
    max_buffer: int = MAX_BUFFER,
) -> DissectionResult:
    """Network dissection of one layer (Bau et al., CVPR 2017, §3.1; see the module docstring).

    Args:
        model: any model; put in eval mode for the passes (each module's mode is restored after).
        data: a dataset of ``(image, label, mask)`` items with concept masks (see the module
            docstring), or a ``DataLoader`` of one.
        layer: module path of the dissected layer (None: the model's default layer, the one
            Grad-CAM explains).
        quantile: per-unit activation quantile ``T_k`` (0.995 keeps the top 0.5 %).
        iou_threshold: a unit is a detector when its best IoU is above this.
        batch_size: images per forward pass (a DataLoader's own batch size wins).
        top_images: how many most-activating images (by the unit's maximum) to record per unit,
            for :func:`top_unit_panels` and :func:`xkd.report.figures.plot_top_units`.
        progress: show a progress bar (rich) on stderr.
        max_buffer: largest number of activations the streaming quantile may hold.

    Returns:
        A :class:`DissectionResult`; ``result["concept_detectors"]`` is the number of detectors.

    Raises:
        LayerNotFoundError: ``layer`` is not a module path of ``model`` (the message lists them).
        DissectionError: data without concept masks, a layer without a spatial output, or bad
            parameters.
    """
    t0 = time.perf_counter()
    if not 0.0 <= iou_threshold < 1.0:
        raise DissectionError(f"iou_threshold must be in [0, 1), got {iou_threshold}")
    if not 0.0 < quantile < 1.0:
        raise DissectionError(f"quantile must be in (0, 1), got {quantile} (Bau et al. use 0.995)")
    if batch_size < 1 or top_images < 0:
        raise DissectionError(f"batch_size must be >= 1 and top_images >= 0, got {batch_size} and {top_images}")
    dataset, batch_size, names, categories, load = _concept_source(data, batch_size)
    layer = default_layer(model) if layer is None else layer
    reader = _LayerReader(model, layer, model_device(model, torch.device("cpu")))
    n = len(dataset)
    batches = list(torch.arange(n).split(batch_size))
    with eval_mode(model), torch.no_grad(), reader.attached(), _progress(progress) as bar:
        # pass 1: thresholds (streaming quantile) and each unit's most activating images
        task = bar.add_task(f"dissect {layer}: quantiles", total=len(batches))
        stream: StreamingTopQuantile | None = None
        best_val = best_idx = finite = None  # finite: a device-side flag, read once after the pass (no sync per batch)
        non_finite = f"layer {layer!r} produced non-finite activations (nan or inf)"
        for start, index in zip(range(0, n, batch_size), batches):
            a = reader(load(index, False)[0])
            if stream is None:
                units, fh, fw = a.shape[1:]
                stream = StreamingTopQuantile(units, n * fh * fw, quantile, max_buffer)
            elif a.shape[1:] != (units, fh, fw):
                if not bool(finite):  # an earlier batch's error comes first
                    raise DissectionError(non_finite)
                raise DissectionError(
                    f"layer {layer!r} output {tuple(a.shape[1:])} for some images and {(units, fh, fw)} for others; "
                    "dissection needs images of one size (set data.image_size)"
                )
            ok = torch.isfinite(a).all()
            finite = ok if finite is None else finite & ok
            stream.update(a.transpose(0, 1).reshape(units, -1))
            peak = a.amax(dim=(2, 3)).T  # (units, B)
            cand_i = torch.arange(start, start + len(index), device=peak.device).expand_as(peak)  # = index
            if best_val is not None:
                peak, cand_i = torch.cat([best_val, peak], 1), torch.cat([best_idx, cand_i], 1)
            keep = peak.topk(min(top_images, peak.shape[1]), dim=1)
            best_val, best_idx = keep.values, cand_i.gather(1, keep.indices)
            bar.advance(task)
        assert stream is not None and stream.min is not None and best_idx is not None
        if not bool(finite):
            raise DissectionError(non_finite)
        thresholds = stream.result()
        strict = thresholds <= stream.min
        # pass 2: IoU of the binarised, upsampled maps with every concept, summed over the data
        task = bar.add_task(f"dissect {layer}: IoU", total=len(batches))
        k = len(names)
        # summed on the activations' device, copied to the CPU once after the pass (no sync per batch or slice)
        inter = torch.zeros(units, k, dtype=torch.float64, device=thresholds.device)
        unit_area = torch.zeros(units, dtype=torch.float64, device=thresholds.device)
        concept_area = torch.zeros(k, dtype=torch.float64, device=thresholds.device)
        image_size = None
        for index in batches:
            images, masks = load(index, True)
            a = reader(images)
            h, w = images.shape[-2:]
            image_size = (int(h), int(w))
            if masks.shape != (len(index), k, h, w):
                raise DissectionError(
                    f"concept masks of shape {tuple(masks.shape[1:])} do not match the images {(k, int(h), int(w))}: "
                    "the masks must be at the images' resolution, one per concept"
                )
            m = masks.to(a.device).flatten(2).float()  # (B, K, P)
            concept_area += m.sum(dim=(0, 2)).double()
            step = max(1, _UPSAMPLE_BUDGET // (len(index) * h * w))
            for u0 in range(0, units, step):
                sl = slice(u0, min(units, u0 + step))
                up = F.interpolate(a[:, sl], size=(h, w), mode="bilinear", align_corners=False)
                on = _binarise(up, thresholds[sl], strict[sl]).flatten(2).float()  # (B, u, P)
                unit_area[sl] += on.sum(dim=(0, 2)).double()
                inter[sl] += torch.einsum("bup,bkp->uk", on, m).double()
            bar.advance(task)
    return _summarise(
        layer, names, categories, thresholds.cpu(), strict.cpu(), inter.cpu(), unit_area.cpu(), concept_area.cpu(),
        best_idx.cpu(),
        quantile, iou_threshold, n, image_size, (int(fh), int(fw)), time.perf_counter() - t0,
    )  # fmt: skip


def _summarise(
    layer: str,
    names: list[str],
    categories: dict[str, str],
    thresholds: Tensor,
    strict: Tensor,
    inter: Tensor,
    unit_area: Tensor,
    concept_area: Tensor,
    top_idx: Tensor,
    quantile: float,
    iou_threshold: float,
    n_images: int,
    image_size: tuple[int, int] | None,
    feature_size: tuple[int, int],
    seconds: float,
) -> DissectionResult:
    """IoUs from the summed counts; best concept and detector flag per unit; the counts."""
    present = concept_area > 0
    union = unit_area[:, None] + concept_area[None, :] - inter
    iou = torch.where(present[None, :], inter / union.clamp_min(1.0), torch.full_like(inter, -1.0))
    best = iou.argmax(dim=1)
    cats = list(dict.fromkeys(categories[c] for c in names))
    per_concept = dict.fromkeys(names, 0)
    per_category = dict.fromkeys(cats, 0)
    units = []
    has = bool(present.any())
    for u in range(len(thresholds)):
        c = names[int(best[u])] if has else None
        value = float(iou[u, best[u]]) if has else None
        detector = value is not None and value > iou_threshold
        if detector:
            per_concept[c] += 1
            per_category[categories[c]] += 1
        units.append({
            "unit": u, "concept": c, "category": categories[c] if c else None, "iou": value, "detector": detector,
            "threshold": float(thresholds[u]), "rule": ">" if bool(strict[u]) else ">=",
        })  # fmt: skip
    n_det = sum(per_concept.values())
    return DissectionResult(
        concept_detectors=n_det,
        n_detectors=n_det,
        layer=layer,
        n_units=len(units),
        n_images=n_images,
        image_size=list(image_size) if image_size else None,
        feature_size=list(feature_size),
        quantile=quantile,
        iou_threshold=iou_threshold,
        concepts=list(names),
        categories={c: categories[c] for c in names},
        per_concept=per_concept,
        per_category=per_category,
        empty_concepts=[c for c, p in zip(names, present.tolist()) if not p],
        thresholds=[float(t) for t in thresholds],
        units=units,
        iou=[[float(v) if p else None for v, p in zip(row, present.tolist())] for row in iou.tolist()],
        top_images=top_idx.tolist(),
        seconds=seconds,
    )


# ----------------------------------------------------------------------------------------------
# the data of the top-units figure (drawn by xkd.report.figures.plot_top_units)


def top_unit_panels(
    result: dict[str, Any],
    model: nn.Module,
    data: Dataset | DataLoader,
    n_units: int = 8,
    n_images: int = 5,
    batch_size: int = 64,
) -> dict[str, Any]:
    """The panels of the figure of a dissection's best units (:func:`xkd.report.figures.plot_top_units`):
    one row per unit (detectors first, best IoU first), its most activating images and on each the
    binarised region ``A_k >= T_k`` (the unit's ``rule``) at the image's resolution.

    ``model`` and ``data`` must be the ones dissected (the result holds thresholds and image
    indices, not activations).

    Returns:
        ``{"layer", "quantile", "cols" (images per row), "rows": [{"unit": the unit's record,
        "cells": [(image (C, H, W), region bool ndarray (H, W)), ...]}]}``.
    """
    _, _, _, _, load = _concept_source(data, batch_size)
    ranked = sorted(result["units"], key=lambda u: (not u["detector"], -(u["iou"] if u["iou"] is not None else -1)))
    rows = [u for u in ranked if result["top_images"][u["unit"]]][:n_units]
    if not rows:
        raise DissectionError("the result has no unit with recorded top images (dissect with top_images >= 1)")
    cols = min(n_images, max(len(result["top_images"][u["unit"]]) for u in rows))
    wanted = sorted({i for u in rows for i in result["top_images"][u["unit"]][:cols]})
    index = torch.tensor(wanted)
    reader = _LayerReader(model, result["layer"], model_device(model, torch.device("cpu")))
    with eval_mode(model), torch.no_grad(), reader.attached():
        images = load(index, False)[0]
        acts = torch.cat([reader(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]).cpu()
    pos = {i: j for j, i in enumerate(wanted)}
    h, w = images.shape[-2:]
    panels = []
    for unit in rows:
        u = unit["unit"]
        cells = []
        for i in result["top_images"][u][:cols]:
            j = pos[i]
            up = F.interpolate(acts[j : j + 1, u : u + 1], size=(h, w), mode="bilinear", align_corners=False)
            t = torch.tensor([unit["threshold"]])
            cells.append((images[j], _binarise(up, t, torch.tensor([unit["rule"] == ">"]))[0, 0].cpu().numpy()))
        panels.append({"unit": unit, "cells": cells})
    return {"layer": result["layer"], "quantile": result["quantile"], "cols": cols, "rows": panels}
