"""The comparison report of ``xkd compare``, rendered from ``records/compare.json`` only.

Tables show mean ± sample standard deviation over seeds (the per-seed values are in the record and
in the "Per seed" table); the best mean per column is highlighted. The figure plots each method's
test accuracy against its headline explanation agreement with the teacher, with error bars of one
standard deviation in both directions.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import xkd.metrics  # noqa: F401  (registers the metrics: columns of comparisons recorded without them)
from xkd.files import atomic_write_text
from xkd.metrics.base import declared
from xkd.report import figures
from xkd.report.render import _ENV, load_record
from xkd.report.tables import (
    ARROWS,
    DASH,
    FSS_TITLE,
    RS_TITLE,
    best_rows,
    better,
    cell,
    explainer_name,
    fmt,
    fmt_p,
    fmt_seconds,
    fmt_share,
    head,
    ok,
    sentence,
)

METRIC_NAMES = {
    "rank_correlation": "Rank corr.",
    "top_k_agreement": "Top-k IoU",
    "map_pearson": "Pearson",
    "superpixel_mse": "Superpixel MSE",
    "superpixel_sign_agreement": "Sign agreement",
}
LOWER_IS_BETTER = {"superpixel_mse"}


@dataclass
class StatCol:
    """A column of mean ± std cells."""

    head: str
    stats: list[dict[str, Any] | None]
    spec: str = ".4f"
    better: str | None = None
    scale: float = 1.0
    title: str | None = None


def fmt_stat(s: dict[str, Any] | None, spec: str = ".4f", scale: float = 1.0) -> str:
    """``mean ± std`` (just the mean with one seed or a constant; "–" when there is no value)."""
    if not s or not ok(s.get("mean")):
        return DASH
    text = fmt(s["mean"], spec, scale)
    std = s.get("std")
    if ok(std) and std > 0:
        text += f" ± {fmt(std, spec, scale)}"
    return text


def stat_table(caption: str, labels: list[dict], cols: list[StatCol], groups: list | None = None) -> dict:
    means = [[(s or {}).get("mean") for s in c.stats] for c in cols]
    bests = [best_rows(m, c.better) for m, c in zip(means, cols)]
    rows = []
    for r, lab in enumerate(labels):
        row = [lab]
        for c, b in zip(cols, bests):
            s = c.stats[r]
            text = c.spec(s) if callable(c.spec) else fmt_stat(s, c.spec, c.scale)
            row.append(cell(text, best=r in b, title=_values_title(s), sub=_seeds_note(s)))
        rows.append(row)
    heads = [head("Method", False)] + [head(c.head + ARROWS[c.better], True, c.title) for c in cols]
    return {"caption": caption, "groups": groups, "head": heads, "rows": rows}


def _seeds_note(s: dict[str, Any] | None) -> str | None:
    """``"1 of 2 seeds"`` when some seeds have no value (e.g. no image both models classified alike):
    such a mean looked like one over every seed."""
    vals = (s or {}).get("values")
    n = (s or {}).get("n")
    if not vals or not isinstance(n, int) or n == 0 or n >= len(vals):
        return None
    return f"{n} of {len(vals)} seeds"


def _seconds_stat(s: dict[str, Any] | None) -> str:
    """A time's ``mean ± std`` over seeds (just the mean with one seed or a constant)."""
    text = fmt_seconds((s or {}).get("mean"))
    std = (s or {}).get("std")
    return text + (f" ± {fmt_seconds(std)}" if ok(std) and std > 0 else "")


def _values_title(s: dict[str, Any] | None) -> str | None:
    vals = (s or {}).get("values")
    if not vals or len(vals) < 2:
        return None
    return "per seed: " + ", ".join(fmt(v, ".4g") for v in vals)


def _label(role: str, m: dict[str, Any]) -> dict:
    params = ", ".join(f"{k}={v}" for k, v in (m.get("distiller_params") or {}).items() if not isinstance(v, dict))
    sub = f"{m.get('distiller') or 'teacher'} · {m.get('model')}" + (f" · {params}" if params else "")
    return cell(role, num=False, sub=sub)


