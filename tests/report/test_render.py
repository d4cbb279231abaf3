"""The report is rendered from records only: every section, numbers traceable to the records, offline,
deterministic, clear errors for incomplete runs, optional parts omitted."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.image import imread

from xkd.report import figures
from xkd.report.render import ReportError, ReportSchemaError, render_report

_spec = importlib.util.spec_from_file_location("make_records", Path(__file__).with_name("make_records.py"))
make_records = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_records)

SECTIONS = [
    "Run",
    "Summary",
    "Explainers",
    "Feature transfer",
    "Sanity checks",
    "Fidelity per class",
    "Chance level",
    "Localisation per K",
    "Average feature maps",
    "Training",
    "Records",
]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> tuple[Path, str]:
    """One full run rendered once, for the read-only checks."""
    run_dir = make_records.make_run_dir(tmp_path_factory.mktemp("full") / "run")
    return run_dir, render_report(run_dir).read_text()


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """A small fresh run for tests that edit records."""
    return make_records.make_run_dir(tmp_path / "run", samples_per_class=1)


def _edit(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _section(html: str, anchor: str) -> str:
    start = html.index(f'id="{anchor}"')
    end = html.find("<section", start + 1)
    return html[start : end if end > 0 else len(html)]


def test_every_section_model_and_number_is_on_the_page(rendered):
    run_dir, html = rendered
    for heading in SECTIONS:
        assert f">{heading}</h2>" in html, heading
        assert re.search(rf'<a href="#[\w-]+">{heading}</a>', html), f"{heading} missing from the contents"
    for role in make_records.ROLES:
        assert f"<strong>{role}</strong>" in html
    models = json.loads((run_dir / "records/models.json").read_text())["models"]
    for m in models.values():
        assert f"{m['test']['accuracy']:.4f}" in html
        assert f"{m['params']:,}" in html
        assert f"{m['flops'] / 1e6:,.2f}" in html
    assert "6,964,106" in html and "566.89" in html  # thousands separators, FLOPs in M
    assert "Chance level" in html  # random-map baseline
    sanity = _section(html, "sanity")
    assert "weights randomised" in sanity and "labels randomised" in sanity and "rank corr. 0.93" in sanity
    assert "2 files skipped" in html and "raw/bad_0.png" in html
    assert "Every number on this page comes from" in html and "records/models.json" in html


def test_teacher_first_and_best_values_highlighted(rendered):
    _, html = rendered
    summary = _section(html, "summary")
    assert (
        summary.index("<strong>teacher</strong>")
        < summary.index("<strong>scratch</strong>")
        < summary.index("<strong>kd</strong>")
    )
    # teacher has the best test accuracy (0.9312) and is highlighted; the worst (kd, 0.8890) is not
    assert re.search(r'class="num best"[^>]*>\s*0\.9312', summary)
    assert not re.search(r'class="num best"[^>]*>\s*0\.8890', summary)
    # lower is better for the loss and parameters
    assert re.search(r'class="num best"[^>]*>\s*0\.2345', summary)
    assert re.search(r'class="num best"[^>]*>\s*1,232,567', summary)


def test_page_is_offline_and_every_image_exists(rendered):
    run_dir, html = rendered
    assert "http://" not in html and "https://" not in html
    assert "<script" not in html and "<link" not in html
    srcs = re.findall(r'<img src="([^"]+)"', html)
    assert len(srcs) >= 3 + 2 + 2  # a card per class, feature strips, curves + confusion matrices
    for src in srcs:
        assert src.startswith("figures/") and (run_dir / src).is_file(), src
        assert imread(run_dir / src).shape[2] in (3, 4)


def test_numbers_come_from_the_records(run_dir):
    _edit(run_dir / "records/models.json", lambda d: d["models"]["kd"]["test"].update(accuracy=0.123456))
    _edit(
        run_dir / "records/explanations.json",
        lambda d: d["per_model"]["scratch"]["grad_cam"]["fidelity"]["per_class"]["square"].update(fidelity=0.43209),
    )
    html = render_report(run_dir).read_text()
    assert "0.1235" in _section(html, "summary")
    assert "0.4321" in _section(html, "fidelity")
    assert "0.8890" not in html  # the old kd accuracy is gone


def test_rendering_twice_gives_the_same_html_and_figures(run_dir):
    a = render_report(run_dir).read_text()
    pngs = {p.name: p.read_bytes() for p in (run_dir / "figures").glob("*.png")}
    b = render_report(run_dir).read_text()
    assert a == b
    assert pngs == {p.name: p.read_bytes() for p in (run_dir / "figures").glob("*.png")}


def test_without_masks_there_is_no_localisation_section(tmp_path):
    run_dir = make_records.make_run_dir(tmp_path / "nomask", has_masks=False, samples_per_class=1, skipped_files=())
    html = render_report(run_dir).read_text()
    assert ">Localisation per K</h2>" not in html and 'href="#localisation"' not in html
    assert "Pointing game" not in html and "outlines mark the ground-truth masks" not in html
    assert ">Summary</h2>" in html and ">Explainers</h2>" in html
    assert "files skipped" not in html


@pytest.mark.parametrize(
    "name", ["models.json", "run.json", "explanations.json", "samples.json", "samples.safetensors"]
)
def test_missing_record_is_a_clear_error(run_dir, name):
    (run_dir / "records" / name).unlink()
    with pytest.raises(ReportError, match=rf"{re.escape(name)} is missing.*xkd run --resume") as err:
        render_report(run_dir)
    assert isinstance(err.value, FileNotFoundError)


def test_missing_run_dir_and_wrong_schema(tmp_path, run_dir):
    with pytest.raises(ReportError, match="does not exist"):
        render_report(tmp_path / "nowhere")
    _edit(run_dir / "records/run.json", lambda d: d.update(schema_version=99))
    with pytest.raises(ReportSchemaError, match="schema_version 99"):
        render_report(run_dir)


def test_missing_explainer_and_null_values_are_dashes(run_dir):
    def change(d):
        del d["per_model"]["kd"]["feature_maps"]
        d["per_model"]["teacher"]["grad_cam"]["deletion_auc"] = None

    _edit(run_dir / "records/explanations.json", change)
    _edit(run_dir / "records/models.json", lambda d: d["models"]["teacher"]["test"].update(loss=None))
    shutil.rmtree(run_dir / "figures", ignore_errors=True)
    html = render_report(run_dir).read_text()
    section = _section(html, "explainer-grad_cam")
    assert "–" in section and "<strong>kd</strong>" in section
    fm = _section(html, "explainer-feature_maps")
    assert "<strong>kd</strong>" not in fm.split("</table>")[0]  # kd has no feature-map scores: no row
    assert "0.2345" not in _section(html, "summary")


def test_many_layers_are_subsampled_and_said_so(tmp_path):
    run_dir = make_records.make_run_dir(tmp_path / "deep", teacher_layers=40, samples_per_class=1, classes=("a", "b"))
    html = render_report(run_dir).read_text()
    assert "teacher: 12 of 40 layers shown, evenly spaced" in html
    assert "features.denseblock" in html  # full paths listed under the strips


def test_save_overlay_figure_rgb_gray_and_numpy(tmp_path):
    images = torch.rand(3, 3, 32, 32)
    rows = {"teacher": torch.rand(3, 32, 32), "kd": torch.zeros(3, 32, 32)}
    p = figures.save_overlay_figure(
        tmp_path / "a.png", images, rows, ["x", "y", "z"], masks=torch.rand(3, 32, 32) > 0.7
    )
    h, w = imread(p).shape[:2]
    assert w > h * 0.5 and h > 200  # three columns, three rows
    q = figures.save_overlay_figure(tmp_path / "sub/b.png", np.random.rand(2, 8, 8), {"s": np.random.rand(2, 8, 8)})
    assert q.is_file() and imread(q).shape[1] < w


def test_helpers():
    assert figures.evenly_spaced(5, 12) == [0, 1, 2, 3, 4]
    idx = figures.evenly_spaced(120, 12)
    assert len(idx) == 12 and idx[0] == 0 and idx[-1] == 119
    assert figures.abbreviate("features.denseblock2.denselayer3.conv1") == "db2.dl3.conv1"
    assert len(figures.abbreviate("a" * 50)) == 16
    m = figures.normalise_map(torch.tensor([[1.0, 3.0], [float("nan"), 2.0]]))
    assert m.min() == 0 and m.max() == 1
    assert not figures.normalise_map(torch.ones(4, 4)).any()


def test_training_table_shows_total_time_its_parts_and_loaded_teacher(run_dir):
    def change(d):
        d["models"]["kd"]["train"].update(seconds=17.5, loop_seconds=4.0, setup_seconds=13.5, assistant_seconds=None)
        d["models"]["teacher"]["train"].update(seconds=14.4, loop_seconds=14.4, loaded_from="cache/teachers/ab/best.pt")

    _edit(run_dir / "records/models.json", change)
    # the run record's per-model times are the totals (loop + setup + assistant), as the pipeline writes them
    _edit(run_dir / "records/run.json", lambda d: d["timing"]["per_model_train_seconds"].update(kd=17.5, teacher=14.4))
    training = _section(render_report(run_dir).read_text(), "training")
    assert "17.5 s" in training and 'title="epoch loop 4.0 s + setup 13.5 s"' in training
    assert "14.4 s" in training and "loaded" in training and "from cache/teachers/ab/best.pt" in training
    # records written before these keys existed still render (no parts on hover, the old "seconds")
    _edit(
        run_dir / "records/models.json",
        lambda d: [d["models"]["kd"]["train"].pop(k) for k in ("loop_seconds", "setup_seconds")],
    )
    assert "17.5 s" in _section(render_report(run_dir).read_text(), "training")


def test_training_table_names_the_device_precision_and_a_fused_optimiser(run_dir):
    def change(d):
        d["models"]["kd"]["train"].update(device="cuda:0 (NVIDIA H200)", precision="bf16", optimizer="adam (fused)")
        d["models"]["scratch"]["train"].update(device="cuda:0 (NVIDIA H200)", precision="bf16", optimizer="adam")

    _edit(run_dir / "records/models.json", change)
    training = _section(render_report(run_dir).read_text(), "training")
    assert "cuda:0 (NVIDIA H200), bf16, fused optimiser" in training
    assert training.count("fused optimiser") == 1  # torch's default optimiser is not named


def test_the_transfer_table_names_each_statistic_once(rendered):
    # "RS fss" repeated FSS, "RS n" showed the image count as 64.0000 and every RS part was titled
    # "relevance to the class target"; the prose called the authors' biased FSS bias-corrected
    run_dir, html = rendered
    section = _section(html, "transfer")
    heads = re.findall(r'<th class="num"[^>]*>([^<]+)</th>', section)
    assert heads == ["FSS ↑", "FSS (R*) ↑", "RS ↑", "R* student–target", "R* teacher–target", "RS teacher | student",
                     "pdCor"]  # fmt: skip
    assert "over 64 explained images; class target: onehot" in section
    transfer = json.loads((run_dir / "records/explanations.json").read_text())["transfer"]
    for entry in transfer.values():
        assert f"{entry['rs']['rs']:.4f}" in section
    assert "64.0000" not in section and "bias-corrected distance correlation between" not in section
