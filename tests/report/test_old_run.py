"""A run directory written before metrics declared their columns in the records still renders.

``tests/fixtures/run_before_redesign`` is a small run (digits, Grad-CAM, two students) written by
xkd at 0e38f51, whose ``explanations.json`` holds ``metric_info`` with direction, category and
description only. The report takes the columns of such runs from today's declarations.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from xkd.cli import main
from xkd.files import read_json
from xkd.report import render_dir
from xkd.report.tables import fmt

FIXTURE = Path(__file__).parent.parent / "fixtures" / "run_before_redesign"


def _copy(tmp_path: Path) -> Path:
    run_dir = tmp_path / "old_run"
    shutil.copytree(FIXTURE, run_dir)
    return run_dir


def _section(html: str, anchor: str) -> str:
    start = html.index(f'id="{anchor}"')
    end = html.find("<section", start + 1)
    return html[start : end if end > 0 else len(html)]


def test_old_run_renders_with_its_recorded_numbers_under_declared_columns(tmp_path):
    run_dir = _copy(tmp_path)
    expl = read_json(run_dir / "records" / "explanations.json")
    assert "columns" not in expl["metric_info"]["fidelity"]  # the old schema, as written then
    (page,) = render_dir(run_dir)
    section = _section(page.read_text(), "explainer-grad_cam")
    for head in ("Fidelity ↑", "Deletion AUC ↓", "Insertion AUC ↑", "ROAD ↑", "Pearson ↑", "Rank corr. ↑"):
        assert head in section, head
    teacher = expl["per_model"]["teacher"]["grad_cam"]
    kd = expl["agreement"]["kd"]["grad_cam"]
    for value in (
        teacher["fidelity"]["mean"],
        teacher["deletion_auc"],
        teacher["road"]["road"],
        kd["rank_correlation"],
    ):
        assert fmt(value, ".4f") in section, value
    assert "Pointing game" not in section  # digits have no masks: no localisation column


def test_xkd_report_rerenders_an_old_run(tmp_path, capsys):
    run_dir = _copy(tmp_path)
    assert main(["report", str(run_dir)]) == 0
    assert (run_dir / "report.html").is_file()
    assert str(run_dir / "report.html") in capsys.readouterr().out
