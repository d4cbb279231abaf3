"""Pipeline bookkeeping: what a student's train time counts, a loaded teacher's recorded time, and
wrong layer names failing before anything trains."""

from __future__ import annotations

import time

import pytest
import torch

from xkd import pipeline as P
from xkd.config import ConfigError
from xkd.data import build_dataset
from xkd.distill.feature import FitNets
from xkd.engine.trained import TrainedModel
from xkd.engine.trainer import Trainer, TrainResult
from xkd.errors import DeviceMemoryError, RunExistsError
from xkd.files import read_json
from xkd.metrics.base import default_metrics
from xkd.models.hooks import LayerNotFoundError
from xkd.plan import load_config, resolve
from xkd.rundir import RunDir, read_train_info, train_info_path, write_train_info

ONE = "students=[{name: kd, distiller: hinton_kd}]"
TA = (
    "students=[{name: ta, distiller: teacher_assistant, params: {assistant: {name: kdfmv_cnn, params: "
    "{widths: [4, 8, 8]}}, assistant_distiller: hinton_kd, distiller: fitnets}}]"
)


def prepared(cfg):
    run_dir = RunDir.of(cfg)
    P.prepare_run_dir(run_dir, cfg, False, False)
    return run_dir


def test_train_seconds_is_loop_plus_setup_plus_assistant():
    m = TrainedModel("s", torch.nn.Linear(1, 1), "x", result=TrainResult(seconds=2.0), setup_seconds=0.5)
    m.assistant_seconds = 3.25
    assert m.train_seconds == 5.75
    rec = m.train_record()
    assert (rec["seconds"], rec["loop_seconds"], rec["setup_seconds"], rec["assistant_seconds"]) == (
        5.75,
        2.0,
        0.5,
        3.25,
    )
    unknown = TrainedModel("teacher", torch.nn.Linear(1, 1), "x", result=TrainResult(seconds=None), from_cache=True)
    assert unknown.train_seconds is None and unknown.train_record()["seconds"] is None


def test_student_time_counts_its_setup_and_its_assistant(tmp_path, make_tiny_args, monkeypatch):
    cfg = load_config(None, make_tiny_args(tmp_path, TA))
    data = build_dataset(cfg.data)
    run_dir = prepared(cfg)
    real_setup = FitNets.setup

    def slow_setup(self, context):  # a setup that takes a known time, like XDistillation's phase 1
        time.sleep(0.3)
        real_setup(self, context)

    monkeypatch.setattr(FitNets, "setup", slow_setup)
    teacher = P.train_teacher(cfg, data, run_dir, torch.device("cpu"), False, False)
    (ta,) = P.train_students(resolve(cfg), data, teacher.model.eval(), run_dir, torch.device("cpu"), False, False)
    assert ta.setup_seconds >= 0.3  # the student's FitNets setup (its assistant's hinton_kd has none)
    assert ta.assistant_seconds == pytest.approx(ta.assistant.train_seconds) and ta.assistant_seconds > 0
    assert ta.train_seconds == pytest.approx(ta.result.seconds + ta.setup_seconds + ta.assistant_seconds)
    assert ta.train_seconds > ta.result.seconds + 0.3


def test_loaded_teacher_reports_the_time_it_took_to_train(tmp_path, make_tiny_args):
    cfg = load_config(None, make_tiny_args(tmp_path, ONE))
    data = build_dataset(cfg.data)
    cpu = torch.device("cpu")
    first = P.train_teacher(cfg, data, prepared(cfg), cpu, False, False)
    assert not first.from_cache and first.result.seconds > 0
    ckpt = RunDir.of(cfg).checkpoint("teacher")
    assert read_train_info(ckpt)["seconds"] == pytest.approx(first.result.seconds)
    assert read_train_info(ckpt)["history"] == first.result.history  # every epoch, the last ones too

    # same config, another run: loaded from the cache, with the time it took when it was trained
    again = load_config(None, make_tiny_args(tmp_path, ONE, "name=again"))
    loaded = P.train_teacher(again, data, prepared(again), cpu, False, False)
    assert loaded.from_cache and loaded.loaded_from.endswith("best.pt")
    assert loaded.result.seconds == pytest.approx(first.result.seconds)
    assert loaded.train_record()["seconds"] == pytest.approx(first.result.seconds)
    # and every epoch it trained (best.pt holds the history up to its best epoch only)
    assert loaded.result.history == first.result.history and len(first.result.history) == cfg.teacher.train.epochs

    # `xkd compare`'s later seeds: teacher.checkpoint = the first run's checkpoint (the record is beside it)
    given = load_config(None, make_tiny_args(tmp_path, ONE, "name=given", "seed=5", f"teacher.checkpoint={ckpt}"))
    chained = P.train_teacher(given, data, prepared(given), cpu, False, False)
    assert chained.from_cache and chained.loaded_from == str(ckpt)
    assert chained.result.seconds == pytest.approx(first.result.seconds)

    # a checkpoint without a record (trained by an older xkd) or with another's record: unknown, not 0 s
    train_info_path(ckpt).unlink()
    old = load_config(None, make_tiny_args(tmp_path, ONE, "name=old", "seed=6", f"teacher.checkpoint={ckpt}"))
    assert P.train_teacher(old, data, prepared(old), cpu, False, False).result.seconds is None
    other = tmp_path / "other.pt"
    other.write_bytes(ckpt.read_bytes() + b"x")
    write_train_info(other, {"seconds": 1.0})
    train_info_path(other).rename(train_info_path(ckpt))
    assert read_train_info(ckpt) is None


