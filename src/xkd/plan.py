"""A run resolved once: ``load_config`` reads and validates a config, :func:`resolve` turns it into a
:class:`RunPlan` of typed specs (each student's distiller parameters, each explainer's class and
parameters) that the pipeline, the scoring loop and the studies use without looking a name up again.

Validation goes beyond types: registry names, method parameters, ranges, and what a comparison or
a study needs. Every error names the key path and the allowed values.
"""

from __future__ import annotations

import inspect
import logging
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import xkd.data  # noqa: F401  (registers the datasets)
import xkd.distill  # noqa: F401  (registers the distillers)
import xkd.explain  # noqa: F401  (registers the explainers)
import xkd.metrics  # noqa: F401  (registers the metrics)
import xkd.models  # noqa: F401  (registers the models)
from xkd import registry as R
from xkd.config import EvaluationConfig, ModelConfig, RunConfig
from xkd.config_files import read_config
from xkd.distill.base import distiller_params
from xkd.engine.runtime import check_train_config
from xkd.errors import ConfigError
from xkd.explain.base import ExplainerSpec, resolve_explainer, split_name
from xkd.explain.superpixel import SuperpixelParams
from xkd.metrics.base import INPUTS, declared, default_metrics
from xkd.schema import check_value, from_dict, to_dict

log = logging.getLogger("xkd")


def agreement_metrics() -> list[str]:
    """The teacher-student agreement metrics (what ``compare.agreement_metric`` may name)."""
    return [m.name for m in declared("agreement")]


@dataclass(frozen=True)
class StudentSpec:
    """One model to distil, resolved: its role, architecture, distiller and typed parameters, and the
    teacher assistant it learns from (``teacher_assistant``: a spec of its own, role
    ``<name>.assistant``, distilled from the teacher first)."""

    name: str
    model: ModelConfig
    distiller: str
    params: Any
    assistant: StudentSpec | None = None


@dataclass(frozen=True)
class RunPlan:
    """A validated config and its resolved specs.

    ``independent`` maps each student to the run's independent student whose maps a metric that
    needs ``independent_maps`` compares it with (``closer_to_teacher``, Ojha et al. 2023): every
    student of that student's architecture except itself (see :func:`independent_students`)."""

    cfg: RunConfig
    students: list[StudentSpec]
    explainers: list[ExplainerSpec]
    independent: dict[str, str] = field(default_factory=dict)


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> RunConfig:
    """Load a YAML run config (or the defaults when ``path`` is None), apply ``--set`` overrides,
    and validate types, registry names and method parameters."""
    cfg = read_config(path, overrides)
    validate_config(cfg)
    return cfg


def resolve(cfg: RunConfig) -> RunPlan:
    """Validate ``cfg`` beyond its types (registry names, method parameters, ranges) and resolve
    every name once into typed specs. An unset ``evaluation.metrics`` becomes the default list (less
    the metrics whose inputs this run cannot give, e.g. ``closer_to_teacher`` without an independent
    student)."""
    defaulted = cfg.evaluation.metrics is None
    if defaulted:
        cfg.evaluation.metrics = default_metrics()

    def check_name(reg: R.Registry, name: str, path: str) -> None:
        if name not in reg:
            raise ConfigError(
                f"{path}: unknown {reg.kind} {name!r}; registered: {', '.join(reg.names())} (one of your own: "
                f"register it in a module named in the config's plugins)"
            )

    check_name(R.DATASETS, cfg.data.name, "data.name")
    for path, m in [("teacher.model", cfg.teacher.model), ("student_model", cfg.student_model)] + [
        (f"students[{i}].model", s.model) for i, s in enumerate(cfg.students) if s.model is not None
    ]:
        if not _is_import_path(m.name):
            check_name(R.MODELS, m.name, f"{path}.name")
    if not cfg.students:
        raise ConfigError("students: at least one student is required")
    names = [s.name for s in cfg.students]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ConfigError(f"students: names must be unique, {sorted(dup)} repeated")
    if "teacher" in names:
        raise ConfigError("students: 'teacher' is reserved for the teacher; rename that student")
    for i, n in enumerate(names):  # a name is a folder of the run (checkpoints, TensorBoard): never a path
        if not n or n.startswith(".") or any(c in n for c in "/\\:"):
            raise ConfigError(
                f"students[{i}].name {n!r}: a name labels the student's folders, so it may not be empty, start "
                "with '.' or contain '/', '\\' or ':'; use letters, digits, '_', '-' and spaces"
            )
    students = [_student(cfg, i, check_name) for i in range(len(cfg.students))]
    explainers = []
    for i, e in enumerate(cfg.evaluation.explainers):
        check_name(R.EXPLAINERS, split_name(e.name)[0], f"evaluation.explainers[{i}].name")
        explainers.append(resolve_explainer(e.name, e.params, e.label, f"evaluation.explainers[{i}].params"))
    keys = [e.key for e in cfg.evaluation.explainers]
    if len(set(keys)) < len(keys):
        dup = sorted({k for k in keys if keys.count(k) > 1})
        raise ConfigError(f"evaluation.explainers: {dup} listed twice; give each entry a distinct `label`")
    check_train_config(cfg.train, "train")
    check_train_config(cfg.teacher.train, "teacher.train")
    if cfg.teacher.checkpoint and not Path(cfg.teacher.checkpoint).expanduser().is_file():
        raise ConfigError(
            f"teacher.checkpoint: {cfg.teacher.checkpoint!r} is not a file; give the path of a saved teacher "
            "(e.g. runs/NAME/checkpoints/teacher/best.pt), or remove it to train the teacher"
        )
    ev = cfg.evaluation
    _validate_metrics(ev, check_name)
    independent = independent_students(cfg, students, defaulted)
    for key in ("fidelity_keep", "agreement_top_k"):
        v = getattr(ev, key)
        if not 0.0 < v <= 1.0:
            raise ConfigError(f"evaluation.{key} must be in (0, 1], got {v}")
    _validate_compare(cfg)
    _validate_study(cfg, check_name)
    return RunPlan(cfg, students, explainers, independent)