def _headline_name(h: dict[str, Any]) -> str:
    if not h.get("explainer"):
        return "explanation agreement"
    name = METRIC_NAMES.get(h["metric"]) or h.get("label") or h["metric"]
    return f"{explainer_name(h['explainer'])} {name}"


def _main_table(cmp: dict[str, Any]) -> dict:
    roles, methods = cmp["roles"], cmp["methods"]
    m = [methods[r] for r in roles]
    h = cmp["headline"]
    way = better(h.get("higher_is_better", True))
    loaded = [str(s) for s, flag in zip(cmp["seeds"], (methods.get("teacher") or {}).get("loaded") or []) if flag]
    teacher_note = (
        f" The teacher was loaded from a checkpoint by seed{'s' if len(loaded) > 1 else ''} {', '.join(loaded)}; "
        "its train time there is the time it took when it was trained."
        if loaded
        else ""
    )
    return stat_table(
        "Accuracy, agreement and cost, mean ± std over seeds (hover a cell for the per-seed values). "
        "Best = the checkpoint with the best validation accuracy (the one evaluated everywhere else); "
        "last = the final epoch's weights. Post-hoc scores a student against the teacher's predictions. "
        "Train time includes the distiller's setup and a teacher assistant's training." + teacher_note,
        [_label(r, x) for r, x in zip(roles, m)],
        [
            StatCol("Acc. (best)", [x.get("accuracy") for x in m], better="high"),
            StatCol("Acc. (last)", [x.get("last_accuracy") for x in m], better="high"),
            StatCol("F1 (best)", [x.get("macro_f1") for x in m], better="high"),
            StatCol("F1 (last)", [x.get("last_macro_f1") for x in m], better="high"),
            StatCol(
                "Best epoch",
                [x.get("best_epoch") for x in m],
                ",.1f",
                title="the epoch with the best validation accuracy (its checkpoint is the one evaluated)",
            ),
            StatCol("Post-hoc acc.", [x.get("posthoc_accuracy") for x in m], better="high"),
            StatCol("Post-hoc F1", [x.get("posthoc_macro_f1") for x in m], better="high"),
            StatCol(_headline_name(h), [x.get("headline_agreement") for x in m], better=way),
            StatCol("Parameters", [x.get("params") for x in m], ",.0f", "low"),
            StatCol("FLOPs (M)", [x.get("flops") for x in m], ",.2f", "low", 1e-6, "per image"),
            StatCol(
                "Train time",
                [x.get("train_seconds") for x in m],
                _seconds_stat,
                title="epoch loop + the distiller's setup (e.g. XDistillation's explanations and CAE) + a teacher "
                "assistant's training; a teacher loaded from a checkpoint counts the time it took when it was trained",
            ),
        ],
    )


def _agreement_metrics(cmp: dict[str, Any]) -> list[tuple[str, str, str | None]]:
    """``(key, label, better)`` of the aggregated agreement metrics, as the comparison recorded their
    declarations; older records: the five metrics of the time."""
    if "agreement_columns" in cmp:
        return [
            (c["key"], METRIC_NAMES.get(c["key"], c["label"]), better(c["higher_is_better"]))
            for c in cmp["agreement_columns"]
        ]
    return [(k, name, "low" if k in LOWER_IS_BETTER else "high") for k, name in METRIC_NAMES.items()]