@pytest.mark.parametrize(
    "student, match",
    [
        ("{name: fit, distiller: fitnets, params: {layers: [[nope, layer3]]}}", r"'fit'.*'nope' not found.*blocks\.0"),
        ("{name: at, distiller: at, params: {layers: [[blocks.2, layer9]]}}", r"'at'.*'layer9' not found.*layer3"),
        ("{name: vid, distiller: vid, params: {layers: [[blocks.2, nope]]}}", r"'vid'.*'nope' not found"),
        ("{name: mt, distiller: medtex, params: {layers: [[blocks.9, layer3]]}}", r"'mt'.*'blocks\.9' not found"),
        (
            "{name: ta, distiller: teacher_assistant, params: {assistant: {name: kdfmv_cnn, params: {widths: [4, 8]}}, "
            "distiller: fitnets, params: {layers: [[blocks.2, layer3]]}}}",
            r"'ta'.*'layer3' not found in KDFMVStudent",  # the teacher has a layer3, the ASSISTANT does not
        ),
    ],
)
def test_wrong_layer_fails_before_anything_trains_or_is_written(tmp_path, make_tiny_args, monkeypatch, student, match):
    def no_training(self, resume=False):
        pytest.fail(f"{self.role} started training before the layer names were checked")

    monkeypatch.setattr(Trainer, "fit", no_training)
    cfg = load_config(None, make_tiny_args(tmp_path, f"students=[{{name: kd, distiller: hinton_kd}}, {student}]"))
    with pytest.raises(LayerNotFoundError, match=match):
        P.run(cfg, progress=False)
    assert not (tmp_path / "runs").exists()  # no run directory, checkpoint or cached teacher


@pytest.mark.parametrize(
    "overrides, match",
    [
        (  # a teacher's layer named for every model: Grad-CAM found no layer3 in the student after training
            ["evaluation.explainers=[{name: grad_cam, params: {layer: layer3}}]"],
            r"evaluation.explainers\[0\] \(grad_cam\) on scratch: .*'layer3' not found in KDFMVStudent.*leave it unset",
        ),
        (
            ["evaluation.explainers=[{name: feature_maps, params: {layers: [blocks.2, nope]}}]"],
            r"evaluation.explainers\[0\] \(feature_maps\) on teacher: .*'blocks.2' not found",
        ),
        (
            ["evaluation.explainers=[{name: unicam, params: {layer: nope}}]"],
            r"evaluation.explainers\[0\] \(unicam\) on scratch: .*'nope' not found",
        ),
        (["evaluation.transfer_layers={student: nope}"], r"evaluation.transfer_layers.student on scratch: .*'nope'"),
        (["evaluation.transfer_layers={teacher: blocks.2}"], r"evaluation.transfer_layers.teacher on teacher: .*"),
    ],
    ids=["explainer_layer", "feature_maps_layers", "unicam_layer", "transfer_student", "transfer_teacher"],
)
def test_an_evaluation_layer_missing_from_a_model_fails_before_training(
    tmp_path, make_tiny_args, monkeypatch, overrides, match
):
    monkeypatch.setattr(Trainer, "fit", lambda self, resume=False: pytest.fail(f"{self.role} trained"))
    cfg = load_config(None, make_tiny_args(tmp_path, *overrides))
    with pytest.raises(LayerNotFoundError, match=match):
        P.run(cfg, progress=False)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("name", ["occlusion", "occlusion+superpixel"])
