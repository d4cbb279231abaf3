"""Report sections about explanations: one section per explainer (every metric for teacher and each
student, the sanity verdict, and the models' maps of the same images side by side), the agreement
metrics tested against chance (Ojha et al.'s closer-to-teacher share, a sentence per student),
feature transfer (FSS/RS) and the sanity-check table. Built from records only, like the rest of the
report."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import xkd.metrics  # noqa: F401  (registers the metrics: columns of runs recorded without them)
from xkd.registry import METRICS
from xkd.report import figures
from xkd.report.tables import (
    ARROWS,
    DASH,
    FSS_TITLE,
    RS_TITLE,
    Col,
    best_rows,
    better,
    cell,
    explainer_name,
    fmt,
    fmt_p,
    fmt_share,
    head,
    make_table,
    model_label,
    ok,
    sentence,
    slug,
)


@dataclass(frozen=True)
class MetricCol:
    """A column of the per-explainer tables, from a metric's declared column."""

    head: str
    key: str
    sub: str | None
    better: str | None
    title: str
    agreement: bool  # a student-vs-teacher score

    def get(self, own: dict, agreement: dict) -> Any:
        v = (agreement if self.agreement else own).get(self.key)
        if self.sub is not None:
            return v.get(self.sub) if isinstance(v, dict) else None
        return v


def metric_columns(expl: dict) -> list[MetricCol]:
    """The columns of the run's metrics, as the records declare them (``metric_info``); a run
    written before the records held the declarations takes them from today's registry."""
    out = []
    names = expl.get("metrics")
    if names is None:  # records without the list of metrics: every registered one that has a value
        names = [m.name for m in METRICS.entries()]
    for name in names:
        info = (expl.get("metric_info") or {}).get(name) or {}
        if "columns" not in info:
            if name not in METRICS:
                continue
            info = METRICS.get(name).info()
        if info.get("scope") not in ("model", "agreement"):
            continue
        for c in info["columns"]:
            way = better(c.get("higher_is_better"))
            agreement = info["scope"] == "agreement"
            out.append(
                MetricCol(c["label"] + ARROWS[way], c["key"], c.get("sub"), way, c.get("title") or "", agreement)
            )
    return out


def tested_metrics(expl: dict) -> list[tuple[str, dict]]:
    """``(name, declaration)`` of the run's agreement metrics that declare a ``sentence`` (a share of
    images tested against chance, e.g. ``closer_to_teacher``), as the records declare them."""
    names = expl.get("metrics")
    if names is None:
        names = [m.name for m in METRICS.entries()]
    out = []
    for name in names:
        info = (expl.get("metric_info") or {}).get(name) or {}
        if "sentence" not in info:
            if name not in METRICS:
                continue
            info = METRICS.get(name).info()
        if info.get("scope") == "agreement" and info.get("sentence"):
            out.append((name, info))
    return out


def _counts(e: dict) -> str:
    parts = [f"{e.get('closer', DASH)} closer", f"{e.get('ties', DASH)} tied", f"{e.get('farther', DASH)} farther"]
    text = f"{', '.join(parts)} of {fmt(e.get('images'), ',.0f')} images"
    if e.get("undefined"):
        text += f"; {e['undefined']} undefined, left out"
    if e.get("independent"):
        text += f"; independent student: {e['independent']}"
    return text + (f"; {e['distance']}" if e.get("distance") else "")


