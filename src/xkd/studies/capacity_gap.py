"""``xkd study capacity-gap``: how does the teacher-student capacity gap shape what is transferred,
and does a teacher assistant help? (UniCAM: Adhane, Dehshibi, Vetter, Masip & Roig, "On Explaining
Knowledge Distillation: Measuring and Visualising the Knowledge Transfer Process"; Mirzadeh et al.,
AAAI 2020)

Teachers of growing capacity (``study.teachers``, at least 3, ordered here by parameter count) are
each distilled into the same small student (``student_model``) with ``study.distiller``; for the
largest teacher, the chain teacher -> ``study.assistant`` -> student (the ``teacher_assistant``
distiller) is trained too. Each teacher is one :func:`xkd.comparison.compare` over N seeds in
``<name>/teachers/<i>_<model>/`` (its own report), so every number is a mean ± std over seeds with
the per-seed values kept. Measured per (teacher, student): accuracy, agreement with the teacher's
predictions, FSS and RS at matched layers, and the headline explanation agreement with the teacher
(``compare.agreement_*``). The verdicts are computed from these numbers.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rich.console import Console

from xkd.comparison import compare, stat
from xkd.config import ConfigError, RunConfig, StudentConfig
from xkd.data import build_dataset
from xkd.metrics.cost import parameter_count
from xkd.plan import validate_config
from xkd.prepare import build_for
from xkd.registry import STUDIES
from xkd.report.study import render_study_report
from xkd.rundir import RunDir, cache_root
from xkd.schema import from_dict, to_dict
from xkd.studies.common import prepare_study_dir, teacher_warnings
from xkd.studies.verdict import judge

DIRECT, VIA_ASSISTANT = "direct", "via_assistant"


def teacher_sizes(cfg: RunConfig) -> list[tuple[int, Any]]:
    """``(parameters, model config)`` of each configured teacher for the data's shape, smallest first."""

    st = cfg.study
    if len(st.teachers) < 3:
        raise ConfigError(
            f"study.teachers: the capacity-gap study needs at least 3 teachers of growing size, got {len(st.teachers)}"
        )
    if st.assistant is None:
        raise ConfigError("study.assistant: name the assistant model of the teacher -> assistant -> student chain")
    data = build_dataset(cfg.data)
    sized = sorted(((parameter_count(build_for(t, data, cfg.seed)), t) for t in st.teachers), key=lambda p: p[0])
    same = [f"{t.name} ({n:,})" for (n, t), (m, _) in zip(sized[1:], sized[:-1]) if n == m]
    if same:
        raise ConfigError(
            f"study.teachers: teachers of equal size ({', '.join(same)} parameters, like the one before): the study "
            "compares teachers of growing capacity; make each teacher larger than the last"
        )
    return sized


def teacher_config(cfg: RunConfig, out: Path, i: int, model: Any, largest: bool) -> RunConfig:
    st = cfg.study
    c = from_dict(RunConfig, to_dict(cfg))
    c.teacher.model = model
    c.teacher.checkpoint = None
    c.name = f"{i}_{model.name}"
    c.output_dir = str(out / "teachers")
    c.cache_dir = str(cache_root(cfg))
    c.students = [StudentConfig(DIRECT, st.distiller, dict(st.params))]
    if largest:
        chain = {
            "assistant": to_dict(st.assistant),
            "assistant_distiller": st.distiller,
            "assistant_params": dict(st.params),
            "distiller": st.distiller,
            "params": dict(st.params),
        }
        c.students.append(StudentConfig(VIA_ASSISTANT, "teacher_assistant", chain))
    return c


