"""``xkd sweep``: an Optuna study whose trials are ordinary xkd runs.

Optuna samples, prunes and keeps the study; this module only turns a trial into a run and a run's
records into the trial's scores:

- every trial is ``xkd run`` of the config with the trial's values set at their config paths (as
  ``--set`` sets them), written to ``<output_dir>/<name>-sweep/trial-NNNN/``; the teacher is
  trained once, by the first trial, and later trials (and ``xkd run --config best.yaml``) load it
  from the teacher cache, which every trial shares with the sweep's ``output_dir``;
- the study lives in an SQLite file in the sweep folder unless ``--storage`` names a database
  (any SQLAlchemy URL: ``postgresql://user:pass@host/db``), so several processes, on one machine or
  many, can work on one study;
- the study ends with exactly ``sweep.trials`` finished (complete or pruned) trials counted over
  every process: a process stops asking for trials when the finished and running ones fill the
  budget, and a trial that finds the budget filled when it starts (two processes asking at the same
  moment) is marked failed with ``over_budget`` and not run;
- a trial left running by a process that died (its process is gone from this machine, or its
  heartbeat in a database server stopped) is marked failed and its values are enqueued again
  (``study.enqueue_trial``), so the slot is retried; one interrupted with Ctrl-C is enqueued again
  at once. A retried trial continues from the checkpoints its first attempt left.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import time
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState
from rich.console import Console

from xkd.cache import Cache
from xkd.config import RunConfig
from xkd.config_files import save_config
from xkd.engine.callbacks import Callback
from xkd.errors import ConfigError, DeviceMemoryError, NonFiniteLossError, RunExistsError
from xkd.files import hide_password, read_json
from xkd.pipeline import teacher_cache_key
from xkd.plan import validate_config
from xkd.rundir import BEST, RunDir, cache_root, not_this_kind
from xkd.runner import run
from xkd.schema import from_dict, to_dict
from xkd.sweeps.outputs import SweepDir, write_outputs
from xkd.sweeps.plan import SweepPlan, UndefinedObjectiveError, resolve_sweep, teacher_paths, with_values
from xkd.sweeps.workers import FINISHED, HOST, Budget, file_lock, occupied, reap, reap_lock, retry, states
from xkd.tracking import mlflow_uri

log = logging.getLogger("xkd")

HEARTBEAT_SECONDS = 30
"""How often a running trial tells a database server it is alive (not used with SQLite: all its
workers share one machine, where a dead worker is found by its process id at once)."""
GRACE_SECONDS = 120
"""After this long without a heartbeat a trial counts as abandoned."""

RETRYABLE = (NonFiniteLossError, DeviceMemoryError, UndefinedObjectiveError)
"""Errors a trial's settings can cause (a diverging learning rate, a batch too large, a collapsed
student whose score is undefined): the trial is recorded as failed and the sweep goes on. Any other
error stops the sweep (after writing its outputs for the trials that finished)."""

CREATION_RACE = ("already exists", "UNIQUE constraint failed", "duplicate key", "database is locked")
"""What opening a new database says when another worker is creating its tables at the same moment."""

CONFIG_ATTR = "xkd_config"


class OverBudget(Exception):
    """The trial started after the budget was filled by other processes; it is not run."""


def sweep(
    cfg: RunConfig,
    trials: int | None = None,
    *,
    storage: str | None = None,
    study_name: str | None = None,
    timeout: float | None = None,
    resume: bool = False,
    progress: bool = True,
) -> Path:
    """Search ``cfg.sweep.params`` with Optuna, each trial an xkd run; returns the sweep folder.

    Args:
        cfg: a validated run config with a ``sweep:`` section.
        trials: finished trials the study ends with (default ``sweep.trials``), over all processes.
        storage: an SQLAlchemy URL of the study's database (default: ``study.db`` in the sweep folder).
        study_name: the study's name in the storage (default: the config's ``name``).
        timeout: stop asking for new trials after this many seconds (a running trial finishes).
        resume: continue the sweep folder and study that exist (and join a study other processes work on).
        progress: progress bars while trials train (the sweep's and each trial's lines print either way).

    The folder holds ``sweep.html``, ``best.yaml`` (``pareto/`` with several objectives),
    ``records/sweep.json`` and one run directory per trial.
    """
    if trials is not None:
        if trials < 1:
            raise ConfigError(f"trials (--trials) must be >= 1, got {trials}")
        cfg = dataclasses.replace(cfg, sweep=dataclasses.replace(cfg.sweep, trials=trials))  # the caller's is kept
    if timeout is not None and timeout <= 0:
        raise ConfigError(f"timeout (--timeout) must be > 0 seconds, got {timeout}")
    plan = resolve_sweep(cfg)
    for path in teacher_paths(plan):
        log.warning("sweep.params.%s changes the teacher: each of its values trains a teacher of its own", path)
    out = SweepDir.of(cfg)
    if out.is_empty():
        if resume:
            log.info("--resume: nothing to resume in %s (no sweep there yet); starting a new one", out.path)
    elif not out.is_sweep():  # --resume would write the study and trials among other files
        raise not_this_kind(out.path, RunDir(out.path).kind(), "sweep", resume=resume)
    elif not resume:
        raise RunExistsError(
            f"sweep folder {out.path} already exists; pass --resume to continue its study (also to add a "
            "worker to it), or choose another name (--set name=NEW)"
        )
    if storage is None:  # the default SQLite file lives in the sweep folder
        out.path.mkdir(parents=True, exist_ok=True)
    url = storage or out.default_storage()
    name = study_name or cfg.name
    held = read_json(out.record).get("study") if out.record.is_file() else None
    if held not in (None, name):  # its trial-0000/... were written over, and sweep.json replaced
        raise ConfigError(
            f"--study {name}: {out.path} holds study {held!r}, whose trial folders a new study's would overwrite; "
            f"give the new study a folder of its own (--set name=NEW), or continue {held!r} (--study {held})"
        )
    console = Console(stderr=True)  # its lines print with or without progress bars (``progress``: bars only)
    study = open_study(url, name, plan, resume)
    out.path.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out.config)
    t0 = time.perf_counter()
    with _quiet_optuna():
        lock = reap_lock(url, out)
        reap(study, lock)
        try:
            if occupied(study) < plan.trials:
                console.print(
                    f"[bold]xkd sweep[/bold] {cfg.name!r}: {len(states(study, FINISHED))} of {plan.trials} trials "
                    f"finished, study {name!r} in {hide_password(url)}"
                )
                objective = TrialRunner(study, plan, out, lock, progress, console)
                study.optimize(
                    objective,
                    timeout=timeout,
                    catch=(OverBudget, *RETRYABLE),
                    callbacks=[Budget(plan.trials, lock)],
                    gc_after_trial=True,
                )
        except BaseException:  # Ctrl-C or an error that stops the sweep: keep what the finished trials found
            with contextlib.suppress(Exception):
                write_outputs(study, plan, out, url)
                console.print(f"sweep stopped; the finished trials are in {out.page}")
            raise
        page = write_outputs(study, plan, out, url)
    console.print(f"sweep report: {page}  ({time.perf_counter() - t0:.0f} s)")
    return out.path


# -- the study ----------------------------------------------------------------------------------------


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """The study's database; a server database gets heartbeats, so a dead worker's trial is found."""
    sqlite = url.startswith("sqlite")
    engine_kwargs: dict[str, Any] = {"connect_args": {"timeout": 60}} if sqlite else {"pool_pre_ping": True}
    heartbeat: dict[str, Any] = {}
    if not sqlite:
        heartbeat = dict(
            heartbeat_interval=HEARTBEAT_SECONDS,
            grace_period=GRACE_SECONDS,
            heartbeat_stale_trial_callback=retry,
        )
    for attempt in range(3):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **heartbeat)
        except ImportError as e:
            raise ConfigError(
                f"--storage {hide_password(url)}: its database driver is not installed ({e}); for PostgreSQL "
                "`pip install 'psycopg[binary]'` and write postgresql+psycopg://..., or `pip install psycopg2-binary`"
            ) from None
        except Exception as e:  # SQLAlchemy's errors: a bad URL, a refused connection, a table race
            if attempt == 2 or not any(m in str(e) for m in CREATION_RACE):
                why = " ".join(str(e).split("(Background on this error")[0].split())  # one line
                raise ConfigError(f"--storage {hide_password(url)}: cannot open the study's database: {why}") from None
            time.sleep(1.0)  # two workers creating the tables at the same moment: the other one won
    raise AssertionError("unreachable")


def open_study(url: str, name: str, plan: SweepPlan, resume: bool) -> optuna.Study:
    """Create the study, or (``resume``) load it and check it was made by the same config."""
    key = config_key(plan.cfg)
    with _quiet_optuna():
        storage = open_storage(url)
        try:
            study = optuna.create_study(
                storage=storage,
                study_name=name,
                directions=plan.directions,
                sampler=make_sampler(plan, plan.seed),
                pruner=make_pruner(plan),
            )
        except optuna.exceptions.DuplicatedStudyError:
            if not resume:
                raise RunExistsError(
                    f"study {name!r} already exists in {hide_password(url)}; pass --resume to continue it (or to add "
                    "a worker to it), or choose another name (--study NEW)"
                ) from None
            # a worker joining a study samples with a seed of its own, else every worker would draw the same values
            seed = zlib.crc32(f"{plan.seed}/{HOST}/{os.getpid()}".encode())
            study = optuna.load_study(
                study_name=name, storage=storage, sampler=make_sampler(plan, seed), pruner=make_pruner(plan)
            )
            check_same_sweep(study, plan, key, url)
            return study
        study.set_metric_names([o.name for o in plan.objectives])
        study.set_user_attr(CONFIG_ATTR, key)
    return study


def check_same_sweep(study: optuna.Study, plan: SweepPlan, key: dict[str, Any], url: str) -> None:
    """A resumed study must optimise the same objectives of the same config."""
    names = [o.name for o in plan.objectives]
    wanted = [
        optuna.study.StudyDirection.MAXIMIZE if d == "maximize" else optuna.study.StudyDirection.MINIMIZE
        for d in plan.directions
    ]
    if study.metric_names not in (None, names) or list(study.directions) != wanted:
        raise ConfigError(
            f"study {study.study_name!r} in {hide_password(url)} optimises {study.metric_names or 'other objectives'}, "
            f"this config {names} ({', '.join(plan.directions)}); start another study in its own folder "
            "(--set name=NEW)"
        )
    stored = study.user_attrs.get(CONFIG_ATTR)
    if stored is not None and stored != key:
        diff = sorted(k for k in set(stored) | set(key) if stored.get(k) != key.get(k))
        raise ConfigError(
            f"study {study.study_name!r} in {hide_password(url)} was started with another config (it differs in: "
            f"{', '.join(diff)}); resume it with the same config, or start another study in its own folder "
            "(--set name=NEW)"
        )


def config_key(cfg: RunConfig) -> dict[str, Any]:
    """What must match between the processes of one study: the config without what names or places
    it, the machine's device and the trial budget."""
    key = to_dict(cfg)
    for k in ("name", "output_dir", "cache_dir", "device", "tracking"):
        key.pop(k, None)
    key["sweep"].pop("trials", None)
    return json.loads(json.dumps(key))


