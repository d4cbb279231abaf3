"""``xkd sweep``: the sweep section checked before training, the study's bookkeeping (dead workers,
budget), then tiny sweeps end to end: one process, two objectives, two worker processes on one
SQLite study (one killed), Ctrl-C and resume, and two workers on a PostgreSQL study when a server
can be started here."""

from __future__ import annotations

import importlib
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from xkd.cli import main
from xkd.config_files import read_config
from xkd.errors import ConfigError
from xkd.files import hide_password, read_json, record, write_json
from xkd.plan import load_config
from xkd.sweeps.outputs import SweepDir, best_config, write_outputs
from xkd.sweeps.plan import Objective, UndefinedObjectiveError, parse_param, resolve_sweep, with_values, yaml_scalar
from xkd.sweeps.study import ReportValAccuracy, TrialRunner, sweep
from xkd.sweeps.workers import reap, reap_lock
from xkd.tracking import mlflow_uri

sweep_module = importlib.import_module("xkd.sweeps.study")

# A tiny run that learns something in two epochs (so the scores differ between trials) and scores
# one explainer with one agreement metric: a trial takes seconds.
TINY = {
    "name": "tiny",
    "data": {"name": "digits", "image_size": 16, "train_size": 240, "val_size": 80, "test_size": 60},
    "teacher": {
        "model": {"name": "cifar_resnet", "params": {"depth": 8, "width": 8}},
        "train": {"epochs": 2, "batch_size": 32},
    },
    "student_model": {"name": "kdfmv_cnn", "params": {"widths": [8, 16, 16]}},
    "students": [{"name": "kd", "distiller": "hinton_kd", "params": {"alpha": 0.5}}],
    "train": {"epochs": 2, "batch_size": 32, "optimizer": {"lr": 0.01}},
    "evaluation": {
        "explainers": [{"name": "grad_cam"}],
        "metrics": ["rank_correlation"],
        "num_images": 24,
        "met_images": 4,
        "samples_per_class": 1,
        "sanity_images": 0,
        "batch_size": 32,
    },
    "sweep": {
        "params": {
            "students.0.params.alpha": {"uniform": [0.1, 0.9]},
            "students.0.params.temperature": {"log_uniform": [1, 20]},
        },
        "trials": 3,
    },
}


def write_config(folder: Path, cache: Path | None = None, **sweep) -> Path:
    """The tiny sweep config under ``folder`` (runs in ``folder/runs``, teacher cache ``cache``)."""
    raw = yaml.safe_load(yaml.safe_dump(TINY))
    raw["output_dir"] = str(folder / "runs")
    if cache is not None:
        raw["cache_dir"] = str(cache)
    raw["sweep"].update(sweep)
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def tiny(*overrides: str):
    """The tiny sweep config, loaded and validated, with ``--set`` overrides."""
    return load_config(None, [*(f"{k}={yaml_scalar(v)}" for k, v in TINY.items()), *overrides])


def sweep_cli(config: Path, *args: str) -> int:
    return main(["sweep", "--config", str(config), "--no-progress", *args])


def study_of(folder: Path, name: str = "tiny") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=SweepDir(folder).default_storage())


# -- the sweep section, checked before anything trains ----------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"uniform": [0.5, 0.5]}, "the range [0.5, 0.5] is empty"),
        ({"uniform": [0.9, 0.1]}, "the range [0.9, 0.1] is inverted"),
        ({"log_uniform": [0, 20]}, "log_uniform needs bounds > 0"),
        ({"log_uniform": [-1e-3, 1e-2]}, "log_uniform needs bounds > 0"),
        ({"int": [1.5, 4]}, "int needs two integers"),
        ({"uniform": [0.1]}, "uniform needs [low, high]"),
        ({"categorical": [0.1]}, "at least two choices"),
        ({"categorical": [1, 1]}, "choices repeat"),
        ({"categorical": ["1e-3", 0.001]}, "choices repeat"),  # YAML reads 1e-3 as a string: it is the number
        ({"normal": [0, 1]}, "give exactly one of uniform, log_uniform, int, categorical"),
        ({"uniform": [0, 1], "log_uniform": [1, 2]}, "give exactly one of"),
        ({"int": [1, 4], "step": 5}, "step 5 is larger than the range"),
        (0.5, "expected a distribution"),
    ],
)
def test_bad_distributions_are_one_clear_error(spec, message):
    with pytest.raises(ConfigError, match="sweep.params.x.y: ") as e:
        parse_param("x.y", spec)
    assert message in str(e.value)


def test_categorical_numbers_in_exponent_notation_are_numbers():
    lr = parse_param("train.optimizer.lr", {"categorical": yaml.safe_load("[1e-3, 1.0e-2, 5E-4]")})
    assert lr.choices == (0.001, 0.01, 0.0005)
    names = parse_param("students.0.distiller", {"categorical": ["hinton_kd", "1e3x", "0.5"]})
    assert names.choices == ("hinton_kd", "1e3x", "0.5")


