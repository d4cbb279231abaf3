"""``xkd study capacity-gap`` end to end on tiny digits: one comparison per teacher, the assistant chain
for the largest, every number traceable to a comparison record, verdicts computed from them."""

from __future__ import annotations

import pytest

from xkd.cli import main
from xkd.config import ConfigError
from xkd.files import read_json
from xkd.plan import load_config
from xkd.studies.capacity_gap import teacher_sizes
from xkd.studies.verdict import HELD, INCONCLUSIVE, NOT_HELD

STUDY = [
    "study.teachers=[{name: cifar_resnet, params: {depth: 8, width: 16}}, "
    "{name: cifar_resnet, params: {depth: 8, width: 4}}, {name: cifar_resnet, params: {depth: 8, width: 8}}]",
    "study.assistant={name: kdfmv_cnn, params: {widths: [8, 8, 8]}}",
    "evaluation.explainers=[{name: grad_cam}]",
    "evaluation.metrics=[rank_correlation, fss, rs]",
]


def test_teachers_are_ordered_by_size_and_need_three(tiny_args):
    cfg = load_config(None, [*tiny_args, *STUDY])
    sizes = [p for p, _ in teacher_sizes(cfg)]
    assert sizes == sorted(sizes) and len(sizes) == 3
    few = load_config(None, [*tiny_args, "study.teachers=[{name: cifar_resnet}]"])
    with pytest.raises(ConfigError, match="at least 3 teachers"):
        teacher_sizes(few)
    twins = load_config(None, [*tiny_args, *STUDY, "study.teachers.1={name: cifar_resnet, params: {depth: 8, width: 8}}",
                               "study.teachers.2={name: cifar_resnet, params: {depth: 8, width: 8}}"])  # fmt: skip
    with pytest.raises(ConfigError, match="teachers of equal size"):
        teacher_sizes(twins)


@pytest.mark.slow
def test_study_runs_one_comparison_per_teacher_and_judges_from_records(tmp_path, study_args):
    assert main(study_args("capacity-gap", "gap", *STUDY)) == 0
    out = tmp_path / "runs" / "gap"
    st = read_json(out / "records/study.json")
    assert st["kind"] == "study" and st["study"] == "capacity-gap" and st["seeds"] == [0, 1]
    params = [t["params"] for t in st["teachers"]]
    assert params == sorted(params)
    for t in st["teachers"]:
        cmp = read_json(out / t["dir"] / "records/compare.json")
        assert t["students"]["direct"]["accuracy"] == cmp["methods"]["direct"]["accuracy"]
        assert t["students"]["direct"]["fss"]["values"] == cmp["methods"]["direct"]["fss"]["values"]
    largest = st["teachers"][-1]
    assert set(largest["students"]) == {"direct", "via_assistant"}
    assert set(st["teachers"][0]["students"]) == {"direct"}
    assert st["assistant"]["model"] == "kdfmv_cnn" and st["assistant"]["params"] > 0
    assert len(st["verdicts"]) == 4
    for v in st["verdicts"]:
        assert v["verdict"] in (HELD, NOT_HELD, INCONCLUSIVE) and v["n_a"] == 2 and v["text"].startswith(v["claim"])
    html = (out / "study.html").read_text()
    assert "Verdicts" in html and "capacity_gap.png" in html and (out / "figures/capacity_gap.png").is_file()
    # resume keeps every finished seed run
    assert main([*study_args("capacity-gap", "gap", *STUDY), "--resume"]) == 0
    cmp = read_json(out / st["teachers"][0]["dir"] / "records/compare.json")
    assert all(r["reused"] for r in cmp["runs"].values())
    assert main(["report", str(out)]) == 0
