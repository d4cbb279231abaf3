"""``xkd compare``: the configured students over several seeds, side by side, in one report.

Every seed is a whole ``xkd run`` of the same config (same data split, student architectures,
optimiser and budget) written to ``<output_dir>/<name>/seeds/seed_<s>/``; only the seed changes
(students' initialisation, data order, the explained test images). The teacher is trained once, by
the first seed's run, and every other seed loads that checkpoint, so the spread measures the
distillation, not the teacher. Then :func:`aggregate` reads the seed runs' records (never live
models) and writes ``records/compare.json`` with, per method, mean ± std over seeds of accuracy,
macro-F1 (best and last epoch), agreement with the teacher's predictions, explanation agreement
with the teacher, FSS/RS, parameters, FLOPs and training time, and a ranking; the agreement metrics
tested against chance (``closer_to_teacher``, Ojha et al. 2023) keep every seed's counts and binomial
p-value beside their mean ± std. The report is rendered from that record
(:func:`xkd.report.compare.render_compare_report`).
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from xkd import tracking
from xkd.config import RunConfig
from xkd.config_files import read_config, save_config
from xkd.errors import ConfigError, RunExistsError
from xkd.files import is_writer
from xkd.metrics.base import Column, declared
from xkd.plan import agreement_metrics, resume_conflicts, validate_for_compare
from xkd.registry import METRICS
from xkd.report.compare import render_compare_report
from xkd.rundir import RunDir, cache_root, not_this_kind
from xkd.runner import run
from xkd.schema import from_dict, to_dict

log = logging.getLogger("xkd")


def quality_columns() -> list[dict[str, Any]]:
    """The numbers of one model's explanation metrics a comparison aggregates: the declared columns
    of every metric of scope ``model`` (the sanity checks declare none: they have their own section);
    a column without a direction is shown without a best value."""
    return [c for m in declared("model") for c in m.info()["columns"]]


def agreement_columns() -> list[dict[str, Any]]:
    """The teacher-student agreement metrics a comparison aggregates, with their declared label and
    direction (their headline is the first declared column, e.g. ``closer_to_teacher``'s share)."""
    return [{"key": m.name, "label": m.label, "higher_is_better": m.higher_is_better} for m in declared("agreement")]


def tested_declarations() -> dict[str, dict[str, Any]]:
    """The agreement metrics tested against chance (those that declare a ``sentence``), as plain data."""
    return {
        m.name: {"label": m.label, "description": m.description, "sentence": m.sentence}
        for m in declared("agreement")
        if m.sentence
    }


def agreement_value(agr: dict[str, Any], ex: str | None, name: str) -> Any:
    """The headline number of agreement metric ``name`` of explainer ``ex`` in one student's agreement
    record: its first declared column (a plain number for most; ``closer_to_teacher``'s ``share``)."""
    entry = _get(agr, ex) if ex is not None else None
    if not isinstance(entry, dict):
        return None
    column = METRICS.get(name).columns[0] if name in METRICS else Column(name, name)
    return column.value(entry)


def agreement_test_stats(agr: list[dict[str, Any]], ex: str, name: str) -> dict[str, Any]:
    """A tested agreement metric of one student and explainer over seeds: mean ± std of the share,
    and each seed's images, counts and binomial p-value as its run recorded them."""
    entries = [_get(a, ex, name) or {} for a in agr]
    out: dict[str, Any] = {"share": stat([e.get("share") for e in entries])}
    for key in ("images", "closer", "ties", "farther", "undefined", "p_value"):
        out[key] = [e.get(key) for e in entries]
    for key in ("independent", "distance"):
        out[key] = next((e[key] for e in entries if e.get(key)), None)
    return out


@dataclass
class SeedRun:
    seed: int
    run_dir: Path
    reused: bool


def seed_config(cfg: RunConfig, compare_dir: Path, seed: int, teacher_checkpoint: str | None) -> RunConfig:
    """``cfg`` for one seed: its own run folder under ``compare_dir/seeds``, the comparison's cache,
    and (after the first seed) the first seed's teacher."""
    c = from_dict(RunConfig, to_dict(cfg))
    c.seed = seed
    c.name = f"seed_{seed}"
    c.tracking.run_name = f"{cfg.tracking.run_name or cfg.name}/{c.name}"  # MLflow tells comparisons apart
    c.output_dir = str(RunDir(compare_dir).seeds)
    c.cache_dir = str(cache_root(cfg))
    if teacher_checkpoint is not None:
        c.teacher.checkpoint = teacher_checkpoint
    return c


def _retrains(run_dir: RunDir, cfg: RunConfig) -> list[str]:
    """What of ``cfg`` changes what trained ``run_dir``'s models (:func:`xkd.plan.resume_conflicts`):
    then the seed runs again; nothing (evaluation settings, more epochs for the students) and it
    resumes with its models."""
    try:
        return resume_conflicts(read_config(run_dir.config), cfg)
    except ConfigError:  # a config this xkd cannot read: run it again
        return [f"{run_dir.config} cannot be read by this xkd"]


def prepare_compare_dir(cfg: RunConfig, resume: bool, overwrite: bool) -> RunDir:
    """Check, clear (``overwrite``) and create the comparison's folder, ``seeds/`` first: what marks
    it as a comparison (:meth:`xkd.rundir.RunDir.kind`) is there before any seed runs."""
    out = RunDir.of(cfg)
    if out.is_empty():
        if resume:
            log.info("--resume: nothing to resume in %s (no comparison there yet); starting a new one", out.path)
    else:
        is_compare = out.seeds.is_dir() or out.has_record("compare")  # a kd-vs-ls study is a comparison too
        if not is_compare:
            raise not_this_kind(out.path, out.kind(), "comparison", resume=resume, overwrite=overwrite)
        if overwrite:
            if is_writer():
                out.clear()
        elif not resume:
            raise RunExistsError(
                f"comparison directory {out.path} already exists; pass --resume to continue it (finished seeds are "
                "kept), --overwrite to start over, or choose another name (--set name=NEW)"
            )
    if is_writer():
        out.seeds.mkdir(parents=True, exist_ok=True)
        out.records.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out.config)
    return out


