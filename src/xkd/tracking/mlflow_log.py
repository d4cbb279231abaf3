"""Logging a run to MLflow (see :mod:`xkd.tracking`); mlflow is imported only when asked for."""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import socket
import time
import urllib.parse
import urllib.request
import weakref
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from xkd.config import RunConfig
from xkd.engine.callbacks import Callback
from xkd.errors import ConfigError
from xkd.files import hide_password, sqlite_path
from xkd.rundir import RunDir, mlflow_root
from xkd.tracking.logged import epoch_scalars, final_scalars, full_history, hyperparameters

log = logging.getLogger("xkd")
MLFLOW_INSTALL = "pip install 'xkd[mlflow]'"


# -- MLflow -------------------------------------------------------------------------------------------


def check(cfg: RunConfig) -> None:
    """Raise :class:`~xkd.errors.ConfigError` when ``cfg`` asks for a tracker that is not installed, or
    for an MLflow server that takes no connection (call it when validating a config, before anything
    is written or trains)."""
    if cfg.tracking.backend != "mlflow":
        return
    if importlib.util.find_spec("mlflow") is None:
        raise ConfigError(
            f"tracking.backend: mlflow needs the mlflow package, which is not installed; run `{MLFLOW_INSTALL}` "
            "or set tracking.backend: none"
        )
    probe_server(mlflow_uri(cfg)[0])


def mlflow_uri(cfg: RunConfig) -> tuple[str, Path | None, bool]:
    """The MLflow tracking URI; the folder of its store when that is a SQLite file (created when
    missing; a new experiment keeps its artifacts beside it, in ``artifacts/``, not in the working
    directory); and whether it is xkd's default store: ``tracking.uri``; else
    ``$MLFLOW_TRACKING_URI``; else (the default) a SQLite store under ``output_dir``
    (:func:`xkd.rundir.mlflow_root`; MLflow 3 refuses its plain-file store unless told otherwise)."""
    uri = cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or ""
    default = not uri
    if default:
        uri = f"sqlite:///{(mlflow_root(cfg) / 'mlflow.db').resolve()}"
    database = sqlite_path(uri)
    return uri, (database.parent if database is not None else None), default


def probe_server(uri: str, timeout: float = 5.0) -> None:
    """Raise :class:`ConfigError` at once when the MLflow server of an ``http(s)`` ``uri`` takes no
    TCP connection within ``timeout`` seconds: MLflow's own client retries for minutes (253 s for a
    closed local port) before it reports the same. Other URIs, and servers behind a configured proxy,
    are left to MLflow."""
    u = urllib.parse.urlparse(uri)
    if u.scheme not in ("http", "https") or not u.hostname:
        return
    if urllib.request.getproxies().get(u.scheme) and not urllib.request.proxy_bypass(u.hostname):
        return
    port = u.port or (443 if u.scheme == "https" else 80)
    try:
        socket.create_connection((u.hostname, port), timeout=timeout).close()
    except OSError as e:
        raise ConfigError(
            f"tracking: cannot reach the MLflow server at {hide_password(uri)!r} ({e}); start it, check "
            "tracking.uri, or set tracking.backend: none"
        ) from None


def _key(name: str) -> str:
    """A metric or param name MLflow accepts (letters, digits, ``_ - . : /`` and spaces)."""
    return re.sub(r"[^A-Za-z0-9_\-. :/]", "_", name)


def _batches(items: list, n: int) -> Iterator[list]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


