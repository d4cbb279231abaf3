"""``xkd study kd-vs-ls`` end to end on tiny concept images: dissection, region precision/recall and
DiffROAR per student and seed, aggregated with the comparison, verdicts computed from the numbers."""

from __future__ import annotations

import pytest
import torch

import xkd.studies.kd_vs_ls as K
from xkd.cli import main
from xkd.config import ConfigError
from xkd.files import read_json
from xkd.metrics.dissection import DissectionError
from xkd.models.hooks import LayerNotFoundError
from xkd.plan import load_config
from xkd.studies.kd_vs_ls import roles_by_distiller, run_study
from xkd.studies.verdict import HELD, INCONCLUSIVE, NOT_HELD

TINY_STUDY = [
    "data.name=concepts",
    "data.params={num_per_class: 24, size: 24}",
    "data.image_size=null",
    "data.train_size=null",
    "data.val_size=null",
    "data.test_size=null",
    "students=[{name: scratch, distiller: scratch}, {name: ls, distiller: label_smoothing}, "
    "{name: kd, distiller: hinton_kd}]",
    "evaluation.explainers=[{name: grad_cam}]",
    "evaluation.metrics=[rank_correlation]",
    "study.diffroar={fractions: [0.3], epochs: 1, batch_size: 32}",
]


def test_the_three_methods_are_required(tiny_args):
    cfg = load_config(None, [*tiny_args, "students=[{name: kd, distiller: hinton_kd}]"])
    with pytest.raises(ConfigError, match="add students with distiller 'scratch', 'label_smoothing'"):
        roles_by_distiller(cfg)


@pytest.mark.parametrize(
    ("override", "error", "match"),
    [
        ("study.layer=features.99", LayerNotFoundError, "features.99"),
        ("study.teacher_layer=nope", LayerNotFoundError, "module paths"),
        ("study.concepts={name: digits}", DissectionError, "concepts"),
        ("students.1.model={name: cifar_resnet}", ConfigError, "one student architecture"),
    ],
)
def test_bad_study_input_fails_before_any_training(tmp_path, make_tiny_args, override, error, match):
    cfg = load_config(None, [*make_tiny_args(tmp_path, *TINY_STUDY, "name=bad"), override])
    with pytest.raises(error, match=match):
        run_study(cfg, 1, progress=False)
    assert not (tmp_path / "runs" / "bad").exists() and not (tmp_path / "runs" / ".cache").exists()


def test_study_data_without_masks_fails_before_any_training(tmp_path, make_tiny_args):
    cfg = load_config(None, [*make_tiny_args(tmp_path, "name=bad"), *TINY_STUDY[-4:], "data.name=digits"])
    with pytest.raises(ConfigError, match="has no masks"):
        run_study(cfg, 1, progress=False)
    assert not (tmp_path / "runs" / "bad").exists()


@pytest.mark.slow
def test_study_measures_every_student_and_seed(tmp_path, make_tiny_args, monkeypatch):
    asked, loaded_on = [], []  # the study measures on the config's device (it was pinned to the CPU)
    monkeypatch.setattr(K, "resolve_device", lambda name: asked.append(name) or torch.device("cpu"))
    load = K.load_run_models
    monkeypatch.setattr(K, "load_run_models", lambda d, device: loaded_on.append(device) or load(d, device))
    config = tmp_path / "c.yaml"
    config.write_text("name: kdls\n")
    args = ["study", "kd-vs-ls", "--config", str(config), "--seeds", "2", "--no-progress"]
    for o in make_tiny_args(tmp_path, *TINY_STUDY, "name=kdls"):
        args += ["--set", o]
    assert main(args) == 0
    assert asked == ["auto"] and loaded_on == [torch.device("cpu")] * 2
    out = tmp_path / "runs" / "kdls"
    st = read_json(out / "records/study.json")
    assert st["study"] == "kd-vs-ls" and st["seeds"] == [0, 1]
    assert st["categories"] == ["colour", "object", "part", "texture"]
    assert st["claim_roles"] == {"scratch": "scratch", "label_smoothing": "ls", "hinton_kd": "kd"}
    cmp = read_json(out / "records/compare.json")
    for role in ("scratch", "ls", "kd"):
        m = st["methods"][role]
        assert m["accuracy"] == cmp["methods"][role]["accuracy"]
        per_seed = st["per_seed"][role]
        assert [e["seed"] for e in per_seed] == [0, 1]
        for cat in st["categories"]:
            assert m["detectors"][cat]["values"] == [e["dissection"]["per_category"][cat] for e in per_seed]
        assert m["precision"]["values"] == [e["precision"] for e in per_seed]
        d = per_seed[0]["diffroar"]
        assert d["diffroar"][0] == pytest.approx(d["keep_top"][0] - d["keep_bottom"][0])
        assert (out / f"figures/top_units_{role}.png").is_file()
    teacher = st["per_seed"]["teacher"]
    assert len(teacher) == 1 and "diffroar" not in teacher[0]  # one teacher for every seed: measured once
    assert st["methods"]["teacher"]["detectors_total"]["n"] == 1
    assert st["methods"]["teacher"]["detectors_total"]["std"] is None
    assert len(st["verdicts"]) == 4
    for v in st["verdicts"]:
        assert v["verdict"] in (HELD, NOT_HELD, INCONCLUSIVE)
    html = (out / "study.html").read_text()
    assert "Verdicts" in html and "detectors_per_category.png" in html
    assert all(f"top_units_{r}.png" in html for r in ("teacher", "scratch", "ls", "kd"))
    # a second run reuses the seed runs and every measurement (dissection, maps and DiffROAR were all
    # measured again: ~5 s here, minutes at full size)
    detectors = K.concept_detectors
    monkeypatch.setattr(K, "concept_detectors", lambda *a, **k: pytest.fail("measured again"))
    assert main([*args, "--resume"]) == 0
    again = read_json(out / "records/study.json")
    assert again["per_seed"] == st["per_seed"] and again["methods"] == st["methods"]
    # another measurement setting measures again (every model of every seed: 3 students x 2 + the teacher)
    calls = []
    monkeypatch.setattr(K, "concept_detectors", lambda *a, **k: calls.append(1) or detectors(*a, **k))
    assert main([*args, "--resume", "--set", "study.region_fraction=0.2"]) == 0
    assert len(calls) == 7
