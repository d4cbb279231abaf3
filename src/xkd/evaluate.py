"""Score a trained teacher and its students, explain both, and write the run's records.

Everything the report shows is computed here once and frozen in ``records/`` (the report reads only these):
classification metrics on the test split, post-hoc agreement of each student with the teacher's
predictions, parameters and FLOPs, mean explanation time, fidelity, deletion/insertion AUC,
teacher-student explanation agreement and, where the data has masks, localisation.

Maps explain the **true class** of each test image for every model, so teacher and student maps
answer the same question and can be compared pixel for pixel; fidelity, which checks whether the
model's prediction survives, scores maps of the predicted class (:func:`xkd.scoring.prediction_maps`).
"""

from __future__ import annotations

import datetime as dt
import time
from typing import Any

import torch
from rich.console import Console
from safetensors.torch import save as save_safetensors
from torch import Tensor

from xkd.data import DataBundle, make_loader
from xkd.data.base import dataset_labels, fetch
from xkd.engine.trained import TrainedModel
from xkd.errors import NonFiniteAttributionError
from xkd.files import atomic_write_bytes, library_versions
from xkd.metrics import classification, cost
from xkd.metrics.base import metric_info
from xkd.plan import RunPlan
from xkd.rundir import RunDir
from xkd.schema import to_dict
from xkd.scoring import explain, explain_and_score, explainer_context, random_baseline


def select_indices(labels: Tensor, num: int | None, seed: int) -> Tensor:
    """A seeded, class-interleaved selection of ``num`` test indices (all when None)."""
    if num is None or num >= len(labels):
        return torch.arange(len(labels))
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(labels), generator=g)
    return torch.sort(perm[:num]).values


def sample_indices(labels: Tensor, per_class: int, num_classes: int) -> Tensor:
    """The first ``per_class`` test images of every class, class by class (for the report grid)."""
    out = []
    for c in range(num_classes):
        out.append(torch.nonzero(labels == c).flatten()[:per_class])
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def evaluate_run(
    plan: RunPlan,
    data: DataBundle,
    teacher: TrainedModel,
    students: list[TrainedModel],
    run_dir: RunDir,
    device: torch.device,
    *,
    started: dt.datetime,
    t0: float,
    train_seconds: float,
    world_size: int = 1,
    progress: bool = True,
    random_labels: TrainedModel | None = None,
) -> dict[str, Any]:
    """Compute every metric for teacher and students and write ``records/`` and ``metrics.json``.

    ``random_labels`` is the student architecture trained on permuted labels, for the data-label
    randomisation check (``data_randomisation_sanity``)."""
    console = Console(stderr=True)  # --no-progress hides bars, not these lines
    cfg, ev = plan.cfg, plan.cfg.evaluation
    models = [teacher, *students]
    for m in models:
        m.model.to(device).eval()
    k = data.num_classes
    c, h, w = data.image_shape
    test_loader = make_loader(data.test, batch_size=ev.batch_size, shuffle=False, seed=cfg.seed)

    console.print("evaluating on the test split")
    tests = {m.role: classification.evaluate_model(m.model, test_loader, k, device) for m in models}
    teacher_preds = tests["teacher"]["preds"]
    model_records: dict[str, Any] = {}
    for m in models:
        t = tests[m.role]
        fl = cost.flops(m.model, (c, h, w))
        model_records[m.role] = {
            "role": m.role,
            "model": m.model_name,
            "distiller": m.distiller,
            "distiller_params": m.distiller_params,
            "params": cost.parameter_count(m.model),
            "flops": fl["flops"],
            "macs": fl["macs"],
            "train": {  # seconds = loop + distiller setup + assistant (see TrainedModel)
                "history": m.result.history,
                "best_epoch": m.result.best_epoch,
                **m.train_record(),
                "checkpoint": run_dir.relative(run_dir.checkpoint(m.role)),
            },
            "test": {
                "accuracy": t["accuracy"],
                "macro_f1": t["macro_f1"],
                "loss": t["loss"],
                "confusion_matrix": t["confusion_matrix"].tolist(),
            },
            "test_last": m.last_test,
            "posthoc": None if m.role == "teacher" else classification.posthoc_agreement(t["preds"], teacher_preds, k),
            "met": {},
        }
        if m.assistant is not None:
            a = m.assistant
            at = classification.evaluate_model(a.model, test_loader, k, device)
            model_records[m.role]["assistant"] = {
                "role": a.role,
                "model": a.model_name,
                "distiller": a.distiller,
                "distiller_params": a.distiller_params,
                "params": cost.parameter_count(a.model),
                "test": {"accuracy": at["accuracy"], "macro_f1": at["macro_f1"]},
                "posthoc": classification.posthoc_agreement(at["preds"], teacher_preds, k),
                "train": {"best_epoch": a.result.best_epoch, **a.train_record()},
                "checkpoint": run_dir.relative(run_dir.checkpoint(a.role)),
            }

    # -- explanations on a seeded subset of the test split ------------------------------------
    t_explain = time.perf_counter()
    test_labels = dataset_labels(data.test)
    idx = select_indices(test_labels, ev.num_images, cfg.seed)
    batch = fetch(data.test, idx)
    images, labels, masks = batch.images.to(device), batch.labels.to(device), batch.masks
    names = [e.key for e in plan.explainers]
    try:
        scored = explain_and_score(plan, models, images, labels, masks, data.class_names, console, random_labels)
    except NonFiniteAttributionError as e:  # name the images as the user can find them: in the test split
        split = [int(idx[i]) for i in e.indices if i < len(idx)]
        raise NonFiniteAttributionError(f"{e} (test-split indices: {', '.join(map(str, split[:10]))})", split) from None
    for m in models:
        model_records[m.role]["met"] = scored["met"][m.role]
    baseline = random_baseline(ev, models, images, labels, cfg.seed, data.class_names)
    explain_seconds = time.perf_counter() - t_explain

    run_dir.write_record("models", {"roles": [m.role for m in models], "models": model_records})
    run_dir.write_record(
        "explanations",
        {
            "explainers": names,
            "num_images": len(idx),
            "fidelity_keep": ev.fidelity_keep,
            "agreement_top_k": ev.agreement_top_k,
            "class_names": data.class_names,
            "metrics": list(ev.metrics),
            "metric_info": metric_info(ev.metrics),
            "per_model": scored["per_model"],
            "agreement": scored["agreement"],
            "transfer": scored["transfer"],
            "correct": scored["predictions_correct"],
            "random_baseline": baseline,
        },
    )
    write_samples(plan, data, models, run_dir, device)
    run_dir.write_record(
        "run",
        {
            "name": cfg.name,
            "seed": cfg.seed,
            "device": str(device),
            "world_size": world_size,
            "versions": library_versions(),
            "started": started.isoformat(timespec="seconds"),
            "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "timing": {
                "total_seconds": time.perf_counter() - t0,
                "train_seconds": train_seconds,
                "per_model_train_seconds": {m.role: m.train_seconds for m in models},
                "explain_seconds": explain_seconds,
            },
            "dataset": {
                "name": data.name,
                "class_names": data.class_names,
                "image_shape": list(data.image_shape),
                "sizes": {"train": len(data.train), "val": len(data.val), "test": len(data.test)},
                "has_masks": data.has_masks,
                "skipped_files": data.skipped_files,
            },
        },
    )
    summary = summarise(model_records, scored["per_model"], scored["agreement"])
    run_dir.write_metrics({"name": cfg.name, "seed": cfg.seed, "models": summary})
    return summary


