"""The HTML report, rendered from the records of a run directory only (never from live models).

``render_report(run_dir)`` reads ``records/{run,models,explanations,samples}.json`` and
``records/samples.safetensors``, (re)draws every figure into ``figures/`` and writes
``report.html`` next to them. The page is self-contained (inline CSS, images by relative path) and
deterministic: rendering the same records twice gives the same bytes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jinja2
from safetensors.torch import load_file

from xkd.errors import ReportError, ReportSchemaError
from xkd.files import SCHEMA_VERSION, atomic_write_text, read_json
from xkd.report import figures
from xkd.report.sections import agreement_tests, explainer_sections, sanity_table, transfer_table
from xkd.report.tables import (
    DASH,
    Col,
    best_rows,
    cell,
    explainer_name,
    fmt,
    fmt_pct,
    fmt_seconds,
    head,
    make_table,
    model_label,
    ok,
)
from xkd.rundir import RUN_RECORDS

MAX_LAYERS = 12
SECTIONS = [  # (anchor, title, context key that must be non-empty or None)
    ("run", "Run", None),
    ("summary", "Summary", None),
    ("explainers", "Explainers", "explainers"),
    ("tests", None, "tests"),  # titled by the tested metrics' labels (e.g. "Closer to teacher")
    ("transfer", "Feature transfer", "transfer"),
    ("sanity", "Sanity checks", "sanity"),
    ("fidelity", "Fidelity per class", "fidelity"),
    ("baseline", "Chance level", "baseline"),
    ("localisation", "Localisation per K", "localisation"),
    ("feature-maps", "Average feature maps", "feature_maps"),
    ("training", "Training", None),
    ("records", "Records", None),
]


# --- loading ----------------------------------------------------------------------------------------


INCOMPLETE_RUN = (
    "the report is rendered from records only and this run may be incomplete (finish it with `xkd run --resume`)."
)


def _need(path: Path) -> Path:
    if not path.is_file():
        raise ReportError(f"{path} is missing: {INCOMPLETE_RUN}")
    return path


def load_record(path: Path, kind: str, incomplete: str) -> dict[str, Any]:
    """One record file of ``kind``, checked for this xkd's schema version; ``incomplete`` tells the
    user how to finish whatever should have written it."""
    if not path.is_file():
        raise ReportError(f"{path} is missing: {incomplete}")
    data = read_json(path)
    if data.get("schema_version") != SCHEMA_VERSION or data.get("kind") != kind:
        raise ReportSchemaError(
            f"{path}: schema_version {data.get('schema_version')!r}, kind {data.get('kind')!r}; "
            f"this xkd reads {SCHEMA_VERSION}, {kind!r}"
        )
    return data


def load_records(run_dir: Path) -> dict[str, Any]:
    """The run's records by kind, plus the sample tensors under ``"tensors"``."""
    if not run_dir.is_dir():
        raise ReportError(f"run directory {run_dir} does not exist")
    out: dict[str, Any] = {}
    for kind in RUN_RECORDS:  # records/<kind>.json
        out[kind] = load_record(run_dir / "records" / f"{kind}.json", kind, INCOMPLETE_RUN)
    out["tensors"] = load_file(str(_need(run_dir / "records" / "samples.safetensors")))
    return out


# --- sections ---------------------------------------------------------------------------------------


