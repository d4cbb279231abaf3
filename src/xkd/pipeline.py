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
    """A trained network and how it came to be."""

    role: str
    model: nn.Module
    model_name: str
    distiller: str | None = None
    distiller_params: dict[str, Any] = field(default_factory=dict)
    result: TrainResult = field(default_factory=TrainResult)
    from_cache: bool = False
    last_test: dict[str, float] | None = None
    assistant: TrainedModel | None = None


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


def prepare_run_dir(cfg: RunConfig, resume: bool, overwrite: bool) -> Path:
    run_dir = run_dir_of(cfg)
    if run_dir.exists() and any(run_dir.iterdir()):
        if overwrite:
            if not (run_dir / "config.yaml").is_file():
                raise RunExistsError(f"{run_dir} is not empty and is not an xkd run directory; refusing to delete it")
            if is_writer():
                shutil.rmtree(run_dir)
        elif not resume:
            raise RunExistsError(
                f"run directory {run_dir} already exists; pass --resume to continue it, --overwrite to start "
                "over, or choose another name (--set name=NEW)"
            )
    D.barrier()
    if is_writer():
        for sub in ("records", "figures", "checkpoints"):
            (run_dir / sub).mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    D.barrier()
    return run_dir


def train_teacher(
    cfg: RunConfig, data: DataBundle, run_dir: Path, device: torch.device, resume: bool, progress: bool
) -> TrainedModel:
    """Train the teacher, or load it from ``teacher.checkpoint`` or the cache keyed by its config."""
    teacher = build_for(cfg.teacher.model, data, cfg.seed)
    ckpt_dir = run_dir / "checkpoints" / "teacher"
    given = cfg.teacher.checkpoint
    cached = cache_dir_of(cfg) / "teachers" / teacher_cache_key(cfg)
    source = Path(given) if given else cached / "best.pt"
    if source.is_file():
        state = load_checkpoint(source)
        load_weights(teacher, model_weights(state), str(source))
        result = TrainResult(history=list(state.get("history", [])), best_epoch=int(state.get("best_epoch", 0)))
        if is_writer():
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, ckpt_dir / "best.pt")
        log.info("teacher loaded from %s", source)
        return TrainedModel("teacher", teacher.to(device), cfg.teacher.model.name, result=result, from_cache=True)
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
        cached.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(cached / "best.pt", (ckpt_dir / "best.pt").read_bytes())
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
        if assistant is not None:
            trained.assistant = assistant
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
    its last epoch (``last_test``: users of other KD frameworks compare best and last)."""
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
    distiller = build_distiller(distiller_name, student, teacher, params, context)
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
        role, model, model_cfg.name, distiller_name, to_dict(distiller.params), result, last_test=last_test
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
    run_dir = prepare_run_dir(cfg, resume, overwrite)
    data = build_dataset(cfg.data)
    if data.skipped_files:
        log.warning("%d unreadable file(s) skipped, e.g. %s", len(data.skipped_files), data.skipped_files[0])
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
