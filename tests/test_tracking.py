"""Tracking: every run writes TensorBoard event files whose values are the run's records (per-epoch
history, final metrics, hyper-parameters, explanation grids); ``train.tensorboard: false`` writes
none; ``--resume`` leaves every epoch once; MLflow logs the same when installed and asks for it
with one clear error when not."""

from __future__ import annotations

import gc
import io
import socket
import sys
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import metadata as hp_metadata

from xkd import pipeline as P
from xkd import tracking
from xkd.config import ConfigError
from xkd.engine.callbacks import Callback
from xkd.plan import load_config
from xkd.rundir import RunDir
from xkd.tracking import mlflow_log

FAST = (
    "students=[{name: kd, distiller: hinton_kd}]",
    "evaluation.explainers=[{name: grad_cam}]",
    "evaluation.metrics=[fidelity, map_pearson, rank_correlation, top_k_agreement]",
)


def events(folder) -> EventAccumulator:
    ea = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    ea.Reload()
    return ea


def steps(ea: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in ea.Scalars(tag)]


def expected_epochs(history: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """The per-epoch series the history of models.json says TensorBoard must hold."""
    out: dict[str, list[tuple[int, float]]] = {}
    for h in history:
        for tag, key in [
            ("loss/train", "train_loss"),
            ("loss/val", "val_loss"),
            ("accuracy/train", "train_accuracy"),
            ("accuracy/val", "val_accuracy"),
            ("macro_f1/val", "val_macro_f1"),
            ("lr", "lr"),
        ]:
            out.setdefault(tag, []).append((h["epoch"], h[key]))
        for name, v in h["terms"].items():
            out.setdefault(f"loss_terms/{name}", []).append((h["epoch"], v))
    return out


def assert_series(ea: EventAccumulator, history: list[dict]) -> None:
    want = expected_epochs(history)
    assert {"loss/train", "loss/val", "accuracy/train", "accuracy/val", "lr"} <= set(want)
    for tag, series in want.items():
        got = steps(ea, tag)
        assert [s for s, _ in got] == [s for s, _ in series], tag  # every epoch once, in order
        assert [v for _, v in got] == pytest.approx([v for _, v in series], rel=1e-6, abs=1e-7), tag


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, make_tiny_args):
    cfg = load_config(None, make_tiny_args(tmp_path_factory.mktemp("tb"), *FAST))
    return cfg, RunDir(P.run(cfg, progress=False))


def test_train_key_and_teacher_cache_ignore_the_tensorboard_switch(tmp_path, make_tiny_args):
    on = load_config(None, make_tiny_args(tmp_path))
    off = load_config(None, make_tiny_args(tmp_path, "teacher.train.tensorboard=false", "train.tensorboard=false"))
    assert on.train.tensorboard and on.teacher.train.tensorboard and not off.teacher.train.tensorboard
    assert "tensorboard" not in P.train_key(on.teacher.train)
    assert P.teacher_cache_key(on) == P.teacher_cache_key(off)


def test_every_epoch_of_every_model_is_in_tensorboard_as_recorded(tiny_run):
    _, rd = tiny_run
    models = rd.read_record("models")
    assert models["roles"] == ["teacher", "kd"]
    for role in models["roles"]:
        history = models["models"][role]["train"]["history"]
        assert history, role
        ea = events(rd.tensorboard_dir(role))
        assert_series(ea, history)
    kd = events(rd.tensorboard_dir("kd"))
    assert {"loss_terms/ce", "loss_terms/kd"} <= set(kd.Tags()["scalars"])  # hinton_kd's two terms


def test_final_metrics_are_the_records(tiny_run):
    _, rd = tiny_run
    models = rd.read_record("models")["models"]
    expl = rd.read_record("explanations")
    for role, rec in models.items():
        # one file per model: a second one, named to sort first, lost its values to the other's purge step
        assert len(list(rd.tensorboard_dir(role).glob("events.out.tfevents.*"))) == 1
        ea = events(rd.tensorboard_dir(role))
        last = rec["train"]["history"][-1]["epoch"]
        assert steps(ea, "test/accuracy") == [(last, pytest.approx(rec["test"]["accuracy"], rel=1e-6))]
        assert steps(ea, "test/macro_f1")[0][1] == pytest.approx(rec["test"]["macro_f1"], rel=1e-6, abs=1e-7)
        fidelity = expl["per_model"][role]["grad_cam"]["fidelity"]["mean"]  # a column with a `sub`
        assert steps(ea, "explain/grad_cam/fidelity")[0][1] == pytest.approx(fidelity, rel=1e-6)
    kd = events(rd.tensorboard_dir("kd"))
    agreement = expl["agreement"]["kd"]["grad_cam"]
    for metric in ("rank_correlation", "map_pearson", "top_k_agreement"):
        assert steps(kd, f"agreement/grad_cam/{metric}")[0][1] == pytest.approx(agreement[metric], rel=1e-5, abs=1e-7)
    assert steps(kd, "posthoc/accuracy")[0][1] == pytest.approx(models["kd"]["posthoc"]["accuracy"], rel=1e-6)
    assert "agreement/grad_cam/rank_correlation" not in events(rd.tensorboard_dir("teacher")).Tags()["scalars"]