def _summary(roles: list[str], models: dict, expl: dict) -> list[dict]:
    labels = [model_label(r, models[r]) for r in roles]
    m = [models[r] for r in roles]
    test = [x.get("test") or {} for x in m]
    post = [x.get("posthoc") or {} for x in m]
    perf = make_table(
        "Accuracy and cost. Post-hoc metrics score a student against the teacher's predictions.",
        labels,
        [
            Col("Test accuracy", [t.get("accuracy") for t in test], better="high"),
            Col("Macro-F1", [t.get("macro_f1") for t in test], better="high"),
            Col("Test loss", [t.get("loss") for t in test], better="low"),
            Col("Post-hoc acc.", [p.get("accuracy") for p in post], better="high", title="vs teacher predictions"),
            Col("Post-hoc F1", [p.get("macro_f1") for p in post], better="high", title="vs teacher predictions"),
            Col("Parameters", [x.get("params") for x in m], ",.0f", "low"),
            Col("FLOPs / image (M)", [x.get("flops") for x in m], ",.2f", "low", scale=1e-6),
        ],
    )
    for row, x in zip(perf["rows"], m):
        params = ", ".join(f"{k}={v}" for k, v in (x.get("distiller_params") or {}).items())
        row.insert(1, cell(x.get("distiller") or "— (teacher)", num=False, sub=params or None))
    perf["head"].insert(1, head("Distiller", False))

    cols, groups = [], [("", 1)]
    for ex in expl.get("explainers", []):
        per = [((expl["per_model"].get(r) or {}).get(ex) or {}) for r in roles]
        agr = [(expl.get("agreement", {}).get(r) or {}).get(ex) or {} for r in roles]
        cols += [
            Col("MET (ms)", [(x.get("met") or {}).get(ex) for x in m], ",.2f", "low", "ms per image", 1e3),
            Col("Fidelity", [(p.get("fidelity") or {}).get("mean") for p in per], better="high"),
            Col(
                "Rank corr.", [a.get("rank_correlation") for a in agr], better="high", title="Spearman with the teacher"
            ),
        ]
        groups.append((explainer_name(ex), 3))
    expl_table = make_table("Explanations: cost, fidelity and agreement with the teacher's maps.", labels, cols, groups)
    return [perf, expl_table] if cols else [perf]


def _fidelity_tables(roles: list[str], expl: dict, class_names: list[str]) -> list[dict]:
    tables = []
    for ex in expl.get("explainers", []):
        fids = {r: ((expl["per_model"].get(r) or {}).get(ex) or {}).get("fidelity") for r in roles}
        shown = [r for r in roles if fids[r]]
        if not shown:
            continue
        rows = []
        for c in [*class_names, None]:
            vals = []
            for r in shown:
                src = fids[r] if c is None else (fids[r].get("per_class") or {}).get(c) or {}
                vals.append((src.get("mean" if c is None else "fidelity"), src.get("retained_probability")))
            first = (fids[shown[0]].get("per_class") or {}).get(c) or {} if c else {}
            best_f, best_p = best_rows([v[0] for v in vals], "high"), best_rows([v[1] for v in vals], "high")
            row = [cell(c or "Average", num=False), cell(fmt(first.get("n"), ",.0f") if c else "")]
            for i, (f, p) in enumerate(vals):
                row += [cell(fmt(f), best=i in best_f), cell(fmt(p), best=i in best_p)]
            rows.append(row)
        heads = [head("Class", False), head("n", True, "explained images of the class")]
        heads += [head(t) for _ in shown for t in ("fidelity", "retained")]
        caption = f"{explainer_name(ex)}: fidelity per class (best model per row highlighted)."
        groups = [("", 2)] + [(r, 2) for r in shown]
        tables.append({"caption": caption, "groups": groups, "head": heads, "rows": rows, "footer_rows": 1})
    return tables


def _per_explainer(roles: list[str], expl: dict, ex: str) -> list[dict]:
    return [(expl["per_model"].get(r) or {}).get(ex) or {} for r in roles]


def _baseline(roles: list[str], models: dict, expl: dict) -> dict | None:
    base = expl.get("random_baseline") or {}
    shown = [r for r in roles if r in base]
    if not shown:
        return None
    keys = {"Fidelity": "fidelity", "Retained": "retained_probability"}
    keys |= {"Deletion AUC": "deletion_auc", "Insertion AUC": "insertion_auc", "ROAD": "road"}
    cols = [Col(h, [base[r].get(k) for r in shown]) for h, k in keys.items() if any(k in base[r] for r in shown)]
    labels = [model_label(r, models[r]) for r in shown]
    return make_table("Random maps (seeded uniform noise) scored like an explainer: chance level.", labels, cols)


def _localisation(roles: list[str], models: dict, expl: dict) -> list[dict]:
    tables = []
    for ex in expl.get("explainers", []):
        per = _per_explainer(roles, expl, ex)
        ks = sorted({k for p in per for k in (p.get("top_k") or {})}, key=lambda k: float(k))
        pg = [p.get("pointing_game") for p in per]
        if not ks and not any(ok(v) for v in pg):
            continue
        cols, groups = [Col("Pointing game", pg, better="high")], [("", 2)]
        for k in ks:
            vals = [((p.get("top_k") or {}).get(k) or {}) for p in per]
            cols += [Col("IoU", [v.get("iou") for v in vals], better="high")]
            cols += [Col("Dice", [v.get("dice") for v in vals], better="high")]
            groups.append((f"K = {fmt(float(k), ',.0f')} px", 2))
        labels = [model_label(r, models[r]) for r in roles]
        caption = f"{explainer_name(ex)}: localisation against the ground-truth masks."
        tables.append(make_table(caption, labels, cols, groups))
    return tables