class MLflow(Callback):
    """Logs the run to MLflow (see the module docstring). The MLflow run is opened when the callback
    is created (a wrong URI fails before training); a failure to log later is a warning, never the
    end of a training."""

    PARAM_CHARS = 500

    def __init__(self, cfg: RunConfig, run_dir: RunDir, resume: bool = False) -> None:
        check(cfg)
        from mlflow.entities import Metric, Param
        from mlflow.tracking import MlflowClient

        self.Metric = Metric
        self.cfg, self.run_dir = cfg, run_dir
        self.uri, folder, _ = mlflow_uri(cfg)
        self.first_epoch: dict[str, int] = {}
        self.complete: set[str] = set()
        path = str(run_dir.path.resolve())
        # before the run folder is prepared: its config.yaml is still the one the earlier process ran
        changed = resume and bool(run_dir.changed_settings(cfg))
        try:
            if folder is not None:
                folder.mkdir(parents=True, exist_ok=True)
            self.client = MlflowClient(tracking_uri=self.uri)
            exp = self.client.get_experiment_by_name(cfg.tracking.experiment)
            if exp is not None:
                exp_id = exp.experiment_id
            else:  # the local store keeps its artifacts beside it, not in the working directory
                where = (folder / "artifacts").resolve().as_uri() if folder is not None else None
                exp_id = self.client.create_experiment(cfg.tracking.experiment, artifact_location=where)
            found = []
            params = {_key(k): str(v)[: self.PARAM_CHARS] for k, v in hyperparameters(cfg).items()}
            if resume and "'" not in path:  # the MLflow run this run folder logged to before
                order = ["attributes.start_time DESC"]
                found = self.client.search_runs([exp_id], f"tags.`xkd.run_dir` = '{path}'", order_by=order)
            if found and changed:
                # MLflow keeps a param's first value: a run resumed with other settings (more epochs, another
                # student) logs to a new MLflow run, which gets every epoch and final value again
                log.info("MLflow: the settings changed since run %s; logging to a new run", found[0].info.run_id)
                found = []
            if found:
                self.run_id = found[0].info.run_id
                self.client.update_run(self.run_id, status="RUNNING")
            else:
                tags = {"xkd.run_dir": path, "xkd.name": cfg.name}
                name = cfg.tracking.run_name or cfg.name
                self.run_id = self.client.create_run(exp_id, run_name=name, tags=tags).info.run_id
                for batch in _batches([Param(k, v) for k, v in params.items()], 100):
                    self.client.log_batch(self.run_id, params=batch)
        except Exception as e:  # any failure to reach or use the store: the URI or the server is wrong
            raise ConfigError(
                f"tracking: cannot log to MLflow at {hide_password(self.uri)!r} ({type(e).__name__}: {e}); check tracking.uri "
                "or set tracking.backend: none"
            ) from e
        log.info("MLflow: run %s in experiment %r at %s", self.run_id, cfg.tracking.experiment, hide_password(self.uri))
        self.open = {"run": True}  # a run stopped before its end (a pruned trial) is marked KILLED
        weakref.finalize(self, _kill, self.client, self.run_id, self.open)

    def _log(self, metrics: list) -> None:
        try:
            for batch in _batches(metrics, 1000):
                self.client.log_batch(self.run_id, metrics=batch)
        except Exception as e:  # a tracking outage must not stop a training
            log.warning("MLflow: could not log %d metric(s) (%s: %s)", len(metrics), type(e).__name__, e)

    def _epoch_metrics(self, role: str, history: Sequence[Mapping[str, Any]]) -> list:
        now = int(time.time() * 1000)
        return [
            self.Metric(_key(f"{role}/{tag}"), v, now, int(stats.get("epoch", i)))
            for i, stats in enumerate(history, start=1)
            for tag, v in epoch_scalars(stats).items()
        ]

    def on_epoch_end(self, role: str, epoch: int, stats: dict[str, Any]) -> None:
        self.first_epoch.setdefault(role, epoch)
        self._log(self._epoch_metrics(role, [stats]))

    def _fill(self, role: str, history: Sequence[Mapping[str, Any]]) -> None:
        """Log the epochs of ``history`` the MLflow run does not hold yet (a resumed or loaded model)."""
        try:
            logged = {m.step for m in self.client.get_metric_history(self.run_id, _key(f"{role}/loss/train"))}
        except Exception:
            logged = set()
        missing = [h for i, h in enumerate(history, start=1) if int(h.get("epoch", i)) not in logged]
        self._log(self._epoch_metrics(role, missing))
        self.complete.add(role)

    def on_train_end(self, role: str, history: list[dict[str, Any]]) -> None:
        first = self.first_epoch.get(role)
        if history and (first is None or first > int(history[0].get("epoch", 1))):
            self._fill(role, history)
        self.complete.add(role)

    def on_run_end(self, run_dir: Path) -> None:
        rd = RunDir(run_dir)
        for role, m in rd.read_record("models")["models"].items():
            if role not in self.complete:
                self._fill(role, full_history(rd, role, (m.get("train") or {}).get("history") or []))
        now = int(time.time() * 1000)
        finals = final_scalars(rd)
        self._log(
            [self.Metric(_key(f"{role}/{t}"), v, now, 0) for role, vals in finals.items() for t, v in vals.items()]
        )
        try:
            for path in (rd.config, rd.metrics):
                self.client.log_artifact(self.run_id, str(path))
            self.client.set_terminated(self.run_id, "FINISHED")
            self.open["run"] = False
        except Exception as e:
            log.warning("MLflow: could not finish run %s (%s: %s)", self.run_id, type(e).__name__, e)


def _kill(client: Any, run_id: str, state: dict[str, bool]) -> None:
    if state["run"]:
        try:
            client.set_terminated(run_id, "KILLED")
        except Exception:  # the store is gone (interpreter exit): the run stays RUNNING
            pass