def test_hparams_hold_the_config_and_the_final_metrics(tiny_run):
    cfg, rd = tiny_run
    ea = events(rd.tensorboard_dir(None))
    content = ea.PluginTagToContent("hparams")
    assert hp_metadata.SESSION_START_INFO_TAG in content
    start = hp_metadata.parse_session_start_info_plugin_data(content[hp_metadata.SESSION_START_INFO_TAG])
    hp = start.hparams
    assert hp["train.optimizer.lr"].number_value == pytest.approx(cfg.train.optimizer.lr)
    assert hp["teacher.train.epochs"].number_value == cfg.teacher.train.epochs == 2
    assert hp["students.0.distiller"].string_value == "hinton_kd"
    assert hp["data.name"].string_value == "digits"
    assert "train.tensorboard" not in hp and "output_dir" not in hp
    models = rd.read_record("models")["models"]
    for role in ("teacher", "kd"):  # the HPARAMS table's metric columns: scalars of the session run
        assert steps(ea, f"{role}/test/accuracy")[0][1] == pytest.approx(models[role]["test"]["accuracy"], rel=1e-6)
    rank = rd.read_record("explanations")["agreement"]["kd"]["grad_cam"]["rank_correlation"]
    assert steps(ea, "kd/agreement/grad_cam/rank_correlation")[0][1] == pytest.approx(rank, rel=1e-5)


def test_the_explanation_grid_shows_the_sample_maps(tiny_run):
    _, rd = tiny_run
    ea = events(rd.tensorboard_dir(None))
    assert ea.Tags()["images"] == ["explanations/grad_cam"]
    (img,) = ea.Images("explanations/grad_cam")
    grid = np.asarray(Image.open(io.BytesIO(img.encoded_image_string)).convert("RGB"))
    tensors = load_file(str(rd.samples_tensors))
    images = tensors["images"]  # (S, 1, 16, 16): one per class
    n, _, h, _ = images.shape
    scale, pad = tracking.GRID_CELL // h, 2
    cell = h * scale
    rows = 1 + 2  # the images, then teacher and kd
    assert grid.shape == (rows * (cell + pad) + pad, n * (cell + pad) + pad, 3)
    # first row: the images themselves; second row: the teacher's map over the first image
    first = images[0, 0].repeat_interleave(scale, 0).repeat_interleave(scale, 1).numpy() * 255
    assert np.abs(grid[pad : pad + cell, pad : pad + cell, 0] - first).max() <= 1.0
    y = pad + cell + pad
    m = tensors["maps/teacher/grad_cam"][0]
    m = (m - m.min()) / (m.max() - m.min())
    want = 0.5 * images[0, 0][..., None].expand(h, h, 3) + 0.5 * tracking.jet(m)
    want = want.repeat_interleave(scale, 0).repeat_interleave(scale, 1).numpy() * 255
    assert np.abs(grid[y : y + cell, pad : pad + cell] - want).max() <= 1.0
    assert "kd (prediction)" in ea.Tensors("explanations/grad_cam/text_summary")[0].tensor_proto.string_val[0].decode()


@pytest.mark.slow
def test_tensorboard_false_writes_nothing_and_the_teacher_switch_only_the_teacher(tmp_path, make_tiny_args):
    cfg = load_config(None, make_tiny_args(tmp_path, *FAST, "train.tensorboard=false"))
    assert tracking.callbacks_for(cfg, RunDir.of(cfg)) == []
    rd = RunDir(P.run(cfg, progress=False))
    assert rd.is_finished() and not rd.tensorboard.exists()
    assert not list(tmp_path.rglob("events.out.tfevents.*"))

    cfg = load_config(None, make_tiny_args(tmp_path, *FAST, "name=no_teacher", "teacher.train.tensorboard=false"))
    rd = RunDir(P.run(cfg, progress=False))
    assert not rd.tensorboard_dir("teacher").exists()
    assert sorted(p.name for p in rd.tensorboard.iterdir()) == ["_run", "kd"]


def event_writer_threads() -> list[threading.Thread]:
    """TensorBoard's event-writer threads alive in this process (one per open writer)."""
    return [t for t in threading.enumerate() if type(t).__name__ == "_AsyncWriterThread" and t.is_alive()]


class Stop(Exception):
    pass


