"""``xkd study kd-vs-ls``: does knowledge distillation make a student more interpretable than
training from scratch, and label smoothing less? (Han, Kim, Choi & Yoon, "On the Impact of Knowledge Distillation for Model
Interpretability", ICML 2023)

Built on :func:`xkd.comparison.compare`: the config's students (at least one ``scratch``, one
``label_smoothing`` and one ``hinton_kd``; any other registered distiller may be added) are trained
over N seeds with the same data, architecture, optimiser and budget. Then, from each seed's
checkpoints, every student (and the teacher, as a reference) is measured on:

- **concept detectors** per category (network dissection, :mod:`xkd.metrics.dissection`) at the
  study's layer over the concept data set;
- **precision and recall** of its attributions (``study.explainer``, true class) against the known
  discriminative region (the data's masks: the object on ``concepts``, the lesion on ``lesions``);
- **DiffROAR** at several fractions of kept pixels (:mod:`xkd.studies.diffroar`, cached).

The numbers go to ``records/study.json`` (mean ± std and per-seed values); the verdict on each claim
is computed from them (:mod:`xkd.studies.verdict`) and the page ``study.html`` is rendered from that
record.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from xkd.comparison import compare, stat
from xkd.config import RunConfig
from xkd.data import build_dataset
from xkd.data.base import TensorImageDataset, fetch
from xkd.distill import build_distiller
from xkd.engine.distributed import resolve_device
from xkd.errors import ConfigError
from xkd.explain import build_explainer
from xkd.files import read_json, write_json
from xkd.metrics.dissection import check_concept_data, concept_detectors, top_unit_panels
from xkd.metrics.localisation import region_precision_recall
from xkd.models.hooks import default_layer, get_module
from xkd.pipeline import load_run_models, weights_key
from xkd.prepare import build_for
from xkd.registry import STUDIES
from xkd.report.figures import plot_top_units
from xkd.report.study import render_study_report
from xkd.rundir import RunDir, cache_root
from xkd.schema import to_dict
from xkd.studies.common import students_by_distiller, teacher_warnings
from xkd.studies.diffroar import diffroar
from xkd.studies.verdict import judge

REQUIRED = {"scratch": "scratch", "label_smoothing": "label smoothing", "hinton_kd": "KD"}


def roles_by_distiller(cfg: RunConfig) -> dict[str, str]:
    """The first student of each required distiller, by distiller name; a clear error if one is missing."""
    return students_by_distiller(
        cfg,
        REQUIRED,
        "xkd study kd-vs-ls compares scratch, label smoothing and KD students",
        "any other registered distiller may be added too",
    )


def preflight(cfg: RunConfig) -> None:
    """Check everything the measurements need before any training: one student architecture, masks on
    the study's data (the discriminative region) and concept masks on the concept data, and the
    dissected layers in the teacher and every student. Raises the error a late failure would."""
    arch = to_dict(cfg.student_model)
    for i, s in enumerate(cfg.students):
        if s.model is not None and to_dict(s.model) != arch:
            raise ConfigError(
                f"students[{i}] ({s.name}) sets its own model: xkd study kd-vs-ls compares methods on one student "
                f"architecture; remove students[{i}].model so every student uses student_model"
            )
    data = build_dataset(cfg.data)
    if not data.has_masks:
        raise _no_masks(cfg)
    check_concept_data(data.test if cfg.study.concepts is None else build_dataset(cfg.study.concepts).test)
    teacher = build_for(cfg.teacher.model, data, cfg.seed)
    if cfg.study.teacher_layer is not None:
        get_module(teacher, cfg.study.teacher_layer)
    if cfg.study.layer is not None:
        for s in cfg.students:
            student = build_distiller(s.distiller, build_for(cfg.student_model, data, cfg.seed), teacher, s.params)
            get_module(student.student, cfg.study.layer)


def _no_masks(cfg: RunConfig) -> ConfigError:
    return ConfigError(
        f"the study's data {cfg.data.name!r} has no masks: the precision/recall of attributions needs the known "
        "discriminative region (use `concepts` or `lesions`, or an imagefolder with masks)"
    )


def _region_masks(cfg: RunConfig, data: Any) -> Any:
    """The test split's images, labels and masks; a clear error if the data has no masks."""

    batch = fetch(data.test, torch.arange(len(data.test)))
    if batch.masks is None:
        raise _no_masks(cfg)
    return batch.images, batch.labels, batch.masks


