"""``xkd run``: plan -> train -> explain and score -> records.

The config is resolved once into a :class:`~xkd.plan.RunPlan`. The teacher is trained first (or
loaded from the cache keyed by its config, or from ``teacher.checkpoint``), then each student is
distilled from it; :func:`xkd.evaluate.evaluate_run` scores them and writes the records. Only rank 0
writes. The report is rendered from the records by :func:`xkd.runner.run` (``xkd run``).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import Tensor, nn

from xkd import tracking
from xkd.cache import Cache
from xkd.config import RunConfig, TrainConfig
from xkd.data import DataBundle, build_dataset, make_loader
from xkd.data.augment import BatchAugment
from xkd.data.base import dataset_labels
from xkd.distill import build_distiller
from xkd.distill.base import DistillContext
from xkd.engine import distributed as D
from xkd.engine.callbacks import Callback, call
from xkd.engine.checkpoint import FORMAT, load_checkpoint, load_weights, model_weights
from xkd.engine.runtime import configure_determinism, device_memory_errors, predict_logits
from xkd.engine.trained import TrainedModel
from xkd.engine.trainer import Trainer, TrainResult
from xkd.errors import ConfigError, ContractError
from xkd.evaluate import evaluate_run
from xkd.files import atomic_write_bytes, is_writer
from xkd.metrics.classification import evaluate_model
from xkd.models import build_model
from xkd.plan import RunPlan, StudentSpec, check_resume, resolve
from xkd.prepare import build_for, check_training_settings, preflight
from xkd.rundir import BEST, LAST, RunDir, cache_root, read_train_info, write_train_info
from xkd.schema import to_dict

log = logging.getLogger("xkd")


def data_key(cfg: RunConfig) -> dict[str, Any]:
    """The data config as cache keys see it: without ``augment`` when it is off, so caches written
    before augmentation existed stay valid."""
    key = to_dict(cfg.data)
    if not cfg.data.augment.enabled:
        key.pop("augment", None)
    return key


def train_key(train: TrainConfig) -> dict[str, Any]:
    """A training config as cache keys see it: the step settings left out at their defaults (a
    cache written before they existed trained with those), the loader's worker count and the
    TensorBoard switch always (they do not change the weights)."""
    key = to_dict(train)
    key.pop("num_workers", None)
    key.pop("tensorboard", None)
    for name, default in (("amp", "auto"), ("channels_last", False), ("compile", False)):
        if key.get(name) == default:
            key.pop(name)
    if key["optimizer"].get("fused") == "auto":
        key["optimizer"].pop("fused")
    return key


def teacher_cache_key(cfg: RunConfig) -> str:
    """Hash of everything that determines the trained teacher's weights."""
    return Cache.key(
        {
            "data": data_key(cfg),
            "model": to_dict(cfg.teacher.model),
            "train": train_key(cfg.teacher.train),
            "seed": cfg.seed,
            "format": FORMAT,
        }
    )


def prepare_run_dir(run_dir: RunDir, cfg: RunConfig, resume: bool, overwrite: bool) -> None:
    """Check, clear (``overwrite``) and create the run directory; only rank 0 writes."""
    run_dir.check(resume, overwrite)
    if overwrite and is_writer():
        run_dir.clear()
    D.barrier()
    if is_writer():
        # the new config.yaml goes in now, the records at the end: a resumed run that stopped between
        # them looked finished with the new config while its records were the old ones. metrics.json,
        # written last, marks a run finished; it goes until this run writes it again
        run_dir.metrics.unlink(missing_ok=True)
        run_dir.create(cfg)
    D.barrier()


