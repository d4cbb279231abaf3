"""The report's closer-to-teacher part (Ojha et al. 2023): a column per explainer, the binomial p-value
under each share, and a plain sentence per student, all from the records."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from xkd.metrics.base import metric_info
from xkd.report.render import render_report
from xkd.report.tables import fmt_p, fmt_share

_spec = importlib.util.spec_from_file_location("make_records", Path(__file__).with_name("make_records.py"))
make_records = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_records)


def _section(html: str, anchor: str) -> str:
    start = html.index(f'id="{anchor}"')
    end = html.find("<section", start + 1)
    return html[start : end if end > 0 else len(html)]


def entry(share: float, p: float, n: int = 200) -> dict:
    closer = round(share * n)
    return {"share": share, "images": n, "closer": closer, "ties": 0, "farther": n - closer, "undefined": 0,
            "p_value": p, "distance": "cosine", "independent": "scratch"}  # fmt: skip


@pytest.fixture
def run_dir(tmp_path) -> Path:
    run_dir = make_records.make_run_dir(tmp_path / "run", samples_per_class=1)
    path = run_dir / "records/explanations.json"
    data = json.loads(path.read_text())
    names = ["rank_correlation", "closer_to_teacher"]
    data["metrics"], data["metric_info"] = names, metric_info(names)
    data["agreement"]["kd"]["grad_cam"]["closer_to_teacher"] = entry(0.71, 0.0031)
    data["agreement"]["kd"]["feature_maps"]["closer_to_teacher"] = entry(0.48, 0.62)
    path.write_text(json.dumps(data))
    return run_dir


def test_a_column_per_explainer_and_a_sentence_per_student(run_dir):
    html = render_report(run_dir).read_text()
    assert '<a href="#tests">Closer to teacher</a>' in html
    part = _section(html, "tests")
    assert "Grad-CAM" in part and "Feature maps" in part  # a column per explainer
    assert "71%" in part and "p = 0.0031" in part and "48%" in part and "p = 0.62" in part
    assert "142 closer, 0 tied, 58 farther of 200 images; independent student: scratch; cosine" in part
    assert (
        "<strong>kd</strong>: the teacher&#39;s Grad-CAM is closer to this student&#39;s than to an independent "
        "student&#39;s (scratch) on 71% of 200 images (p = 0.0031)." in part
    )
    assert "<strong>scratch</strong>" not in part  # the independent student has no score against itself
    # the explainer's own part shows the share among the agreement columns
    assert "Closer to teacher ↑" in _section(html, "explainer-grad_cam") and "0.7100" in html


def test_a_run_without_the_metric_has_no_such_part(tmp_path):
    html = render_report(make_records.make_run_dir(tmp_path / "run", samples_per_class=1)).read_text()
    assert 'id="tests"' not in html and "Closer to teacher" not in html


def test_formatting_helpers():
    assert fmt_share(0.714) == "71%" and fmt_share(None) == "–"
    assert fmt_p(0.0031) == "p = 0.0031" and fmt_p(1.0) == "p = 1" and fmt_p(2.345e-5) == "p = 2.3e-05"