def test_an_occlusion_window_larger_than_the_images_fails_before_training(tmp_path, make_tiny_args, monkeypatch, name):
    # the ValueError came at explain time, after every model had trained (the tiny run: 16x16 digits)
    monkeypatch.setattr(Trainer, "fit", lambda self, resume=False: pytest.fail(f"{self.role} trained"))
    over = f"evaluation.explainers=[{{name: grad_cam}}, {{name: {name}, params: {{window: [4, 17], stride: 2}}}}]"
    cfg = load_config(None, make_tiny_args(tmp_path, over))
    with pytest.raises(
        ConfigError, match=r"explainers\[1\] \(occlusion.*window \[4, 17\] is larger than the images \[16, 16\]"
    ):
        P.run(cfg, progress=False)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "overrides, match",
    [
        (
            ["students=[{name: at, distiller: at, params: {layers: [[classifier, layer3]]}}]"],
            r"student 'at' \(distiller 'at'\).*'classifier' outputs shape",
        ),
        (
            ["students=[{name: crd, distiller: crd, params: {nce_k: 100000}}]"],
            r"nce_k = 100000 negatives per image, but the training split has \d+ images",
        ),
        (
            [
                "students=[{name: e2kd, distiller: e2kd, params: {frozen_explanations: true}}]",
                "data.augment.hflip=true",
            ],
            r"e2kd: frozen_explanations .* but data.augment is on",
        ),
    ],
    ids=["layer_shape", "crd_negatives", "frozen_e2kd_augmented"],
)
def test_a_distiller_config_error_fails_before_training(tmp_path, make_tiny_args, monkeypatch, overrides, match):
    monkeypatch.setattr(Trainer, "fit", lambda self, resume=False: pytest.fail("trained"))
    cfg = load_config(None, make_tiny_args(tmp_path, *overrides))
    with pytest.raises(ConfigError, match=match):
        P.run(cfg, progress=False)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["train.amp=fp16"], r"^train\.amp: fp16 needs a CUDA device.*on cpu use bf16 or off"),
        (["teacher.train.amp=fp16"], r"^teacher\.train\.amp: fp16 needs a CUDA device"),
        (["train.optimizer.fused=true"], r"^train\.optimizer\.fused: true is not supported for adam on cpu"),
    ],
    ids=["students_fp16", "teacher_fp16", "fused_unsupported"],
)
def test_a_precision_or_optimiser_the_device_lacks_fails_before_the_teacher_trains(
    tmp_path, make_tiny_args, monkeypatch, overrides, match
):
    # fp16 on the CPU was reported only when the students' training began, after the teacher's
    monkeypatch.setattr(Trainer, "fit", lambda self, resume=False: pytest.fail(f"{self.role} trained"))
    if "fused" in overrides[0]:  # a torch without a fused CPU kernel (torch < 2.4)
        real = torch.optim.Adam

        def adam(params, **kw):
            if kw.get("fused"):
                raise RuntimeError(
                    "`fused=True` requires all the params to be floating point Tensors of supported devices"
                )
            return real(params, **kw)

        monkeypatch.setattr(torch.optim, "Adam", adam)
    cfg = load_config(None, make_tiny_args(tmp_path, *overrides))
    with pytest.raises(ConfigError, match=match):
        P.run(cfg, progress=False)
    assert not (tmp_path / "runs").exists()


def test_preflight_runs_no_expensive_setup(tmp_path, make_tiny_args, monkeypatch):
    from xkd.distill.xdistill import XDistillation

    monkeypatch.setattr(XDistillation, "setup", lambda self, context: pytest.fail("phase 1 ran in the preflight"))
    cfg = load_config(
        None, make_tiny_args(tmp_path, "students=[{name: x, distiller: xdistill}, {name: f, distiller: fitnets}]")
    )
    P.preflight(resolve(cfg), build_dataset(cfg.data))


class _Trained(Exception):
    """Raised by a stubbed Trainer.fit: the run got past its checks to training."""


