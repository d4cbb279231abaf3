"""Explain teacher and students on the same test images and score the explanations: one loop.

For every configured explainer and every model it applies to, the maps of the true class of each
image are computed once (metrics that check the model's own decision, fidelity, get maps of the
predicted class: the images the model gets wrong are explained again for the class it predicts);
then every selected metric (``evaluation.metrics``) is called with the
inputs its declaration asks for (:class:`~xkd.metrics.base.MetricInfo`), by scope:

- ``timing``: the cost of explaining (mean explanation time), per model and explainer;
- ``model``: faithfulness, localisation, the sanity checks, per model and explainer;
- ``agreement``: each student's maps against the teacher's, per explainer (and, for the metrics that
  ask for ``independent_maps``, against the independent student's: Ojha et al.'s ``closer_to_teacher``);
- ``transfer``: each student's features against the teacher's (UniCAM's FSS and RS), once.

A metric whose inputs do not exist (masks on data without masks, the random-label model of a
student of another architecture) is skipped. ``evaluation.metric_params`` override a metric's
keyword arguments. The inputs are gathered and moved to the device here, once, and nowhere else.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial
from typing import Any

import torch
from rich.console import Console
from torch import Tensor, nn

from xkd.config import EvaluationConfig
from xkd.engine.trained import TrainedModel
from xkd.explain.base import ExplainerSpec, check_map_shape
from xkd.explain.superpixel import SuperpixelParams, slic_segments
from xkd.metrics.base import MetricInfo, declared
from xkd.metrics.localisation import medtex_k_values
from xkd.metrics.transfer import model_features
from xkd.models.hooks import default_layer
from xkd.plan import RunPlan
from xkd.schema import from_dict
from xkd.stats import check_same_samples


def explain(
    spec: ExplainerSpec,
    model: nn.Module,
    images: Tensor,
    targets: Tensor,
    pad: tuple[Tensor, Tensor] | None = None,
    **context: Any,
) -> Tensor:
    """Maps of ``targets`` for ``images`` by explainer ``spec``. An explainer that needs more images
    per call than given (UniCAM: 4) is called with the first images of ``pad`` (``(images,
    targets)``, e.g. other test images) appended, and only the maps of ``images`` are returned."""
    n, need = images.shape[0], spec.min_images
    if n < need and pad is not None:
        extra = need - n
        images = torch.cat([images, pad[0][:extra].to(images.device)])
        targets = torch.cat([targets, pad[1][:extra].to(targets.device)])
    with spec.build(model, **context) as ex:
        maps = ex.explain(images, targets).maps
    # one map per image at its resolution: a user's explainer is named here, not by a metric failing on it
    check_map_shape(maps, tuple(images.shape[-2:]), images.shape[0], method=spec.key)
    return maps[:n]


class Scorer:
    """Calls the selected metrics of one scope with the inputs they declare."""

    def __init__(self, ev: EvaluationConfig) -> None:
        self.ev = ev
        chosen = set(ev.metrics)
        self.metrics = [m for m in declared() if m.name in chosen]

    def of(self, scope: str) -> list[MetricInfo]:
        return [m for m in self.metrics if m.scope == scope]

    def wants(self, *needs: str) -> bool:
        """Whether a selected metric needs any of ``needs``."""
        return any(n in m.needs for m in self.metrics for n in needs)

    def call(self, info: MetricInfo, values: dict[str, Any]) -> Any | None:
        """``info``'s raw result on ``values``, or None when an input is missing or its subset is empty."""
        if any(values.get(n) is None for n in info.needs if n != "explainer"):
            return None
        if info.subset is not None:
            n = min(int(getattr(self.ev, info.subset)), values["images"].shape[0])
            if n == 0:
                return None
            values = {k: (v[:n] if k in PER_IMAGE and v is not None else v) for k, v in values.items()}
        if "explainer" in info.needs:
            with values["make_explainer"](values["model"]) as ex:
                return self._run(info, {**values, "explainer": ex})
        return self._run(info, values)

    def _run(self, info: MetricInfo, values: dict[str, Any]) -> Any:
        args, kwargs = info.bind(values)
        return info.fn(*args, **{**kwargs, **self.ev.metric_params.get(info.name, {})})

    def score(self, infos: Iterable[MetricInfo], values: dict[str, Any], chance: bool = False) -> dict[str, Any]:
        """The record entries of every metric of ``infos`` that applies to ``values``."""
        out: dict[str, Any] = {}
        for info in infos:
            result = self.call(info, values)
            if result is not None:
                merge(out, info.to_record(result, chance=chance))
        return out


PER_IMAGE = (
    "images",
    "labels",
    "maps",
    "masks",
    "teacher_maps",
    "student_maps",
    "independent_maps",
    "segments",
    "both_correct",
)
"""Inputs with one entry per image: a metric's ``subset`` takes the first images of each."""


def merge(into: dict[str, Any], entries: dict[str, Any]) -> None:
    """Add ``entries`` to ``into``, merging nested dicts (two metrics may add to one entry)."""
    for k, v in entries.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            merge(into[k], v)
        else:
            into[k] = v


