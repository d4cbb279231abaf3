"""The bookkeeping the worker processes of one sweep share: the budget of finished trials, and the
trials of workers that died, failed and enqueued again (see :mod:`xkd.sweeps.study`)."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

from xkd.files import sqlite_path
from xkd.sweeps.outputs import SweepDir

log = logging.getLogger("xkd")

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
HOST = socket.gethostname()


def states(study: optuna.Study, wanted: tuple[TrialState, ...]) -> list[FrozenTrial]:
    return study.get_trials(deepcopy=False, states=wanted)


def occupied(study: optuna.Study) -> int:
    """Trials that finished or are running: the budget they take."""
    return len(states(study, (*FINISHED, TrialState.RUNNING)))


class Budget:
    """Stops this process when finished and running trials fill the budget (Optuna's
    ``MaxTrialsCallback`` counting running trials too, after failing those of dead workers), or
    when as many trials as the budget failed for their settings (every one diverging, say)."""

    def __init__(self, trials: int, lock: Path) -> None:
        self.trials, self.lock = trials, lock

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        reap(study, self.lock)
        if occupied(study) >= self.trials:
            study.stop()
        elif sum("error" in t.user_attrs for t in states(study, (TrialState.FAIL,))) >= self.trials:
            log.warning("%d trials failed for their settings (see sweep.html); the sweep stops", self.trials)
            study.stop()


def retry(study: optuna.Study, trial: FrozenTrial) -> None:
    """Enqueue ``trial``'s values again, as a new trial that knows which one it retries."""
    study.enqueue_trial(dict(trial.params), user_attrs={"retry_of": trial.number})
    log.info("trial %d did not finish; its values are enqueued again", trial.number)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):  # a killed child its parent has not waited for yet
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][:1] != "Z"
    return True


def reap_lock(url: str, out: SweepDir) -> Path:
    """The lock the workers of one study take turns under to reap: beside an SQLite file (its workers
    share one machine, whatever their output folders), else in the sweep folder (a server database
    refuses a second update of a finished trial: its row locks do the rest)."""
    database = sqlite_path(url)
    return database.with_name(f"{database.name}.reap.lock") if database is not None else out.path / ".reap.lock"


def reap(study: optuna.Study, lock: Path) -> None:
    """Fail the running trials of workers that died on this machine and enqueue their values again.

    Under a lock in the sweep folder, so two workers never retry one trial twice (SQLite has no row
    locks; a server database also refuses a second update of a finished trial)."""
    with file_lock(lock):
        for t in states(study, (TrialState.RUNNING,)):
            worker = t.user_attrs.get("worker") or {}
            pid = worker.get("pid")
            if worker.get("host") != HOST or not isinstance(pid, int) or pid == os.getpid() or _alive(pid):
                continue
            try:
                study.tell(t.number, state=TrialState.FAIL)
            except (ValueError, RuntimeError):  # another process finished it meanwhile
                continue
            retry(study, t)


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` between the processes of this machine."""
    try:
        import fcntl
    except ImportError:  # no fcntl (Windows): one worker per sweep folder there
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