def _agreement_table(cmp: dict[str, Any]) -> dict | None:
    students, methods = cmp["students"], cmp["methods"]
    cols, groups = [], [("", 1)]
    for ex in cmp.get("explainers", []):
        shown = [
            (k, label, way)
            for k, label, way in _agreement_metrics(cmp)
            if any(k in ((methods[r].get("explanation_agreement") or {}).get(ex) or {}) for r in students)
        ]
        if not shown:
            continue
        for k, label, way in shown:
            stats = [((methods[r].get("explanation_agreement") or {}).get(ex) or {}).get(k) for r in students]
            cols.append(StatCol(label, stats, better=way))
        groups.append((explainer_name(ex), len(shown)))
    if not cols:
        return None
    return stat_table(
        "Explanation agreement of each student's maps with the teacher's (same test images, true class), "
        "mean ± std over seeds.",
        [_label(r, methods[r]) for r in students],
        cols,
        groups,
    )


def _share_stat(s: dict[str, Any] | None) -> str:
    """A share's ``mean ± std`` over seeds in percent (``67.5% ± 4.2%``)."""
    if not s or not ok(s.get("mean")):
        return DASH
    text = f"{s['mean'] * 100:.1f}%"
    return text + (f" ± {s['std'] * 100:.1f}%" if ok(s.get("std")) else "")


def _images(values: list[Any]) -> str:
    got = sorted({int(v) for v in values if ok(v)})
    if not got:
        return DASH
    return f"{got[0]:,}" if len(got) == 1 else f"{got[0]:,}–{got[-1]:,}"


def _seed_title(t: dict[str, Any], i: int) -> str:
    counts = [f"{(t.get(k) or [None] * (i + 1))[i]} {k}" for k in ("closer", "ties", "farther")]
    return f"{', '.join(counts)} of {(t.get('images') or [None] * (i + 1))[i]} images"


def _tests_sections(cmp: dict[str, Any]) -> list[dict]:
    """Per agreement metric tested against chance (``closer_to_teacher``): mean ± std of the share per
    student and explainer, every seed's share with its binomial p-value, and a sentence per student."""
    students, methods, seeds = cmp["students"], cmp["methods"], cmp["seeds"]
    out = []
    for name, decl in (cmp.get("agreement_tests") or {}).items():
        tests = {r: {ex: t[name] for ex, t in (methods[r].get("agreement_tests") or {}).items() if name in t}
                 for r in students}  # fmt: skip
        explainers = [ex for ex in cmp.get("explainers", []) if any(ex in tests[r] for r in students)]
        shown = [r for r in students if tests[r]]
        if not shown:
            continue
        labels = [_label(r, methods[r]) for r in shown]
        means = stat_table(
            f"{decl.get('label')}: {decl.get('description')}, mean ± std over seeds (Ojha et al., NeurIPS 2023, "
            "§4.1; ties count half).",
            labels,
            [
                StatCol(explainer_name(ex), [(tests[r].get(ex) or {}).get("share") for r in shown], _share_stat, "high")
                for ex in explainers
            ],
        )
        heads, groups, rows = [head("Method", False)], [("", 1)], []
        for ex in explainers:
            heads += [head(f"seed {s}", True) for s in seeds]
            groups.append((explainer_name(ex), len(seeds)))
        for r, lab in zip(shown, labels):
            row = [lab]
            for ex in explainers:
                t = tests[r].get(ex) or {}
                shares = (t.get("share") or {}).get("values") or [None] * len(seeds)
                ps = t.get("p_value") or [None] * len(seeds)
                row += [
                    cell(fmt_share(v), sub=fmt_p(ps[i]) if ok(v) else None, title=_seed_title(t, i) if t else None)
                    for i, v in enumerate(shares)
                ]
            rows.append(row)
        per_seed = {
            "caption": "Every seed's share, with its two-sided binomial test against 50% (the sign test on the untied "
            "images); hover a cell for the counts.",
            "groups": groups,
            "head": heads,
            "rows": rows,
        }
        sentences = []
        for r in shown:
            for ex in explainers:
                t = tests[r].get(ex)
                if not t:
                    continue
                ps = ", ".join(fmt_p(p)[4:] for p in t.get("p_value") or [])
                text = sentence(
                    decl["sentence"],
                    ex,
                    {k: v for k, v in t.items() if isinstance(v, str)},
                    share=_share_stat(t.get("share")),
                    images=_images(t.get("images") or []),
                    p=f"p per seed: {ps}",
                )
                n = (t.get("share") or {}).get("n") or 0
                sentences.append({"role": r, "text": f"over {n} seed{'' if n == 1 else 's'}, {text}"})
        out.append({"name": name, "label": decl.get("label") or name, "tables": [means, per_seed],
                    "sentences": sentences})  # fmt: skip
    return out


