"""``xkd run``: data -> teacher -> students -> explain -> metrics -> records -> report.

The teacher is trained first (or loaded from a cache keyed by its config, or from
``teacher.checkpoint``), then each student is distilled from it. Evaluation, records and the report
are written by rank 0 only.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import nn

from xkd.config import ConfigError, ModelConfig, RunConfig, save_config, to_dict
from xkd.data import DataBundle, build_dataset
from xkd.distill import build_distiller, distiller_params
from xkd.distill.base import DistillContext
from xkd.engine import distributed as D
from xkd.engine.checkpoint import FORMAT, load_checkpoint, load_weights, model_weights
from xkd.engine.trainer import Trainer, TrainResult
from xkd.models import build_model
from xkd.registry import DISTILLERS
from xkd.report.records import atomic_write_bytes, is_writer

log = logging.getLogger("xkd")


class RunExistsError(FileExistsError):
    """The run directory already holds a run."""


@dataclass
class TrainedModel:
    """A trained network and how it came to be.

    Training time has parts: ``result.seconds`` (the trainer's epoch loop), ``setup_seconds`` (the
    distiller's setup before the loop: adapters, XDistillation's phase 1 of teacher explanations and
    CAE training, including the time cached artefacts took when they were built,
    ``setup_reused_seconds``) and ``assistant_seconds`` (the whole training of the teacher assistant
    the student was distilled from). :attr:`train_seconds` is their sum, the cost compared across
    methods. A model loaded from a checkpoint (``from_cache``; ``loaded_from`` its path) reports the
    time recorded when it was trained, or ``None`` when there is no record.
    """

    role: str
    model: nn.Module
    model_name: str
    distiller: str | None = None
    distiller_params: dict[str, Any] = field(default_factory=dict)
    result: TrainResult = field(default_factory=TrainResult)
    from_cache: bool = False
    last_test: dict[str, float] | None = None
    assistant: TrainedModel | None = None
    setup_seconds: float | None = None
    setup_reused_seconds: float | None = None
    assistant_seconds: float | None = None
    loaded_from: str | None = None

    @property
    def train_seconds(self) -> float | None:
        """Epoch loop + distiller setup + assistant training (None when the loop time is unknown)."""
        if self.result.seconds is None:
            return None
        return self.result.seconds + (self.setup_seconds or 0.0) + (self.assistant_seconds or 0.0)

    def train_record(self) -> dict[str, Any]:
        """The timing part of the ``train`` entry in ``records/models.json``."""
        return {
            "seconds": self.train_seconds,
            "loop_seconds": self.result.seconds,
            "setup_seconds": self.setup_seconds,
            "setup_reused_seconds": self.setup_reused_seconds,
            "assistant_seconds": self.assistant_seconds,
            "from_cache": self.from_cache,
            "loaded_from": self.loaded_from,
        }


def run_dir_of(cfg: RunConfig) -> Path:
    return Path(cfg.output_dir) / cfg.name


def cache_dir_of(cfg: RunConfig) -> Path:
    return Path(cfg.cache_dir) if cfg.cache_dir else Path(cfg.output_dir) / ".cache"


def teacher_cache_key(cfg: RunConfig) -> str:
    """Hash of everything that determines the trained teacher's weights."""
    key = {
        "data": to_dict(cfg.data),
        "model": to_dict(cfg.teacher.model),
        "train": to_dict(cfg.teacher.train),
        "seed": cfg.seed,
        "format": FORMAT,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def build_for(cfg: ModelConfig, data: DataBundle, seed: int) -> nn.Module:
    """Build ``cfg`` for ``data``'s shape with a seeded initialisation."""
    torch.manual_seed(seed)
    c, h, w = data.image_shape
    return build_model(cfg, data.num_classes, c, h if h == w else (h, w))


def check_run_dir(cfg: RunConfig, resume: bool, overwrite: bool) -> Path:
    """Raise :class:`RunExistsError` when the run directory cannot be used as asked; writes nothing."""
    run_dir = run_dir_of(cfg)
    if run_dir.exists() and any(run_dir.iterdir()):
        if overwrite:
            if not (run_dir / "config.yaml").is_file():
                raise RunExistsError(f"{run_dir} is not empty and is not an xkd run directory; refusing to delete it")
        elif not resume:
            raise RunExistsError(
                f"run directory {run_dir} already exists; pass --resume to continue it, --overwrite to start "
                "over, or choose another name (--set name=NEW)"
            )
    return run_dir


def prepare_run_dir(cfg: RunConfig, resume: bool, overwrite: bool) -> Path:
    run_dir = check_run_dir(cfg, resume, overwrite)
    if run_dir.exists() and any(run_dir.iterdir()) and overwrite and is_writer():
        shutil.rmtree(run_dir)
    D.barrier()
    if is_writer():
        for sub in ("records", "figures", "checkpoints"):
            (run_dir / sub).mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    D.barrier()
    return run_dir


def preflight(cfg: RunConfig, data: DataBundle) -> None:
    """Check every student's distiller on UNTRAINED models before anything trains or is written.

    Builds the teacher, each student (and each teacher assistant) architecture and each distiller
    without its setup, so every ``layers`` path is resolved (a wrong one raises
    :class:`~xkd.models.hooks.LayerNotFoundError` listing the model's module paths) and runs the
    distiller's cheap :meth:`~xkd.distill.base.Distiller.preflight` (a dry run checking feature
    shapes). Nothing expensive runs (no XDistillation explanations or CAE training).
    """
    from xkd.models.hooks import LayerNotFoundError

    sample = torch.zeros(2, *data.image_shape)
    teacher = build_for(cfg.teacher.model, data, cfg.seed).eval()

    def check(role: str, name: str, student: nn.Module, source: nn.Module, params: dict[str, Any]) -> None:
        try:
            build_distiller(name, student, source, params).preflight(sample)
        except LayerNotFoundError as e:
            raise LayerNotFoundError(f"student {role!r} (distiller {name!r}): {e}") from None
        except ValueError as e:  # a layer whose output shape the method cannot use: a config mistake
            raise ConfigError(f"student {role!r} (distiller {name!r}): {e}") from e

    for s in cfg.students:
        source = teacher
        if getattr(DISTILLERS.get(s.distiller), "needs_assistant", False):
            p = distiller_params(s.distiller, s.params)
            source = build_for(p.assistant_model(), data, cfg.seed).eval()
            check(f"{s.name}.assistant", p.assistant_distiller, source, teacher, p.assistant_params)
        check(s.name, s.distiller, build_for(s.model or cfg.student_model, data, cfg.seed), source, s.params)


def train_info_path(checkpoint: Path) -> Path:
    """Where the record of how a checkpoint was trained lives: ``best.pt`` -> ``best.train.json``."""
    return checkpoint.with_name(f"{checkpoint.stem}.train.json")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_train_info(checkpoint: Path, info: dict[str, Any]) -> None:
    """Store ``info`` (training seconds, best epoch) next to ``checkpoint``, with the checkpoint's
    SHA-256 so a record is never applied to other weights."""
    data = dict(info, checkpoint_sha256=_sha256(checkpoint))
    atomic_write_bytes(train_info_path(checkpoint), json.dumps(data, indent=1).encode())


def read_train_info(checkpoint: Path) -> dict[str, Any] | None:
    """The record :func:`write_train_info` stored for ``checkpoint``; None when it is missing,
    unreadable or written for other weights (a checkpoint trained before records existed)."""
    path = train_info_path(checkpoint)
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        log.warning("cannot read %s; the training time of %s is unknown", path, checkpoint)
        return None
    if not isinstance(info, dict) or info.get("checkpoint_sha256") != _sha256(checkpoint):
        log.warning("%s does not describe %s (other weights); the training time is unknown", path, checkpoint)
        return None
    return info


def train_teacher(
    cfg: RunConfig, data: DataBundle, run_dir: Path, device: torch.device, resume: bool, progress: bool
) -> TrainedModel:
    """Train the teacher, or load it from ``teacher.checkpoint`` or the cache keyed by its config.

    A trained teacher's time is stored next to its checkpoints (``best.train.json`` in the run's
    ``checkpoints/teacher/`` and in the cache); a loaded teacher reports that time (not 0 s), so a
    comparison whose later seeds reuse the first seed's teacher averages the real cost."""
    teacher = build_for(cfg.teacher.model, data, cfg.seed)
    ckpt_dir = run_dir / "checkpoints" / "teacher"
    given = cfg.teacher.checkpoint
    cached = cache_dir_of(cfg) / "teachers" / teacher_cache_key(cfg)
    source = Path(given) if given else cached / "best.pt"
    if source.is_file():
        state = load_checkpoint(source)
        load_weights(teacher, model_weights(state), str(source))
        info = read_train_info(source)
        seconds = info.get("seconds") if info else None
        result = TrainResult(
            history=list(state.get("history", [])),
            best_epoch=int(state.get("best_epoch", 0)),
            seconds=float(seconds) if isinstance(seconds, (int, float)) else None,
        )
        if is_writer():
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, ckpt_dir / "best.pt")
            if info is not None:  # a run loading this run's teacher finds the time too
                write_train_info(ckpt_dir / "best.pt", {k: v for k, v in info.items() if k != "checkpoint_sha256"})
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
    trainer = Trainer(
        distiller,
        data.train,
        data.val,
        cfg.teacher.train,
        checkpoint_dir=ckpt_dir,
        seed=cfg.seed,
        device=device,
        role="teacher",
        progress=progress,
    )
    result = trainer.fit(resume=resume)
    _load_best(distiller, ckpt_dir / "best.pt")
    if is_writer():
        info = {"seconds": result.seconds, "best_epoch": result.best_epoch, "epochs": len(result.history)}
        write_train_info(ckpt_dir / "best.pt", info)
        cached.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(cached / "best.pt", (ckpt_dir / "best.pt").read_bytes())
        write_train_info(cached / "best.pt", info)
    return TrainedModel("teacher", teacher, cfg.teacher.model.name, result=result)