def test_distributions_are_asked_of_optuna_by_config_path():
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    params = [
        parse_param("train.optimizer.lr", {"log_uniform": [1e-4, 1e-2]}),
        parse_param("train.epochs", {"int": [1, 7], "step": 2}),
        parse_param("students.0.distiller", {"categorical": ["hinton_kd", "dkd"]}),
    ]
    for _ in range(5):
        trial = study.ask()
        values = {p.path: p.suggest(trial) for p in params}
        assert 1e-4 <= values["train.optimizer.lr"] <= 1e-2
        assert values["train.epochs"] in (1, 3, 5, 7)
        assert values["students.0.distiller"] in ("hinton_kd", "dkd")
        assert trial.params == values


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("train.optimizer.lrr", "train.optimizer has no key 'lrr'; its keys: name, lr, weight_decay, momentum"),
        ("students.3.params.alpha", "students has 1 item(s); '3' is not an index 0..0"),
        ("students.kd.params.alpha", "'kd' is not an index"),
        ("students.0.params.alphaa", "distiller 'hinton_kd' of student 'kd' has no parameter 'alphaa'"),
        ("train.epochs.x", "train.epochs is a value (2), not a section"),
        ("name", "'name' is set by the sweep"),
        ("sweep.trials", "'sweep' is set by the sweep"),
        ("students.0.name", "a student's name keys its records and the objectives"),
    ],
)
def test_a_path_naming_no_config_key_is_one_clear_error(path, message):
    cfg = tiny(f"sweep.params={{{path}: {{uniform: [0.1, 0.9]}}}}")
    with pytest.raises(ConfigError, match=f"sweep.params.{path}: ") as e:
        resolve_sweep(cfg)
    assert message in str(e.value)


def test_a_distiller_parameter_left_at_its_default_can_be_searched():
    # the config gives alpha only; temperature is hinton_kd's Params default
    plan = resolve_sweep(tiny())
    assert [p.path for p in plan.params] == ["students.0.params.alpha", "students.0.params.temperature"]


def test_every_edge_of_a_range_must_make_a_valid_config():
    cfg = tiny("sweep.params={students.0.params.alpha: {uniform: [0.1, 1.5]}}")
    with pytest.raises(ConfigError, match=r"sweep.params.students.0.params.alpha: the value 1.5 .* alpha"):
        resolve_sweep(cfg)


def test_nothing_to_search_is_an_error():
    with pytest.raises(ConfigError, match="sweep.params: nothing to search"):
        resolve_sweep(tiny("sweep.params={}"))


def test_default_objective_sampler_and_pruner():
    plan = resolve_sweep(tiny())
    (o,) = plan.objectives
    assert (o.name, o.direction, o.scope) == ("kd.val_accuracy", "maximize", "val_accuracy")
    assert (plan.sampler, plan.pruner, plan.watched_student, plan.seed) == ("tpe", "median", "kd", 0)
    two = resolve_sweep(tiny("sweep.objectives=[{metric: val_accuracy}, {metric: rank_correlation}, {metric: params}]"))
    assert [o.name for o in two.objectives] == ["kd.val_accuracy", "kd.grad_cam.rank_correlation", "kd.params"]
    assert two.directions == ["maximize", "maximize", "minimize"]  # params: declared lower is better
    assert (two.sampler, two.pruner, two.watched_student) == ("nsga2", "none", None)


@pytest.mark.parametrize(
    ("objectives", "extra", "message"),
    [
        ("[{metric: sharpness}]", (), "no run of this config records 'sharpness'; recorded: val_accuracy, accuracy"),
        ("[{metric: fidelity}]", (), "'fidelity' (fidelity) is not computed by this config: add 'fidelity'"),
        ("[{metric: confusion_matrix}]", (), "'confusion_matrix' is not recorded as one number per model"),
        ("[{metric: accuracy, student: teacher}]", (), "'teacher' is not a student (the teacher is trained once"),
        ("[{metric: accuracy, student: ls}]", (), "'ls' is not a student; students: kd"),
        ("[{metric: accuracy, explainer: grad_cam}]", (), "'accuracy' is one number per model; it takes no explainer"),
        ("[{metric: rank_correlation, explainer: lime}]", (), "'lime' is not among evaluation.explainers (grad_cam)"),
        (
            "[{metric: rank_correlation}]",
            ("evaluation.explainers=[{name: grad_cam}, {name: feature_maps}]",),
            "'rank_correlation' is recorded per explainer; name one of grad_cam, feature_maps",
        ),
        (
            "[{metric: val_accuracy}]",
            (
                "students=[{name: a, distiller: hinton_kd}, {name: b, distiller: scratch}]",
                "sweep.params={train.optimizer.lr: {log_uniform: [1e-3, 1e-1]}}",
            ),
            "which student's val_accuracy? the searched settings name no single student; students: a, b",
        ),  # fmt: skip
        ("[{metric: val_accuracy}, {metric: val_accuracy}]", (), "['kd.val_accuracy'] listed twice"),
        ("[{metric: val_accuracy}, {metric: accuracy}]", ("sweep.pruner=median",), "Optuna prunes single-objective"),
        ("[{metric: loss}]", ("sweep.pruner=median",), "kd.loss is minimised"),
    ],
)
def test_an_objective_no_run_records_is_one_clear_error(objectives, extra, message):
    cfg = tiny(f"sweep.objectives={objectives}", *extra)
    with pytest.raises(ConfigError) as e:
        resolve_sweep(cfg)
    assert message in str(e.value)