def _quality_columns(cmp: dict[str, Any]) -> list[dict[str, Any]]:
    """The aggregated columns as the comparison recorded them; older records: today's declarations."""
    if "quality_columns" in cmp:
        return cmp["quality_columns"]
    return [c for m in declared("model") for c in m.info()["columns"] if c["higher_is_better"] is not None]


def _quality_tables(cmp: dict[str, Any]) -> list[dict]:
    """Per explainer: its own metrics (faithfulness, localisation) for every model, and top-K IoU and
    Dice per K where the data has masks."""
    roles, methods = cmp["roles"], cmp["methods"]
    tables = []
    for ex in cmp.get("explainers_scored", []):
        q = {r: (methods[r].get("explanation_quality") or {}).get(ex) or {} for r in roles}
        shown = [r for r in roles if q[r]]
        cols = [c for c in _quality_columns(cmp) if any(c["key"] in q[r] for r in shown)]
        if cols:
            tables.append(
                stat_table(
                    f"{explainer_name(ex)}: its own metrics per model, mean ± std over seeds.",
                    [_label(r, methods[r]) for r in shown],
                    [
                        StatCol(c["label"], [q[r].get(c["key"]) for r in shown], better=better(c["higher_is_better"]))
                        for c in cols
                    ],
                )
            )
        ks = sorted({k for r in shown for k in (q[r].get("per_k") or {})}, key=float)
        if ks:
            cols, groups = [], [("", 1)]
            for k in ks:
                for m in ("iou", "dice"):
                    stats = [((q[r].get("per_k") or {}).get(k) or {}).get(m) for r in shown]
                    cols.append(StatCol("IoU" if m == "iou" else "Dice", stats, better="high"))
                groups.append((f"K = {fmt(float(k), ',.0f')} px", 2))
            tables.append(
                stat_table(
                    f"{explainer_name(ex)}: top-K IoU and Dice of the K most important pixels against the masks.",
                    [_label(r, methods[r]) for r in shown],
                    cols,
                    groups,
                )
            )
    return tables


def _transfer_table(cmp: dict[str, Any]) -> dict | None:
    students, methods = cmp["students"], cmp["methods"]
    if not any("fss" in methods[r] for r in students):
        return None
    return stat_table(
        f"Feature transfer at matched layers (UniCAM). FSS: {FSS_TITLE}. RS: {RS_TITLE}.",
        [_label(r, methods[r]) for r in students],
        [
            StatCol("FSS", [methods[r].get("fss") for r in students], better="high", title=FSS_TITLE),
            StatCol("RS", [methods[r].get("rs") for r in students], better="high", title=RS_TITLE),
        ],
    )


def _assistant_table(cmp: dict[str, Any]) -> dict | None:
    students, methods = cmp["students"], cmp["methods"]
    shown = [r for r in students if methods[r].get("assistant")]
    if not shown:
        return None
    a = [methods[r]["assistant"] for r in shown]
    return stat_table(
        "Teacher assistants: the intermediate model each chain distilled its student from.",
        [cell(r, num=False, sub=x.get("model")) for r, x in zip(shown, a)],
        [
            StatCol("Assistant acc.", [x.get("accuracy") for x in a], better="high"),
            StatCol("Assistant post-hoc acc.", [x.get("posthoc_accuracy") for x in a], better="high"),
            StatCol("Assistant parameters", [x.get("params") for x in a], ",.0f"),
        ],
    )