def validate_config(cfg: RunConfig) -> None:
    """Check ``cfg`` as :func:`resolve` does, keeping nothing."""
    resolve(cfg)


def _student(cfg: RunConfig, i: int, check_name: Any) -> StudentSpec:
    """Student ``i`` resolved: its typed distiller parameters and, for ``teacher_assistant``, the
    assistant it learns from (a spec of its own)."""
    s = cfg.students[i]
    check_name(R.DISTILLERS, s.distiller, f"students[{i}].distiller")
    params = distiller_params(s.distiller, s.params, f"students[{i}].params")
    assistant = None
    if getattr(R.DISTILLERS.get(s.distiller), "needs_assistant", False):
        a_params = distiller_params(params.assistant_distiller, params.assistant_params, f"students[{i}].params")
        assistant = StudentSpec(f"{s.name}.assistant", params.assistant_model(), params.assistant_distiller, a_params)
    return StudentSpec(s.name, s.model or cfg.student_model, s.distiller, params, assistant)


INDEPENDENT = "independent_maps"  # the input of the metrics that compare a student with an independent one


def independent_students(cfg: RunConfig, students: list[StudentSpec], defaulted: bool = False) -> dict[str, str]:
    """Student -> the independent student it is compared with by the selected metrics that need
    ``independent_maps`` (``closer_to_teacher``): the student named by such a metric's ``independent``
    parameter, else the first student whose distiller is ``scratch``; paired with every other student
    of its architecture (the same model config). Empty when no selected metric needs one.

    Raises:
        ConfigError: a named student does not exist or learns from the teacher, or the run has no
            independent student with another student of its architecture. When ``evaluation.metrics``
            was the default list (``defaulted``), such metrics are dropped from it instead.
    """
    ev = cfg.evaluation
    needing = [m for m in ev.metrics if INDEPENDENT in R.METRICS.get(m).needs]
    if not needing:
        return {}
    spec = {s.name: s for s in students}
    named = {m: p["independent"] for m, p in ev.metric_params.items() if m in needing and "independent" in p}
    if len(set(named.values())) > 1:
        raise ConfigError(f"evaluation.metric_params: the independent students differ ({named}); name one student")
    for m, name in named.items():
        path = f"evaluation.metric_params.{m}.independent"
        if name not in spec:
            raise ConfigError(f"{path}: {name!r} is not a student; students: {', '.join(spec)}")
        if getattr(R.DISTILLERS.get(spec[name].distiller), "needs_teacher", True):
            raise ConfigError(
                f"{path}: {name!r} is distilled with {spec[name].distiller!r}, which learns from the teacher; an "
                "independent student is trained without it: name a student whose distiller is scratch (or another "
                "teacher-free distiller such as label_smoothing)"
            )
    chosen = next(iter(named.values()), None) or next((s.name for s in students if s.distiller == "scratch"), None)
    pairs = {}
    if chosen is not None:
        pairs = {s.name: chosen for s in students if s.name != chosen and s.model == spec[chosen].model}
    if pairs:
        return pairs
    if defaulted:
        ev.metrics = [m for m in ev.metrics if m not in needing]
        return {}
    listed = ", ".join(needing)
    if chosen is None:
        problem = "this run has no independent student (a student trained without the teacher)"
        fix = (
            "add one to `students`, e.g. {name: scratch, distiller: scratch}, or name a teacher-free student "
            f"with evaluation.metric_params.{needing[0]}.independent"
        )
    else:
        problem = f"no other student has the architecture of the independent student {chosen!r}"
        fix = f"give a distilled student its model ({spec[chosen].model.name})"
    raise ConfigError(
        f"evaluation.metrics: {listed} compares each distilled student's maps with an independent student's of "
        f"the same architecture, but {problem}: {fix}, or remove {listed} from evaluation.metrics"
    )