def test_values_are_set_as_set_sets_them():
    for v in (1e-05, 0.1, 3, True, "hinton_kd", 2.5e20, None):
        assert yaml.safe_load(yaml_scalar(v)) == v and type(yaml.safe_load(yaml_scalar(v))) is type(v)
    raw = with_values(tiny(), {"students.0.params.temperature": 1e-05, "train.optimizer.lr": 0.0123})
    assert raw["students"][0]["params"] == {"alpha": 0.5, "temperature": 1e-05}
    assert raw["train"]["optimizer"]["lr"] == 0.0123


def test_a_list_a_distiller_leaves_at_its_default_is_set_item_by_item():
    cfg = tiny(
        "students=[{name: m, distiller: medex}]",
        "sweep.params={students.0.params.explainer_widths.1: {int: [4, 12]}}",
        "sweep.objectives=[{metric: accuracy}]",
    )
    plan = resolve_sweep(cfg)  # the edges 4 and 12 validate as lists, not as {'1': 4}
    assert [p.path for p in plan.params] == ["students.0.params.explainer_widths.1"]
    raw = with_values(cfg, {"students.0.params.explainer_widths.1": 12})
    assert raw["students"][0]["params"]["explainer_widths"] == [4, 12, 16]  # medex's default [4, 8, 16]
    assert cfg.students[0].params == {}  # the caller's config is left alone


@pytest.mark.parametrize("kind", ["uniform", "log_uniform"])
def test_a_float_range_on_an_integer_setting_is_one_clear_error(kind):
    cfg = tiny(f"sweep.params={{train.batch_size: {{{kind}: [16, 64]}}}}")
    with pytest.raises(ConfigError, match=r"sweep.params.train.batch_size: the value 16.0 of its range") as e:
        resolve_sweep(cfg)
    assert "the setting is an integer: search it with int: [16, 64]" in str(e.value)
    resolve_sweep(tiny("sweep.params={train.batch_size: {int: [16, 64]}}"))


def test_trials_log_to_the_mlflow_store_best_yaml_logs_to(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = tiny(f"output_dir={tmp_path}/runs", "tracking.backend=mlflow")
    plan = resolve_sweep(cfg)
    runner = TrialRunner(None, plan, SweepDir.of(cfg), tmp_path / "lock", progress=False, console=None)
    trial = runner.trial_config(0, {"students.0.params.alpha": 0.3})
    assert trial.output_dir == str(tmp_path / "runs/tiny-sweep")  # the trials' run folders are in the sweep's
    assert trial.tracking.run_name == "tiny-sweep/trial-0000"  # MLflow tells two sweeps' trials apart
    assert best_config(cfg, {}).get("tracking", {}).get("run_name") is None  # best.yaml is a plain run
    best = load_config(None, [f"{k}={yaml_scalar(v)}" for k, v in best_config(cfg, {}).items()])
    assert trial.tracking.uri == mlflow_uri(best)[0] == f"sqlite:///{(tmp_path / 'runs/mlruns/mlflow.db').resolve()}"
    assert mlflow_uri(trial)[1] == (tmp_path / "runs/mlruns").resolve()  # its artifacts go beside that store
    cfg = tiny(f"output_dir={tmp_path}/runs", "tracking.backend=mlflow", "tracking.uri=http://mlflow.lan:5000")
    runner.plan = resolve_sweep(cfg)
    assert runner.trial_config(1, {}).tracking.uri == "http://mlflow.lan:5000"
    assert mlflow_uri(runner.trial_config(1, {}))[1] is None  # a server keeps its own artifacts
    # a URI from the environment (with its password) reaches the trials through the environment, never
    # through their config.yaml
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "postgresql://xkd:s3cret@db.lan/mlflow")
    runner.plan = resolve_sweep(tiny(f"output_dir={tmp_path}/runs", "tracking.backend=mlflow"))
    trial = runner.trial_config(2, {})
    assert trial.tracking.uri is None and mlflow_uri(trial)[:2] == ("postgresql://xkd:s3cret@db.lan/mlflow", None)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///:memory:")
    assert mlflow_uri(trial)[1] is None  # an in-memory store has no folder


def write_records(folder: Path, models: dict, explanations: dict) -> Path:
    (folder / "records").mkdir(parents=True)
    write_json(folder / "records/models.json", record("models", {"models": models}))
    write_json(folder / "records/explanations.json", record("explanations", explanations))
    return folder


def test_an_objective_recorded_as_null_fails_the_trial_and_one_never_recorded_stops_the_sweep(tmp_path):
    plan = resolve_sweep(
        tiny("sweep.objectives=[{metric: rank_correlation}, {metric: accuracy}, {metric: val_accuracy}]")
    )
    rank, acc, val = plan.objectives
    kd = {"test": {"accuracy": 0.25}, "train": {"history": [{"val_accuracy": 0.5}, {"val_accuracy": 0.75}]}}
    ok = write_records(tmp_path / "ok", {"kd": kd}, {"agreement": {"kd": {"grad_cam": {"rank_correlation": 0.5}}}})
    assert (rank.read(ok), acc.read(ok), val.read(ok)) == (0.5, 0.25, 0.75)
    # a collapsed student: its maps are constant, the rank correlation undefined (NaN is written as null)
    kd_nan = {"test": {"accuracy": None}, "train": {"history": [{"val_accuracy": None}]}}
    nan = write_records(
        tmp_path / "nan", {"kd": kd_nan}, {"agreement": {"kd": {"grad_cam": {"rank_correlation": None}}}}
    )
    for o in (rank, acc, val):
        with pytest.raises(
            UndefinedObjectiveError, match=f"sweep objective {o.name}: .* recorded None .* marked failed"
        ):
            o.read(nan)
    # no record of it at all: every trial would fail the same way
    gone = write_records(tmp_path / "gone", {"kd": {"train": {"history": []}}}, {"agreement": {"kd": {}}})
    for o in (rank, acc, val):
        with pytest.raises(ConfigError, match=f"sweep objective {o.name}: .* has no record of it"):
            o.read(gone)


