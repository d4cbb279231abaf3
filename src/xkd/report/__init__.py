"""Reports rendered from records only: a run (``report.html``), a comparison and a study."""

from __future__ import annotations

from pathlib import Path

from xkd.report.compare import render_compare_report
from xkd.report.render import render_report
from xkd.report.study import render_study_report
from xkd.rundir import RunDir


def render_dir(path: str | Path) -> list[Path]:
    """Re-render every report of ``path`` from its records: a run's, a comparison's, a study's (a
    study over one comparison has both). Returns the pages written."""
    d = RunDir(path)
    pages = []
    if d.has_record("study"):
        pages.append(render_study_report(d.path))
    if d.has_record("compare"):
        pages.append(render_compare_report(d.path))
    elif not d.has_record("study"):
        pages.append(render_report(d.path))
    return pages


__all__ = ["render_compare_report", "render_dir", "render_report", "render_study_report"]