def summarise(model_records: dict[str, Any], per_model: dict[str, Any], agree: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers per model (``metrics.json``), each copied from a record."""
    out = {}
    for role, r in model_records.items():
        out[role] = {
            "accuracy": r["test"]["accuracy"],
            "macro_f1": r["test"]["macro_f1"],
            "loss": r["test"]["loss"],
            "posthoc_accuracy": None if r["posthoc"] is None else r["posthoc"]["accuracy"],
            "params": r["params"],
            "flops": r["flops"],
            "met": r["met"],
            "fidelity": {e: (v.get("fidelity") or {}).get("mean") for e, v in per_model[role].items()},
            "agreement": agree.get(role),
        }
    return out


def write_samples(
    plan: RunPlan, data: DataBundle, models: list[TrainedModel], run_dir: RunDir, device: torch.device
) -> None:
    """Maps of a few test images per class, and per-layer average feature maps, for the report."""
    ev = plan.cfg.evaluation
    idx = sample_indices(dataset_labels(data.test), ev.samples_per_class, data.num_classes)
    batch = fetch(data.test, idx)
    images, labels, masks = batch.images.to(device), batch.labels.to(device), batch.masks
    tensors: dict[str, Tensor] = {"images": images.float().cpu().contiguous()}
    if masks is not None:
        tensors["masks"] = masks.to(torch.uint8).cpu().contiguous()
    shown = [e for e in plan.explainers if e.name != "feature_maps"]
    # other test images, for explainers that explain more images per call than there are samples (UniCAM: 4)
    need, pad = max((e.min_images for e in shown), default=1) - len(idx), None
    if need > 0:
        taken = set(idx.tolist())
        others = [i for i in range(len(data.test)) if i not in taken][:need]
        if others:
            extra = fetch(data.test, torch.tensor(others))
            pad = (extra.images, extra.labels)
    preds, layers = {}, {}
    for m in models:
        with torch.no_grad():
            preds[m.role] = m.model(images).argmax(1).cpu().tolist()
        for e in shown:
            if (e.pair and m.role == "teacher") or not e.applies(m.model):
                continue
            context, _ = explainer_context(e, m, models[0], models[1:])
            if context is None:
                continue
            maps = explain(e, m.model, images, labels, pad=pad, **context)
            tensors[f"maps/{m.role}/{e.key}"] = maps.cpu()
        fm_spec = next((e for e in plan.explainers if e.name == "feature_maps"), None)
        if fm_spec is not None:
            with fm_spec.build(m.model) as fm:
                per_layer = fm.explain_layers(images)
            layers[m.role] = [a.layer for a in per_layer]
            for i, a in enumerate(per_layer):
                tensors[f"feature_maps/{m.role}/{i}"] = a.maps.cpu().contiguous()
    atomic_write_bytes(run_dir.samples_tensors, save_safetensors({k: v.contiguous() for k, v in tensors.items()}))
    run_dir.write_record(
        "samples",
        {
            "indices": idx.tolist(),
            "labels": labels.cpu().tolist(),
            "class_names": data.class_names,
            "predictions": preds,
            "explainers": [e.key for e in shown],
            "feature_layers": layers,
            "has_masks": masks is not None,
            "config": to_dict(ev),
        },
    )