@STUDIES.register("kd-vs-ls")
def run_study(
    cfg: RunConfig, seeds: int | None = None, *, resume: bool = False, overwrite: bool = False, progress: bool = True
) -> Path:
    """Run the study and return its folder (``study.html``, ``records/study.json``, the comparison)."""

    roles = roles_by_distiller(cfg)
    preflight(cfg)
    t0 = time.perf_counter()
    out = compare(cfg, seeds, resume=resume, overwrite=overwrite, progress=progress)
    console = Console(stderr=True)  # --no-progress hides bars, not these lines
    study = RunDir(out)
    cmp = study.read_record("compare")
    measured, empty = measure(cfg, out, cmp, console)
    body = summarise(cfg, cmp, measured, roles)
    body["empty_concepts"] = empty
    body["warnings"] = teacher_warnings([(cmp, "the teacher")])
    body["seconds"] = time.perf_counter() - t0
    study.write_record("study", body)
    html = render_study_report(out)
    console.print(f"study report: {html}  ({time.perf_counter() - t0:.0f} s)")
    return out


def measure(
    cfg: RunConfig, out: Path, cmp: dict[str, Any], console: Console
) -> tuple[dict[str, list[dict[str, Any]]], list[str]]:
    """Per role, one dict per seed (the teacher, shared by every seed, once): dissection counts, region
    precision/recall, DiffROAR; and the concepts with no positive pixel in the concept data. Each is
    kept in ``records/measured/`` keyed by the model's weights and the settings, so a resumed study
    measures only what is new (it measured every model of every seed again)."""

    st, folder = cfg.study, RunDir(out)
    data = build_dataset(cfg.data)
    concepts = data if st.concepts is None else build_dataset(st.concepts)
    splits = {n: _tensor_split(getattr(data, n)).scaled() for n in ("train", "val", "test")}
    test_images, test_labels, test_masks = _region_masks(cfg, data)
    device = resolve_device(cfg.device)  # dissection, maps and DiffROAR's retraining run there
    retrain = st.diffroar.model or cfg.student_model
    per_role: dict[str, list[dict[str, Any]]] = {r: [] for r in cmp["roles"]}
    empty: list[str] = []
    for s in cmp["seeds"]:
        run_dir = RunDir(out / cmp["runs"][str(s)]["dir"])
        _, models, _ = load_run_models(run_dir, device)
        for role, model in models.items():
            if role == "teacher" and per_role[role]:  # one teacher for every seed: measured once (n = 1)
                continue
            key = {"weights": weights_key(model), "study": to_dict(st), "data": to_dict(cfg.data),
                   "retrain": to_dict(retrain), "seed": s}  # fmt: skip
            saved = folder.records / "measured" / f"seed_{s}_{role}.json"
            figure = folder.figures / f"top_units_{role}.png"
            old = read_json(saved) if saved.is_file() else {}
            if old.get("key") == key and (s != cmp["seeds"][0] or figure.is_file()):
                console.print(f"seed {s}: {role} was measured with these weights and settings: reused")
                per_role[role].append(old["entry"])
                _note_empty(old["empty_concepts"], empty, console)
                continue
            console.print(f"seed {s}: measuring {role}")
            layer = (st.teacher_layer if role == "teacher" else st.layer) or default_layer(model)
            result = concept_detectors(
                model, concepts.test, layer=layer, quantile=st.quantile, iou_threshold=st.iou_threshold
            )
            if s == cmp["seeds"][0]:  # the top units of every model of the first seed, for the page
                panels = top_unit_panels(result, model, concepts.test)
                plot_top_units(panels, figure)
            det = {k: v for k, v in result.to_record().items() if k not in ("iou", "top_images", "thresholds")}
            with build_explainer(st.explainer, model, st.explainer_params) as ex:
                maps = torch.cat(
                    [
                        ex.explain(test_images[i : i + 256], test_labels[i : i + 256]).maps
                        for i in range(0, len(test_images), 256)
                    ]
                )
            pr = region_precision_recall(maps, test_masks, fraction=st.region_fraction)
            entry: dict[str, Any] = {"seed": s, "dissection": det, "precision": pr["region_precision"],
                                     "recall": pr["region_recall"]}  # fmt: skip
            if role != "teacher":
                entry["diffroar"] = diffroar(
                    model, weights_key(model), splits, data.num_classes, st.diffroar, retrain,
                    to_dict(cfg.data), s, device, cache_root(cfg),
                )  # fmt: skip
            per_role[role].append(entry)
            write_json(saved, {"key": key, "entry": entry, "empty_concepts": list(result["empty_concepts"])})
            _note_empty(result["empty_concepts"], empty, console)
    return per_role, empty