def _feature_maps(run_dir: Path, roles: list[str], samples: dict, tensors: dict, class_names: list[str]) -> dict | None:
    layers = samples.get("feature_layers") or {}
    shown = [r for r in roles if layers.get(r) and f"feature_maps/{r}/0" in tensors]
    labels = samples.get("labels", [])
    if not shown or not labels:
        return None
    picks = [labels.index(y) for y in dict.fromkeys(labels)][:2]
    indices = samples.get("indices", list(range(len(labels))))
    notes, full, keep = [], [], {}
    for r in shown:
        n = len(layers[r])
        keep[r] = [i for i in figures.evenly_spaced(n, MAX_LAYERS) if f"feature_maps/{r}/{i}" in tensors]
        if len(keep[r]) < n:
            notes.append(f"{r}: {len(keep[r])} of {n} layers shown, evenly spaced (first and last included)")
        full.append({"role": r, "layers": [(i, layers[r][i], i in keep[r]) for i in range(n)]})
    figs = []
    for j in picks:
        strips = {
            r: [(figures.abbreviate(layers[r][i]), tensors[f"feature_maps/{r}/{i}"][j]) for i in keep[r]] for r in shown
        }
        src = f"figures/feature_maps_{j:03d}.png"
        figures.save_feature_strips(run_dir / src, tensors["images"][j], strips)
        caption = f"Test image #{indices[j]} (true class: {figures.class_name(class_names, labels[j])})."
        figs.append({"src": src, "caption": caption})
    return {"figures": figs, "notes": notes, "full": full}


def _training(run_dir: Path, roles: list[str], models: dict, run: dict, class_names: list[str]) -> dict:
    trains = {r: models[r].get("train") or {} for r in roles}
    figures.save_training_curves(run_dir / "figures/training_curves.png", trains)
    cms = {r: cm for r in roles if (cm := (models[r].get("test") or {}).get("confusion_matrix"))}
    if cms:
        figures.save_confusion_matrices(run_dir / "figures/confusion_matrices.png", cms, class_names)
    hist = {r: trains[r].get("history") or [] for r in roles}
    at_best = [next((h for h in hist[r] if h.get("epoch") == trains[r].get("best_epoch")), {}) for r in roles]
    secs = (run.get("timing") or {}).get("per_model_train_seconds") or {}
    labels = [model_label(r, models[r]) for r in roles]
    cols = [
        Col("Epochs", [len(hist[r]) for r in roles], ",.0f"),
        Col("Best epoch", [trains[r].get("best_epoch") for r in roles], ",.0f"),
        Col("Val accuracy at best", [h.get("val_accuracy") for h in at_best], better="high"),
        Col("Train time", [secs.get(r, trains[r].get("seconds")) for r in roles], fmt_seconds),
    ]
    speed = [trains[r].get("images_per_second") for r in roles]
    memory = [trains[r].get("peak_memory_bytes") for r in roles]
    if any(map(ok, speed)):  # records written before throughput was measured have none
        cols.append(Col("Images/s", speed, ",.0f", title="training throughput of the epoch loop"))
    if any(map(ok, memory)):  # measured on CUDA devices only
        cols.append(Col("Peak memory (MiB)", memory, ",.0f", scale=2**-20))
    table = make_table(
        "Training per model (best epoch = the checkpoint that is evaluated). Train time = the epoch loop "
        "+ the distiller's setup before it (e.g. XDistillation's teacher explanations and CAE, or the "
        "teacher's logits computed once, counted also when read from the cache) + the training of a "
        "teacher assistant; a loaded teacher shows the time it took when it was trained.",
        labels,
        cols,
    )
    for row, r in zip(table["rows"], roles):  # the parts of the train time, on hover
        row[4]["title"] = _time_parts(trains[r])
    if any(trains[r].get("device") for r in roles):
        table["head"].append(head("Device, precision", False))
        for row, r in zip(table["rows"], roles):
            fused = "fused optimiser" if "(fused)" in str(trains[r].get("optimizer")) else None
            how = ", ".join(str(v) for v in (trains[r].get("device"), trains[r].get("precision"), fused) if v)
            outputs = trains[r].get("teacher_outputs")
            row.append(cell(how or DASH, num=False, sub=f"teacher: {outputs}" if outputs else None))
    table["head"].append(head("Checkpoint", False))
    for row, r in zip(table["rows"], roles):
        source = "loaded" if trains[r].get("from_cache") else "trained"
        where = trains[r].get("loaded_from")
        sub = trains[r].get("checkpoint") if not where else f"from {where}"
        row.append(cell(source, num=False, sub=sub))
    confusion = "figures/confusion_matrices.png" if cms else None
    return {"table": table, "curves": "figures/training_curves.png", "confusion": confusion}


