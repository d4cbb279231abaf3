"""The report is rendered from records only: sections, numbers traceable, offline, deterministic."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

from xkd.report.render import ReportError, render_report

_spec = importlib.util.spec_from_file_location("make_records", Path(__file__).with_name("make_records.py"))
make_records = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_records)


@pytest.fixture
def run_dir(tmp_path):
    return make_records.make_run_dir(tmp_path / "run")


def test_every_section_and_model_is_on_the_page(run_dir):
    html = render_report(run_dir).read_text()
    for heading in [
        "Summary",
        "Fidelity per class",
        "Faithfulness",
        "Localisation",
        "Sample explanations",
        "Average feature maps",
        "Training",
        "Records",
    ]:
        assert f">{heading}</h2>" in html, heading
    for role in make_records.ROLES:
        assert role in html
    assert "2 unreadable file(s) were skipped" in html


def test_numbers_come_from_the_records(run_dir):
    render_report(run_dir)
    path = run_dir / "records" / "models.json"
    models = json.loads(path.read_text())
    models["models"]["kd"]["test"]["accuracy"] = 0.123456
    path.write_text(json.dumps(models))
    html = render_report(run_dir).read_text()
    assert "0.1235" in html


def test_page_is_offline_and_every_image_exists(run_dir):
    html = render_report(run_dir).read_text()
    assert "http://" not in html and "https://" not in html
    srcs = re.findall(r'<img src="([^"]+)"', html)
    assert srcs and all((run_dir / s).is_file() for s in srcs)


def test_rendering_twice_gives_the_same_html(run_dir):
    a = render_report(run_dir).read_text()
    b = render_report(run_dir).read_text()
    assert a == b


def test_without_masks_there_is_no_localisation_section(tmp_path):
    run_dir = make_records.make_run_dir(tmp_path / "nomask", has_masks=False)
    html = render_report(run_dir).read_text()
    assert ">Localisation</h2>" not in html and ">Summary</h2>" in html


def test_missing_record_is_a_clear_error(run_dir):
    (run_dir / "records" / "models.json").unlink()
    with pytest.raises(ReportError, match=r"models.json is missing.*xkd run --resume"):
        render_report(run_dir)