def test_bad_input_stops_the_cli_before_anything_is_written(tmp_path, capsys):
    config = write_config(tmp_path, params={"students.0.params.alpha": {"uniform": [0.9, 0.1]}})
    assert sweep_cli(config) == 2
    assert "sweep.params.students.0.params.alpha: the range [0.9, 0.1] is inverted" in capsys.readouterr().err
    config = write_config(tmp_path)
    assert sweep_cli(config, "--trials", "0") == 2
    assert "trials (--trials) must be >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"timeout \(--timeout\) must be > 0 seconds"):
        sweep(load_config(config), timeout=0)  # from Python, named as both
    assert sweep_cli(config, "--storage", "nosuchdb://x") == 2
    assert "cannot open the study's database" in capsys.readouterr().err
    assert not (tmp_path / "runs" / ".cache").exists()  # no teacher trained
    assert not list((tmp_path / "runs").glob("tiny-sweep/trial-*"))


@pytest.mark.parametrize(
    "entries, match",
    [
        (["file.txt"], r"is not empty and is not an xkd sweep \(it has no config.yaml"),
        (["config.yaml", "checkpoints/"], r"holds an xkd run, not a sweep.*\(`xkd run --resume` continues"),
    ],
    ids=["files", "run"],
)
def test_resume_into_a_folder_that_is_not_a_sweep_is_refused(tmp_path, capsys, make_folder, entries, match):
    # --resume created study.db and trial folders among the user's files
    config = write_config(tmp_path)
    folder = tmp_path / "runs" / "tiny-sweep"
    folder.mkdir(parents=True)
    make_folder(folder, entries)
    before = sorted(folder.rglob("*"))
    assert sweep_cli(config, "--resume") == 2
    err = capsys.readouterr().err
    assert re.match(rf"xkd: error: --resume: {folder} {match}", err), err
    assert "nothing to resume; choose another name (--set name=NEW) or remove the folder" in err
    assert sorted(folder.rglob("*")) == before


def test_another_study_in_a_sweep_folder_is_refused_before_anything_is_written(tmp_path, capsys, make_folder):
    # --resume --study NEW wrote the new study's trial-0000 over the old one's and replaced sweep.json
    config = write_config(tmp_path)
    folder = tmp_path / "runs" / "tiny-sweep"
    make_folder(folder, {"config.yaml": "name: tiny\n", "records/sweep.json": '{"study": "tiny"}', "trial-0000/": None})
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert sweep_cli(config, "--resume", "--study", "other") == 2
    err = capsys.readouterr().err
    assert f"--study other: {folder} holds study 'tiny', whose trial folders a new study's would overwrite" in err
    assert "(--set name=NEW), or continue 'tiny' (--study tiny)" in err
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before  # no study.db either


def test_resume_with_nothing_to_resume_starts_a_sweep_and_says_so(tmp_path, monkeypatch, caplog):
    class Opened(Exception):
        pass

    def open_study(*a, **k):
        raise Opened

    monkeypatch.setattr(sweep_module, "open_study", open_study)
    with caplog.at_level(logging.INFO, logger="xkd"), pytest.raises(Opened):
        sweep(tiny(f"output_dir={tmp_path}"), resume=True, progress=False)
    assert f"--resume: nothing to resume in {tmp_path / 'tiny-sweep'} (no sweep there yet)" in caplog.text
    assert SweepDir(tmp_path / "tiny-sweep").is_sweep() is False  # only its (empty) folder so far


def test_no_progress_bars_keeps_the_sweeps_lines(tmp_path, monkeypatch, capsys):
    # --no-progress hid the sweep's lines and the page's path too; it means no bars
    monkeypatch.setenv("COLUMNS", "400")  # one console line per message
    monkeypatch.setattr(optuna.Study, "optimize", lambda self, *a, **k: None)
    monkeypatch.setattr(sweep_module, "write_outputs", lambda study, plan, out, url: out.page)
    folder = sweep(tiny(f"output_dir={tmp_path}"), progress=False)
    err = capsys.readouterr().err
    assert "xkd sweep 'tiny': 0 of 3 trials finished, study 'tiny'" in err
    assert f"sweep report: {folder / 'sweep.html'}" in err


# -- the study's bookkeeping ------------------------------------------------------------------------------


class FakeTrial:
    def __init__(self, prune_at: int) -> None:
        self.reported: list[tuple[float, int]] = []
        self.prune_at = prune_at

    def report(self, value: float, step: int) -> None:
        self.reported.append((value, step))

    def should_prune(self) -> bool:
        return len(self.reported) >= self.prune_at