class StopAt(Callback):
    """Interrupts training at the end of ``role``'s epoch ``epoch`` (after its checkpoint)."""

    def __init__(self, role: str, epoch: int) -> None:
        self.role, self.epoch = role, epoch

    def on_epoch_end(self, role, epoch, stats):
        if (role, epoch) == (self.role, self.epoch):
            raise Stop


@pytest.mark.slow
def test_resume_leaves_every_epoch_once(tmp_path, make_tiny_args):
    cfg = load_config(None, make_tiny_args(tmp_path, *FAST, "train.epochs=3"))
    with pytest.raises(Stop):  # kd's epoch 2 is checkpointed and logged, then the run stops (a pruned trial)
        P.run(cfg, progress=False, callbacks=[StopAt("kd", 2)])
    gc.collect()
    assert not event_writer_threads()  # the stopped run's writers were closed (a leaked one would
    # write again into files a resumed run rewrites)
    rd = RunDir.of(cfg)
    assert [s for s, _ in steps(events(rd.tensorboard_dir("kd")), "loss/train")] == [1, 2]
    P.run(cfg, resume=True, progress=False)
    models = rd.read_record("models")["models"]
    assert [h["epoch"] for h in models["kd"]["train"]["history"]] == [1, 2, 3]
    for role in ("teacher", "kd"):  # the teacher is loaded from the cache on resume
        ea = events(rd.tensorboard_dir(role))
        assert_series(ea, models[role]["train"]["history"] if role == "kd" else ea_history(rd, role))
        assert len(ea.Scalars("test/accuracy")) == 1
    teacher = events(rd.tensorboard_dir("teacher"))
    assert [s for s, _ in steps(teacher, "loss/train")] == [1, 2]  # all it trained, not just to its best epoch

    P.run(cfg, resume=True, progress=False)  # resuming a finished run rewrites, never duplicates
    for role in ("teacher", "kd"):
        ea = events(rd.tensorboard_dir(role))
        assert [s for s, _ in steps(ea, "loss/train")] == list(range(1, len(steps(ea, "loss/train")) + 1))
        assert len(ea.Scalars("test/accuracy")) == 1


def ea_history(rd: RunDir, role: str) -> list[dict]:
    """The history the run's own ``last.pt`` of ``role`` holds (longer than a cached teacher's record)."""
    return tracking.full_history(rd, role, rd.read_record("models")["models"][role]["train"]["history"])


def test_only_the_writing_rank_tracks(tmp_path, make_tiny_args, monkeypatch):
    cfg = load_config(None, make_tiny_args(tmp_path))
    assert [type(c) for c in tracking.callbacks_for(cfg, RunDir.of(cfg))] == [tracking.TensorBoard]
    monkeypatch.setenv("RANK", "1")
    assert tracking.callbacks_for(cfg, RunDir.of(cfg)) == []


def test_a_missing_mlflow_is_one_clear_error_before_anything_runs(tmp_path, make_tiny_args, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if it were not installed
    cfg = load_config(None, make_tiny_args(tmp_path, *FAST, "tracking.backend=mlflow"))
    with pytest.raises(ConfigError, match=r"tracking\.backend: mlflow .*pip install 'xkd\[mlflow\]'"):
        tracking.check(cfg)
    with pytest.raises(ConfigError, match=r"pip install 'xkd\[mlflow\]'"):
        P.run(cfg, progress=False)
    assert not RunDir.of(cfg).path.exists()  # nothing written, nothing trained
    tracking.check(load_config(None, make_tiny_args(tmp_path)))  # the default (none) needs nothing


@pytest.mark.slow
def test_mlflow_logs_params_epochs_and_final_metrics(tmp_path, make_tiny_args, monkeypatch):
    pytest.importorskip("mlflow", reason="mlflow is an optional extra: pip install 'xkd[mlflow]'")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    extra = ("tracking.backend=mlflow", "tracking.experiment=t", "train.epochs=2")
    cfg = load_config(None, make_tiny_args(tmp_path, *FAST, *extra))
    uri, folder, default = tracking.mlflow_uri(cfg)
    assert default
    assert uri == f"sqlite:///{(tmp_path / 'runs' / 'mlruns' / 'mlflow.db').resolve()}"
    assert folder == (tmp_path / "runs" / "mlruns").resolve()
    with pytest.raises(Stop):  # interrupted after kd's first epoch (a pruned trial, a crash)
        P.run(cfg, progress=False, callbacks=[StopAt("kd", 1)])
    gc.collect()
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("t")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "KILLED"

    rd = RunDir(P.run(cfg, resume=True, progress=False))  # continues the same MLflow run
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == cfg.name
    assert run.data.tags["xkd.run_dir"] == str(rd.path.resolve())
    assert float(run.data.params["train.optimizer.lr"]) == cfg.train.optimizer.lr
    assert run.data.params["students.0.distiller"] == "hinton_kd"
    models = rd.read_record("models")["models"]
    assert [h["epoch"] for h in models["kd"]["train"]["history"]] == [1, 2]
    for role in ("teacher", "kd"):  # every epoch once, with the recorded values
        history = tracking.full_history(rd, role, models[role]["train"]["history"])
        for tag, series in expected_epochs(history).items():
            got = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, f"{role}/{tag}"))
            assert [s for s, _ in got] == [s for s, _ in series], (role, tag)
            assert [v for _, v in got] == pytest.approx([v for _, v in series], rel=1e-9), (role, tag)
        assert run.data.metrics[f"{role}/test/accuracy"] == pytest.approx(models[role]["test"]["accuracy"])
    rank = rd.read_record("explanations")["agreement"]["kd"]["grad_cam"]["rank_correlation"]
    assert run.data.metrics["kd/agreement/grad_cam/rank_correlation"] == pytest.approx(rank)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "metrics.json"} <= artifacts
    assert (tmp_path / "runs" / "mlruns" / "artifacts").is_dir()  # beside the store, not in the cwd

    # resumed with other settings: MLflow keeps a param's first value, so a new MLflow run gets it all
    more = load_config(None, make_tiny_args(tmp_path, *FAST, *extra[:2], "train.epochs=3"))
    P.run(more, resume=True, progress=False)
    new, old = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"])
    assert old.info.run_id == run.info.run_id and old.data.params["train.epochs"] == "2"
    assert new.data.params["train.epochs"] == "3" and new.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(new.info.run_id, "kd/loss/train")) == [1, 2, 3]
    assert len(client.get_metric_history(new.info.run_id, "kd/test/accuracy")) == 1  # once, not per process