@STUDIES.register("capacity-gap")
def run_study(
    cfg: RunConfig, seeds: int | None = None, *, resume: bool = False, overwrite: bool = False, progress: bool = True
) -> Path:
    """Run the study and return its folder (``study.html``, ``records/study.json``, one comparison per teacher)."""

    t0 = time.perf_counter()
    console = Console(stderr=True)  # --no-progress hides bars, not these lines
    sized = teacher_sizes(cfg)
    study = RunDir.of(cfg)
    out = study.path
    prepare_study_dir(study, resume, overwrite, "capacity-gap", "teachers")
    rows = []
    for i, (params, model) in enumerate(sized):
        c = teacher_config(cfg, out, i, model, largest=i == len(sized) - 1)
        validate_config(c)
        console.print(
            f"[bold]capacity gap[/bold]: teacher {i + 1} of {len(sized)}: {model.name} ({params:,} parameters)"
        )
        cmp_dir = compare(c, seeds, resume=resume, overwrite=False, progress=progress)
        rows.append((i, params, model, cmp_dir, RunDir(cmp_dir).read_record("compare")))
    body = summarise(cfg, out, rows)
    body["warnings"] = teacher_warnings((c, f"the teacher {m.name}") for _, _, m, _, c in rows)
    body["seconds"] = time.perf_counter() - t0
    study.write_record("study", body)
    html = render_study_report(out)
    console.print(f"study report: {html}  ({time.perf_counter() - t0:.0f} s)")
    return out


KEYS = ("accuracy", "posthoc_accuracy", "fss", "rs", "headline_agreement")


def summarise(cfg: RunConfig, out: Path, rows: list[tuple[int, int, Any, Path, dict[str, Any]]]) -> dict[str, Any]:
    teachers = []
    for _, params, model, cmp_dir, cmp in rows:
        methods = cmp["methods"]
        teachers.append(
            {
                "label": f"{model.name} {','.join(f'{k}={v}' for k, v in model.params.items())}".strip(),
                "model": to_dict(model),
                "params": params,
                "accuracy": methods["teacher"]["accuracy"],
                "dir": str(cmp_dir.relative_to(out)),
                "students": {s: {k: methods[s].get(k) for k in KEYS} for s in cmp["students"]},
            }
        )
    largest, smallest = teachers[-1], teachers[0]
    via = largest["students"].get(VIA_ASSISTANT) or {}
    a_rec = (rows[-1][4]["methods"].get(VIA_ASSISTANT) or {}).get("assistant") or {}

    def vals(t: dict[str, Any], role: str, key: str) -> list[Any]:
        return list(((t["students"].get(role) or {}).get(key) or {}).get("values") or [])

    verdicts = [
        judge("A larger capacity gap lowers the student's accuracy", f"teacher {largest['label']}",
              vals(largest, DIRECT, "accuracy"), f"teacher {smallest['label']}", vals(smallest, DIRECT, "accuracy"),
              higher=False, quantity="student accuracy"),
        judge("A larger capacity gap transfers less of the teacher's features (FSS)", f"teacher {largest['label']}",
              vals(largest, DIRECT, "fss"), f"teacher {smallest['label']}", vals(smallest, DIRECT, "fss"),
              higher=False, quantity="FSS"),
        judge("The teacher assistant helps the student of the largest teacher (accuracy)", "via assistant",
              vals(largest, VIA_ASSISTANT, "accuracy"), "direct", vals(largest, DIRECT, "accuracy"), higher=True,
              quantity="student accuracy"),
        judge("The teacher assistant helps the student agree with the largest teacher", "via assistant",
              vals(largest, VIA_ASSISTANT, "posthoc_accuracy"), "direct", vals(largest, DIRECT, "posthoc_accuracy"),
              higher=True, quantity="agreement with the teacher's predictions"),
    ]  # fmt: skip
    return {
        "name": cfg.name,
        "study": "capacity-gap",
        "seeds": rows[0][4]["seeds"],
        "series": [DIRECT, VIA_ASSISTANT],
        "headline": rows[0][4].get("headline") or {},  # the agreement's metric and its direction
        "teachers": teachers,
        "assistant": {
            "role": VIA_ASSISTANT,
            "model": (cfg.study.assistant.name if cfg.study.assistant else None),
            "params": (a_rec.get("params") or {}).get("mean"),
            "accuracy": a_rec.get("accuracy") or stat([]),
            "student": via,
        }
        if via
        else None,
        "config": to_dict(cfg.study),
        "verdicts": [v.to_record() for v in verdicts],
        "seed_run_seconds": sum(float(r[4].get("seed_run_seconds") or 0.0) for r in rows),
        "links": [(f"{t['dir']}/report.html", f"comparison with teacher {t['label']}") for t in teachers],
    }
