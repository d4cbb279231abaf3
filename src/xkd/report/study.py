"""The page of ``xkd study`` (``study.html``), rendered from ``records/study.json`` only.

Both studies share the layout: the verdicts first (each computed from the per-seed numbers by
:mod:`xkd.studies.verdict`), then the tables and figures they rest on, then links to the comparison
report(s) and the seed runs they aggregate.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from xkd.files import atomic_write_text
from xkd.report import study_figures
from xkd.report.compare import StatCol, fmt_stat, stat_table
from xkd.report.render import _ENV, load_record
from xkd.report.tables import better, cell, fmt, fmt_seconds

TITLES = {
    "kd-vs-ls": "KD vs label smoothing vs scratch",
    "capacity-gap": "Capacity gap and teacher assistant",
    "explanation-transfer": "Explanation transfer: e2KD vs KD",
}


def load_study(out: Path) -> dict[str, Any]:
    return load_record(
        out / "records" / "study.json", "study", "the study is incomplete (rerun `xkd study ... --resume`)"
    )


def _label(role: str, m: dict[str, Any]) -> dict:
    return cell(role, num=False, sub=m.get("distiller") or "teacher")


def _kd_vs_ls(out: Path, st: dict[str, Any]) -> dict[str, Any]:
    roles, methods, cats = st["roles"], st["methods"], st["categories"]
    m = [methods[r] for r in roles]
    main = stat_table(
        "Per method, mean ± std over seeds (hover for per-seed values): test accuracy, concept detectors "
        f"per category at the dissected layer, precision and recall of the top "
        f"{fmt(st['config']['region_fraction'] * 100, '.0f')}% attributed pixels against the discriminative "
        "region, and DiffROAR averaged over the fractions (teacher: reference, one model).",
        [_label(r, x) for r, x in zip(roles, m)],
        [StatCol("Accuracy", [x["accuracy"] for x in m], better="high")]
        + [StatCol(c, [x["detectors"].get(c) for x in m], ".2f", "high", title=f"{c} detectors") for c in cats]
        + [
            StatCol("All detectors", [x["detectors_total"] for x in m], ".2f", "high"),
            StatCol("Precision", [x["precision"] for x in m], better="high"),
            StatCol("Recall", [x["recall"] for x in m], better="high"),
            StatCol("DiffROAR", [x.get("diffroar_mean") for x in m], better="high"),
        ],
        [("", 2), ("Concept detectors", len(cats) + 1), ("Attributions", 3)],
    )
    students = st["students"]
    cols, groups = [], [("", 1)]
    for f in st["fractions"]:
        d = [(methods[r].get("diffroar") or {}).get(str(f)) or {} for r in students]
        cols += [
            StatCol("keep top", [x.get("keep_top") for x in d], better="high"),
            StatCol("keep bottom", [x.get("keep_bottom") for x in d], better="low"),
            StatCol("DiffROAR", [x.get("diffroar") for x in d], better="high"),
        ]
        groups.append((f"{fmt(f * 100, '.0f')}% of pixels kept", 3))
    diff = stat_table(
        "DiffROAR per fraction: test accuracy of a model retrained on images reduced to their top (or bottom) "
        "attributed pixels; DiffROAR = keep top − keep bottom (positive: the attributions rank discriminative "
        "pixels first).",
        [_label(r, methods[r]) for r in students],
        cols,
        groups,
    )
    src = "figures/detectors_per_category.png"
    study_figures.save_grouped_bars(
        out / src,
        cats,
        {
            r: (
                [(methods[r]["detectors"].get(c) or {}).get("mean") for c in cats],
                [(methods[r]["detectors"].get(c) or {}).get("std") for c in cats],
            )
            for r in roles
        },
        "concept detectors (mean ± std)",
        f"Detectors per concept category, {len(st['seeds'])} seed(s)",
    )
    figs = [(src, "Concept detectors per category and method; error bars: one std over seeds.")]
    for r in roles:
        unit_fig = f"figures/top_units_{r}.png"
        if (out / unit_fig).is_file():
            figs.append((unit_fig, f"{r} (seed {st['seeds'][0]}): its best units, each with its most activating "
                         "images and the region above the unit's threshold outlined; titled with the unit, its "
                         "best concept and the IoU."))  # fmt: skip
    layers = ", ".join(sorted({f"{r}: {methods[r].get('layer')} ({methods[r].get('units')} units)" for r in roles}))
    facts = {"Dissected layers": layers}
    if st.get("empty_concepts"):  # no positive pixel anywhere in the concept data: never a unit's concept
        facts["Concepts absent from the data"] = ", ".join(st["empty_concepts"]) + " (no IoU; never a detector)"
    return {
        "tables": [main, diff],
        "figures": figs,
        "facts": facts,
    }


def _agreement_better(st: dict[str, Any]) -> str | None:
    """The direction of the study's agreement metric, as its record says (older records: higher)."""
    return better(st.get("higher_is_better", (st.get("headline") or {}).get("higher_is_better", True)))


