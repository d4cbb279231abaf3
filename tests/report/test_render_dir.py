"""``xkd report DIR`` tells a folder's kind before reading records: a sweep or a folder xkd did not
write is one error saying so (not "finish it with `xkd run --resume`"), and an incomplete
comparison is told to finish with `xkd compare --resume`."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from xkd.cli import main
from xkd.errors import ReportError
from xkd.report import render_dir

_spec = importlib.util.spec_from_file_location("make_records", Path(__file__).with_name("make_records.py"))
make_records = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_records)


def test_a_sweep_folder_is_sent_to_xkd_sweep_resume(tmp_path, capsys):
    sweep = tmp_path / "kd-sweep"
    (sweep / "records").mkdir(parents=True)
    (sweep / "trial-0000").mkdir()
    (sweep / "config.yaml").write_text("name: kd\n")
    (sweep / "study.db").write_bytes(b"")
    (sweep / "records/sweep.json").write_text("{}")
    (sweep / "sweep.html").write_text("<html></html>")
    said = (
        f"{sweep} is a sweep folder, which `xkd report` does not render: `xkd sweep --config {sweep / 'config.yaml'} "
        "--resume` (from the folder the sweep ran in) rewrites its sweep.html"
    )
    with pytest.raises(ReportError, match=re.escape(said)):
        render_dir(sweep)
    assert main(["report", str(sweep)]) == 2
    err = capsys.readouterr().err
    assert said in err and "xkd run --resume" not in err


def test_a_folder_xkd_did_not_write_is_said_to_be_none_of_its_and_names_the_runs_inside(tmp_path, capsys):
    folder = tmp_path / "runs"
    folder.mkdir()
    (folder / "notes.txt").write_text("hello")
    (folder / ".cache" / "teachers").mkdir(parents=True)  # the teacher cache is not named
    run = make_records.make_run_dir(folder / "tiny", samples_per_class=1)
    with pytest.raises(ReportError, match=re.escape(f"{folder} is not an xkd output folder")) as err:
        render_dir(folder)
    assert f"pass the folder of a run, comparison or study, e.g. {run}" in str(err.value)
    assert "resume" not in str(err.value)
    with pytest.raises(ReportError, match=re.escape(f"{tmp_path / 'nowhere'} does not exist")):
        render_dir(tmp_path / "nowhere")
    with pytest.raises(ReportError, match=re.escape(f"{folder / 'notes.txt'} is a file; pass the folder")):
        render_dir(folder / "notes.txt")  # was a NotADirectoryError traceback


def test_an_incomplete_comparison_is_finished_by_xkd_compare_and_a_run_without_config_still_renders(tmp_path):
    cmp = tmp_path / "cmp"
    make_records.make_run_dir(cmp / "seeds" / "seed_0", samples_per_class=1)
    (cmp / "config.yaml").write_text("name: cmp\n")
    with pytest.raises(ReportError, match=r"compare\.json is missing: .*xkd compare --resume"):
        render_dir(cmp)
    run = make_records.make_run_dir(tmp_path / "run", samples_per_class=1)
    (run / "config.yaml").unlink()
    assert render_dir(run) == [run / "report.html"]
