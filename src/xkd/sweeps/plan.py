"""What ``xkd sweep`` searches and what it scores, checked before anything trains.

:func:`resolve_sweep` turns a config's ``sweep:`` section into a :class:`SweepPlan`: every searched
path is looked up in the resolved config (list indices, and a student's parameters against its
distiller's ``Params`` dataclass, defaults included), every range is checked, the config is
validated with each range's edge values applied, and every objective is matched to the record a
run writes it in, by the metric declarations (:mod:`xkd.metrics.base`). A mistake is one
:class:`~xkd.errors.ConfigError` naming the key.

Objectives are read from a finished trial's records, never from live models:

- ``val_accuracy``: the student's best validation accuracy (``records/models.json``, its training
  history); the pruner watches the same number epoch by epoch;
- the test-split metrics (scope ``test``): ``accuracy``, ``macro_f1``, ``loss``,
  ``posthoc_agreement`` (agreement with the teacher's predictions), ``params``, ``flops``;
- any column of a metric of ``evaluation.metrics`` (scopes ``model``, ``agreement``, ``transfer``,
  ``timing``) from ``records/explanations.json`` (``models.json`` for the explanation time), per
  explainer where the metric has one: ``rank_correlation`` of ``grad_cam`` is the rank correlation
  of the student's Grad-CAM maps with the teacher's.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import yaml

from xkd import registry as R
from xkd.config import RunConfig, SweepObjective
from xkd.config_files import apply_override
from xkd.distill.base import distiller_params
from xkd.errors import ConfigError, XkdError
from xkd.metrics.base import Column, MetricInfo, declared
from xkd.plan import resolve, validate_config
from xkd.rundir import RunDir
from xkd.schema import from_dict, to_dict

KINDS = ("uniform", "log_uniform", "int", "categorical")
"""The distributions a searched setting may have."""

SET_BY_SWEEP = ("name", "output_dir", "cache_dir", "sweep")
"""Top-level keys every trial gets from the sweep itself."""

TEACHER_KEYS = ("data", "teacher", "seed")
"""Top-level keys that change the teacher: a sweep over them trains one teacher per value."""

VAL_ACCURACY = "val_accuracy"

MISSING = object()
"""A record entry that is absent (as opposed to recorded as null)."""


class UndefinedObjectiveError(XkdError, ValueError):
    """A finished trial recorded its objective as null or non-finite; the trial fails, the sweep goes on."""


# where a run records each test-split metric of a model (records/models.json, models.<role>)
TEST_RECORDS: dict[str, tuple[str, ...]] = {
    "accuracy": ("test", "accuracy"),
    "macro_f1": ("test", "macro_f1"),
    "loss": ("test", "loss"),
    "posthoc_agreement": ("posthoc", "accuracy"),
    "params": ("params",),
    "flops": ("flops",),
}

EXPLAINED_SCOPES = ("model", "agreement", "timing")
"""Scopes whose records are kept per explainer."""


@dataclass(frozen=True)
class SearchParam:
    """One searched setting: a config path and its distribution."""

    path: str
    kind: str
    low: float | int | None = None
    high: float | int | None = None
    step: float | int | None = None
    choices: tuple[Any, ...] = ()

    def suggest(self, trial: optuna.Trial) -> Any:
        """The trial's value, asked of Optuna's sampler (the config path is the parameter's name)."""
        if self.kind == "categorical":
            return trial.suggest_categorical(self.path, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.path, int(self.low), int(self.high), step=int(self.step or 1))
        return trial.suggest_float(
            self.path, float(self.low), float(self.high), log=self.kind == "log_uniform", step=self.step
        )

    def edges(self) -> list[Any]:
        """The values at the ends of the range (every choice of a categorical), of the type the
        sampler gives: floats for ``uniform`` and ``log_uniform`` even with integer bounds."""
        if self.kind == "categorical":
            return list(self.choices)
        if self.kind == "int":
            return [self.low, self.high]
        return [float(self.low), float(self.high)]  # type: ignore[arg-type]

    def describe(self) -> str:
        if self.kind == "categorical":
            return f"categorical {list(self.choices)}"
        step = f", step {self.step}" if self.step is not None else ""
        return f"{self.kind} [{self.low}, {self.high}]{step}"


@dataclass(frozen=True)
class Objective:
    """One optimised score: which metric of which student (and explainer), and where it is recorded."""

    metric: str
    student: str
    direction: str
    scope: str
    explainer: str | None = None
    column: Column | None = None

    @property
    def name(self) -> str:
        """``<student>.<metric>`` or ``<student>.<explainer>.<metric>``."""
        parts = [self.student, self.explainer, self.metric]
        return ".".join(p for p in parts if p is not None)

    def read(self, run_dir: str | Path) -> float:
        """The score of the finished run in ``run_dir``, from its records.

        Raises:
            UndefinedObjectiveError: the run recorded the score as null or non-finite (a collapsed
                student's rank correlation is undefined): the trial fails, the sweep goes on.
            ConfigError: the records have no entry for it at all (the explainer does not apply to
                the student): every trial would fail alike, so the sweep stops.
        """
        rd = RunDir(run_dir)
        models = rd.read_record("models")["models"]
        model = models.get(self.student) or {}
        if self.scope == VAL_ACCURACY:
            history = (model.get("train") or {}).get("history") or []
            values = [h.get("val_accuracy") for h in history]
            value: Any = max((v for v in values if _is_number(v)), default=None if history else MISSING)
            where = f"models.json models.{self.student}.train.history[*].val_accuracy"
        elif self.scope == "test":
            value, where = _dig(model, TEST_RECORDS[self.metric]), f"models.json models.{self.student}"
        elif self.scope == "timing":
            value, where = _dig(model, ("met", self.explainer)), f"models.json models.{self.student}.met"
        else:
            expl = rd.read_record("explanations")
            section = {"model": "per_model", "agreement": "agreement", "transfer": "transfer"}[self.scope]
            entry = _dig(expl, (section, self.student) + ((self.explainer,) if self.explainer else ()))
            assert self.column is not None  # resolve_objective gives every explanation scope its column
            value = _dig(entry, (self.column.key,) + ((self.column.sub,) if self.column.sub else ()))
            where = f"explanations.json {section}.{self.student}" + (f".{self.explainer}" if self.explainer else "")
        if isinstance(value, dict):  # a record that keeps its headline under the metric's name (RS)
            value = value.get(self.metric, MISSING)
        if value is MISSING:
            raise ConfigError(
                f"sweep objective {self.name}: the run in {rd.path} has no record of it (looked in {where}); "
                "does the explainer apply to this student?"
            )
        if not _is_number(value):
            raise UndefinedObjectiveError(
                f"sweep objective {self.name}: the run in {rd.path} recorded {value!r} for it ({where}): it is "
                "undefined for this trial's models (a student that predicts one class, constant maps); the trial "
                "is marked failed"
            )
        return float(value)


@dataclass(frozen=True)
class SweepPlan:
    """A validated sweep: the base config, what is searched, what is optimised, and how."""

    cfg: RunConfig
    params: list[SearchParam]
    objectives: list[Objective]
    sampler: str
    pruner: str
    trials: int
    seed: int

    @property
    def directions(self) -> list[str]:
        return [o.direction for o in self.objectives]

    @property
    def watched_student(self) -> str | None:
        """The student whose validation accuracy is reported to Optuna each epoch (one objective only:
        Optuna has no intermediate values for several)."""
        return self.objectives[0].student if len(self.objectives) == 1 else None


# -- searched settings --------------------------------------------------------------------------------


def parse_param(path: str, spec: Any) -> SearchParam:
    """``{uniform: [a, b]}`` & co. as a :class:`SearchParam`; bad ranges raise :class:`ConfigError`."""
    where = f"sweep.params.{path}"
    if not isinstance(spec, dict) or not spec:
        raise ConfigError(f"{where}: expected a distribution such as {{uniform: [0.1, 0.9]}}, got {spec!r}")
    kinds = [k for k in spec if k in KINDS]
    extra = [k for k in spec if k not in (*KINDS, "step")]
    if len(kinds) != 1 or extra:
        raise ConfigError(
            f"{where}: give exactly one of {', '.join(KINDS)} (and `step` for uniform or int), got {sorted(spec)}"
        )
    kind, value, step = kinds[0], spec[kinds[0]], _numeric(spec.get("step"))
    if kind == "categorical":
        if step is not None:
            raise ConfigError(f"{where}: `step` applies to uniform and int ranges, not to categorical")
        if not isinstance(value, list) or len(value) < 2:
            raise ConfigError(f"{where}: categorical needs a list of at least two choices, got {value!r}")
        value = [_exponent_number(v) for v in value]
        if any(v is not None and not isinstance(v, (bool, int, float, str)) for v in value):
            raise ConfigError(f"{where}: categorical choices must be numbers, strings, booleans or null, got {value!r}")
        if len({repr(v) for v in value}) < len(value):
            raise ConfigError(f"{where}: categorical choices repeat: {value!r}")
        return SearchParam(path, kind, choices=tuple(value))
    if isinstance(value, list):
        value = [_numeric(v) for v in value]
    if not isinstance(value, list) or len(value) != 2 or not all(_is_number(v) for v in value):
        raise ConfigError(f"{where}: {kind} needs [low, high], two numbers, got {value!r}")
    low, high = value
    if kind == "int" and not all(isinstance(v, int) for v in value):
        raise ConfigError(f"{where}: int needs two integers [low, high], got {value!r}")
    if not low < high:
        what = "empty" if low == high else "inverted"
        raise ConfigError(f"{where}: the range [{low}, {high}] is {what}; write [low, high] with low < high")
    if kind == "log_uniform" and low <= 0:
        raise ConfigError(f"{where}: log_uniform needs bounds > 0 (a log scale), got [{low}, {high}]")
    if step is not None:
        if kind == "log_uniform":
            raise ConfigError(f"{where}: `step` applies to uniform and int ranges, not to log_uniform")
        if not _is_number(step) or step <= 0 or (kind == "int" and not isinstance(step, int)):
            raise ConfigError(f"{where}: step must be a positive {'integer' if kind == 'int' else 'number'}")
        if step > high - low:
            raise ConfigError(f"{where}: step {step} is larger than the range [{low}, {high}]")
    return SearchParam(path, kind, low, high, step)


def config_tree(cfg: RunConfig) -> dict[str, Any]:
    """The config as the searched paths see it: plain data, every student's ``params`` holding every
    parameter of its distiller (defaults included)."""
    tree = to_dict(cfg)
    for i, s in enumerate(cfg.students):
        if s.distiller in R.DISTILLERS:
            resolved = distiller_params(s.distiller, s.params, f"students[{i}].params")
            init = [f.name for f in dataclasses.fields(resolved) if f.init]
            tree["students"][i]["params"] = {k: to_dict(getattr(resolved, k)) for k in init}
    return tree


def check_path(cfg: RunConfig, tree: dict[str, Any], path: str) -> None:
    """Raise :class:`ConfigError` unless ``path`` names a key of the resolved config."""
    where = f"sweep.params.{path}"
    parts = path.split(".")
    if parts[0] in SET_BY_SWEEP:
        raise ConfigError(f"{where}: {parts[0]!r} is set by the sweep for every trial; it cannot be searched")
    if len(parts) == 3 and parts[0] == "students" and parts[2] == "name":
        raise ConfigError(f"{where}: a student's name keys its records and the objectives; it cannot be searched")
    node: Any = tree
    for i, part in enumerate(parts):
        here = ".".join(parts[:i]) or "the config"
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(
                    f"{where}: {here} has {len(node)} item(s); {part!r} is not an index 0..{len(node) - 1}"
                )
            node = node[int(part)]
        elif isinstance(node, dict):
            if part not in node:
                if i == 3 and parts[0] == "students" and parts[2] == "params":
                    s = cfg.students[int(parts[1])]
                    raise ConfigError(
                        f"{where}: distiller {s.distiller!r} of student {s.name!r} has no parameter {part!r}; "
                        f"its parameters: {', '.join(node) or 'none'}"
                    )
                keys = ", ".join(map(str, node)) or "none (set it in the config first)"
                raise ConfigError(f"{where}: {here} has no key {part!r}; its keys: {keys}")
            node = node[part]
        else:
            raise ConfigError(f"{where}: {here} is a value ({node!r}), not a section with key {part!r}")


def with_values(cfg: RunConfig, values: dict[str, Any]) -> dict[str, Any]:
    """``cfg`` as plain data with ``values`` set at their config paths (as ``--set`` sets them).

    A path inside a student's parameter the config leaves at its default
    (``students.0.params.widths.1``) first gets that default, so the item is set in the default's
    list or section, not in a new one.
    """
    raw = to_dict(cfg)
    tree: dict[str, Any] | None = None
    for path, value in values.items():
        keys = _keys(path)
        if len(keys) > 4 and keys[0] == "students" and keys[2] == "params":
            params = raw["students"][keys[1]].setdefault("params", {})
            if params.get(keys[3]) is None:
                tree = tree or config_tree(cfg)
                params[keys[3]] = copy.deepcopy(tree["students"][keys[1]]["params"][keys[3]])
        apply_override(raw, f"{path}={yaml_scalar(value)}")
    return raw


def yaml_scalar(value: Any) -> str:
    """``value`` as YAML text that reads back as the same value (``1e-05`` would read as a string)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=1_000_000)
    return text.removesuffix("\n").removesuffix("\n...").strip()


# -- objectives ---------------------------------------------------------------------------------------


def metric_columns() -> dict[str, tuple[MetricInfo, Column]]:
    """Every recorded number by its record key: the columns of the declared metrics."""
    out: dict[str, tuple[MetricInfo, Column]] = {}
    for info in declared("test", "model", "agreement", "transfer", "timing"):
        for col in info.columns:
            out.setdefault(col.key, (info, col))
    return out


def resolve_objective(
    cfg: RunConfig, i: int, obj: SweepObjective, tuned: list[str], explainers: dict[str, Any]
) -> Objective:
    where = f"sweep.objectives[{i}]"
    names = [s.name for s in cfg.students]
    student = obj.student
    if student is None:
        if len(tuned) == 1:
            student = tuned[0]
        elif len(names) == 1:
            student = names[0]
        else:
            raise ConfigError(
                f"{where}.student: which student's {obj.metric}? the searched settings "
                f"{'name ' + ', '.join(tuned) if tuned else 'name no single student'}; students: {', '.join(names)}"
            )
    if student not in names:
        extra = " (the teacher is trained once and shared by every trial)" if student == "teacher" else ""
        raise ConfigError(f"{where}.student: {student!r} is not a student{extra}; students: {', '.join(names)}")
    columns = metric_columns()
    if obj.metric == VAL_ACCURACY:
        scope, info, column, higher = VAL_ACCURACY, None, None, True
    elif obj.metric in columns:
        info, column = columns[obj.metric]
        scope = info.scope
        if scope != "test" and info.name not in cfg.evaluation.metrics:
            raise ConfigError(
                f"{where}.metric: {obj.metric!r} ({info.name}) is not computed by this config: add {info.name!r} "
                "to evaluation.metrics"
            )
        higher = column.higher_is_better if column.higher_is_better is not None else info.higher_is_better
        if scope == "test" and obj.metric not in TEST_RECORDS:
            raise ConfigError(f"{where}.metric: {obj.metric!r} is not recorded as one number per model")
    else:
        scored = [k for k, (m, _) in columns.items() if m.scope != "test" and m.name in cfg.evaluation.metrics]
        raise ConfigError(
            f"{where}.metric: no run of this config records {obj.metric!r}; recorded: "
            f"{', '.join([VAL_ACCURACY, *TEST_RECORDS, *scored])}"
        )
    explainer = obj.explainer
    if scope in EXPLAINED_SCOPES:
        if explainer is None:
            if len(explainers) != 1:
                raise ConfigError(
                    f"{where}.explainer: {obj.metric!r} is recorded per explainer; name one of {', '.join(explainers)}"
                )
            explainer = next(iter(explainers))
        if explainer not in explainers:
            raise ConfigError(
                f"{where}.explainer: {explainer!r} is not among evaluation.explainers ({', '.join(explainers)}); "
                "use an explainer's label"
            )
        if scope == "agreement" and explainers[explainer].pair:
            raise ConfigError(
                f"{where}.explainer: {explainer!r} explains students against the teacher; it has no "
                "teacher-student agreement record"
            )
    elif explainer is not None:
        raise ConfigError(f"{where}.explainer: {obj.metric!r} is one number per model; it takes no explainer")
    if obj.direction is None and higher is None:
        raise ConfigError(
            f"{where}.direction: {obj.metric!r} declares no direction (higher or lower is better); set "
            f"{where}.direction to maximize or minimize"
        )
    direction = obj.direction or ("maximize" if higher else "minimize")
    return Objective(obj.metric, student, direction, scope, explainer, column)


# -- the whole plan -----------------------------------------------------------------------------------


def resolve_sweep(cfg: RunConfig) -> SweepPlan:
    """Validate ``cfg.sweep`` against ``cfg`` (itself validated) and resolve it once."""
    sw = cfg.sweep
    plan = resolve(cfg)
    if not sw.params:
        raise ConfigError(
            "sweep.params: nothing to search; give config paths with distributions, e.g. "
            "students.1.params.alpha: {uniform: [0.1, 0.9]}"
        )
    if sw.trials < 1:
        raise ConfigError(f"sweep.trials must be >= 1, got {sw.trials}")
    tree = config_tree(cfg)
    params = []
    for path, spec in sw.params.items():
        check_path(cfg, tree, str(path))
        params.append(parse_param(str(path), spec))
    for p in params:  # every edge of every range must make a valid config: fail now, not in trial 7
        for value in p.edges():
            try:
                validate_config(from_dict(RunConfig, with_values(cfg, {p.path: value})))
            except ConfigError as e:
                hint = ""
                current = _dig(tree, tuple(_keys(p.path)))
                if p.kind != "int" and isinstance(current, int) and not isinstance(current, bool):
                    hint = f"; the setting is an integer: search it with int: [{int(p.low)}, {int(p.high)}]"
                raise ConfigError(
                    f"sweep.params.{p.path}: the value {value!r} of its range is not valid: {e}{hint}"
                ) from None
    tuned = sorted({cfg.students[int(p.path.split(".")[1])].name for p in params if _student_path(p.path)})
    explainers = {e.key: e for e in plan.explainers}
    given = sw.objectives or [SweepObjective()]  # default: the tuned student's validation accuracy
    objectives = [resolve_objective(cfg, i, o, tuned, explainers) for i, o in enumerate(given)]
    names = [o.name for o in objectives]
    if len(set(names)) < len(names):
        raise ConfigError(f"sweep.objectives: {sorted({n for n in names if names.count(n) > 1})} listed twice")
    sampler = sw.sampler or ("tpe" if len(objectives) == 1 else "nsga2")
    prunable = len(objectives) == 1 and objectives[0].direction == "maximize"
    if sw.pruner == "median" and not prunable:
        why = (
            "Optuna prunes single-objective studies only"
            if len(objectives) > 1
            else f"it compares validation accuracies (higher is better) and {names[0]} is minimised"
        )
        raise ConfigError(f"sweep.pruner: median cannot be used here: {why}; set pruner: none")
    pruner = sw.pruner or ("median" if prunable else "none")
    return SweepPlan(cfg, params, objectives, sampler, pruner, sw.trials, cfg.seed if sw.seed is None else sw.seed)


def teacher_paths(plan: SweepPlan) -> list[str]:
    """Searched paths that change the teacher (each value trains its own)."""
    return [p.path for p in plan.params if p.path.split(".")[0] in TEACHER_KEYS]


def _student_path(path: str) -> bool:
    return re.match(r"students\.\d+\.", path) is not None


def _keys(path: str) -> list[str | int]:
    """A config path's keys, list indices as ints."""
    return [int(k) if k.isdigit() else k for k in path.split(".")]


EXPONENT_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")
"""A number in exponent notation without a dot in its mantissa (``1e-3``), which YAML 1.1 reads as a string."""


def _exponent_number(v: Any) -> Any:
    """A categorical choice written ``1e-3`` as the float it means; every other choice as it is
    (a choice ``"0.5"`` quoted in YAML stays the string the user wrote)."""
    return float(v) if isinstance(v, str) and EXPONENT_NUMBER.fullmatch(v) else v


def _numeric(v: Any) -> Any:
    """A number written in YAML as ``1e-4`` (which YAML 1.1 reads as a string) as the float it means."""
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return v
    return v


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _dig(d: Any, keys: tuple[Any, ...]) -> Any:
    """``d[k0][k1]...``; :data:`MISSING` where a key is absent (a recorded null stays ``None``)."""
    for k in keys:
        if d is None:  # a section recorded as null: every number under it is undefined
            return None
        if isinstance(d, list) and isinstance(k, int) and 0 <= k < len(d):
            d = d[k]
        elif isinstance(d, dict) and k in d:
            d = d[k]
        else:
            return MISSING
    return d