def _ranking_table(cmp: dict[str, Any]) -> dict:
    rk, methods = cmp["ranking"], cmp["methods"]
    names = {
        "accuracy": "Accuracy",
        "posthoc_accuracy": "Post-hoc acc.",
        "headline_agreement": _headline_name(cmp["headline"]),
    }
    heads = [head("Place", True), head("Method", False)]
    heads += [head(f"{names.get(c['key'], c['key'])} rank", True) for c in rk["criteria"]]
    heads.append(head("Mean rank", True, "mean of the ranks over the criteria (1 = best)"))
    rows = []
    for place, r in enumerate(rk["order"], 1):
        row = [cell(str(place)), _label(r, methods[r])]
        row += [cell(fmt(rk["ranks"][c["key"]].get(r), ".1f")) for c in rk["criteria"]]
        row.append(cell(fmt(rk["mean_rank"].get(r), ".2f"), best=place == 1))
        rows.append(row)
    caption = (
        "Ranking of the students by the mean of each criterion (1 = best, ties share their mean rank), "
        "ordered by mean rank. Differences smaller than the standard deviations above are not resolved "
        "at this number of seeds."
    )
    return {"caption": caption, "groups": None, "head": heads, "rows": rows}


def _per_seed_table(cmp: dict[str, Any]) -> dict:
    seeds = cmp["seeds"]
    heads = [head("Method", False)] + [head(f"seed {s}", True) for s in seeds]
    rows = []
    for r in cmp["roles"]:
        vals = (cmp["methods"][r].get("accuracy") or {}).get("values") or []
        rows.append([cell(r, num=False)] + [cell(fmt(v)) for v in vals])
    caption = "Test accuracy (best checkpoint) of every seed's run; each run's own report is linked below."
    return {"caption": caption, "groups": None, "head": heads, "rows": rows}


def _figure(out: Path, cmp: dict[str, Any]) -> str | None:
    students, methods = cmp["students"], cmp["methods"]
    points = []
    for r in students:
        acc, agr = methods[r].get("accuracy") or {}, methods[r].get("headline_agreement") or {}
        if ok(acc.get("mean")) and ok(agr.get("mean")):
            points.append((r, agr["mean"], agr.get("std") or 0.0, acc["mean"], acc.get("std") or 0.0))
    if not points:
        return None
    teacher_acc = (methods.get("teacher", {}).get("accuracy") or {}).get("mean")
    src = "figures/accuracy_vs_agreement.png"
    figures.save_accuracy_vs_agreement(
        out / src, points, _headline_name(cmp["headline"]), teacher_acc, len(cmp["seeds"])
    )
    return src


def load_compare(out: Path) -> dict[str, Any]:
    return load_record(
        out / "records" / "compare.json",
        "compare",
        "the comparison is incomplete (finish it with `xkd compare --resume`)",
    )


def render_compare_report(out: str | Path) -> Path:
    """Render ``out/report.html`` (and ``out/figures/*.png``) from ``out/records/compare.json``."""
    out = Path(out)
    cmp = load_compare(out)
    ctx = {
        "cmp": cmp,
        "dataset": cmp.get("dataset") or {},
        "headline": _headline_name(cmp["headline"]),
        "main": _main_table(cmp),
        "agreement": _agreement_table(cmp),
        "tests": _tests_sections(cmp),
        "transfer": _transfer_table(cmp),
        "quality": _quality_tables(cmp),
        "assistants": _assistant_table(cmp),
        "ranking": _ranking_table(cmp),
        "per_seed": _per_seed_table(cmp),
        "figure": _figure(out, cmp),
        "runs": [(s, info["dir"]) for s, info in cmp["runs"].items()],
        "seconds": fmt_seconds(cmp.get("seconds")),
        "seed_seconds": fmt_seconds(cmp.get("seed_run_seconds")),
    }
    html = _ENV.get_template("compare.html.j2").render(**ctx)
    return atomic_write_text(out / "report.html", html)