@pytest.mark.parametrize(
    "change, match",
    [
        (["students.1.params.alpha=0.2"], r"students\[kd\]\.params: .*'alpha': 0\.7.* -> .*'alpha': 0\.2"),
        (["students.1.distiller=dkd"], r"students\[kd\]\.distiller: hinton_kd -> dkd"),
        (["teacher.model.params={depth: 14, width: 8}"], r"teacher\.model: .*'depth': 8.* -> .*'depth': 14"),
        (["student_model.params={widths: [4, 8, 16]}"], r"students\[scratch\]\.model: .*students\[kd\]\.model"),
        (["train.optimizer.lr=0.5"], r"students\[scratch\]\.train: .*'lr': 0\.002.* -> .*'lr': 0\.5"),
        (["seed=3"], r"seed: 0 -> 3"),
        # a teacher trained on for more epochs is not the teacher the finished students learnt from
        (["teacher.train.epochs=4"], r"teacher\.train\.epochs: 2 -> 4"),
    ],
    ids=["distiller_params", "distiller", "teacher", "student_model", "students_lr", "seed", "teacher_epochs"],
)
def test_resume_refuses_a_run_trained_with_other_settings(tmp_path, make_tiny_args, monkeypatch, change, match):
    # --resume kept the finished models and recorded them under the new config (alpha 0.2 written into
    # config.yaml and models.json for a student trained with 0.7)
    monkeypatch.setattr(Trainer, "fit", lambda self, resume=False: pytest.fail(f"{self.role} trained"))
    students = "students=[{name: scratch, distiller: scratch}, {name: kd, distiller: hinton_kd, params: {alpha: 0.7}}]"
    first = load_config(None, make_tiny_args(tmp_path, students, "train.optimizer.lr=0.002"))
    RunDir.of(first).create(first)  # the run's saved config, as a run that trained writes it
    cfg = load_config(None, make_tiny_args(tmp_path, students, "train.optimizer.lr=0.002", *change))
    with pytest.raises(ConfigError, match=rf"--resume: .*tiny holds models trained with other settings.*{match}"):
        P.run(cfg, resume=True, progress=False)
    with pytest.raises(_Trained):  # --overwrite starts over
        monkeypatch.setattr(Trainer, "fit", lambda self, resume=False: (_ for _ in ()).throw(_Trained()))
        P.run(cfg, overwrite=True, progress=False)


def test_resume_may_change_epochs_evaluation_and_how_steps_run(tmp_path, make_tiny_args, monkeypatch):
    first = load_config(None, make_tiny_args(tmp_path))
    RunDir.of(first).create(first)
    more = [
        "train.epochs=3", "train.amp=bf16", "train.channels_last=true", "teacher.train.channels_last=true",
        "evaluation.num_images=12", "evaluation.explainers=[{name: grad_cam}]",
        "students=[{name: scratch, distiller: scratch}, {name: kd, distiller: hinton_kd}, {name: new, distiller: at}]",
    ]  # fmt: skip
    cfg = load_config(None, make_tiny_args(tmp_path, *more))
    assert [s.name for s in first.students] == ["scratch", "kd", "ls"]  # ls dropped, new added: not conflicts
    monkeypatch.setattr(Trainer, "fit", lambda self, resume=False: (_ for _ in ()).throw(_Trained()))
    with pytest.raises(_Trained):
        P.run(cfg, resume=True, progress=False)


FOREIGN = {  # what another command (or a user) leaves in a folder, and what the error calls it
    "files": ({"file.txt": "hi"}, r"is not empty and is not an xkd run \(it has no config.yaml"),
    "comparison": ({"config.yaml": "name: tiny\n", "seeds/": None}, r"holds an xkd comparison, not a run"),
    "study": ({"records/study.json": "{}"}, r"holds an xkd study, not a run"),
    "sweep": ({"config.yaml": "name: tiny\n", "study.db": ""}, r"holds an xkd sweep, not a run"),
}


@pytest.mark.parametrize("what", list(FOREIGN))
@pytest.mark.parametrize("flag", ["resume", "overwrite"])
def test_resume_or_overwrite_of_a_folder_that_is_not_a_run_is_refused(
    tmp_path, make_tiny_args, make_folder, monkeypatch, what, flag
):
    # --resume trained a new run beside file.txt, and into comparisons, studies and sweeps of the same name
    monkeypatch.setattr(Trainer, "fit", lambda self, resume=False: pytest.fail(f"{self.role} trained"))
    cfg = load_config(None, make_tiny_args(tmp_path))
    files, match = FOREIGN[what]
    make_folder(RunDir.of(cfg).path, files)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    fix = r"choose another name \(--set name=NEW\) or remove the folder"
    if what != "files":
        fix += rf" \(`xkd {'compare' if what == 'comparison' else what} --resume` continues what is there\)"
    with pytest.raises(RunExistsError, match=rf"^--{flag}: .*tiny {match}.*{fix}$"):
        P.run(cfg, **{flag: True}, progress=False)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written, nothing deleted