def weights_key(model: nn.Module) -> str:
    """SHA-256 of a model's state (names, shapes and values): identifies a trained teacher in cache keys."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _load_best(distiller: nn.Module, path: Path) -> None:
    D.barrier()
    load_weights(distiller.trainable_modules(), load_checkpoint(path)["model"], str(path))


def train_students(
    cfg: RunConfig,
    data: DataBundle,
    teacher: nn.Module,
    run_dir: Path,
    device: torch.device,
    resume: bool,
    progress: bool,
) -> list[TrainedModel]:
    """Distil every configured student from ``teacher`` with the same data and budget.

    A ``teacher_assistant`` student is a chain: its assistant is distilled from ``teacher`` first
    (checkpoints under ``checkpoints/<name>.assistant``), then the student from the assistant."""
    out = []
    for s in cfg.students:
        model_cfg = s.model or cfg.student_model
        source, assistant = teacher, None
        if getattr(DISTILLERS.get(s.distiller), "needs_assistant", False):
            p = distiller_params(s.distiller, s.params)
            a_cfg = p.assistant_model()
            assistant = distil(
                cfg, data, teacher, f"{s.name}.assistant", a_cfg, p.assistant_distiller, p.assistant_params,
                run_dir, device, resume, progress,
            )  # fmt: skip
            source = assistant.model.eval().requires_grad_(False)
        trained = distil(cfg, data, source, s.name, model_cfg, s.distiller, s.params, run_dir, device, resume, progress)
        if assistant is not None:  # the student's cost includes the assistant it could not exist without
            trained.assistant = assistant
            trained.assistant_seconds = assistant.train_seconds
        out.append(trained)
    return out


def distil(
    cfg: RunConfig,
    data: DataBundle,
    teacher: nn.Module,
    role: str,
    model_cfg: ModelConfig,
    distiller_name: str,
    params: dict[str, Any],
    run_dir: Path,
    device: torch.device,
    resume: bool,
    progress: bool,
) -> TrainedModel:
    """Train one student of architecture ``model_cfg`` from ``teacher`` with distiller ``distiller_name``
    under ``checkpoints/<role>``; returns it with its best checkpoint loaded, and the test scores of
    its last epoch (``last_test``: users of other KD frameworks compare best and last). The
    distiller's setup (XDistillation's phase 1, adapters) is timed as ``setup_seconds``."""
    student = build_for(model_cfg, data, cfg.seed)
    context = DistillContext(
        sample=torch.zeros(2, *data.image_shape),
        train=data.train,
        cache_dir=cache_dir_of(cfg) / "distill",
        teacher_key=weights_key(teacher),
        device=device,
        seed=cfg.seed,
        progress=progress,
    )
    t_setup = time.perf_counter()
    distiller = build_distiller(distiller_name, student, teacher, params, context)
    reused = float(distiller.setup_reused_seconds)
    setup_seconds = time.perf_counter() - t_setup + reused
    ckpt_dir = run_dir / "checkpoints" / role
    trainer = Trainer(
        distiller,
        data.train,
        data.val,
        cfg.train,
        checkpoint_dir=ckpt_dir,
        seed=cfg.seed,
        device=device,
        role=role,
        progress=progress,
    )
    result = trainer.fit(resume=resume)
    model = distiller.student  # the evaluated model: a method may wrap the student (MED-TEX)
    last_test = test_scores(model, data, cfg, device)
    _load_best(distiller, ckpt_dir / "best.pt")
    return TrainedModel(
        role,
        model,
        model_cfg.name,
        distiller_name,
        to_dict(distiller.params),
        result,
        last_test=last_test,
        setup_seconds=setup_seconds,
        setup_reused_seconds=reused,
    )


def test_scores(model: nn.Module, data: DataBundle, cfg: RunConfig, device: torch.device) -> dict[str, float]:
    """Accuracy and macro-F1 of ``model`` (as it is now) on the test split."""
    from xkd.data import make_loader
    from xkd.metrics.classification import evaluate_model

    loader = make_loader(data.test, batch_size=cfg.evaluation.batch_size, shuffle=False, seed=cfg.seed)
    scores = evaluate_model(model, loader, data.num_classes, device)  # restores the train/eval flags
    return {"accuracy": scores["accuracy"], "macro_f1": scores["macro_f1"]}


class PermutedLabels(torch.utils.data.Dataset):
    """``dataset`` with its labels shuffled by a seeded permutation (images unchanged): the training
    data of the data-label randomisation check (Adebayo et al. 2018, §3.2)."""

    def __init__(self, dataset: Any, seed: int) -> None:
        self.dataset = dataset
        self.order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple:
        image, _, mask = self.dataset[i]
        return image, self.dataset[self.order[i]][1], mask


def train_random_labels(
    cfg: RunConfig, data: DataBundle, run_dir: Path, device: torch.device, resume: bool, progress: bool
) -> TrainedModel:
    """The student architecture trained from scratch on permuted labels, with the students' budget;
    its last epoch is kept (validation accuracy on the true labels means nothing for it)."""
    student = build_for(cfg.student_model, data, cfg.seed)
    distiller = build_distiller("scratch", student)
    ckpt_dir = run_dir / "checkpoints" / "random_labels"
    trainer = Trainer(
        distiller,
        PermutedLabels(data.train, cfg.seed),
        data.val,
        cfg.train,
        checkpoint_dir=ckpt_dir,
        seed=cfg.seed,
        device=device,
        role="random_labels",
        progress=progress,
    )
    result = trainer.fit(resume=resume)
    _load_best(distiller, ckpt_dir / "last.pt")
    return TrainedModel("random_labels", student.eval(), cfg.student_model.name, "scratch", {}, result)


def run(cfg: RunConfig, *, resume: bool = False, overwrite: bool = False, progress: bool = True) -> Path:
    """Run the whole pipeline for ``cfg`` and return the run directory (holding ``report.html``)."""
    from xkd.evaluate import evaluate_run
    from xkd.report.render import render_report

    info = D.init_distributed()
    started = dt.datetime.now(dt.timezone.utc)
    t0 = time.perf_counter()
    device = D.resolve_device(cfg.device, info)
    console = Console(stderr=True)
    check_run_dir(cfg, resume, overwrite)
    data = build_dataset(cfg.data)
    if data.skipped_files:
        log.warning("%d unreadable file(s) skipped, e.g. %s", len(data.skipped_files), data.skipped_files[0])
    preflight(cfg, data)  # wrong layer names and shapes fail here, before any training or file
    run_dir = prepare_run_dir(cfg, resume, overwrite)
    if progress and info.is_main:
        console.print(
            f"[bold]xkd[/bold] run {cfg.name!r}: {data.name} {tuple(data.image_shape)}, "
            f"{len(data.train)}/{len(data.val)}/{len(data.test)} train/val/test, device {device}"
        )
    teacher = train_teacher(cfg, data, run_dir, device, resume, progress)
    teacher.model.eval().requires_grad_(False)
    students = train_students(cfg, data, teacher.model, run_dir, device, resume, progress)
    random_labels = None
    if "data_randomisation_sanity" in cfg.evaluation.metrics:
        random_labels = train_random_labels(cfg, data, run_dir, device, resume, progress)
    train_seconds = time.perf_counter() - t0
    if info.is_main:
        evaluate_run(
            cfg,
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
        html = render_report(run_dir)
        if progress:
            console.print(f"report: {html}  ({time.perf_counter() - t0:.0f} s)")
    D.barrier()
    return run_dir


def load_run_models(run_dir: str | Path) -> tuple[RunConfig, DataBundle | None, dict[str, nn.Module], dict[str, Any]]:
    """Rebuild the teacher and students of a finished run from its config and best checkpoints.

    Returns the config, ``None`` for the data (not rebuilt), the models by role, and the run record.
    """
    import yaml

    from xkd.config import from_dict
    from xkd.report.records import read_json

    run_dir = Path(run_dir)
    cfg_path, rec_path = run_dir / "config.yaml", run_dir / "records" / "run.json"
    for p in (cfg_path, rec_path):
        if not p.is_file():
            raise ConfigError(f"{run_dir} is not a finished xkd run: {p.name} is missing (run `xkd run` first)")
    cfg = from_dict(RunConfig, yaml.safe_load(cfg_path.read_text()))
    record = read_json(rec_path)
    c, h, w = record["dataset"]["image_shape"]
    n = len(record["dataset"]["class_names"])
    models: dict[str, nn.Module] = {}
    size = h if h == w else (h, w)
    teacher = build_model(cfg.teacher.model, n, c, size)
    for role, mcfg, distiller in [("teacher", cfg.teacher.model, None)] + [
        (s.name, s.model or cfg.student_model, s) for s in cfg.students
    ]:
        model = teacher if distiller is None else build_model(mcfg, n, c, size)
        if distiller is not None:  # the evaluated model may wrap the student (MED-TEX, XDistillation)
            model = build_distiller(distiller.distiller, model, teacher, distiller.params).student
        path = run_dir / "checkpoints" / role / "best.pt"
        load_weights(model, model_weights(load_checkpoint(path)), str(path))
        models[role] = model.eval()
    return cfg, None, models, record