def _validate_study(cfg: RunConfig, check_name: Any) -> None:
    st = cfg.study
    for path, name, params in [
        ("study.explainer", st.explainer, st.explainer_params),
        ("study.diffroar.explainer", st.diffroar.explainer, st.diffroar.explainer_params),
    ]:
        check_name(R.EXPLAINERS, split_name(name)[0], path)
        resolve_explainer(name, params, path=path.replace("explainer", "explainer_params"))
    check_name(R.DISTILLERS, st.distiller, "study.distiller")
    distiller_params(st.distiller, st.params, "study.params")
    models = [(f"study.teachers[{i}]", m) for i, m in enumerate(st.teachers)]
    models += [("study.assistant", st.assistant), ("study.diffroar.model", st.diffroar.model)]
    for path, m in models:
        if m is not None and not _is_import_path(m.name):
            check_name(R.MODELS, m.name, f"{path}.name")
    if st.concepts is not None:
        check_name(R.DATASETS, st.concepts.name, "study.concepts.name")


def _validate_compare(cfg: RunConfig) -> None:
    c = cfg.compare
    if c.seeds < 1:
        raise ConfigError(f"compare.seeds must be >= 1, got {c.seeds}")
    if c.agreement_metric not in agreement_metrics():
        raise ConfigError(
            f"compare.agreement_metric: {c.agreement_metric!r} is not a teacher-student agreement metric; "
            f"allowed: {', '.join(agreement_metrics())}"
        )
    if R.METRICS.get(c.agreement_metric).higher_is_better is None:  # a user's: the ranking needs a direction
        raise ConfigError(
            f"compare.agreement_metric: {c.agreement_metric!r} declares no direction, so the comparison cannot rank "
            "by it; declare higher_is_better in its @metric or choose another metric"
        )
    keys = [e.key for e in cfg.evaluation.explainers]
    if c.agreement_explainer is not None and c.agreement_explainer not in keys:
        raise ConfigError(
            f"compare.agreement_explainer {c.agreement_explainer!r} is not among evaluation.explainers "
            f"({', '.join(keys)}); use an explainer's label"
        )


def validate_for_compare(cfg: RunConfig) -> None:
    """What ``xkd compare`` needs beyond a valid run config: its headline agreement is computed."""
    c = cfg.compare
    if c.agreement_metric not in cfg.evaluation.metrics:
        raise ConfigError(
            f"compare.agreement_metric {c.agreement_metric!r} is not computed by this config: add it to "
            f"evaluation.metrics or choose one of the selected metrics "
            f"({', '.join(m for m in cfg.evaluation.metrics if m in agreement_metrics()) or 'none selected'})"
        )


def _validate_metrics(ev: EvaluationConfig, check_name: Any) -> None:
    for i, name in enumerate(ev.metrics):
        check_name(R.METRICS, name, f"evaluation.metrics[{i}]")
        if R.METRICS.get(name).scope == "study":
            raise ConfigError(
                f"evaluation.metrics[{i}]: {name!r} is not computed by a run: a study computes it (network "
                "dissection runs in `xkd study kd-vs-ls`, its layer and concept data are under `study:`), or call "
                "its function on a model"
            )
    for name, kwargs in ev.metric_params.items():
        check_name(R.METRICS, name, f"evaluation.metric_params.{name}")
        if not isinstance(kwargs, Mapping):
            raise ConfigError(f"evaluation.metric_params.{name} must be a mapping of keyword arguments")
        info = R.METRICS.get(name)
        filled = info.filled  # the scoring loop passes these: `road: {model: 3}` was a TypeError after training
        arguments = inspect.signature(info.fn).parameters
        allowed = ", ".join(p for p in arguments if p not in filled) or "none"
        for key in kwargs:
            if key in filled:
                raise ConfigError(
                    f"evaluation.metric_params.{name}.{key}: the run passes it ({INPUTS[filled[key]]}); arguments "
                    f"you may set: {allowed}"
                )
            if key not in arguments:
                raise ConfigError(f"evaluation.metric_params.{name}.{key}: unknown argument; arguments: {allowed}")
            # the value against the argument's annotation: a string for ROAD's percentages failed with
            # a ValueError from inside the metric, after every model had trained
            hint = _argument_type(info.fn, key)
            if hint is not None:
                check_value(hint, kwargs[key], f"evaluation.metric_params.{name}.{key}")
        try:  # and its range (ROAD's percentages in [0, 1), a deletion path's steps >= 1, ...)
            info.check_params(dict(kwargs))
        except ValueError as e:
            raise ConfigError(f"evaluation.metric_params.{name}: {e}") from None
    from_dict(SuperpixelParams, ev.superpixel, "evaluation.superpixel").validate()
    for key in ev.transfer_layers:
        if key not in ("teacher", "student"):
            raise ConfigError(f"evaluation.transfer_layers.{key}: unknown key; allowed keys: teacher, student")
    for key in ("num_images", "met_images", "sanity_images", "samples_per_class", "batch_size"):
        v = getattr(ev, key)
        if v is not None and v < (0 if key == "sanity_images" else 1):
            raise ConfigError(f"evaluation.{key} must be >= {0 if key == 'sanity_images' else 1}, got {v}")
    _validate_min_images(ev)