def train_teacher(
    cfg: RunConfig,
    data: DataBundle,
    run_dir: RunDir,
    device: torch.device,
    resume: bool,
    progress: bool,
    callbacks: Sequence[Callback] = (),
) -> TrainedModel:
    """Train the teacher, or load it from ``teacher.checkpoint`` or the cache keyed by its config.

    A trained teacher's time and epochs are stored next to its checkpoints (``best.train.json`` in the
    run's ``checkpoints/teacher/`` and in the cache); a loaded teacher reports that time (not 0 s), so a
    comparison whose later seeds reuse the first seed's teacher averages the real cost, and its whole
    history (``best.pt`` holds the epochs up to the best one)."""
    teacher = build_for(cfg.teacher.model, data, cfg.seed)
    ckpt = run_dir.checkpoint("teacher")
    cached = Cache(cache_root(cfg)).folder("teachers", teacher_cache_key(cfg))
    given = cfg.teacher.checkpoint
    source = Path(given).expanduser() if given else cached / BEST
    if source.is_file():
        state = load_checkpoint(source)
        load_weights(teacher, model_weights(state), str(source))
        info = read_train_info(source)
        seconds = info.get("seconds") if info else None
        kept = info.get("history") if info else None  # every epoch it trained; best.pt's stops at the best
        result = TrainResult(
            history=list(kept if isinstance(kept, list) and kept else state.get("history", [])),
            best_epoch=int(state.get("best_epoch", 0)),
            seconds=float(seconds) if isinstance(seconds, (int, float)) else None,
        )
        if is_writer():
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, ckpt)
            if info is not None:  # a run loading this run's teacher finds the time too
                write_train_info(ckpt, {k: v for k, v in info.items() if k != "checkpoint_sha256"})
        took = "an unknown time" if result.seconds is None else f"{result.seconds:.1f} s"
        log.info("teacher loaded from %s (it trained in %s)", source, took)
        return TrainedModel(
            "teacher",
            teacher.to(device),
            cfg.teacher.model.name,
            result=result,
            from_cache=True,
            loaded_from=str(source),
        )
    distiller = build_distiller("scratch", teacher)
    trainer = trainer_for(
        distiller, data.train, data, cfg.teacher.train, run_dir, "teacher", cfg, device, progress, callbacks
    )
    result = trainer.fit_and_restore(resume=resume)
    if is_writer():
        info = {"seconds": result.seconds, "best_epoch": result.best_epoch, "epochs": len(result.history)}
        info["history"] = result.history  # best.pt holds the epochs up to the best one only
        write_train_info(ckpt, info)
        cached.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(cached / BEST, ckpt.read_bytes())
        write_train_info(cached / BEST, info)
    return TrainedModel("teacher", teacher, cfg.teacher.model.name, result=result)


def trainer_for(
    distiller: nn.Module,
    train: Any,
    data: DataBundle,
    train_cfg: Any,
    run_dir: RunDir,
    role: str,
    cfg: RunConfig,
    device: torch.device,
    progress: bool,
    callbacks: Sequence[Callback] = (),
) -> Trainer:
    """The trainer of one model of the run: its checkpoints under ``checkpoints/<role>``, the
    training batches augmented as ``data.augment`` says."""
    return Trainer(
        distiller,
        train,
        data.val,
        train_cfg,
        checkpoint_dir=run_dir.checkpoint_dir(role),
        seed=cfg.seed,
        device=device,
        role=role,
        progress=progress,
        augment=BatchAugment(cfg.data.augment, data.image_shape),
        callbacks=callbacks,
    )