def test_resume_with_nothing_to_resume_starts_a_new_run_and_says_so(tmp_path, make_tiny_args, monkeypatch, caplog):
    monkeypatch.setattr(Trainer, "fit", lambda self, resume=False: (_ for _ in ()).throw(_Trained()))
    cfg = load_config(None, make_tiny_args(tmp_path))
    RunDir.of(cfg).path.mkdir(parents=True)  # empty: as good as not there
    with caplog.at_level("INFO", logger="xkd"), pytest.raises(_Trained):
        P.run(cfg, resume=True, progress=False)
    assert f"--resume: nothing to resume in {RunDir.of(cfg).path} (no run there yet); starting a new run" in caplog.text
    assert RunDir.of(cfg).is_run()


def test_resume_of_a_finished_run_with_the_same_config_computes_nothing(
    tmp_path, make_tiny_args, finished_run, monkeypatch, caplog
):
    # --resume of a finished run explained and scored every model again, with nothing changed
    monkeypatch.setattr(P, "build_dataset", lambda *a: pytest.fail("the run was computed again"))
    cfg = load_config(None, make_tiny_args(tmp_path))
    rd = finished_run(RunDir.of(cfg).path, cfg)
    with caplog.at_level("INFO", logger="xkd"):
        assert P.run(cfg, resume=True, progress=False) == rd.path
    assert f"{rd.path} already finished with this config: nothing to train or score again" in caplog.text
    # settings no run reads (compare.*, study.*, sweep.*), where it logs and stores, and how a step runs
    # change nothing it computed (each re-explained and re-scored the whole run)
    same = ["compare.seeds=5", "train.tensorboard=false", "teacher.train.num_workers=0", "train.amp=bf16",
            "train.optimizer.fused=false", "tracking.experiment=other", f"cache_dir={tmp_path / 'elsewhere'}"]  # fmt: skip
    for setting in same:
        P.run(load_config(None, make_tiny_args(tmp_path, setting)), resume=True, progress=False)
    for changed in (["evaluation.num_images=12"], ["train.epochs=2"]):  # an evaluation setting; more epochs
        monkeypatch.setattr(P, "build_dataset", lambda *a: (_ for _ in ()).throw(_Trained()))
        with pytest.raises(_Trained):
            P.run(load_config(None, make_tiny_args(tmp_path, *changed)), resume=True, progress=False)
    (rd.records / "samples.json").unlink()  # a finished run missing a record is completed again
    with pytest.raises(_Trained):
        P.run(cfg, resume=True, progress=False)


def test_a_resume_stopped_before_its_records_is_not_taken_for_finished(
    tmp_path, make_tiny_args, finished_run, monkeypatch
):
    # the new config.yaml was saved first and the records last: stopped between them, the next
    # --resume found a "finished" run with the new config and reported the old numbers under it
    def stop(*a, **k):
        raise _Trained

    monkeypatch.setattr(P, "train_teacher", stop)
    cfg = load_config(None, make_tiny_args(tmp_path))
    rd = finished_run(RunDir.of(cfg).path, cfg)
    changed = load_config(None, make_tiny_args(tmp_path, "evaluation.num_images=12"))
    with pytest.raises(_Trained):  # stops after the config is saved, before any record is written
        P.run(changed, resume=True, progress=False)
    assert "num_images: 12" in rd.config.read_text() and not rd.metrics.exists()
    with pytest.raises(_Trained):  # computed again, not "already finished"
        P.run(changed, resume=True, progress=False)


def test_sizes_larger_than_the_data_are_said_before_training(tmp_path, make_tiny_args, caplog):
    # they were clamped without a word: 100,000 training images asked, 240 used
    over = ["data.train_size=100000", "evaluation.num_images=1000", "evaluation.met_images=500"]
    cfg = load_config(None, make_tiny_args(tmp_path, *over))
    with caplog.at_level("WARNING", logger="xkd"):
        data = build_dataset(cfg.data)
        P.preflight(resolve(cfg), data)
    text = caplog.text
    assert f"data.train_size 100000: digits has {len(data.train)} train images; all of them are used" in text
    assert "evaluation.num_images 1000: the test split has 60 images; all of them are used" in text
    assert "evaluation.met_images 500: the run explains 60 images" in text
    assert "sanity_images" not in text  # within bounds: nothing said
    assert "masks" not in text  # the default metric list: its mask metrics are skipped without a word