def agreement_tests(roles: list[str], models: dict, expl: dict) -> list[dict]:
    """Per metric tested against chance: a table (a row per student, a column per explainer: the share
    with its binomial p-value) and a plain sentence per student and explainer."""
    out = []
    agreement = expl.get("agreement") or {}
    for name, info in tested_metrics(expl):
        explainers = [
            ex
            for ex in expl.get("explainers", [])
            if any(((agreement.get(r) or {}).get(ex) or {}).get(name) for r in roles)
        ]
        shown = [r for r in roles if any(((agreement.get(r) or {}).get(ex) or {}).get(name) for ex in explainers)]
        if not shown:
            continue
        entries = {
            r: {ex: ((agreement.get(r) or {}).get(ex) or {}).get(name) or {} for ex in explainers} for r in shown
        }
        heads = [head("Model", False)] + [head(explainer_name(ex), True, info.get("description")) for ex in explainers]
        best = {ex: best_rows([entries[r][ex].get("share") for r in shown], "high") for ex in explainers}
        rows = []
        for i, r in enumerate(shown):
            row = [model_label(r, models.get(r) or {})]
            for ex in explainers:
                e = entries[r][ex]
                sub = fmt_p(e.get("p_value")) if e else None
                row.append(
                    cell(fmt_share(e.get("share")), best=i in best[ex], sub=sub, title=_counts(e) if e else None)
                )
            rows.append(row)
        distances = sorted({e.get("distance") for r in shown for e in entries[r].values() if e.get("distance")})
        measure = {"cosine": "cosine similarity", "rank": "rank (Spearman) correlation"}
        caption = (
            f"{info.get('label')}: {info.get('description')}. Per test image, the teacher's map is compared with this "
            f"student's and the independent student's by {' and '.join(measure.get(d, d) for d in distances) or 'a similarity'}"
            " (Ojha et al., NeurIPS 2023, §4.1); ties count half, images where a similarity is undefined are left out; "
            "p: two-sided binomial test against 50% on the untied images. Hover a cell for the counts."
        )
        table = {"caption": caption, "groups": None, "head": heads, "rows": rows}
        sentences = [
            {"role": r, "text": sentence(info["sentence"], ex, entries[r][ex])}
            for r in shown
            for ex in explainers
            if entries[r][ex]
        ]
        out.append({"name": name, "label": info.get("label") or name, "table": table, "sentences": sentences})
    return out


def sanity_verdict(entry: dict) -> str:
    s = entry.get("sanity") or {}
    v = s.get("verdict")
    return DASH if v is None else str(v).upper()


def explainer_tables(roles: list[str], models: dict, expl: dict, ex: str) -> list[dict]:
    """Every recorded metric of explainer ``ex``: one table of the models' own scores (teacher and
    students) and one of each student's agreement with the teacher. Columns without any value are
    left out."""
    per = [((expl.get("per_model") or {}).get(r) or {}).get(ex) for r in roles]
    agr = [((expl.get("agreement") or {}).get(r) or {}).get(ex) or {} for r in roles]
    shown = [i for i, p in enumerate(per) if p is not None]
    labels = [model_label(roles[i], models[roles[i]]) for i in shown]
    met = [((models[roles[i]].get("met") or {}).get(ex)) for i in shown]
    own = [Col("MET (ms)", met, ",.2f", "low", "mean execution time per image", 1e3)] if any(map(ok, met)) else []
    pair = []
    for c in metric_columns(expl):
        vals = [c.get(per[i], agr[i]) for i in shown]
        if any(ok(v) for v in vals):
            (pair if c.agreement else own).append(Col(c.head, vals, better=c.better, title=c.title))
    name = explainer_name(ex)
    caption = f"{name}: faithfulness, localisation and cost of each model's maps."
    undefined = [(per[i].get("undefined") or {}) for i in shown]
    empty = max((u.get("empty_mask") or 0 for u in undefined), default=0)
    no_pos = {roles[i]: u.get("no_positive_attribution") for i, u in zip(shown, undefined)}
    if empty:
        caption += f" {empty} image(s) with an empty mask: localisation undefined there, left out of the means."
    if any(no_pos.values()):
        parts = ", ".join(f"{r} {n}" for r, n in no_pos.items() if n)
        caption += f" Mask mass undefined (no positive attribution) for {parts} image(s)."
    tables = [make_table(caption, labels, own)]
    verdicts = [sanity_verdict(per[i]) for i in shown]
    if any(v != DASH for v in verdicts):
        tables[0]["head"].append(head("Sanity", False, "model-parameter randomisation test"))
        for row, v in zip(tables[0]["rows"], verdicts):
            row.append(cell(v, num=False, title="maps must change when the weights are randomised"))
    students = [j for j, i in enumerate(shown) if any(ok(c.values[j]) for c in pair)]
    if students:
        cols = [Col(c.head, [c.values[j] for j in students], better=c.better, title=c.title) for c in pair]
        caption = f"{name}: agreement of each student's maps with the teacher's."
        tables.append(make_table(caption, [labels[j] for j in students], cols))
    return tables


