"""Validation of closer_to_teacher before any training: the run needs an independent student (the
student's architecture trained without the teacher); on by default only where the run has one."""

from __future__ import annotations

import pytest

from xkd.cli import main
from xkd.config import ConfigError
from xkd.plan import load_config, resolve

NO_SCRATCH = "students=[{name: kd, distiller: hinton_kd}, {name: ls, distiller: label_smoothing}]"
ASKED = "evaluation.metrics=[closer_to_teacher, rank_correlation]"


def test_default_metrics_include_it_only_when_the_run_has_a_scratch_student(tmp_path, make_tiny_args):
    cfg = load_config(None, make_tiny_args(tmp_path))  # default students: scratch, kd, ls
    assert "closer_to_teacher" in cfg.evaluation.metrics
    assert resolve(cfg).independent == {"kd": "scratch", "ls": "scratch"}
    cfg = load_config(None, make_tiny_args(tmp_path, NO_SCRATCH))  # no error: simply not computed
    assert "closer_to_teacher" not in cfg.evaluation.metrics and "rank_correlation" in cfg.evaluation.metrics
    assert resolve(cfg).independent == {}


def test_asking_for_it_without_an_independent_student_is_one_clear_error(tmp_path, make_tiny_args):
    with pytest.raises(ConfigError) as err:
        load_config(None, make_tiny_args(tmp_path, NO_SCRATCH, ASKED))
    msg = str(err.value)
    assert "closer_to_teacher" in msg and "no independent student" in msg
    assert "{name: scratch, distiller: scratch}" in msg and "metric_params.closer_to_teacher.independent" in msg


def test_the_error_comes_before_any_training(tmp_path, make_tiny_args, capsys):
    args = ["run", "--no-progress"]
    for o in make_tiny_args(tmp_path, NO_SCRATCH, ASKED):
        args += ["--set", o]
    assert main(args) == 2
    assert "no independent student" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # nothing written, nothing trained


def test_a_named_independent_student_must_exist_and_learn_without_the_teacher(tmp_path, make_tiny_args):
    def params(name: str) -> str:
        return f"evaluation.metric_params={{closer_to_teacher: {{independent: {name}}}}}"

    with pytest.raises(ConfigError, match="independent: 'kd' is distilled with 'hinton_kd', which learns from the"):
        load_config(None, make_tiny_args(tmp_path, NO_SCRATCH, ASKED, params("kd")))
    with pytest.raises(ConfigError, match="independent: 'nobody' is not a student; students: kd, ls"):
        load_config(None, make_tiny_args(tmp_path, NO_SCRATCH, ASKED, params("nobody")))
    cfg = load_config(None, make_tiny_args(tmp_path, NO_SCRATCH, ASKED, params("ls")))  # teacher-free: allowed
    assert resolve(cfg).independent == {"kd": "ls"}


def test_the_independent_student_needs_a_distilled_student_of_its_architecture(tmp_path, make_tiny_args):
    other = (
        "students=[{name: scratch, distiller: scratch, model: {name: cifar_resnet, params: {depth: 8, width: 4}}}, "
        "{name: kd, distiller: hinton_kd}]"
    )
    with pytest.raises(ConfigError, match="no other student has the architecture of the independent student 'scratch'"):
        load_config(None, make_tiny_args(tmp_path, other, ASKED))
    cfg = load_config(None, make_tiny_args(tmp_path, other))  # by default: left out
    assert "closer_to_teacher" not in cfg.evaluation.metrics


def test_the_distance_is_checked_before_training(tmp_path, make_tiny_args):
    bad = "evaluation.metric_params={closer_to_teacher: {distance: euclidean}}"
    with pytest.raises(
        ConfigError, match="closer_to_teacher.distance: 'euclidean' is not allowed; allowed values: 'cosine', 'rank'"
    ):
        load_config(None, make_tiny_args(tmp_path, bad))
    ok = load_config(None, make_tiny_args(tmp_path, "evaluation.metric_params={closer_to_teacher: {distance: rank}}"))
    assert "closer_to_teacher" in ok.evaluation.metrics