def test_the_pruning_callback_watches_one_student_and_raises_trial_pruned():
    trial = FakeTrial(prune_at=3)
    cb = ReportValAccuracy(trial, "kd")
    cb.on_train_start("teacher", 9)
    cb.on_train_start("kd", 4)
    cb.on_epoch_end("teacher", 1, {"val_accuracy": 0.9})  # other models are not reported
    cb.on_epoch_end("kd", 1, {"val_accuracy": 0.4})
    cb.on_epoch_end("kd", 2, {"val_accuracy": 0.6})
    with pytest.raises(optuna.TrialPruned, match="kd: best validation accuracy 0.6000 after epoch 3 of 4"):
        cb.on_epoch_end("kd", 3, {"val_accuracy": 0.5})
    assert trial.reported == [(0.4, 1), (0.6, 2), (0.6, 3)]  # the best so far: what the trial scores


def test_a_resumed_retry_reports_the_best_accuracy_of_its_whole_history():
    # the failed attempt reported epochs 1-2 (best 0.3125); the retry resumes from its checkpoints
    trial = FakeTrial(prune_at=99)
    cb = ReportValAccuracy(trial, "kd", earlier={2: 0.3125, 1: 0.3125})
    cb.on_train_start("kd", 4)
    cb.on_epoch_end("kd", 3, {"val_accuracy": 0.21875})
    cb.on_epoch_end("kd", 4, {"val_accuracy": 0.28125})
    assert trial.reported == [(0.3125, 1), (0.3125, 2), (0.3125, 3), (0.3125, 4)]  # what the trial scores


def test_the_last_epoch_is_reported_but_never_pruned():
    trial = FakeTrial(prune_at=1)
    cb = ReportValAccuracy(trial, "kd")
    cb.on_train_start("kd", 2)
    with pytest.raises(optuna.TrialPruned):
        cb.on_epoch_end("kd", 1, {"val_accuracy": 0.4})
    cb.on_epoch_end("kd", 2, {"val_accuracy": 0.3})  # finished: kept, scored 0.4
    assert trial.reported == [(0.4, 1), (0.4, 2)]


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_a_dead_workers_trial_is_failed_and_its_values_enqueued_once(tmp_path):
    out = SweepDir(tmp_path / "s")
    out.path.mkdir()
    study = optuna.create_study(storage=out.default_storage(), study_name="s")
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for pid in (dead_pid(), alive.pid):
            t = study.ask()
            t.suggest_float("alpha", 0.0, 1.0)
            t.set_user_attr("worker", {"host": socket.gethostname(), "pid": pid})
        other = study.ask()  # a worker on another machine: its heartbeat decides, not its pid
        other.set_user_attr("worker", {"host": "elsewhere", "pid": dead_pid()})
        reap(study, out.path / ".lock")
        reap(study, out.path / ".lock")  # a second look finds nothing new to retry
    finally:
        alive.kill()
        alive.wait()
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.RUNNING, TrialState.RUNNING, TrialState.WAITING]
    retried = trials[3]
    assert retried.user_attrs == {"retry_of": 0}
    assert retried.system_attrs["fixed_params"] == trials[0].params


def test_storage_urls_are_shown_without_passwords_and_sqlite_workers_lock_beside_the_file(tmp_path):
    assert (
        hide_password("postgresql+psycopg://ann:s3cr:et@db.lan:5432/xkd")
        == "postgresql+psycopg://ann:***@db.lan:5432/xkd"
    )
    assert hide_password("sqlite:////tmp/s/study.db") == "sqlite:////tmp/s/study.db"
    assert hide_password("postgresql://ann:p@ss@db/xkd") == "postgresql://ann:***@db/xkd"  # '@' in the password
    assert (
        hide_password("postgresql://ann@db/xkd?sslmode=require&password=s3cret")
        == "postgresql://ann@db/xkd?sslmode=require&password=***"
    )
    assert hide_password("http://ann:tok@mlflow.lan:5000") == "http://ann:***@mlflow.lan:5000"  # tracking.uri
    assert hide_password("postgresql:///xkd?password=s3cret") == "postgresql:///xkd?password=***"  # '///' kept
    assert hide_password("postgresql://ann:s3cret@[::1/xkd") == "postgresql://ann:***@[::1/xkd"  # unparsable
    out = SweepDir(tmp_path / "s")
    assert reap_lock(f"sqlite:///{tmp_path}/shared.db", out) == tmp_path / "shared.db.reap.lock"
    assert reap_lock("postgresql://ann@db/xkd", out) == out.path / ".reap.lock"


# -- end to end: one process ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One teacher cache for the in-process sweeps: the teacher is trained once for all of them."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def swept(tmp_path_factory, cache):
    tmp = tmp_path_factory.mktemp("sweep")
    config = write_config(tmp, cache)
    assert sweep_cli(config) == 0
    return config, tmp / "runs" / "tiny-sweep"