def test_listed_metrics_that_need_masks_are_said_on_data_without_masks(tmp_path, make_tiny_args, caplog):
    # pointing_game listed on digits (no masks) gave no number and no word
    cfg = load_config(None, make_tiny_args(tmp_path, "evaluation.metrics=[rank_correlation, pointing_game, mask_mass]"))
    with caplog.at_level("WARNING", logger="xkd"):
        P.preflight(resolve(cfg), build_dataset(cfg.data))
    assert "evaluation.metrics: pointing_game, mask_mass need ground-truth masks and digits has none" in caplog.text
    # the default list and one mask metric beyond it: only that one is said
    caplog.clear()
    extra = f"evaluation.metrics=[{', '.join(default_metrics())}, region_precision]"
    cfg = load_config(None, make_tiny_args(tmp_path, extra))
    with caplog.at_level("WARNING", logger="xkd"):
        P.preflight(resolve(cfg), build_dataset(cfg.data))
    assert "evaluation.metrics: region_precision needs ground-truth masks and digits has none, so it is" in caplog.text


@pytest.mark.parametrize(
    "bad, match, smallest",
    [
        # the sanity metrics' SSIM needs 3x3 maps: 2x2 images trained every model, then raised in scoring
        (
            "data.image_size=2",
            r"evaluation.metrics: randomisation_sanity needs images of at least 3x3; the digits images are 2x2: "
            r"raise data.image_size or drop it",
            "data.image_size=3",
        ),
        # distance correlation needs 4 samples: a 2-image test split trained every model, then raised
        (
            "data.test_size=3",
            r"evaluation.metrics: fss needs at least 4, rs needs at least 4 explained images and the run explains "
            r"3 \(the test split has 3\): explain more test images \(evaluation.num_images, data.test_size, or more "
            r"data\), or drop them",
            "evaluation.num_images=4",
        ),
    ],
)
def test_a_metric_that_cannot_score_this_little_fails_before_training(tmp_path, make_tiny_args, bad, match, smallest):
    cfg = load_config(None, make_tiny_args(tmp_path, bad))
    with pytest.raises(ConfigError, match=match):
        P.preflight(resolve(cfg), build_dataset(cfg.data))
    cfg = load_config(None, make_tiny_args(tmp_path, smallest))
    P.preflight(resolve(cfg), build_dataset(cfg.data))  # the least it scores
    cfg = load_config(None, make_tiny_args(tmp_path, "evaluation.num_images=4"))
    P.preflight(resolve(cfg), build_dataset(cfg.data))


def out_of_memory(gib: str):
    """A stand-in that raises torch's out-of-memory error, as a GPU does, asking for ``gib`` GiB."""

    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {gib} GiB")

    return oom


@pytest.mark.parametrize(
    "stage, match",
    [
        (  # an OOM in the explainers came as a raw CUDA traceback after all training, naming no setting
            "evaluate_run",
            r"explaining and scoring, after every model had trained \(CUDA out of memory. Tried to allocate 9.00 GiB\): "
            r"lower evaluation.batch_size \(now 32\).*--resume",
        ),
        (  # the teacher-logit pass (and the test scores) run outside the trainer's own OOM handling
            "predict_logits",
            r"cpu \(\d+ threads\) ran out of memory while training \(CUDA out of memory. Tried to allocate 9.00 GiB\): "
            r"lower train.batch_size or evaluation.batch_size \(now 32\); the models trained so far are kept",
        ),
    ],
)
def test_out_of_memory_outside_the_trainer_is_one_error_and_resume_goes_on(
    tmp_path, make_tiny_args, monkeypatch, stage, match
):
    real = getattr(P, stage)
    monkeypatch.setattr(P, stage, out_of_memory("9.00"))
    with pytest.raises(DeviceMemoryError, match=match):
        P.run(load_config(None, make_tiny_args(tmp_path)), progress=False)
    if stage != "evaluate_run":
        return
    monkeypatch.setattr(P, stage, real)  # a lower evaluation batch: the models are evaluated, not trained again
    monkeypatch.setattr(Trainer, "_train_epoch", lambda self, *a: pytest.fail(f"{self.role} trained again"))
    path = P.run(load_config(None, make_tiny_args(tmp_path, "evaluation.batch_size=16")), resume=True, progress=False)
    assert {"teacher", "scratch", "kd"} <= set(read_json(path / "metrics.json")["models"])