def make_sampler(plan: SweepPlan, seed: int) -> optuna.samplers.BaseSampler:
    if plan.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if plan.sampler == "nsga2":  # a small population, else a 20-trial budget never leaves the first generation
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(4, min(50, plan.trials // 4)))
    return optuna.samplers.TPESampler(seed=seed)


def make_pruner(plan: SweepPlan) -> optuna.pruners.BasePruner:
    if plan.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=0)
    return optuna.pruners.NopPruner()


@contextlib.contextmanager
def _quiet_optuna() -> Iterator[None]:
    """Optuna's experimental-feature warnings (heartbeats, metric names) say nothing to a user, and
    its per-trial log lines repeat the sweep's own."""
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            yield
    finally:
        optuna.logging.set_verbosity(verbosity)


# -- one trial ----------------------------------------------------------------------------------------


class ReportValAccuracy(Callback):
    """Reports the watched student's best validation accuracy so far (the trial's score, when it is
    the objective) to Optuna after every epoch, and raises ``optuna.TrialPruned`` when the pruner says
    so (the epoch's checkpoints are already written). After the last epoch it only reports: the
    training is done, and pruning then would throw away a finished trial."""

    def __init__(self, trial: optuna.Trial, role: str, earlier: dict[int, float] | None = None) -> None:
        """``earlier``: the values a failed attempt of this trial reported, by epoch (a retried trial
        resumes from its checkpoints, so its history, and its score, start with those epochs)."""
        self.trial, self.role = trial, role
        self.epochs: int | None = None
        self.best = -math.inf
        for epoch, value in sorted((earlier or {}).items()):
            self.best = max(self.best, value)
            trial.report(self.best, epoch)

    def on_train_start(self, role: str, epochs: int) -> None:
        if role == self.role:
            self.epochs = epochs

    def on_epoch_end(self, role: str, epoch: int, stats: dict[str, Any]) -> None:
        if role != self.role or stats.get("val_accuracy") is None:
            return
        self.best = max(self.best, float(stats["val_accuracy"]))
        self.trial.report(self.best, epoch)
        if epoch != self.epochs and self.trial.should_prune():
            raise optuna.TrialPruned(
                f"{role}: best validation accuracy {self.best:.4f} after epoch {epoch} of {self.epochs}"
            )


class TeacherLock(Callback):
    """Holds the sweep's teacher lock until the trial's first student starts training (the teacher is
    cached by then), so concurrent first trials train the teacher once, not once each."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._held: contextlib.ExitStack | None = None

    def __enter__(self) -> TeacherLock:
        self._held = contextlib.ExitStack()
        self._held.enter_context(file_lock(self.path))
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def release(self) -> None:
        if self._held is not None:
            self._held.close()
            self._held = None

    def on_train_start(self, role: str, epochs: int) -> None:
        if role != "teacher":
            self.release()


class TrialRunner:
    """The study's objective: one trial = one xkd run; returns the objectives read from its records."""

    def __init__(
        self, study: optuna.Study, plan: SweepPlan, out: SweepDir, lock: Path, progress: bool, console: Console
    ) -> None:
        self.study, self.plan, self.out, self.lock = study, plan, out, lock
        self.progress, self.console = progress, console

    def __call__(self, trial: optuna.Trial) -> float | list[float]:
        trial.set_user_attr("worker", {"host": HOST, "pid": os.getpid()})
        reap(self.study, self.lock)
        if self._over_budget(trial):
            trial.set_user_attr("over_budget", True)
            self.study.stop()
            raise OverBudget(f"trial {trial.number}: the budget of {self.plan.trials} trials is filled; not run")
        values = {p.path: p.suggest(trial) for p in self.plan.params}
        cfg = self.trial_config(trial.number, values)
        run_dir = RunDir.of(cfg)
        trial.set_user_attr("run_dir", run_dir.path.name)
        resume = self._continue_from(trial.user_attrs.get("retry_of"), run_dir, cfg)
        shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
        self.console.print(f"[bold]trial {trial.number}[/bold]: {shown}")
        callbacks: list[Callback] = []
        if self.plan.watched_student is not None:
            earlier = _frozen(self.study, trial.user_attrs["retry_of"]).intermediate_values if resume else None
            callbacks.append(ReportValAccuracy(trial, self.plan.watched_student, earlier))
        t0 = time.perf_counter()
        try:
            with self._teacher_lock(cfg) as lock:
                run(cfg, resume=resume, progress=self.progress, callbacks=[*callbacks, *([lock] if lock else [])])
        except KeyboardInterrupt:
            trial.set_user_attr("interrupted", True)
            retry(self.study, _frozen(self.study, trial))
            raise
        except RETRYABLE as e:
            trial.set_user_attr("error", str(e))
            raise
        try:
            scores = [o.read(run_dir.path) for o in self.plan.objectives]
        except UndefinedObjectiveError as e:
            trial.set_user_attr("error", str(e))
            raise
        shown = ", ".join(f"{o.name} {v:.4g}" for o, v in zip(self.plan.objectives, scores))
        self.console.print(f"trial {trial.number}: {shown} ({time.perf_counter() - t0:.0f} s)")
        return scores[0] if len(scores) == 1 else scores

    def trial_config(self, number: int, values: dict[str, Any]) -> RunConfig:
        """The sweep's config with the trial's values, run as ``<sweep folder>/trial-NNNN`` with the
        sweep's teacher cache (and MLflow store); its ``sweep`` section is left out (a trial is a plain run)."""
        raw = with_values(self.plan.cfg, values)
        raw.pop("sweep", None)
        raw.update(
            name=self.out.trial_name(number), output_dir=str(self.out.path), cache_dir=str(cache_root(self.plan.cfg))
        )
        raw["tracking"]["run_name"] = f"{self.out.path.name}/{raw['name']}"  # MLflow tells sweeps apart
        uri, _, default_store = mlflow_uri(self.plan.cfg)
        if self.plan.cfg.tracking.backend == "mlflow" and default_store:
            # the local store of the sweep's output_dir, as best.yaml's (a URI the user gave, in the config
            # or $MLFLOW_TRACKING_URI, reaches the trials as it is, and is never written into their configs)
            raw["tracking"]["uri"] = uri
        cfg = from_dict(RunConfig, raw)
        validate_config(cfg)
        return cfg

    def _over_budget(self, trial: optuna.Trial) -> bool:
        """Whether the trials numbered before this one, finished, running or waiting, fill the budget."""
        counted = (*FINISHED, TrialState.RUNNING, TrialState.WAITING)
        return sum(t.number < trial.number for t in states(self.study, counted)) >= self.plan.trials

    def _continue_from(self, retry_of: Any, run_dir: RunDir, cfg: RunConfig) -> bool:
        """A retried trial starts from the checkpoints its failed attempt left (same settings), in a run
        folder made with its config first (``--resume`` continues a run folder only)."""
        if not isinstance(retry_of, int):
            return False
        previous = self.out.path / self.out.trial_name(retry_of) / "checkpoints"
        if not previous.is_dir():
            return False
        if run_dir.is_empty():
            run_dir.create(cfg)
        shutil.copytree(previous, run_dir.checkpoints, dirs_exist_ok=True)
        return True

    def _teacher_lock(self, cfg: RunConfig) -> contextlib.AbstractContextManager[TeacherLock | None]:
        cached = Cache(cache_root(cfg)).folder("teachers", teacher_cache_key(cfg)) / BEST
        if cfg.teacher.checkpoint or cached.is_file():
            return contextlib.nullcontext()
        return TeacherLock(self.out.teacher_lock)


def _frozen(study: optuna.Study, trial: optuna.Trial | int) -> FrozenTrial:
    number = trial if isinstance(trial, int) else trial.number
    return next(t for t in study.get_trials(deepcopy=False) if t.number == number)