def explain_and_score(
    plan: RunPlan,
    models: list[TrainedModel],
    images: Tensor,
    labels: Tensor,
    masks: Tensor | None,
    class_names: list[str],
    console: Console,
    random_labels: TrainedModel | None = None,
) -> dict[str, Any]:
    """Explain ``images`` (true-class targets) with every planned explainer for teacher and students,
    and score the maps. Returns the body of ``records/explanations.json`` (without the run-level
    fields) and the MET per model and explainer."""
    ev = plan.cfg.evaluation
    sc = Scorer(ev)
    teacher, students = models[0], models[1:]
    with torch.no_grad():
        preds = {m.role: predict(m.model, images, ev.batch_size) for m in models}
    correct = {r: p == labels for r, p in preds.items()}
    common = run_inputs(sc, images, labels, masks, class_names)
    per_model: dict[str, dict[str, Any]] = {m.role: {} for m in models}
    agree: dict[str, dict[str, Any]] = {s.role: {} for s in students}
    met: dict[str, dict[str, Any]] = {m.role: {} for m in models}
    for e in plan.explainers:
        maps: dict[str, Tensor] = {}
        for m in students if e.pair else models:
            if not e.applies(m.model):
                console.print(f"{e.key} does not apply to {m.role}: skipped")
                continue
            context, base = explainer_context(e, m, teacher, students)
            if context is None:
                console.print(f"{e.key}: {m.role} has no base model of its architecture: skipped")
                continue
            console.print(f"explaining {m.role} with {e.key} ({images.shape[0]} images)")
            maps[m.role] = explain(e, m.model, images, labels, **context)
            values = {
                **common,
                "model": m.model,
                "maps": maps[m.role],
                "map_form": e.map_form,  # mask_mass reads superpixel-form maps once per superpixel
                "prediction_maps": prediction_maps(
                    sc, e, m.model, images, labels, preds[m.role], maps[m.role], context
                ),
                "make_explainer": partial(e.build, **context),
                "random_label_model": label_sanity_model(e, m, random_labels),
            }
            for info in sc.of("timing"):
                result = sc.call(info, values)
                if result is not None:
                    met[m.role][e.key] = info.to_record(result)[info.name]
            per_model[m.role][e.key] = score_maps(sc, values)
            if base is not None:  # which model the map was measured against
                per_model[m.role][e.key]["base_model"] = base.role
        if e.pair or "teacher" not in maps:
            continue
        for s in students:
            if s.role not in maps:
                continue
            values = {
                **common,
                "teacher_maps": maps["teacher"],
                "student_maps": maps[s.role],
                "both_correct": correct["teacher"] & correct[s.role],
                "same_prediction": preds["teacher"] == preds[s.role],
                "map_form": e.map_form,
                **independent_inputs(plan, s.role, maps),
            }
            agree[s.role][e.key] = sc.score(sc.of("agreement"), values)
    transfer = {}
    if sc.of("transfer"):
        transfer = score_transfer(sc, common, teacher, students, images)
    return {
        "per_model": per_model,
        "agreement": agree,
        "transfer": transfer,
        "met": met,
        "predictions_correct": {r: int(c.sum()) for r, c in correct.items()},
    }


def independent_inputs(plan: RunPlan, role: str, maps: dict[str, Tensor]) -> dict[str, Any]:
    """``independent_maps`` and ``independent_role`` for student ``role``: the maps of the independent
    student the plan pairs it with (:attr:`RunPlan.independent`), on the teacher's maps' device; None
    for the independent student itself, a student of another architecture, or when that student has
    no maps of this explainer (the metrics needing them are then skipped)."""
    other = plan.independent.get(role)
    if other is None or other not in maps:
        return {"independent_maps": None, "independent_role": None}
    return {"independent_maps": maps[other].to(maps["teacher"].device), "independent_role": other}


def prediction_maps(
    sc: Scorer,
    e: ExplainerSpec,
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    preds: Tensor,
    maps: Tensor,
    context: dict[str, Any],
) -> Tensor | None:
    """``model``'s maps of its **predicted** class (what fidelity checks): the true-class ``maps``
    where it is right, the images it gets wrong explained again for the class it predicts. None when
    no selected metric needs them."""
    if not sc.wants("prediction_maps"):
        return None
    wrong = preds != labels
    if not bool(wrong.any()):
        return maps
    out = maps.clone()
    out[wrong] = explain(e, model, images[wrong], preds[wrong], pad=(images, labels), **context)
    return out


def score_maps(sc: Scorer, values: dict[str, Any]) -> dict[str, Any]:
    """The record of one model's maps of one explainer: every selected metric of scope ``model``,
    and where the data has masks, the images whose mask is empty (localisation is undefined there:
    left out of the means, never scored 0)."""
    entry = sc.score(sc.of("model"), values)
    masks = values.get("masks")
    if masks is not None:
        merge(entry, {"undefined": {"empty_mask": int((~masks.flatten(1).bool().any(dim=1)).sum())}})
    return entry