@pytest.mark.slow
def test_every_trial_is_an_xkd_run_with_its_values_and_one_teacher(swept, cache):
    _, folder = swept
    study = study_of(folder)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 3
    assert study.metric_names == ["kd.val_accuracy"]
    teachers_trained = 0
    for t in study.trials:
        run_dir = folder / f"trial-{t.number:04d}"
        assert t.user_attrs["run_dir"] == run_dir.name
        assert (run_dir / "report.html").is_file() and (run_dir / "metrics.json").is_file()
        cfg = read_config(run_dir / "config.yaml")
        assert cfg.students[0].params == {
            "alpha": t.params["students.0.params.alpha"],
            "temperature": t.params["students.0.params.temperature"],
        }
        assert cfg.sweep.params == {}  # a trial is a plain run
        models = read_json(run_dir / "records/models.json")["models"]
        teachers_trained += not models["teacher"]["train"]["from_cache"]
        history = models["kd"]["train"]["history"]
        assert t.value == max(h["val_accuracy"] for h in history)
        best_so_far = [max(h["val_accuracy"] for h in history[: i + 1]) for i in range(len(history))]
        assert t.intermediate_values == dict(enumerate(best_so_far, start=1))
    assert teachers_trained <= 1 and len(list((cache / "teachers").iterdir())) == 1
    rec = read_json(folder / "records/sweep.json")
    assert rec["kind"] == "sweep" and rec["finished"] == 3 and rec["best"] == [study.best_trial.number]


@pytest.mark.slow
def test_the_callers_config_is_left_alone_and_pruned_trials_show_no_objective_values(tmp_path, cache):
    cfg = load_config(write_config(tmp_path, cache, objectives=[{"metric": "rank_correlation"}], trials=3))
    folder = sweep(cfg, trials=2, progress=False)
    assert cfg.sweep.trials == 3  # --trials applies to this sweep, not to the config object
    study = study_of(folder)
    t = study.trials[0]
    study.add_trial(  # as Optuna records a pruned trial: its last reported validation accuracy as its value
        optuna.trial.create_trial(
            state=TrialState.PRUNED, params=t.params, distributions=t.distributions, intermediate_values={1: 0.25}
        )
    )
    write_outputs(study, resolve_sweep(cfg), SweepDir(folder), SweepDir(folder).default_storage())
    rows = read_json(folder / "records/sweep.json")["trials"]
    assert [r["state"] for r in rows] == ["complete", "complete", "pruned"]
    assert rows[0]["values"] == [t.value] and rows[2]["values"] is None
    assert "pruned after epoch 1 (val accuracy 0.2500)" in (folder / "sweep.html").read_text()


@pytest.mark.slow
def test_sweep_html_opens_offline_and_shows_the_best_trial(swept):
    _, folder = swept
    page = (folder / "sweep.html").read_text()
    assert "<script src=" not in page and "cdn.plot.ly/plotly" not in page.split("</script>")[-1]
    assert page.count("Plotly.newPlot") >= 4 and len(page) > 1_000_000  # plotly.js embedded once
    for heading in ("Best trial", "Optimisation history: kd.val_accuracy", "Parameter importances", "Slices"):
        assert heading in page, heading
    best = study_of(folder).best_trial
    assert f'href="trial-{best.number:04d}/report.html"' in page


@pytest.mark.slow
def test_best_yaml_is_a_run_config_with_the_best_values(swept):
    _, folder = swept
    best = study_of(folder).best_trial
    cfg = load_config(folder / "best.yaml")  # what `xkd run --config best.yaml` reads and validates
    assert cfg.name == "tiny-best" and cfg.sweep.params == {}
    assert cfg.students[0].params["alpha"] == best.params["students.0.params.alpha"]
    assert cfg.students[0].params["temperature"] == best.params["students.0.params.temperature"]
    assert cfg.output_dir == str(folder.parent)  # the sweep's teacher cache is found


@pytest.mark.slow
def test_resume_adds_trials_to_the_same_study_and_checks_the_config(swept, capsys):
    config, folder = swept
    assert sweep_cli(config) == 2
    assert "already exists; pass --resume" in capsys.readouterr().err
    assert sweep_cli(config, "--resume", "--set", "train.epochs=3") == 2
    assert "was started with another config (it differs in: train)" in capsys.readouterr().err
    assert sweep_cli(config, "--resume", "--trials", "4") == 0
    study = study_of(folder)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 4
    assert (folder / "trial-0003/report.html").is_file()
    assert sweep_cli(config, "--resume", "--trials", "4") == 0  # nothing left to run: outputs rewritten
    assert len(study_of(folder).trials) == 4


@pytest.mark.slow
def test_two_objectives_give_a_pareto_front_and_its_configs(tmp_path, cache):
    config = write_config(
        tmp_path, cache, objectives=[{"metric": "val_accuracy"}, {"metric": "rank_correlation"}], trials=3
    )
    assert sweep_cli(config) == 0
    folder = tmp_path / "runs/tiny-sweep"
    study = study_of(folder)
    assert study.metric_names == ["kd.val_accuracy", "kd.grad_cam.rank_correlation"]
    for t in study.trials:
        expl = read_json(folder / t.user_attrs["run_dir"] / "records/explanations.json")
        assert t.values[1] == expl["agreement"]["kd"]["grad_cam"]["rank_correlation"]
    front = study.best_trials
    files = sorted(p.name for p in (folder / "pareto").glob("*.yaml"))
    assert files == sorted(f"trial-{t.number:04d}.yaml" for t in front)
    first = max(front, key=lambda t: (t.values[0], t.values[1]))
    best = load_config(folder / "best.yaml")
    assert best.students[0].params["alpha"] == first.params["students.0.params.alpha"]
    page = (folder / "sweep.html").read_text()
    assert "Pareto front" in page and "Optimisation history: kd.grad_cam.rank_correlation" in page