def sample_cards(
    run_dir: Path, roles: list[str], samples: dict, tensors: dict, class_names: list[str], ex: str
) -> list[dict]:
    """One figure per class: the test images and each model's map of them (teacher first)."""
    return _cards(run_dir, samples, tensors, class_names, [(r, r, ex) for r in roles], slug(ex))


def _cards(
    run_dir: Path, samples: dict, tensors: dict, class_names: list[str], series: list[tuple[str, str, str]], name: str
) -> list[dict]:
    """One figure per class with a row per ``(row label, role, explainer key)`` of ``series`` that has maps."""
    labels, preds = samples.get("labels", []), samples.get("predictions", {})
    indices = samples.get("indices", list(range(len(labels))))
    masks = tensors.get("masks") if samples.get("has_masks") else None
    shown = [(row, r, ex) for row, r, ex in series if f"maps/{r}/{ex}" in tensors]
    cards = []
    for k, cname in enumerate(class_names) if shown else []:
        idx = [i for i, y in enumerate(labels) if y == k]
        if not idx:
            continue
        maps = {row: tensors[f"maps/{r}/{ex}"][idx] for row, r, ex in shown}
        pred = {row: [p[i] for i in idx] for row, r, _ in shown if len(p := preds.get(r) or []) == len(labels)}
        src = f"figures/samples_{name}_{k:03d}.png"
        args = (tensors["images"][idx], maps, [labels[i] for i in idx], pred, class_names)
        m = None if masks is None else masks[idx]
        figures.save_class_grid(run_dir / src, *args, indices=[indices[i] for i in idx], masks=m)
        roles = {r for _, r, _ in shown if len(preds.get(r) or []) == len(labels)}
        wrong = sum(preds[r][i] != k for r in roles for i in idx)  # each model once, however many rows
        cards.append({"name": cname, "src": src, "wrong": wrong})
    return cards


def unicam_kinds(samples: dict, keys: list[str]) -> dict[str, str]:
    """Explainer key -> UniCAM map kind (``residual`` by default, ``distilled``, ``kd_given_base``,
    ``base_given_kd``) for the UniCAM entries among ``keys``."""
    entries = ((samples.get("config") or {}).get("explainers")) or []
    out = {}
    for e in entries:
        if e.get("name") == "unicam":
            key = e.get("label") or e.get("name")
            if key in keys:
                out[key] = (e.get("params") or {}).get("kind", "residual")
    return out


def explainer_sections(
    run_dir: Path, roles: list[str], models: dict, expl: dict, samples: dict, tensors: dict, class_names: list[str]
) -> list[dict]:
    """One section per explainer: its metric table and its sample maps."""
    out = []
    keys = list(dict.fromkeys([*expl.get("explainers", []), *samples.get("explainers", [])]))
    for ex in keys:
        has_scores = any(((expl.get("per_model") or {}).get(r) or {}).get(ex) is not None for r in roles)
        tables = explainer_tables(roles, models, expl, ex) if has_scores else []
        cards = sample_cards(run_dir, roles, samples, tensors, class_names, ex)
        if not tables and not cards:
            continue
        anchor = f"explainer-{slug(ex)}"
        out.append({"key": ex, "anchor": anchor, "title": explainer_name(ex), "tables": tables, "cards": cards})
    kinds = unicam_kinds(samples, keys)
    if len(set(kinds.values())) > 1:  # the UniCAM kinds of each student side by side
        series = [(f"{r} · {kind}", r, ex) for r in roles for ex, kind in kinds.items()]
        cards = _cards(run_dir, samples, tensors, class_names, series, "unicam_pair")
        if cards:
            out.append({"key": "unicam_pair", "anchor": "explainer-unicam-pair",
                        "title": "UniCAM: distilled vs residual", "tables": [], "cards": cards})  # fmt: skip
    return out