def run_inputs(
    sc: Scorer, images: Tensor, labels: Tensor, masks: Tensor | None, class_names: list[str], segments: bool = True
) -> dict[str, Any]:
    """The inputs every metric of the run may ask for, on the images' device (SLIC ``segments`` only
    when a selected metric needs them)."""
    ev = sc.ev
    h, w = images.shape[2:]
    segs = None
    usable = [m for m in sc.metrics if "segments" in m.needs and ("masks" not in m.needs or masks is not None)]
    if segments and usable:
        segs = slic_segments(images, from_dict(SuperpixelParams, ev.superpixel, "superpixel")).to(images.device)
    return {
        "images": images,
        "labels": labels.to(images.device),
        "masks": None if masks is None else masks.to(images.device),
        "k_values": medtex_k_values(h, w),
        "segments": segs,
        "map_form": "pixel",  # the default; explain_and_score sets each explainer's own
        "class_names": class_names,
        "num_classes": len(class_names),
        "batch_size": ev.batch_size,
        "fidelity_keep": ev.fidelity_keep,
        "agreement_top_k": ev.agreement_top_k,
    }


def explainer_context(
    e: ExplainerSpec, m: TrainedModel, teacher: TrainedModel, students: list[TrainedModel]
) -> tuple[dict[str, Any] | None, TrainedModel | None]:
    """What explainer ``e`` needs besides the model to explain ``m``: ``teacher=`` for UniCAM,
    ``base=`` for its KD-vs-base maps; and the base model used. ``(None, None)`` when ``m`` has no
    base model (its maps are skipped)."""
    context: dict[str, Any] = {"teacher": teacher.model} if e.pair else {}
    if not e.needs_base:
        return context, None
    base = base_model(m, teacher, students)
    if base is None:
        return None, None
    return {**context, "base": base.model}, base


def base_model(m: TrainedModel, teacher: TrainedModel, students: list[TrainedModel]) -> TrainedModel | None:
    """The base model of student ``m`` for UniCAM's KD-vs-base maps (Adhane et al.'s
    ``student_kd_given_base_model``): the run's ``scratch`` student of ``m``'s architecture, else the
    teacher when it has that architecture (their README allows it); None for the scratch student
    itself and when there is neither."""
    if m.distiller == "scratch":
        return None
    for s in students:
        if s.distiller == "scratch" and s is not m and same_architecture(s.model, m.model):
            return s
    return teacher if same_architecture(teacher.model, m.model) else None


def same_architecture(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape for k in sa)


def label_sanity_model(e: ExplainerSpec, m: TrainedModel, random_labels: TrainedModel | None) -> nn.Module | None:
    """The random-label model the data-label randomisation check (Adebayo et al., NeurIPS 2018, §3.2)
    compares student ``m``'s maps with: only for students of its architecture, and explainers of
    one model (not UniCAM's pairs) that apply to it."""
    if random_labels is None or m.role == "teacher" or e.pair or not e.applies(random_labels.model):
        return None
    return random_labels.model if same_architecture(m.model, random_labels.model) else None


def predict(model: nn.Module, images: Tensor, batch_size: int) -> Tensor:
    return torch.cat([model(images[s : s + batch_size]).argmax(1) for s in range(0, len(images), batch_size)])


def score_transfer(
    sc: Scorer, common: dict[str, Any], teacher: TrainedModel, students: list[TrainedModel], images: Tensor
) -> dict[str, Any]:
    """Transfer metrics (UniCAM's FSS and RS) of each student against the teacher at matched layers."""
    layers = sc.ev.transfer_layers
    t_layer = layers.get("teacher") or default_layer(teacher.model)
    t_feats, _ = model_features(teacher.model, images, t_layer, sc.ev.batch_size)  # once for every student
    out = {}
    for s in students:
        s_layer = layers.get("student") or default_layer(s.model)
        s_feats, _ = model_features(s.model, images, s_layer, sc.ev.batch_size)
        check_same_samples(s_feats, t_feats)
        # the statistics run where the features are (model_features returns them on the CPU)
        device = s_feats.device
        values = {
            **common,
            "labels": common["labels"].to(device),
            "student_features": s_feats,
            "teacher_features": t_feats.to(device),
        }
        entry: dict[str, Any] = {"student_layer": s_layer, "teacher_layer": t_layer}
        out[s.role] = entry | sc.score(sc.of("transfer"), values)
    return out


def random_baseline(
    ev: EvaluationConfig, models: list[TrainedModel], images: Tensor, labels: Tensor, seed: int, class_names: list[str]
) -> dict[str, Any]:
    """Scores of seeded uniform-random maps, per model, with every selected metric declared
    ``chance=True`` (fidelity, deletion/insertion AUC, ROAD): the chance level a real explainer must
    beat to mean anything."""
    sc = Scorer(ev)
    chance = [m for m in sc.of("model") if m.chance]
    g = torch.Generator().manual_seed(seed)
    maps = torch.rand(images.shape[0], *images.shape[2:], generator=g).to(images.device)
    common = {
        **run_inputs(sc, images, labels, None, class_names, segments=False),
        "maps": maps,
        "prediction_maps": maps,
    }
    return {m.role: sc.score(chance, {**common, "model": m.model}, chance=True) for m in models}