def _capacity_gap(out: Path, st: dict[str, Any]) -> dict[str, Any]:
    rows = st["teachers"]
    series = st["series"]
    tables = []
    for key, title, way in (
        ("accuracy", "Student accuracy", "high"),
        ("posthoc_accuracy", "Agreement with the teacher's predictions", "high"),
        ("fss", "FSS", None),
        ("rs", "RS", None),
        ("headline_agreement", "Explanation agreement", _agreement_better(st)),
    ):
        cols = [StatCol(s, [(t["students"].get(s) or {}).get(key) for t in rows], better=way) for s in series]
        labels = [
            cell(t["label"], num=False, sub=f"{fmt(t['params'], ',.0f')} params · acc {fmt_stat(t['accuracy'])}")
            for t in rows
        ]
        t = stat_table(
            f"{title} per teacher (rows, growing capacity) and student (columns), mean ± std over seeds.", labels, cols
        )
        t["head"][0]["text"] = "Teacher"
        tables.append(t)
    sizes = [t["params"] for t in rows]
    panels, extra = {}, {}
    for key, title in (("accuracy", "student accuracy"), ("posthoc_accuracy", "post-hoc acc. vs teacher"),
                       ("fss", "FSS"), ("rs", "RS"), ("headline_agreement", "explanation agreement")):  # fmt: skip
        panels[title] = {  # the chain exists for the largest teacher only: a marked point, not a line
            s: ([((t["students"].get(s) or {}).get(key) or {}).get("mean") for t in rows],
                [((t["students"].get(s) or {}).get(key) or {}).get("std") for t in rows])
            for s in series
            if s != "via_assistant"
        }  # fmt: skip
        ta = st.get("assistant")
        if ta:
            v = ta["student"].get(key) or {}
            extra[title] = {"student via the assistant": (rows[-1]["params"], v.get("mean"), v.get("std"))}
    src = "figures/capacity_gap.png"
    study_figures.save_lines_vs_size(out / src, sizes, panels, extra)
    facts = {"Teachers": ", ".join(f"{t['label']} ({fmt(t['params'], ',.0f')})" for t in rows)}
    if st.get("assistant"):
        facts["Assistant"] = (
            f"{st['assistant']['model']} ({fmt(st['assistant']['params'], ',.0f')} params), for the largest teacher"
        )
    caption = "Each measure against the teacher's size (log scale); the star is the student distilled through the assistant from the largest teacher."
    return {"tables": tables, "figures": [(src, caption)], "facts": facts}


def _nan(v: Any) -> float:
    return float("nan") if v is None else float(v)


def _explanation_transfer(out: Path, st: dict[str, Any]) -> dict[str, Any]:
    fractions = st["fractions"]
    ex, metric = st["explainer"], st["metric"]
    students = list(fractions[0]["students"]) if fractions else []
    quality_keys = sorted({k for fr in fractions for s in fr["students"].values() for k in s["quality"]})
    tables = []
    for fr in fractions:
        rows = fr["students"]
        cols = [
            StatCol("Accuracy", [rows[s].get("accuracy") for s in students], better="high"),
            StatCol(
                f"{metric} with the teacher ({ex})",
                [rows[s].get("agreement") for s in students],
                better=_agreement_better(st),
            ),
            StatCol(
                "Closer to the teacher than an independent student",
                [rows[s].get("closer_to_teacher") for s in students],
                spec=".1%",
                better="high",
                title="share of test images where the teacher's map is closer to this student's than to the "
                "independent student's (chance 50%)",
            ),
        ]
        cols += [StatCol(k, [rows[s]["quality"].get(k) for s in students]) for k in quality_keys]
        labels = [cell(s, num=False, sub=rows[s].get("distiller") or "") for s in students]
        tables.append(
            stat_table(
                f"{fr['label']} of the training data ({fmt(fr['train_images'], ',.0f')} images"
                + (f", {fr['student_epochs']} student epochs" if fr.get("student_epochs") else "")
                + f"; teacher accuracy {fmt_stat(fr.get('teacher_accuracy'))}), mean ± std over seeds.",
                labels,
                cols,
            )
        )
    sizes = [fr["train_images"] for fr in fractions]
    panels = {}
    for key, title in (("accuracy", "accuracy"), ("agreement", f"{metric} with the teacher"),
                       ("closer_to_teacher", "closer to the teacher (share)")):  # fmt: skip
        panels[title] = {  # a measure without a value (e.g. no image with a defined map) is not drawn
            s: ([_nan((fr["students"][s].get(key) or {}).get("mean")) for fr in fractions],
                [_nan((fr["students"][s].get(key) or {}).get("std")) for fr in fractions])
            for s in students
            if s != st["roles"]["independent"] or key != "closer_to_teacher"
        }  # fmt: skip
    src = "figures/explanation_transfer.png"
    study_figures.save_lines_vs_size(out / src, sizes, panels, xlabel="training images")
    facts = {
        "Explainer": ex,
        "Independent student": st["roles"]["independent"],
        "Data fractions": ", ".join(f"{fr['label']} ({fmt(fr['train_images'], ',.0f')})" for fr in fractions),
    }
    caption = (
        "Each measure against the number of training images the students saw (log scale); the teacher is the same."
    )
    return {"tables": tables, "figures": [(src, caption)], "facts": facts}


RENDERERS = {"kd-vs-ls": _kd_vs_ls, "capacity-gap": _capacity_gap, "explanation-transfer": _explanation_transfer}


def render_study_report(out: str | Path) -> Path:
    """Render ``out/study.html`` (and its figures) from ``out/records/study.json``."""
    out = Path(out)
    st = load_study(out)
    body = RENDERERS[st["study"]](out, st)
    ctx = {
        "st": st,
        "title": TITLES.get(st["study"], st["study"]),
        "verdicts": st.get("verdicts", []),
        "tables": body["tables"],
        "figures": body["figures"],
        "facts": body["facts"],
        "links": st.get("links") or [("report.html", "the comparison of the methods (mean ± std over seeds)")],
        "seconds": fmt_seconds(st.get("seconds")),
        "seed_seconds": fmt_seconds(st["seed_run_seconds"]) if st.get("seed_run_seconds") else None,
    }
    html = _ENV.get_template("study.html.j2").render(**ctx)
    return atomic_write_text(out / "study.html", html)