def _time_parts(train: dict) -> str | None:
    """``epoch loop 3.1 s + setup 9.0 s + assistant 5.2 s`` from a ``train`` record (None for old records)."""
    parts = [
        (label, train.get(key))
        for label, key in (
            ("epoch loop", "loop_seconds"),
            ("setup", "setup_seconds"),
            ("assistant", "assistant_seconds"),
        )
    ]
    shown = [f"{label} {fmt_seconds(v)}" for label, v in parts if ok(v)]
    return " + ".join(shown) if len(shown) > 1 else None


# --- entry point --------------------------------------------------------------------------------------


_ENV = jinja2.Environment(
    loader=jinja2.FileSystemLoader(str(Path(__file__).parent / "templates")),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
    keep_trailing_newline=True,
)
_ENV.filters.update(num=fmt, seconds=fmt_seconds)


def render_report(run_dir: str | Path) -> Path:
    """Render ``run_dir/report.html`` (and ``run_dir/figures/*.png``) from ``run_dir/records``.

    Raises:
        ReportError: a record file is missing (the run may be incomplete: ``xkd run --resume``).
        ReportSchemaError: a record was written by an incompatible xkd.
    """
    run_dir = Path(run_dir)
    rec = load_records(run_dir)
    run, mrec, expl, samples, tensors = rec["run"], rec["models"], rec["explanations"], rec["samples"], rec["tensors"]
    models = mrec.get("models") or {}
    roles = [r for r in mrec.get("roles") or list(models) if r in models]
    class_names = list(
        (run.get("dataset") or {}).get("class_names") or expl.get("class_names") or samples.get("class_names") or []
    )
    expl.setdefault("per_model", {})
    has_masks = bool((run.get("dataset") or {}).get("has_masks"))
    ctx = {
        "run": run,
        "dataset": run.get("dataset") or {},
        "timing": run.get("timing") or {},
        "roles": roles,
        "summary": _summary(roles, models, expl),
        "fidelity": _fidelity_tables(roles, expl, class_names),
        "fidelity_keep": fmt_pct(expl.get("fidelity_keep")),
        "top_k": fmt_pct(expl.get("agreement_top_k")),
        "num_images": expl.get("num_images"),
        "explainers": explainer_sections(run_dir, roles, models, expl, samples, tensors, class_names),
        "tests": agreement_tests(roles, models, expl),
        "transfer": transfer_table(roles, models, expl),
        "sanity": sanity_table(roles, models, expl),
        "baseline": _baseline(roles, models, expl),
        "localisation": _localisation(roles, models, expl) if has_masks else [],
        "has_masks": bool(samples.get("has_masks")),
        "feature_maps": _feature_maps(run_dir, roles, samples, tensors, class_names),
        "training": _training(run_dir, roles, models, run, class_names),
        "records": sorted(p.name for p in (run_dir / "records").iterdir() if p.is_file() and p.name[0] != "."),
        "has_config": (run_dir / "config.yaml").is_file(),
    }
    ctx["tests_title"] = " · ".join(t["label"] for t in ctx["tests"])
    ctx["sections"] = [(a, t or ctx[f"{a}_title"]) for a, t, key in SECTIONS if key is None or ctx[key]]
    html = _ENV.get_template("report.html.j2").render(**ctx)
    return atomic_write_text(run_dir / "report.html", html)