def test_a_wrong_mlflow_uri_fails_before_training(tmp_path, make_tiny_args):
    pytest.importorskip("mlflow", reason="mlflow is an optional extra: pip install 'xkd[mlflow]'")
    cfg = load_config(None, make_tiny_args(tmp_path, *FAST, "tracking.backend=mlflow", "tracking.uri=nosuchscheme://x"))
    with pytest.raises(ConfigError, match=r"tracking: cannot log to MLflow at 'nosuchscheme://x'"):
        tracking.callbacks_for(cfg, RunDir.of(cfg))
    with pytest.raises(ConfigError, match=r"tracking: cannot log to MLflow"):
        P.run(cfg, progress=False)
    assert not RunDir.of(cfg).path.exists()  # nothing written: the same command works once the URI is fixed


def test_mlflow_names_a_comparisons_runs_after_it(tmp_path, make_tiny_args):
    from xkd.comparison import seed_config

    cfg = load_config(None, make_tiny_args(tmp_path, "name=cmp"))
    assert seed_config(cfg, tmp_path / "runs" / "cmp", 1, None).tracking.run_name == "cmp/seed_1"
    cfg.tracking.run_name = "mine"
    assert seed_config(cfg, tmp_path / "runs" / "cmp", 1, None).tracking.run_name == "mine/seed_1"


def test_a_tensorboard_folder_that_is_a_file_is_one_error_before_training(tmp_path, make_tiny_args):
    cfg = load_config(None, make_tiny_args(tmp_path, *FAST))
    rd = RunDir.of(cfg)
    rd.create(cfg)  # a run interrupted before its first epoch
    rd.tensorboard.write_text("not a folder")
    with pytest.raises(ConfigError, match=r"tensorboard is a file where the run writes its TensorBoard events"):
        P.run(cfg, resume=True, progress=False)
    assert not rd.checkpoint("teacher").is_file()  # nothing trained


def test_an_unreachable_mlflow_server_fails_in_seconds_not_minutes():
    # MLflow's client retried a closed port for 253 s before reporting it
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # bound, never listening: connections are refused
        t0 = time.perf_counter()
        with pytest.raises(
            ConfigError, match=rf"cannot reach the MLflow server at 'http://127.0.0.1:{port}'.*backend: none"
        ):
            mlflow_log.probe_server(f"http://127.0.0.1:{port}", timeout=2.0)
        assert time.perf_counter() - t0 < 30
    with socket.socket() as server:  # a listening server passes; file and database URIs are MLflow's to check
        server.bind(("127.0.0.1", 0))
        server.listen()
        mlflow_log.probe_server(f"http://127.0.0.1:{server.getsockname()[1]}")
    mlflow_log.probe_server("sqlite:///x.db")
    mlflow_log.probe_server("file:///tmp/mlruns")


def test_jet_runs_blue_to_red():
    c = tracking.jet(torch.tensor([0.0, 0.5, 1.0]))
    assert c[0].tolist() == pytest.approx([0.0, 0.0, 0.5])  # dark blue
    assert c[1].tolist() == pytest.approx([0.5, 1.0, 0.5])  # green-ish middle
    assert c[2].tolist() == pytest.approx([0.5, 0.0, 0.0])  # dark red
