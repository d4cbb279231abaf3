"""Explain teacher and students on the same test images and score the explanations.

For every configured explainer this computes, per model, the maps of the true class of each image
and the selected metrics (``evaluation.metrics``): faithfulness (fidelity, deletion/insertion AUC,
ROAD), localisation against masks (pointing game, top-K IoU and Dice, mask mass), the randomisation
sanity check and the mean execution time; per student, the agreement of its maps with the
teacher's (Pearson, rank correlation, top-k% IoU, superpixel MSE and sign agreement). Once per
student, the feature transfer scores FSS and RS (UniCAM) at matched layers.

Every metric is called through the registry (:data:`xkd.registry.METRICS`) with the keyword
arguments of ``evaluation.metric_params``; its headline value goes into the record, its details
where the report needs them. Metrics whose inputs do not exist (masks on data without masks) are
skipped and say so in the record.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from rich.console import Console
from torch import Tensor, nn

from xkd.config import EvaluationConfig, from_dict
from xkd.explain import build_explainer
from xkd.explain.base import explainer_applies, map_form, min_images, split_name
from xkd.explain.superpixel import SuperpixelParams, slic_segments
from xkd.metrics import as_result, localisation
from xkd.registry import EXPLAINERS, METRICS

if TYPE_CHECKING:
    from xkd.pipeline import TrainedModel

MASK_METRICS = ("pointing_game", "top_k_iou", "top_k_dice", "mask_mass", "region_precision")
AGREEMENT_METRICS = ("map_pearson", "rank_correlation", "top_k_agreement")
SUPERPIXEL_METRICS = ("superpixel_mse", "superpixel_sign_agreement")


def pair_explainer(name: str) -> bool:
    """True for explainers of a (student, teacher) pair (UniCAM): they run on students only."""
    return bool(getattr(EXPLAINERS.get(split_name(name)[0]), "needs_teacher", False))


class Scorer:
    """Calls registered metrics with the run's ``metric_params`` and keeps what was selected."""

    def __init__(self, ev: EvaluationConfig) -> None:
        self.ev = ev
        self.selected = set(ev.metrics)

    def wants(self, name: str) -> bool:
        return name in self.selected

    def full(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """The metric's raw return value (``metric_params`` override ``kwargs``)."""
        return METRICS.get(name).fn(*args, **{**kwargs, **self.ev.metric_params.get(name, {})})

    def __call__(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """The metric's headline value (a number, or None when undefined)."""
        return headline(as_result(name, self.full(name, *args, **kwargs)).value)


def headline(v: Any) -> Any:
    if isinstance(v, Tensor):
        v = v.item() if v.numel() == 1 else v.tolist()
    return v


def explain(
    name: str,
    params: dict[str, Any],
    model: nn.Module,
    images: Tensor,
    targets: Tensor,
    pad: tuple[Tensor, Tensor] | None = None,
    **context: Any,
) -> Tensor:
    """Maps of ``targets`` for ``images`` by explainer ``name``. An explainer that needs more images
    per call than given (UniCAM: 4) is called with the first images of ``pad`` (``(images,
    targets)``, e.g. other test images) appended, and only the maps of ``images`` are returned."""
    n, need = images.shape[0], min_images(name)
    if n < need and pad is not None:
        extra = need - n
        images = torch.cat([images, pad[0][:extra].to(images.device)])
        targets = torch.cat([targets, pad[1][:extra].to(targets.device)])
    with build_explainer(name, model, params, **context) as ex:
        return ex.explain(images, targets).maps[:n]


def score_model(
    sc: Scorer,
    name: str,
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    maps: Tensor,
    masks: Tensor | None,
    class_names: list[str],
    make: Callable[[nn.Module], Any],
) -> dict[str, Any]:
    """Every selected per-model metric of one explainer's ``maps``."""
    ev = sc.ev
    h, w = images.shape[2:]
    out: dict[str, Any] = {}
    if sc.wants("fidelity"):
        fid = sc.full(
            "fidelity",
            model,
            images,
            labels,
            maps,
            keep=ev.fidelity_keep,
            batch_size=ev.batch_size,
            class_names=class_names,
        )
        out["fidelity"] = fidelity_record(fid)
    for m in ("deletion_auc", "insertion_auc"):
        if sc.wants(m):
            out[m] = sc(m, model, images, maps, batch_size=ev.batch_size, targets=labels)
    if sc.wants("road"):
        road = sc.full("road", model, images, maps, targets=labels, batch_size=ev.batch_size)
        out["road"] = {k: headline(v) for k, v in road.items() if k != "per_image"}
    if masks is not None:
        k_values = localisation.medtex_k_values(h, w)
        if sc.wants("pointing_game"):
            out["pointing_game"] = sc("pointing_game", maps, masks)
        if sc.wants("top_k_iou") or sc.wants("top_k_dice"):
            per_k = sc.full("top_k_iou", maps, masks, k_values).get("per_k") or {}
            out["top_k"] = {str(k): v for k, v in per_k.items()}
            if sc.wants("top_k_iou"):
                out["top_k_iou"] = sc("top_k_iou", maps, masks, k_values)
            if sc.wants("top_k_dice"):
                out["top_k_dice"] = sc("top_k_dice", maps, masks, k_values)
        # images where the localisation metrics are undefined (left out of their means, never 0)
        undefined = {"empty_mask": int((~masks.flatten(1).bool().any(dim=1)).sum())}
        if sc.wants("mask_mass"):
            mm = sc.full("mask_mass", maps, masks)
            out["mask_mass"] = headline(as_result("mask_mass", mm).value)
            undefined["no_positive_attribution"] = mm["skipped_no_positive"]
        out["undefined"] = undefined
        if sc.wants("region_precision"):
            res = sc.full("region_precision", maps, masks)
            out["region_precision"], out["region_recall"] = res["region_precision"], res["region_recall"]
    if sc.wants("randomisation_sanity") and ev.sanity_images > 0:
        n = min(ev.sanity_images, images.shape[0])
        res = sc.full("randomisation_sanity", model, images[:n], make, targets=labels[:n])
        out["sanity"] = {
            "verdict": res["verdict"],
            "final_rank_correlation": headline(res["randomisation_sanity"]),
            "threshold": res["threshold"],
            "layers": res["layers"],
            "compared_after": res["compared_after"],
            "rank_correlation": headline(res["rank_correlation"]),
            "ssim": headline(res["ssim"]),
            "n_images": res["n_images"],
        }
    return out


def score_agreement(
    sc: Scorer,
    teacher_maps: Tensor,
    student_maps: Tensor,
    segments: Tensor | None,
    both_correct: Tensor,
    form: str = "pixel",
) -> dict[str, Any]:
    """Teacher-student agreement of one explainer's maps (each selected metric); ``form`` is the
    explainer's :attr:`~xkd.explain.base.Explainer.map_form` (how the superpixel metrics read the maps)."""
    out: dict[str, Any] = {}
    for m in AGREEMENT_METRICS:
        if sc.wants(m):
            kwargs = {"k": sc.ev.agreement_top_k} if m == "top_k_agreement" else {}
            out[m] = sc(m, teacher_maps, student_maps, **kwargs)
    if segments is not None:
        if sc.wants("superpixel_mse"):
            # each image's superpixel vector scaled by its largest |value| (signs kept): teacher and
            # student maps of most explainers live on different scales (set normalize: false for raw)
            out["superpixel_mse"] = sc(
                "superpixel_mse", teacher_maps, student_maps, segments, normalize=True, form=form
            )
        if sc.wants("superpixel_sign_agreement"):
            res = sc.full(
                "superpixel_sign_agreement", teacher_maps, student_maps, segments, correct=both_correct, form=form
            )
            out["superpixel_sign_agreement"] = headline(res["superpixel_sign_agreement"])
            out["sign_agreement_images"] = headline(res.get("evaluated"))
    return out


def explain_and_score(
    ev: EvaluationConfig,
    models: list[TrainedModel],
    images: Tensor,
    labels: Tensor,
    masks: Tensor | None,
    class_names: list[str],
    console: Console,
    random_labels: TrainedModel | None = None,
) -> dict[str, Any]:
    """Explain ``images`` (true-class targets) with every configured explainer for teacher and
    students, and score the maps. Returns the body of ``records/explanations.json`` (without the
    run-level fields) and the MET per model and explainer."""
    sc = Scorer(ev)
    teacher, students = models[0], models[1:]
    with torch.no_grad():
        preds = {m.role: predict(m.model, images, ev.batch_size) for m in models}
    correct = {r: p == labels for r, p in preds.items()}
    segments = None
    if any(sc.wants(m) for m in SUPERPIXEL_METRICS):
        segments = slic_segments(images, from_dict(SuperpixelParams, ev.superpixel, "superpixel")).to(images.device)
    per_model: dict[str, dict[str, Any]] = {m.role: {} for m in models}
    agree: dict[str, dict[str, Any]] = {s.role: {} for s in students}
    met: dict[str, dict[str, float]] = {m.role: {} for m in models}
    for e in ev.explainers:
        pair = pair_explainer(e.name)
        maps: dict[str, Tensor] = {}
        for m in students if pair else models:
            if not explainer_applies(e.name, m.model):
                console.print(f"{e.key} does not apply to {m.role}: skipped")
                continue
            context = {"teacher": teacher.model} if pair else {}
            console.print(f"explaining {m.role} with {e.name} ({images.shape[0]} images)")

            def make(model: nn.Module, e: Any = e, context: dict = context) -> Any:
                return build_explainer(e.name, model, e.params, **context)

            maps[m.role] = explain(e.name, e.params, m.model, images, labels, **context)
            if sc.wants("met"):
                n_met = min(ev.met_images, images.shape[0])
                with make(m.model) as ex:
                    met[m.role][e.key] = sc("met", ex, images[:n_met], labels[:n_met])
            per_model[m.role][e.key] = score_model(
                sc, e.name, m.model, images, labels, maps[m.role], masks, class_names, make
            )
        applies = explainer_applies(e.name, random_labels.model) if random_labels is not None else False
        if applies and sc.wants("data_randomisation_sanity") and not pair:
            label_sanity(sc, e, students, random_labels, images, labels, per_model)
        if pair or "teacher" not in maps:
            continue
        for s in students:
            both = correct["teacher"] & correct[s.role]
            agree[s.role][e.key] = score_agreement(sc, maps["teacher"], maps[s.role], segments, both, map_form(e.name))
    transfer = {}
    if sc.wants("fss") or sc.wants("rs"):
        transfer = score_transfer(sc, teacher, students, images, labels, class_names)
    return {
        "per_model": per_model,
        "agreement": agree,
        "transfer": transfer,
        "met": met,
        "predictions_correct": {r: int(c.sum()) for r, c in correct.items()},
    }


def same_architecture(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape for k in sa)


def label_sanity(
    sc: Scorer,
    e: Any,
    students: list[TrainedModel],
    random_labels: TrainedModel,
    images: Tensor,
    labels: Tensor,
    per_model: dict[str, dict[str, Any]],
) -> None:
    """Data-label randomisation check (Adebayo et al. 2018, §3.2) of explainer ``e`` for every student
    with the random-label model's architecture: its maps must differ from the random-label model's."""
    n = min(sc.ev.sanity_images, images.shape[0])
    for s in students:
        if n == 0 or e.key not in per_model[s.role] or not same_architecture(s.model, random_labels.model):
            continue

        def make(model: nn.Module, e: Any = e) -> Any:
            return build_explainer(e.name, model, e.params)

        res = sc.full("data_randomisation_sanity", s.model, random_labels.model, images[:n], make, targets=labels[:n])
        per_model[s.role][e.key]["label_sanity"] = {
            "verdict": res["verdict"],
            "rank_correlation": headline(res["data_randomisation_sanity"]),
            "ssim": headline(res["ssim"]),
            "threshold": res["threshold"],
            "n_images": res["n_images"],
        }


def predict(model: nn.Module, images: Tensor, batch_size: int) -> Tensor:
    return torch.cat([model(images[s : s + batch_size]).argmax(1) for s in range(0, len(images), batch_size)])


def score_transfer(
    sc: Scorer,
    teacher: TrainedModel,
    students: list[TrainedModel],
    images: Tensor,
    labels: Tensor,
    class_names: list[str],
) -> dict[str, Any]:
    """FSS and RS (UniCAM, SEEDS.md §5) of each student against the teacher at matched layers."""
    from xkd.metrics.transfer import pair_features

    layers = sc.ev.transfer_layers
    out = {}
    for s in students:
        feats = pair_features(
            s.model,
            teacher.model,
            images,
            student_layer=layers.get("student"),
            teacher_layer=layers.get("teacher"),
            batch_size=sc.ev.batch_size,
        )
        entry: dict[str, Any] = {"student_layer": feats.student_layer, "teacher_layer": feats.teacher_layer}
        if sc.wants("fss"):
            entry["fss"] = sc("fss", feats.student, feats.teacher)
        if sc.wants("rs"):
            rs = sc.full("rs", feats.student, feats.teacher, labels, num_classes=len(class_names))
            entry["rs"] = {k: headline(v) for k, v in rs.items()}
        out[s.role] = entry
    return out


def random_baseline(
    ev: EvaluationConfig, models: list[TrainedModel], images: Tensor, labels: Tensor, seed: int, class_names: list[str]
) -> dict[str, Any]:
    """Faithfulness scores of seeded uniform-random maps, per model: the chance level a real
    explainer's fidelity, deletion/insertion AUC and ROAD must beat to mean anything."""
    sc = Scorer(ev)
    g = torch.Generator().manual_seed(seed)
    maps = torch.rand(images.shape[0], *images.shape[2:], generator=g).to(images.device)
    out = {}
    for m in models:
        entry: dict[str, Any] = {}
        if sc.wants("fidelity"):
            fid = sc.full(
                "fidelity",
                m.model,
                images,
                labels,
                maps,
                keep=ev.fidelity_keep,
                batch_size=ev.batch_size,
                class_names=class_names,
            )
            entry |= {"fidelity": fid["fidelity"], "retained_probability": fid["retained"]}
        for name in ("deletion_auc", "insertion_auc"):
            if sc.wants(name):
                entry[name] = sc(name, m.model, images, maps, batch_size=ev.batch_size, targets=labels)
        if sc.wants("road"):
            entry["road"] = sc("road", m.model, images, maps, targets=labels, batch_size=ev.batch_size)
        out[m.role] = entry
    return out


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