def _note_empty(concepts: list[str], empty: list[str], console: Console) -> None:
    """Add ``concepts`` without a positive pixel to ``empty``, saying each once."""
    for c in concepts:
        if c not in empty:
            empty.append(c)
            console.print(f"[yellow]concept {c!r} has no positive pixel in the concept data: no IoU, never a detector")


def _tensor_split(ds: Any) -> Any:

    if isinstance(ds, TensorImageDataset):
        return ds
    batch = fetch(ds, torch.arange(len(ds)))
    return TensorImageDataset(batch.images, batch.labels, batch.masks)


def summarise(
    cfg: RunConfig, cmp: dict[str, Any], measured: dict[str, list[dict[str, Any]]], roles: dict[str, str]
) -> dict[str, Any]:
    """Mean ± std per method of every measured number, and the verdicts."""
    categories = sorted({c for entries in measured.values() for e in entries for c in e["dissection"]["per_category"]})
    fractions = list(cfg.study.diffroar.fractions)
    methods: dict[str, Any] = {}
    for role, entries in measured.items():
        m: dict[str, Any] = {
            "accuracy": cmp["methods"][role]["accuracy"],
            "distiller": cmp["methods"][role].get("distiller"),
            "detectors": {c: stat([e["dissection"]["per_category"].get(c, 0) for e in entries]) for c in categories},
            "detectors_total": stat([e["dissection"]["n_detectors"] for e in entries]),
            "precision": stat([e["precision"] for e in entries]),
            "recall": stat([e["recall"] for e in entries]),
            "layer": entries[0]["dissection"]["layer"] if entries else None,
            "units": entries[0]["dissection"]["n_units"] if entries else None,
        }
        if entries and "diffroar" in entries[0]:
            m["diffroar"] = {
                str(f): {
                    "diffroar": stat([e["diffroar"]["diffroar"][i] for e in entries]),
                    "keep_top": stat([e["diffroar"]["keep_top"][i] for e in entries]),
                    "keep_bottom": stat([e["diffroar"]["keep_bottom"][i] for e in entries]),
                }
                for i, f in enumerate(fractions)
            }
            m["diffroar_mean"] = stat([sum(e["diffroar"]["diffroar"]) / len(fractions) for e in entries])
        methods[role] = m
    kd, ls, sc = roles["hinton_kd"], roles["label_smoothing"], roles["scratch"]
    obj = "object" if "object" in categories else (categories[0] if categories else None)

    def values(role: str, key: str, sub: str | None = None) -> list[Any]:
        s = methods[role][key] if sub is None else methods[role][key].get(sub) or {}
        return list((s or {}).get("values") or [])

    verdicts = []
    if obj is not None:
        verdicts.append(judge(f"KD gives more {obj} detectors than training from scratch", kd,
                              values(kd, "detectors", obj), sc, values(sc, "detectors", obj), higher=True,
                              quantity=f"{obj} detectors", spec=".2f"))  # fmt: skip
        verdicts.append(judge(f"Label smoothing gives fewer {obj} detectors than training from scratch", ls,
                              values(ls, "detectors", obj), sc, values(sc, "detectors", obj), higher=False,
                              quantity=f"{obj} detectors", spec=".2f"))  # fmt: skip
    verdicts.append(judge("KD's attributions are more precise on the discriminative region than scratch's", kd,
                          values(kd, "precision"), sc, values(sc, "precision"), higher=True,
                          quantity=f"precision of the top {cfg.study.region_fraction:.0%} pixels"))  # fmt: skip
    verdicts.append(judge("KD's attributions highlight more discriminative features than scratch's (DiffROAR)", kd,
                          values(kd, "diffroar_mean"), sc, values(sc, "diffroar_mean"), higher=True,
                          quantity="DiffROAR averaged over the fractions"))  # fmt: skip
    return {
        "name": cfg.name,
        "study": "kd-vs-ls",
        "seeds": cmp["seeds"],
        "roles": cmp["roles"],
        "students": cmp["students"],
        "claim_roles": roles,
        "categories": categories,
        "fractions": fractions,
        "config": to_dict(cfg.study),
        "methods": methods,
        "per_seed": measured,
        "verdicts": [v.to_record() for v in verdicts],
        "seed_run_seconds": cmp.get("seed_run_seconds"),
    }
