"""What a sweep leaves in its folder: one object owns the layout, and the files read from the study.

```
<output_dir>/<name>-sweep/
  config.yaml          the sweep's config
  study.db             the Optuna study (SQLite, unless --storage names a database)
  trial-NNNN/          one ordinary xkd run directory per trial (report.html, records/, ...)
  best.yaml            the best trial's config: `xkd run --config best.yaml` runs it as it is
  pareto/trial-NNNN.yaml  with several objectives: the config of every trial on the Pareto front
  records/sweep.json   every trial's state, settings and scores; the best trial(s)
  sweep.html           best trial, optimisation history, parameter importances, slices, Pareto front
```

``sweep.html`` embeds plotly.js, so it opens offline. With several objectives ``best.yaml`` is the
Pareto-optimal trial that is best on the first objective (ties: the next objective).
"""

from __future__ import annotations

import datetime as dt
import html
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.trial import FrozenTrial, TrialState

from xkd.config import RunConfig
from xkd.files import atomic_write_text, hide_password, record, write_json
from xkd.rundir import SWEEP_DATABASE, RunDir
from xkd.sweeps.plan import SweepPlan, with_values

log = logging.getLogger("xkd")


class SweepDir:
    """The folder of one sweep and every path inside it."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @classmethod
    def of(cls, cfg: RunConfig) -> SweepDir:
        """``<output_dir>/<name>-sweep`` of ``cfg``."""
        return cls(Path(cfg.output_dir) / f"{cfg.name}-sweep")

    @property
    def config(self) -> Path:
        return self.path / RunDir.CONFIG

    @property
    def database(self) -> Path:
        return self.path / SWEEP_DATABASE  # what RunDir.kind() tells a sweep by

    @property
    def page(self) -> Path:
        return self.path / "sweep.html"

    @property
    def best(self) -> Path:
        return self.path / "best.yaml"

    @property
    def pareto(self) -> Path:
        return self.path / "pareto"

    @property
    def record(self) -> Path:
        return self.path / "records" / "sweep.json"

    @property
    def teacher_lock(self) -> Path:
        return self.path / ".teacher.lock"

    @staticmethod
    def trial_name(number: int) -> str:
        return f"trial-{number:04d}"

    def default_storage(self) -> str:
        return f"sqlite:///{self.database.resolve()}"

    def is_empty(self) -> bool:
        return RunDir(self.path).is_empty()

    def is_sweep(self) -> bool:
        """Whether the folder holds a sweep: its study, record or trials (:meth:`xkd.rundir.RunDir.kind`),
        or, with ``--storage`` before the first trial, only its ``config.yaml`` (a run has ``checkpoints/``)."""
        kind = RunDir(self.path).kind()
        return kind == "sweep" or (kind == "run" and not (self.path / "checkpoints").exists())


def best_config(cfg: RunConfig, values: dict[str, Any]) -> dict[str, Any]:
    """``cfg`` with ``values`` as plain data ready for ``xkd run``: named ``<name>-best``, in the
    sweep's ``output_dir`` (so it finds the sweep's teacher in the cache), without its ``sweep`` section."""
    raw = with_values(cfg, values)
    raw.pop("sweep", None)
    raw["name"] = f"{cfg.name}-best"
    return raw


def best_trials(study: optuna.Study, plan: SweepPlan) -> list[FrozenTrial]:
    """The best trial (one objective) or the Pareto front, best on the first objective first."""
    if not any(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
        return []
    if len(plan.objectives) == 1:
        return [study.best_trial]
    signs = [-1.0 if d == "maximize" else 1.0 for d in plan.directions]
    return sorted(study.best_trials, key=lambda t: ([s * v for s, v in zip(signs, t.values)], t.number))


def write_outputs(study: optuna.Study, plan: SweepPlan, out: SweepDir, url: str) -> Path:
    """Write ``best.yaml`` (and ``pareto/``), ``records/sweep.json`` and ``sweep.html``; returns the page."""
    best = best_trials(study, plan)
    header = "# xkd sweep {name}: the config of trial {n} ({scores}); `xkd run --config {file}` runs it\n"
    if best:
        raw = best_config(plan.cfg, best[0].params)
        atomic_write_text(out.best, header.format(**_header(plan, best[0], str(out.best))) + _yaml(raw))
    pareto_files = []
    if len(plan.objectives) > 1:
        keep = {f"{out.trial_name(t.number)}.yaml" for t in best}
        for stale in out.pareto.glob("*.yaml") if out.pareto.is_dir() else []:
            if stale.name not in keep:  # the front moved on since the last write
                stale.unlink(missing_ok=True)  # another worker may have removed it first
        for t in best:
            path = out.pareto / f"{out.trial_name(t.number)}.yaml"
            raw = best_config(plan.cfg, t.params)
            raw["name"] = f"{plan.cfg.name}-{out.trial_name(t.number)}"
            atomic_write_text(path, header.format(**_header(plan, t, str(path))) + _yaml(raw))
            pareto_files.append(f"pareto/{path.name}")
    summary = summarise(study, plan, out, url, best, pareto_files)
    write_json(out.record, record("sweep", summary))
    atomic_write_text(out.page, render_page(study, plan, summary))
    return out.page


def _header(plan: SweepPlan, t: FrozenTrial, file: str) -> dict[str, Any]:
    scores = ", ".join(f"{o.name} {v:.4g}" for o, v in zip(plan.objectives, t.values))
    return {"name": plan.cfg.name, "n": t.number, "scores": scores, "file": file}


def _yaml(raw: dict[str, Any]) -> str:
    return yaml.safe_dump(raw, sort_keys=False)


def summarise(
    study: optuna.Study, plan: SweepPlan, out: SweepDir, url: str, best: list[FrozenTrial], pareto: list[str]
) -> dict[str, Any]:
    """The body of ``records/sweep.json``."""
    trials = study.get_trials(deepcopy=False)
    counts = {s.name.lower(): sum(t.state == s for t in trials) for s in TrialState}
    return {
        "name": plan.cfg.name,
        "study": study.study_name,
        "storage": hide_password(url),
        "sampler": plan.sampler,
        "pruner": plan.pruner,
        "seed": plan.seed,
        "trials_wanted": plan.trials,
        "finished": counts["complete"] + counts["pruned"],
        "counts": counts,
        "objectives": [
            {
                "name": o.name,
                "metric": o.metric,
                "student": o.student,
                "explainer": o.explainer,
                "direction": o.direction,
            }
            for o in plan.objectives
        ],
        "params": [{"path": p.path, "distribution": p.describe()} for p in plan.params],
        "best": [t.number for t in best],
        "best_config": str(out.best) if best else None,
        "pareto_configs": pareto,
        "trials": [
            {
                "number": t.number,
                "state": t.state.name.lower(),
                "params": t.params,
                # a pruned trial's value is Optuna's last reported validation accuracy, not a score of
                # the objectives: its note gives it
                "values": t.values if t.state == TrialState.COMPLETE else None,
                "intermediate": {str(k): v for k, v in sorted(t.intermediate_values.items())},
                "run_dir": t.user_attrs.get("run_dir"),
                "here": bool(t.user_attrs.get("run_dir")) and (out.path / t.user_attrs["run_dir"]).is_dir(),
                "worker": t.user_attrs.get("worker"),
                "retry_of": t.user_attrs.get("retry_of"),
                "over_budget": bool(t.user_attrs.get("over_budget")),
                "interrupted": bool(t.user_attrs.get("interrupted")),
                "error": t.user_attrs.get("error"),
                "seconds": t.duration.total_seconds() if t.duration is not None else None,
            }
            for t in trials
        ],
        "written": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


# -- sweep.html ---------------------------------------------------------------------------------------

CSS = """
body { margin: 0; color: #1f2328; font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, Arial, sans-serif; }
main { max-width: 1200px; margin: 0 auto; padding: 24px 32px 48px; }
h1 { font-size: 26px; margin: 0 0 4px; } h2 { font-size: 20px; margin: 32px 0 8px; border-top: 1px solid #d8dee4;
padding-top: 8px; } .muted { color: #59636e; } code { background: #f6f8fa; padding: 1px 4px; border-radius: 4px; }
table { border-collapse: collapse; font-size: 13.5px; font-variant-numeric: tabular-nums; margin: 8px 0 16px; }
th, td { padding: 4px 10px; border-bottom: 1px solid #d8dee4; text-align: left; } th { background: #f6f8fa; }
tr.best td { background: #dff3e4; } .note { background: #fff4d6; border: 1px solid #e9c46a; border-radius: 8px;
padding: 6px 12px; } a { color: #0b5cad; }
"""


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return html.escape(str(v))


def _run_link(t: dict[str, Any]) -> str:
    """A link to the trial's report; a trial another machine ran names that machine."""
    rd = t.get("run_dir")
    if not rd:
        return ""
    if not t["here"]:
        return f"{html.escape(rd)} on {html.escape(str((t.get('worker') or {}).get('host', 'another machine')))}"
    link = f'<a href="{html.escape(rd)}/report.html">{html.escape(rd)}</a>'
    return link if t["state"] == "complete" else html.escape(rd)


def figures(study: optuna.Study, plan: SweepPlan) -> list[tuple[str, str]]:
    """(title, HTML) of each Optuna figure; the first embeds plotly.js, so the page needs no network."""
    import optuna.visualization as vis
    from optuna.importance import FanovaImportanceEvaluator

    names = [o.name for o in plan.objectives]
    makers: list[tuple[str, Callable[[], Any]]] = []
    for i, name in enumerate(names):
        target = None if len(names) == 1 else (lambda t, i=i: t.values[i])
        makers.append(
            (
                f"Optimisation history: {name}",
                lambda tg=target, n=name: vis.plot_optimization_history(study, target=tg, target_name=n),
            )
        )
    if len(names) == 1:
        makers.append(
            (f"Validation accuracy of {plan.objectives[0].student} per epoch (what the pruner sees)",
             lambda: vis.plot_intermediate_values(study))
        )  # fmt: skip
    for i, name in enumerate(names):
        target = None if len(names) == 1 else (lambda t, i=i: t.values[i])
        makers.append(
            (f"Parameter importances (fANOVA): {name}",
             lambda tg=target, n=name: vis.plot_param_importances(
                 study, evaluator=FanovaImportanceEvaluator(seed=plan.seed), target=tg, target_name=n))
        )  # fmt: skip
        makers.append(
            (
                f"Slices: {name} against each setting",
                lambda tg=target, n=name: vis.plot_slice(study, target=tg, target_name=n),
            )
        )
    if 2 <= len(names) <= 3:
        makers.append(("Pareto front", lambda: vis.plot_pareto_front(study, target_names=names)))
    out: list[tuple[str, str]] = []
    embedded = False
    for title, make in makers:
        try:
            fig = make()
        except Exception as e:  # a figure that needs more finished trials than there are
            out.append((title, f'<p class="note">Not drawn yet: {html.escape(str(e))}</p>'))
            continue
        out.append((title, fig.to_html(full_html=False, include_plotlyjs=not embedded, default_height="420px")))
        embedded = True
    return out


def render_page(study: optuna.Study, plan: SweepPlan, summary: dict[str, Any]) -> str:
    """``sweep.html`` from the study and its summary."""
    names = [o["name"] for o in summary["objectives"]]
    paths = [p["path"] for p in summary["params"]]
    trials = {t["number"]: t for t in summary["trials"]}
    c = summary["counts"]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>xkd sweep {html.escape(summary['name'])}</title><style>{CSS}</style></head><body><main>",
        f"<h1>xkd sweep <code>{html.escape(summary['name'])}</code></h1>",
        f"<p class='muted'>{summary['finished']} of {summary['trials_wanted']} trials finished ({c['complete']} complete, "
        f"{c['pruned']} pruned; {c['fail']} failed, {c['running']} running, {c['waiting']} waiting). Study "
        f"<code>{html.escape(summary['study'])}</code> in <code>{html.escape(summary['storage'])}</code>; sampler "
        f"{summary['sampler']}, pruner {summary['pruner']}, seed {summary['seed']}. Written {summary['written']}.</p>",
        "<h2>Search space and objectives</h2><table><tr><th>setting (config path)</th><th>distribution</th></tr>",
        *(f"<tr><td><code>{html.escape(p['path'])}</code></td><td>{html.escape(p['distribution'])}</td></tr>" for p in summary["params"]),
        "</table><table><tr><th>objective</th><th>metric</th><th>student</th><th>explainer</th><th>direction</th></tr>",
        *(
            f"<tr><td><code>{html.escape(o['name'])}</code></td><td>{o['metric']}</td><td>{html.escape(o['student'])}</td>"
            f"<td>{html.escape(o['explainer'] or '')}</td><td>{o['direction']}</td></tr>"
            for o in summary["objectives"]
        ),
        "</table>",
    ]  # fmt: skip
    parts.append("<h2>Best trial</h2>" if len(names) == 1 else "<h2>Pareto front</h2>")
    if not summary["best"]:
        parts.append("<p class='note'>No trial has completed yet.</p>")
    else:
        if len(names) > 1:
            parts.append(
                f"<p>{len(summary['best'])} trial(s) no other trial beats on every objective. <code>best.yaml</code> is "
                f"the one best on {html.escape(names[0])}; each one's config is in <code>pareto/</code>.</p>"
            )
        parts.append(_trial_table([trials[n] for n in summary["best"]], names, paths, best=set(summary["best"][:1])))
        parts.append(
            f"<p><code>xkd run --config {html.escape(summary['best_config'])}</code>, from the folder the sweep ran in "
            "(the config's paths are relative to it), runs the best configuration as it is.</p>"
        )
    for title, fig in figures(study, plan):
        parts.append(f"<h2>{html.escape(title)}</h2>{fig}")
    parts.append("<h2>Every trial</h2>")
    parts.append(_trial_table(list(trials.values()), names, paths, best=set(summary["best"][:1]), every=True))
    parts.append("</main></body></html>")
    return "\n".join(parts)


def _trial_table(
    rows: list[dict[str, Any]], names: list[str], paths: list[str], best: set[int], every: bool = False
) -> str:
    head = ["trial", "state", *names, *paths, "seconds", "run"] + (["note"] if every else [])
    out = ["<table><tr>", *(f"<th>{html.escape(h)}</th>" for h in head), "</tr>"]
    for t in rows:
        values = t["values"] or [None] * len(names)
        note = []
        if t["retry_of"] is not None:
            note.append(f"retries trial {t['retry_of']}")
        if t["over_budget"]:
            note.append("not run: the budget was filled")
        if t["interrupted"]:
            note.append("interrupted")
        if t["error"]:
            note.append(html.escape(t["error"]))
        if t["state"] == "pruned" and t["intermediate"]:
            last = list(t["intermediate"].items())[-1]
            note.append(f"pruned after epoch {last[0]} (val accuracy {last[1]:.4f})")
        cells = [
            str(t["number"]),
            t["state"],
            *("" if v is None else _fmt(v) for v in values),
            *(_fmt(t["params"].get(p, "")) for p in paths),
            "" if t["seconds"] is None else f"{t['seconds']:.0f}",
            _run_link(t),
        ] + (["; ".join(note)] if every else [])
        cls = " class='best'" if t["number"] in best else ""
        out.append(f"<tr{cls}>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    out.append("</table>")
    return "".join(out)