def weights_key(model: nn.Module) -> str:
    """SHA-256 of a model's state (names, shapes and values): identifies a trained teacher in cache keys."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def train_students(
    plan: RunPlan,
    data: DataBundle,
    teacher: nn.Module,
    run_dir: RunDir,
    device: torch.device,
    resume: bool,
    progress: bool,
    callbacks: Sequence[Callback] = (),
) -> list[TrainedModel]:
    """Distil every planned student from ``teacher`` with the same data and budget.

    A ``teacher_assistant`` student is a chain: its assistant is distilled from ``teacher`` first
    (checkpoints under ``checkpoints/<name>.assistant``), then the student from the assistant."""
    out = []
    for spec in plan.students:
        source, assistant = teacher, None
        if spec.assistant is not None:
            assistant = distil(plan.cfg, data, teacher, spec.assistant, run_dir, device, resume, progress, callbacks)
            source = assistant.model.eval().requires_grad_(False)
        trained = distil(plan.cfg, data, source, spec, run_dir, device, resume, progress, callbacks)
        if assistant is not None:  # the student's cost includes the assistant it could not exist without
            trained.assistant = assistant
            trained.assistant_seconds = assistant.train_seconds
        out.append(trained)
    return out


def distil(
    cfg: RunConfig,
    data: DataBundle,
    teacher: nn.Module,
    spec: StudentSpec,
    run_dir: RunDir,
    device: torch.device,
    resume: bool,
    progress: bool,
    callbacks: Sequence[Callback] = (),
) -> TrainedModel:
    """Train student ``spec`` from ``teacher`` under ``checkpoints/<role>``; returns it with its best
    checkpoint loaded, and the test scores of its last epoch (``last_test``: users of other KD
    frameworks compare best and last). The distiller's setup (XDistillation's phase 1, adapters) is
    timed as ``setup_seconds``."""
    student = build_for(spec.model, data, cfg.seed)
    context = DistillContext(
        sample=torch.zeros(2, *data.image_shape),
        train=data.train,
        cache_dir=cache_root(cfg) / "distill",
        teacher_key=weights_key(teacher),
        device=device,
        seed=cfg.seed,
        progress=progress,
    )
    t_setup = time.perf_counter()
    try:
        distiller = build_distiller(spec.distiller, student, teacher, spec.params, context)
    except ContractError as e:  # a user's setup that failed: which student
        raise ContractError(f"student {spec.name!r}: {e}") from e.__cause__
    reused = float(distiller.setup_reused_seconds)
    outputs = None
    if distiller.teacher is not None:
        augmented = cfg.data.augment.enabled
        outputs = "forward per batch (augmented images)" if augmented else "forward per batch"
        if distiller.teacher_logits_only and not augmented:  # one teacher pass serves every epoch
            logits, built = cached_teacher_logits(cfg, data, teacher, device)
            distiller.use_teacher_logits(logits.to(device), dataset_labels(data.train))
            reused += built
            outputs = "cached logits"
        outputs = distiller.teacher_outputs() or outputs
    setup_seconds = time.perf_counter() - t_setup + reused
    trainer = trainer_for(distiller, data.train, data, cfg.train, run_dir, spec.name, cfg, device, progress, callbacks)
    result = trainer.fit(resume=resume)
    model = distiller.student  # the evaluated model: a method may wrap the student (MED-TEX)
    last_test = test_scores(model, data, cfg, device)
    trainer.restore(BEST)
    return TrainedModel(
        spec.name,
        model,
        spec.model.name,
        spec.distiller,
        to_dict(distiller.params),
        result,
        last_test=last_test,
        setup_seconds=setup_seconds,
        setup_reused_seconds=reused,
        teacher_outputs=outputs,
    )


def cached_teacher_logits(
    cfg: RunConfig, data: DataBundle, teacher: nn.Module, device: torch.device
) -> tuple[Tensor, float]:
    """The teacher's logits of every training image, by index: read from the cache (keyed by the
    teacher's weights and the data) or computed once and cached. Returns them and the seconds they
    took when they were computed (0 when computed now: that time is measured by the caller)."""
    cache = Cache(cache_root(cfg))
    key = Cache.key({"teacher": weights_key(teacher), "data": data_key(cfg), "split": "train"})
    path = cache.file("teacher_logits", "train", key)
    stored = cache.read(path, key)
    if stored is not None and stored["logits"].shape[0] == len(data.train):
        return stored["logits"], cache.seconds(path)
    t0 = time.perf_counter()
    logits = predict_logits(teacher, data.train, device)
    if is_writer():
        cache.write(path, key, {"logits": logits}, time.perf_counter() - t0)
    return logits, 0.0


def test_scores(model: nn.Module, data: DataBundle, cfg: RunConfig, device: torch.device) -> dict[str, float]:
    """Accuracy and macro-F1 of ``model`` (as it is now) on the test split."""
    loader = make_loader(data.test, batch_size=cfg.evaluation.batch_size, shuffle=False, seed=cfg.seed)
    scores = evaluate_model(model, loader, data.num_classes, device)  # restores the train/eval flags
    return {"accuracy": scores["accuracy"], "macro_f1": scores["macro_f1"]}


class PermutedLabels(torch.utils.data.Dataset):
    """``dataset`` with its labels shuffled by a seeded permutation (images unchanged): the training
    data of the data-label randomisation check (Adebayo et al., NeurIPS 2018, §3.2)."""

    def __init__(self, dataset: Any, seed: int) -> None:
        self.dataset = dataset
        self.order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple:
        image, _, mask = self.dataset[i]
        return image, self.dataset[self.order[i]][1], mask


def train_random_labels(
    cfg: RunConfig,
    data: DataBundle,
    run_dir: RunDir,
    device: torch.device,
    resume: bool,
    progress: bool,
    callbacks: Sequence[Callback] = (),
) -> TrainedModel:
    """The student architecture trained from scratch on permuted labels, with the students' budget;
    its last epoch is kept (validation accuracy on the true labels means nothing for it)."""
    student = build_for(cfg.student_model, data, cfg.seed)
    distiller = build_distiller("scratch", student)
    train = PermutedLabels(data.train, cfg.seed)
    trainer = trainer_for(distiller, train, data, cfg.train, run_dir, "random_labels", cfg, device, progress, callbacks)
    result = trainer.fit_and_restore(resume=resume, restore=LAST)
    return TrainedModel("random_labels", student.eval(), cfg.student_model.name, "scratch", {}, result)


def run(
    cfg: RunConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    callbacks: Sequence[Callback] = (),
) -> Path:
    """Train, explain and score everything ``cfg`` asks for and write the records; returns the run
    directory (:func:`xkd.runner.run` also renders the report). ``callbacks`` see every model's
    training (:class:`~xkd.engine.callbacks.Callback`) and the end of the run."""
    plan = resolve(cfg)
    tracking.check(cfg)  # a tracker that is not installed fails here, before anything is written
    configure_determinism(cfg.deterministic)
    info = D.init_distributed()
    started = dt.datetime.now(dt.timezone.utc)
    t0 = time.perf_counter()
    device = D.resolve_device(cfg.device, info)
    console = Console(stderr=True)
    run_dir = RunDir.of(cfg)
    run_dir.check(resume, overwrite)
    if resume and not overwrite:
        if not run_dir.is_run():  # check() let it through: empty, or not there yet
            log.info("--resume: nothing to resume in %s (no run there yet); starting a new run", run_dir.path)
        else:
            check_resume(run_dir.config, cfg)
            if run_dir.is_finished() and run_dir.changed_settings(cfg) == []:
                # resume continues an interrupted run: a finished one with the same config has nothing left
                log.info(
                    "%s already finished with this config: nothing to train or score again; its report is "
                    "rendered from its records",
                    run_dir.path,
                )
                return run_dir.path  # xkd.runner.run renders its report from the records
    data = build_dataset(cfg.data)  # an image folder warns of the files it skipped (the report lists them)
    preflight(plan, data)  # wrong layer names and shapes fail here, before any training or file
    check_training_settings(cfg, device)
    # TensorBoard, MLflow; first, so an epoch is logged before a caller's callback may stop the run there.
    # Before the folder is written: an MLflow store that cannot be used left a run folder behind
    callbacks = [*tracking.callbacks_for(cfg, run_dir, resume), *callbacks]
    prepare_run_dir(run_dir, cfg, resume, overwrite)
    if info.is_main:
        console.print(
            f"[bold]xkd[/bold] run {cfg.name!r}: {data.name} {tuple(data.image_shape)}, "
            f"{len(data.train)}/{len(data.val)}/{len(data.test)} train/val/test, device {device}"
        )
    kept = "the models trained so far are kept: rerun with --resume and the lower setting"
    with device_memory_errors(
        device,
        "while training",
        f"lower train.batch_size or evaluation.batch_size (now {cfg.evaluation.batch_size}); {kept}",
    ):  # the trainer's own out-of-memory errors name the epoch; this catches the rest (teacher logits, test scores)
        teacher = train_teacher(cfg, data, run_dir, device, resume, progress, callbacks)
        teacher.model.eval().requires_grad_(False)
        students = train_students(plan, data, teacher.model, run_dir, device, resume, progress, callbacks)
        random_labels = None
        if "data_randomisation_sanity" in cfg.evaluation.metrics:
            random_labels = train_random_labels(cfg, data, run_dir, device, resume, progress, callbacks)
    train_seconds = time.perf_counter() - t0
    if info.is_main:
        with device_memory_errors(
            device,
            "while explaining and scoring, after every model had trained",
            f"lower evaluation.batch_size (now {cfg.evaluation.batch_size}) or an explainer's batch_size / "
            "internal_batch_size. The trained models are kept: rerun with --resume and the lower setting (e.g. "
            "--set evaluation.batch_size=...) to evaluate them without training again",
        ):
            evaluate_run(
                plan,
                data,
                teacher,
                students,
                run_dir,
                device,
                started=started,
                t0=t0,
                train_seconds=train_seconds,
                world_size=info.world_size,
                progress=progress,
                random_labels=random_labels,
            )
        call(callbacks, "on_run_end", run_dir.path)
    D.barrier()
    return run_dir.path


def load_run_models(
    run_dir: str | Path | RunDir, device: torch.device | str = "cpu"
) -> tuple[RunConfig, dict[str, nn.Module], dict[str, Any]]:
    """Rebuild the teacher and students of a finished run from its config and best checkpoints, on
    ``device``, in eval mode.

    Returns the config, the models by role, and the run record.
    """
    run_dir = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    if not run_dir.path.is_dir():
        what = "is a file, not a folder" if run_dir.path.exists() else "does not exist"
        raise ConfigError(f"{run_dir.path} {what}: pass the folder of a finished run (runs/NAME)")
    if run_dir.kind() is None:
        raise ConfigError(f"{run_dir.path} is not a folder xkd wrote: pass the folder of a finished run (runs/NAME)")
    for p in (run_dir.config, run_dir.record("run")):
        if not p.is_file():
            raise ConfigError(
                f"{run_dir.path} is not a finished xkd run: {p.name} is missing (finish it with `xkd run --resume`)"
            )
    cfg = run_dir.read_config()
    record = run_dir.read_record("run")
    c, h, w = record["dataset"]["image_shape"]
    n = len(record["dataset"]["class_names"])
    size = h if h == w else (h, w)
    teacher = build_model(cfg.teacher.model, n, c, size)
    models: dict[str, nn.Module] = {}
    for role, mcfg, student in [("teacher", cfg.teacher.model, None)] + [
        (s.name, s.model or cfg.student_model, s) for s in cfg.students
    ]:
        model = teacher if student is None else build_model(mcfg, n, c, size)
        if student is not None:  # the evaluated model may wrap the student (MED-TEX, XDistillation)
            model = build_distiller(student.distiller, model, teacher, student.params).student
        path = run_dir.checkpoint(role)
        load_weights(model, model_weights(load_checkpoint(path)), str(path))
        models[role] = model.eval()
    for model in models.values():  # after loading: a student may share modules with the teacher
        model.to(device)
    return cfg, models, record