# the transfer record's entries shown: (key, header, metric whose declared direction it has, or None
# for a diagnostic without one, title); the keys of ``rs`` are those of :func:`xkd.metrics.transfer.rs`
TRANSFER_COLUMNS = (
    ("fss", "FSS", "fss", FSS_TITLE),
    ("fss_unbiased", "FSS (R*)", "fss_unbiased", "xkd's bias-corrected FSS (R*, U-centred): ~0 when independent"),
    ("rs", "RS", "rs", RS_TITLE),
    ("rs_student", "R* student–target", None, "direct relevance of the student's features to the class target"),
    ("rs_teacher", "R* teacher–target", None, "direct relevance of the teacher's features to the class target"),
    (
        "rs_teacher_given_student",
        "RS teacher | student",
        None,
        "R* of the class target with the teacher's features, the student's projected out: what the student did "
        "not take",
    ),
    (
        "pdcor_student_target_given_teacher",
        "pdCor",
        None,
        "partial distance correlation of the student's features and the class target given the teacher's",
    ),
)


def transfer_table(roles: list[str], models: dict, expl: dict) -> dict | None:
    """FSS and RS (UniCAM) of each student against the teacher, with the RS record's diagnostics."""
    tr = expl.get("transfer") or {}
    shown = [r for r in roles if r in tr]
    if not shown:
        return None
    cols = []
    for key, label, decl, title in TRANSFER_COLUMNS:
        values = [(tr[r].get("rs") or {}).get(key, tr[r].get(key)) for r in shown]  # "rs" holds RS and its parts
        if not any(ok(v) for v in values):
            continue
        way = better(METRICS.get(decl).higher_is_better) if decl in METRICS else None
        cols.append(Col(label + ARROWS[way], values, better=way, title=title))
    rs = [tr[r].get("rs") or {} for r in shown]
    n = sorted({x["n"] for x in rs if ok(x.get("n"))})
    over = f" over {n[0]:,} explained images" if len(n) == 1 else ""
    target = {x.get("target") for x in rs} - {None}
    of = f"; class target: {target.pop()}" if len(target) == 1 else ""
    caption = f"Feature transfer at matched layers (UniCAM){over}{of}."
    table = make_table(caption, [model_label(r, models[r]) for r in shown], cols)
    table["head"].append(head("Layers (student / teacher)", False))
    for row, r in zip(table["rows"], shown):
        row.append(cell(f"{tr[r].get('student_layer')} / {tr[r].get('teacher_layer')}", num=False))
    return table


def sanity_table(roles: list[str], models: dict, expl: dict) -> dict | None:
    """Verdicts of the sanity checks, one row per explainer and check, one column per model."""
    checks = [
        ("sanity", "weights randomised", "final_rank_correlation"),
        ("label_sanity", "labels randomised", "rank_correlation"),
    ]
    rows = []
    for ex in expl.get("explainers", []):
        for key, what, corr_key in checks:
            entries = [(((expl.get("per_model") or {}).get(r) or {}).get(ex) or {}).get(key) or {} for r in roles]
            if not any(entries):
                continue
            row = [cell(explainer_name(ex), num=False, sub=what)]
            for s in entries:
                corr = s.get(corr_key)
                sub = f"rank corr. {fmt(corr, '.2f')}" if ok(corr) else None
                text = DASH if s.get("verdict") is None else str(s["verdict"]).upper()
                row.append(cell(text, num=False, sub=sub, best=text == "PASS"))
            rows.append(row)
    if not rows:
        return None
    heads = [head("Explainer", False)] + [head(r, False) for r in roles]
    caption = (
        "Sanity checks (Adebayo et al. 2018): PASS when the maps change (rank correlation below the threshold) once "
        "the model's weights are randomised layer by layer from the top, or against the same architecture trained "
        "on permuted labels."
    )
    return {"caption": caption, "groups": None, "head": heads, "rows": rows}