@pytest.mark.slow
def test_an_undefined_score_fails_its_trial_and_an_error_that_stops_the_sweep_keeps_its_outputs(
    tmp_path, cache, monkeypatch, capsys
):
    read = Objective.read
    outcomes = iter([UndefinedObjectiveError("kd collapsed"), None, ConfigError("the records went missing")])

    def scripted(self, run_dir):  # trial 0: score undefined; trial 1: as recorded; trial 2: a stopping error
        outcome = next(outcomes)
        if outcome is not None:
            raise outcome
        return read(self, run_dir)

    monkeypatch.setattr(Objective, "read", scripted)
    config = write_config(tmp_path, cache, trials=3)
    assert sweep_cli(config) == 2
    assert "the records went missing" in capsys.readouterr().err
    folder = tmp_path / "runs/tiny-sweep"
    study = study_of(folder)
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.FAIL]
    assert study.trials[0].user_attrs["error"] == "kd collapsed"
    rec = read_json(folder / "records/sweep.json")  # written although the sweep stopped with an error
    assert rec["best"] == [1] and (folder / "sweep.html").is_file()
    assert (
        load_config(folder / "best.yaml").students[0].params["alpha"]
        == study.trials[1].params["students.0.params.alpha"]
    )


# -- end to end: several processes ------------------------------------------------------------------------


def worker(config: Path, *args: str) -> subprocess.Popen:
    """``xkd sweep --resume`` in a process of its own (how a second worker joins a study)."""
    cmd = [sys.executable, "-m", "xkd.cli", "sweep", "--config", str(config), "--resume", "--no-progress", *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(p: subprocess.Popen, timeout: float = 280) -> str:
    out, _ = p.communicate(timeout=timeout)
    assert p.returncode == 0, out[-3000:]
    return out


def running_trial_of(folder: Path, pid: int, deadline: float) -> optuna.trial.FrozenTrial:
    """Wait until process ``pid`` runs a trial whose run directory exists."""
    while time.time() < deadline:
        try:
            running = study_of(folder).get_trials(states=(TrialState.RUNNING,))
        except Exception:  # the worker has not created the study yet
            running = []
        for t in running:
            run_dir = t.user_attrs.get("run_dir")
            if (t.user_attrs.get("worker") or {}).get("pid") == pid and run_dir and (folder / run_dir).is_dir():
                return t
        time.sleep(0.1)
    raise AssertionError(f"process {pid} ran no trial in time")


def assert_exactly(study: optuna.Study, n: int, folders: list[Path]) -> None:
    """``n`` finished trials, none run twice; every other trial was retried or never run."""
    trials = study.get_trials()
    done = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(done) == n, [(t.number, t.state) for t in trials]
    retried = {t.user_attrs.get("retry_of") for t in trials}
    for t in trials:
        if t.state == TrialState.FAIL:
            assert t.number in retried or t.user_attrs.get("over_budget"), t
    values = [tuple(sorted(t.params.items())) for t in done]
    assert len(set(values)) == n  # no settings run twice
    for t in done:  # each finished trial's run directory was written by one worker, in one folder
        homes = [f for f in folders if (f / t.user_attrs["run_dir"] / "metrics.json").is_file()]
        assert len(homes) == 1, t.number


@pytest.mark.slow
def test_two_workers_started_together_finish_exactly_n_trials_and_train_one_teacher(tmp_path):
    config = write_config(tmp_path, trials=3)
    folder = tmp_path / "runs/tiny-sweep"
    a, b = worker(config), worker(config)
    finish(a), finish(b)
    study = study_of(folder)
    assert_exactly(study, 3, [folder])
    assert len({t.user_attrs["worker"]["pid"] for t in study.trials}) == 2  # both worked
    trained = [
        not read_json(folder / t.user_attrs["run_dir"] / "records/models.json")["models"]["teacher"]["train"][
            "from_cache"
        ]
        for t in study.get_trials(states=(TrialState.COMPLETE,))
    ]
    assert sum(trained) == 1  # the teacher lock: one first trial trained it, the other waited and loaded it


@pytest.mark.slow
def test_a_killed_workers_trial_is_failed_and_retried_by_another_worker(tmp_path, cache):
    config = write_config(tmp_path, cache, trials=3)
    folder = tmp_path / "runs/tiny-sweep"
    a = worker(config)
    killed = running_trial_of(folder, a.pid, time.time() + 200)
    a.kill()  # SIGKILL mid-trial: its trial stays RUNNING in the study
    a.communicate()
    assert study_of(folder).trials[killed.number].state == TrialState.RUNNING
    finish(worker(config))
    study = study_of(folder)
    assert_exactly(study, 3, [folder])
    trials = study.get_trials()
    assert trials[killed.number].state == TrialState.FAIL
    retry = next(t for t in trials if t.user_attrs.get("retry_of") == killed.number)
    assert retry.state == TrialState.COMPLETE and retry.params == killed.params
    assert (folder / retry.user_attrs["run_dir"] / "report.html").is_file()


@pytest.mark.slow
def test_ctrl_c_enqueues_the_trial_again_and_resume_continues_it(tmp_path, cache, monkeypatch, caplog):
    config = write_config(tmp_path, cache, trials=2)
    folder = tmp_path / "runs/tiny-sweep"

    def ctrl_c(self, role, epoch, stats):  # what SIGINT raises, once the student's first epoch is saved
        if role == "kd":
            raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(ReportValAccuracy, "on_epoch_end", ctrl_c)
        assert sweep_cli(config) == 130
    trials = study_of(folder).get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.WAITING]
    assert trials[0].user_attrs["interrupted"] and trials[1].user_attrs["retry_of"] == 0
    with caplog.at_level(logging.INFO, logger="xkd"):
        assert sweep_cli(config, "--resume") == 0
    study = study_of(folder)
    assert_exactly(study, 2, [folder])
    retry = study.trials[1]
    assert retry.state == TrialState.COMPLETE and retry.params == trials[0].params
    # it continued from the checkpoint of the interrupted attempt's first student epoch
    assert "kd: resumed from" in caplog.text and retry.intermediate_values.keys() == {2}


