"""Reports rendered from records only: a run (``report.html``), a comparison and a study."""

from __future__ import annotations

from pathlib import Path

from xkd.errors import ReportError
from xkd.report.compare import render_compare_report
from xkd.report.render import render_report
from xkd.report.study import render_study_report
from xkd.rundir import RunDir


def not_a_report_dir(d: RunDir, kind: str | None) -> ReportError:
    """The error for a folder ``xkd report`` does not render: a sweep (``xkd sweep`` writes its page),
    or one that holds nothing xkd wrote (``kind`` None; the xkd folders inside it are named)."""
    if kind == "sweep":
        return ReportError(
            f"{d.path} is a sweep folder, which `xkd report` does not render: `xkd sweep --config {d.config} "
            "--resume` (from the folder the sweep ran in) rewrites its sweep.html; each of its trial-NNNN folders "
            "is a run that `xkd report` renders"
        )
    if not d.path.is_dir():
        what = "is a file" if d.path.exists() else "does not exist"
        return ReportError(f"{d.path} {what}; pass the folder of a run, comparison or study (runs/NAME)")
    inside = sorted(
        str(p) for p in d.path.iterdir() if p.is_dir() and p.name[0] != "." and RunDir(p).kind() not in (None, "sweep")
    )  # not the teacher cache (.cache)
    hint = f", e.g. {', '.join(inside[:3])}" if inside else " (runs/NAME)"
    return ReportError(
        f"{d.path} is not an xkd output folder (no {RunDir.CONFIG} or records of a run, comparison, study or "
        f"sweep); pass the folder of a run, comparison or study{hint}"
    )


def render_dir(path: str | Path) -> list[Path]:
    """Re-render every report of ``path`` from its records: a run's, a comparison's, a study's (a
    study over one comparison has both). Returns the pages written.

    Raises:
        ReportError: ``path`` is a sweep, or nothing xkd wrote; or a record is missing (the message
            names the command that finishes that kind of folder).
    """
    d = RunDir(path)
    kind = d.kind()
    if kind is None and d.has_record("run"):  # a run's records without its config still render
        kind = "run"
    if kind not in ("run", "comparison", "study"):
        raise not_a_report_dir(d, kind)
    pages = []
    if kind == "study":
        pages.append(render_study_report(d.path))
    if kind == "comparison" or d.has_record("compare"):
        pages.append(render_compare_report(d.path))
    elif kind == "run":
        pages.append(render_report(d.path))
    return pages


__all__ = ["render_compare_report", "render_dir", "render_report", "render_study_report"]