def compare(
    cfg: RunConfig,
    seeds: int | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Run ``cfg`` over ``seeds`` seeds (default ``cfg.compare.seeds``), aggregate and render the report.

    Returns the comparison directory (holding ``report.html``). With ``resume``, finished seed runs
    are reused as they are and an interrupted one continues from its last checkpoints. ``progress``
    turns the progress bars on or off; the comparison's own lines print either way.
    """
    if seeds is not None:
        cfg.compare.seeds = seeds
    validate_for_compare(cfg)
    tracking.check(cfg)  # mlflow missing or its server down: before the comparison's folder is written
    console = Console(stderr=True)  # its lines print with or without progress bars (``progress``: bars only)
    t0 = time.perf_counter()
    out = prepare_compare_dir(cfg, resume, overwrite)
    seed_list = [cfg.seed + i for i in range(cfg.compare.seeds)]
    runs: list[SeedRun] = []
    teacher_ckpt = cfg.teacher.checkpoint
    for i, s in enumerate(seed_list):
        c = seed_config(cfg, out.path, s, teacher_ckpt)
        run_dir = RunDir.of(c)
        console.print(f"[bold]xkd compare[/bold] {cfg.name!r}: seed {s} ({i + 1} of {len(seed_list)})")
        # what the seed's run would compute differently: compare.* (the number of seeds, the headline) is not
        # read by a run, so a finished seed stays valid when only that changed
        changed = run_dir.changed_settings(c) if resume else None
        if changed == [] and run_dir.is_finished():
            console.print(f"seed {s}: finished run found in {run_dir.path}, reused")
            runs.append(SeedRun(s, run_dir.path, True))
        else:
            conflicts = _retrains(run_dir, c) if changed else []
            if conflicts:  # its checkpoints belong to models trained with other settings
                console.print(
                    f"seed {s}: the models' settings changed since {run_dir.path} was written "
                    f"({'; '.join(conflicts)}); it is run again"
                )
            elif changed:
                console.print(
                    f"seed {s}: {'; '.join(changed)} changed; its trained models are kept and it is evaluated again"
                )
            fresh = bool(conflicts)
            runs.append(SeedRun(s, run(c, resume=resume and not fresh, overwrite=fresh, progress=progress), False))
        if teacher_ckpt is None:  # every later seed distils from this seed's teacher
            teacher_ckpt = str(run_dir.checkpoint("teacher"))
    if is_writer():
        summary = aggregate(cfg, runs)
        summary["seconds"] = time.perf_counter() - t0
        out.write_record("compare", summary)
        html = render_compare_report(out.path)
        console.print(f"comparison report: {html}  ({time.perf_counter() - t0:.0f} s)")
    return out.path


# --- aggregation ------------------------------------------------------------------------------------


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def stat(values: list[Any]) -> dict[str, Any]:
    """Mean and sample standard deviation (n - 1) of the finite values; the per-seed values kept as
    they were (None where a seed has no value). ``std`` is None with fewer than two values."""
    vals = [x for x in (_num(v) for v in values) if x is not None]
    return {
        "mean": statistics.fmean(vals) if vals else None,
        "std": statistics.stdev(vals) if len(vals) >= 2 else None,
        "n": len(vals),
        "values": [_num(v) for v in values],
    }


def _get(d: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def headline_explainer(cfg: RunConfig, agreement: dict[str, Any]) -> str | None:
    """The explainer whose agreement is the headline: configured, else the first with agreement records."""
    if cfg.compare.agreement_explainer is not None:
        return cfg.compare.agreement_explainer
    present = {ex for per_role in agreement.values() for ex in (per_role or {})}
    return next((e.key for e in cfg.evaluation.explainers if e.key in present), None)


def aggregate(cfg: RunConfig, runs: list[SeedRun]) -> dict[str, Any]:
    """Mean ± std over seeds of every per-model number, read from each seed run's records."""
    recs = []
    for r in runs:
        rd = RunDir(r.run_dir)
        recs.append((r, rd.read_record("models"), rd.read_record("explanations")))
    run_recs = [RunDir(r.run_dir).read_record("run") for r in runs]
    first_models = recs[0][1]
    roles = list(first_models["roles"])
    students = roles[1:]
    explainer = headline_explainer(cfg, recs[0][2].get("agreement") or {})
    metric = cfg.compare.agreement_metric
    order = [e.key for e in cfg.evaluation.explainers]
    explainers = sorted(
        {ex for _, _, e in recs for per_role in (e.get("agreement") or {}).values() for ex in (per_role or {})},
        key=lambda ex: order.index(ex) if ex in order else len(order),
    )
    all_explainers = [
        ex for ex in order if any(ex in per for _, _, e in recs for per in (e.get("per_model") or {}).values())
    ]
    tests_declared = tested_declarations()
    methods: dict[str, Any] = {}
    for role in roles:
        per_seed = [m["models"].get(role) or {} for _, m, _ in recs]
        agr = [(e.get("agreement") or {}).get(role) or {} for _, _, e in recs]
        own = [(e.get("per_model") or {}).get(role) or {} for _, _, e in recs]
        transfer = [(e.get("transfer") or {}).get(role) or {} for _, _, e in recs]
        entry: dict[str, Any] = {
            "model": per_seed[0].get("model"),
            "distiller": per_seed[0].get("distiller"),
            "distiller_params": per_seed[0].get("distiller_params"),
            "accuracy": stat([_get(m, "test", "accuracy") for m in per_seed]),
            "macro_f1": stat([_get(m, "test", "macro_f1") for m in per_seed]),
            "last_accuracy": stat([_get(m, "test_last", "accuracy") for m in per_seed]),
            "last_macro_f1": stat([_get(m, "test_last", "macro_f1") for m in per_seed]),
            "best_epoch": stat([_get(m, "train", "best_epoch") for m in per_seed]),
            # train time = epoch loop + distiller setup + assistant; a loaded teacher (later seeds) reports
            # the time it took when it was trained, not 0 s (older records: None where a part is missing)
            "train_seconds": stat([_get(m, "train", "seconds") for m in per_seed]),
            "setup_seconds": stat([_get(m, "train", "setup_seconds") for m in per_seed]),
            "assistant_seconds": stat([_get(m, "train", "assistant_seconds") for m in per_seed]),
            "loaded": [bool(_get(m, "train", "from_cache")) for m in per_seed],
            "params": stat([m.get("params") for m in per_seed]),
            "flops": stat([m.get("flops") for m in per_seed]),
            "explanation_quality": {ex: quality(own, ex) for ex in all_explainers if any(ex in o for o in own)},
        }
        if role != "teacher":
            entry["posthoc_accuracy"] = stat([_get(m, "posthoc", "accuracy") for m in per_seed])
            entry["posthoc_macro_f1"] = stat([_get(m, "posthoc", "macro_f1") for m in per_seed])
            entry["explanation_agreement"] = {
                ex: {
                    k: stat([agreement_value(a, ex, k) for a in agr])
                    for k in agreement_metrics()
                    if any(agreement_value(a, ex, k) is not None for a in agr)
                }
                for ex in explainers
            }
            headline = [agreement_value(a, explainer, metric) for a in agr]
            entry["headline_agreement"] = stat(headline) if explainer else stat([])
            tests = {
                ex: {
                    name: agreement_test_stats(agr, ex, name)
                    for name in tests_declared
                    if any(_get(a, ex, name) for a in agr)
                }
                for ex in explainers
            }
            if any(tests.values()):
                entry["agreement_tests"] = {ex: t for ex, t in tests.items() if t}
            if any(transfer):
                entry["fss"] = stat([t.get("fss") for t in transfer])
                entry["rs"] = stat([_get(t, "rs", "rs") for t in transfer])
            assistant = [m.get("assistant") for m in per_seed]
            if any(assistant):
                entry["assistant"] = {
                    "model": (assistant[0] or {}).get("model"),
                    "accuracy": stat([_get(a, "test", "accuracy") for a in assistant]),
                    "posthoc_accuracy": stat([_get(a, "posthoc", "accuracy") for a in assistant]),
                    "params": stat([(a or {}).get("params") for a in assistant]),
                }
        methods[role] = entry

    higher = METRICS.get(metric).higher_is_better if metric in METRICS else True
    ranking = rank(
        {r: methods[r] for r in students},
        [("accuracy", True), ("posthoc_accuracy", True), ("headline_agreement", bool(higher))],
    )
    return {
        "name": cfg.name,
        "seeds": [r.seed for r in runs],
        "explainers_scored": all_explainers,
        "runs": {str(r.seed): {"dir": f"seeds/{r.run_dir.name}", "reused": r.reused} for r in runs},
        "roles": roles,
        "students": students,
        "explainers": explainers,
        "headline": {
            "explainer": explainer,
            "metric": metric,
            "label": METRICS.get(metric).label if metric in METRICS else metric,
            "higher_is_better": higher,
        },
        "quality_columns": quality_columns(),
        "agreement_columns": agreement_columns(),
        "agreement_tests": tests_declared,
        "methods": methods,
        "ranking": ranking,
        "dataset": run_recs[0].get("dataset"),
        "seed_run_seconds": sum(float((rr.get("timing") or {}).get("total_seconds") or 0.0) for rr in run_recs),
    }


def _value(entry: dict[str, Any], column: dict[str, Any]) -> Any:
    v = entry.get(column["key"])
    if column.get("sub") is not None:  # fidelity and ROAD records keep their headline under "mean" / "road"
        return v.get(column["sub"]) if isinstance(v, dict) else None
    return v


def quality(own: list[dict[str, Any]], ex: str) -> dict[str, Any]:
    """One explainer's own metrics for one model over seeds: each declared column, and top-K IoU/Dice per K."""
    entries = [o.get(ex) or {} for o in own]
    out: dict[str, Any] = {
        c["key"]: stat([_value(e, c) for e in entries])
        for c in quality_columns()
        if any(_value(e, c) is not None for e in entries)
    }
    ks = sorted({k for e in entries for k in (e.get("top_k") or {})}, key=float)
    if ks:
        out["per_k"] = {k: {m: stat([_get(e, "top_k", k, m) for e in entries]) for m in ("iou", "dice")} for k in ks}
    return out


def _ranks(values: dict[str, float | None], higher: bool) -> dict[str, float | None]:
    """Rank 1 = best; ties share the mean of their ranks; a missing value gets no rank."""
    present = sorted((v, r) for r, v in values.items() if v is not None)
    if higher:
        present.reverse()
    out: dict[str, float | None] = {r: None for r in values}
    i = 0
    while i < len(present):
        j = i
        while j + 1 < len(present) and present[j + 1][0] == present[i][0]:
            j += 1
        for k in range(i, j + 1):
            out[present[k][1]] = (i + j) / 2 + 1
        i = j + 1
    return out


def rank(methods: dict[str, Any], criteria: list[tuple[str, bool]]) -> dict[str, Any]:
    """Rank methods by the mean of each criterion, then by their mean rank over the criteria."""
    per = {key: _ranks({r: (m.get(key) or {}).get("mean") for r, m in methods.items()}, hi) for key, hi in criteria}
    mean_rank = {}
    for r in methods:
        got = [per[key][r] for key, _ in criteria if per[key][r] is not None]
        mean_rank[r] = statistics.fmean(got) if got else None
    order = sorted(methods, key=lambda r: (mean_rank[r] is None, mean_rank[r] or 0.0, r))
    return {
        "criteria": [{"key": k, "higher_is_better": hi} for k, hi in criteria],
        "ranks": per,
        "mean_rank": mean_rank,
        "order": order,
    }