def _argument_type(fn: Any, param: str) -> Any:
    """The annotation of ``fn``'s parameter ``param`` (None when it has none or it does not resolve)."""
    try:
        return typing.get_type_hints(fn).get(param)
    except Exception:  # an annotation that does not resolve here: no check
        return None


def _validate_min_images(ev: EvaluationConfig) -> None:
    """Explainers that need several images per call (UniCAM: 4) get them: a clear error now rather
    than after training. The report's per-class samples are padded with other test images instead."""
    need_of = {e.name: resolve_explainer(e.name, e.params).min_images for e in ev.explainers}
    need = max(need_of.values(), default=1)
    if need <= 1:
        return
    names = ", ".join(sorted(n for n, k in need_of.items() if k == need))
    for key in ("num_images", "met_images", "sanity_images"):
        v = getattr(ev, key)
        if v is not None and 0 < v < need and not (key == "sanity_images" and v == 0):
            raise ConfigError(
                f"evaluation.{key} = {v}, but {names} explains at least {need} images per call; set it to >= {need}"
                + (" (or 0 to skip the check)" if key == "sanity_images" else "")
            )


def _is_import_path(name: str) -> bool:
    return ":" in name or "." in name


def _trained_with(cfg: RunConfig) -> dict[str, Any]:
    """What decides a run's trained weights, flattened to ``key: value``: the seed, the data, the
    teacher (architecture, checkpoint, training) and each student (architecture, distiller and its
    parameters, training). The students' epochs are left out (a resumed run may train them on to
    more; the teacher's stay in: finished students were distilled from the teacher as it was), and so
    are the settings that change how a step runs, not what it computes (precision, memory layout,
    compile, fused optimiser, workers, TensorBoard)."""

    def training(t: Any) -> dict[str, Any]:
        opt = {k: v for k, v in to_dict(t.optimizer).items() if k != "fused"}
        return {"batch_size": t.batch_size, "optimizer": opt, "scheduler": to_dict(t.scheduler),
                "max_steps_per_epoch": t.max_steps_per_epoch}  # fmt: skip

    out = {"seed": cfg.seed, "data": to_dict(cfg.data), "teacher.model": to_dict(cfg.teacher.model)}
    out |= {"teacher.checkpoint": cfg.teacher.checkpoint, "teacher.train": training(cfg.teacher.train)}
    out |= {"teacher.train.epochs": cfg.teacher.train.epochs}
    for s in cfg.students:
        model = s.model or cfg.student_model
        out |= {f"students[{s.name}].model": to_dict(model), f"students[{s.name}].distiller": s.distiller}
        out |= {f"students[{s.name}].params": s.params, f"students[{s.name}].train": training(cfg.train)}
    return out


def resume_conflicts(saved: RunConfig, cfg: RunConfig) -> list[str]:
    """The settings of ``cfg`` that differ from those ``saved`` trained its models with (see
    :func:`_trained_with`), as ``key: old -> new``; students only one of them has are not conflicts
    (a resumed run trains a new student and ignores a dropped one)."""
    old, new = _trained_with(saved), _trained_with(cfg)
    return [f"{k}: {old[k]} -> {new[k]}" for k in new if k in old and old[k] != new[k]]


def check_resume(saved_config: Path, cfg: RunConfig) -> None:
    """``--resume`` of a run (its ``config.yaml`` at ``saved_config``) whose models were trained with
    other settings would keep those models and record them under ``cfg``: refuse, naming what changed
    (evaluation settings and epochs may change)."""
    try:
        saved = read_config(saved_config)
    except ConfigError as e:  # written by an older xkd whose keys this one does not read
        log.warning("cannot compare %s with this config (%s); resuming without the check", saved_config, e)
        return
    changed = resume_conflicts(saved, cfg)
    if changed:
        raise ConfigError(
            f"--resume: {saved_config.parent} holds models trained with other settings, and resuming would keep "
            f"them under the new ones: {'; '.join(changed)}. Restore those settings, pass --overwrite to train "
            "again, or choose another name (--set name=NEW)"
        )