# -- PostgreSQL -------------------------------------------------------------------------------------------


def postgres_binaries() -> Path | None:
    found = shutil.which("initdb") and shutil.which("pg_ctl")
    if found:
        return Path(found).parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return versions[-1].parent if versions else None


def postgres_driver() -> str | None:
    for module, dialect in (("psycopg", "postgresql+psycopg"), ("psycopg2", "postgresql+psycopg2")):
        try:
            __import__(module)
            return dialect
        except ImportError:
            continue
    return None


@pytest.fixture
def postgres_url():
    """A throw-away PostgreSQL server on a free loopback port; skipped where none can be started."""
    bin_dir, dialect = postgres_binaries(), postgres_driver()
    if bin_dir is None:
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl; Debian: apt-get install postgresql)")
    if dialect is None:
        pytest.skip("no PostgreSQL driver for SQLAlchemy (pip install 'psycopg[binary]')")
    as_user: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root: run it as an unprivileged user
        user = next((u for u in ("postgres", "nobody") if _user_exists(u)), None)
        if user is None or shutil.which("runuser") is None:
            pytest.skip("running as root without runuser and an unprivileged user to start PostgreSQL as")
        as_user = ["runuser", "-u", user, "--"]
    home = Path(tempfile.mkdtemp(prefix="xkd-pg-"))
    if as_user:
        shutil.chown(home, user=as_user[2])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = home / "data"
    subprocess.run([*as_user, str(bin_dir / "initdb"), "-D", str(data), "-U", "xkd", "--auth=trust"], check=True,
                   capture_output=True)  # fmt: skip
    options = f"-p {port} -k {home} -c listen_addresses=127.0.0.1"
    start = [*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(home / "log"), "-w"]
    subprocess.run([*start, "start"], check=True, capture_output=True)
    try:
        yield f"{dialect}://xkd@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True)  # fmt: skip
        shutil.rmtree(home, ignore_errors=True)


def _user_exists(name: str) -> bool:
    import pwd

    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


@pytest.mark.slow
def test_two_machines_share_one_postgresql_study(tmp_path, cache, postgres_url):
    # two workers with their own output folders, as on two machines: they share only the database
    config = write_config(tmp_path, cache, trials=3)  # one teacher cache, as on a shared file system
    args = ("--storage", postgres_url, "--study", "pg")
    a = worker(config, *args, "--set", f"output_dir={tmp_path / 'a'}")
    b = worker(config, *args, "--set", f"output_dir={tmp_path / 'b'}")
    finish(a), finish(b)
    study = optuna.load_study(study_name="pg", storage=postgres_url)
    folders = [tmp_path / "a/tiny-sweep", tmp_path / "b/tiny-sweep"]
    assert_exactly(study, 3, folders)
    for f in folders:
        assert (f / "sweep.html").is_file() and (f / "best.yaml").is_file()
        assert not (f / "study.db").exists()
    assert "postgresql" in read_json(folders[0] / "records/sweep.json")["storage"]


def test_a_metric_without_a_direction_is_an_objective_only_with_one_given():
    """A user's metric that declares no direction (higher_is_better=None): a comparison shows it (no best
    value), a sweep asks which way to optimise it."""
    from xkd.comparison import quality_columns
    from xkd.metrics.base import metric
    from xkd.registry import METRICS

    metric("undirected_spread", scope="model", inputs=("maps",), higher_is_better=None, category="x")(
        lambda maps: float(maps.std())
    )
    try:
        assert {"key": "undirected_spread", "higher_is_better": None}.items() <= quality_columns()[-1].items()
        with pytest.raises(ConfigError, match=r"objectives\[0\].direction: 'undirected_spread' declares no direction"):
            resolve_sweep(
                tiny("evaluation.metrics=[undirected_spread]", "sweep.objectives=[{metric: undirected_spread}]")
            )
        plan = resolve_sweep(
            tiny(
                "evaluation.metrics=[undirected_spread]",
                "sweep.objectives=[{metric: undirected_spread, direction: minimize}]",
            )
        )
        assert plan.directions == ["minimize"]
    finally:
        METRICS._entries.pop("undirected_spread")
