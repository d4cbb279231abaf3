"""``xkd study explanation-transfer``: does training for explanation agreement transfer the teacher's
explanations better than plain KD, at no cost in accuracy, and more so with less data?

Re-measures the claims of e2KD (Parchami-Araghi, Böhle, Rao & Schiele, "Good Teachers Explain:
Explanation-Enhanced Knowledge Distillation", ECCV 2024) with the test of Ojha et al. ("What
Knowledge Gets Distilled in Knowledge Distillation?", NeurIPS 2023):

1. e2KD students agree more with the teacher's explanations than KD students: the rank correlation
   of their maps with the teacher's (``compare.agreement_explainer``), and ``closer_to_teacher``,
   the share of test images where the teacher's map is closer to the student's than to an
   independent (scratch) student's;
2. at equal or better accuracy;
3. the advantage grows with less data (the paper distils with 50 images per class).

The config's students must include a ``scratch`` student (the independent student of
``closer_to_teacher``), a ``hinton_kd`` student and an ``e2kd`` student; any other registered
distiller may be added (e.g. ``cat_kd`` and ``e2kd`` with ``frozen_explanations``). For every data
fraction of ``study.data_fractions`` (of the config's training split, class-stratified), largest
first, the students are compared over N seeds by :func:`xkd.comparison.compare` (with ``study.equal_steps``, for
as many optimiser steps as at the largest fraction), each fraction in
``<name>/fractions/<pct>/`` with its own report. The teacher is trained once, on the largest
fraction, and every smaller fraction distils from that checkpoint: only the students see less data,
as in the paper. The verdicts are computed from the per-seed numbers (:mod:`xkd.studies.verdict`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rich.console import Console

from xkd.comparison import compare, seed_config
from xkd.config import ConfigError, RunConfig
from xkd.data import DataBundle, build_dataset
from xkd.plan import validate_config
from xkd.registry import STUDIES
from xkd.report.study import render_study_report
from xkd.rundir import RunDir, cache_root
from xkd.schema import from_dict, to_dict
from xkd.studies.common import prepare_study_dir, students_by_distiller, teacher_warnings
from xkd.studies.verdict import judge

REQUIRED = {"scratch": "scratch (the independent student)", "hinton_kd": "KD", "e2kd": "e2KD"}
CLOSER = "closer_to_teacher"


def roles(cfg: RunConfig) -> dict[str, str]:
    """The first student of each required distiller, by distiller name; a clear error if one is missing."""
    return students_by_distiller(
        cfg,
        REQUIRED,
        "xkd study explanation-transfer compares e2KD with KD against an independent student",
        "cat_kd, e2kd with frozen_explanations or any other registered distiller may be added too",
    )


def fraction_sizes(cfg: RunConfig, data: DataBundle | None = None) -> list[tuple[float, int]]:
    """``(fraction, training images)`` of each configured data fraction, largest first (``data``: the
    config's data set when already built)."""
    fractions = list(cfg.study.data_fractions)
    if not fractions:
        raise ConfigError("study.data_fractions: give at least one fraction of the training data, e.g. [1.0, 0.05]")
    bad = [f for f in fractions if not 0 < f <= 1]
    if bad:
        raise ConfigError(f"study.data_fractions must lie in (0, 1], got {bad}")
    if len(set(fractions)) != len(fractions):
        raise ConfigError(f"study.data_fractions has a repeated value: {fractions}")
    data = data or build_dataset(cfg.data)
    n, k = len(data.train), data.num_classes
    sizes = []
    for f in sorted(fractions, reverse=True):
        size = round(f * n)
        if size < 2 * k:
            raise ConfigError(
                f"study.data_fractions: {f:g} of the {n} training images is {size}, fewer than 2 per class "
                f"({k} classes); raise the fraction or data.train_size"
            )
        sizes.append((f, size))
    return sizes


def fraction_label(f: float) -> str:
    return f"{100 * f:g}%"


def student_epochs(cfg: RunConfig, size: int, full: int) -> int:
    """The students' epochs on ``size`` training images: the config's, or, with ``study.equal_steps``,
    as many as give the optimiser steps of the config's epochs on ``full`` images (the largest fraction's)."""
    epochs = cfg.train.epochs
    if not cfg.study.equal_steps or size >= full:
        return epochs
    per_epoch = lambda n: -(-n // cfg.train.batch_size)  # noqa: E731  (batches per epoch, the last one partial)
    return max(epochs, -(-epochs * per_epoch(full) // per_epoch(size)))


def fraction_config(
    cfg: RunConfig, out: Path, f: float, size: int, teacher: str | None, full: int, largest: int | None = None
) -> RunConfig:
    """The comparison's config at fraction ``f`` (``size`` of the ``full`` training images; the
    students' steps matched to the ``largest`` fraction's, default ``full``)."""
    c = from_dict(RunConfig, to_dict(cfg))
    c.name = f"{100 * f:g}pct".replace(".", "_")
    c.output_dir = str(out / "fractions")
    c.cache_dir = str(cache_root(cfg))
    if size < full:
        c.data.train_size = size
        c.train.epochs = student_epochs(cfg, size, largest or full)
    if teacher is not None:
        c.teacher.checkpoint = teacher
    return c


@STUDIES.register("explanation-transfer")
def run_study(
    cfg: RunConfig, seeds: int | None = None, *, resume: bool = False, overwrite: bool = False, progress: bool = True
) -> Path:
    """Run the study and return its folder (``study.html``, ``records/study.json``, one comparison per
    data fraction)."""
    t0 = time.perf_counter()
    console = Console(stderr=True)  # --no-progress hides bars, not these lines
    found = roles(cfg)
    data = build_dataset(cfg.data)
    sizes = fraction_sizes(cfg, data)
    full = len(data.train)
    study = RunDir.of(cfg)
    prepare_study_dir(study, resume, overwrite, "explanation-transfer", "fractions")
    configs = []
    for f, size in sizes:  # everything is checked before the first training starts
        c = fraction_config(cfg, study.path, f, size, None, full, sizes[0][1])
        validate_config(c)
        configs.append(c)
    rows = []
    teacher: str | None = cfg.teacher.checkpoint
    for (f, size), c in zip(sizes, configs):
        if teacher is not None:
            c.teacher.checkpoint = teacher
        console.print(f"[bold]explanation transfer[/bold]: {fraction_label(f)} of the training data ({size} images)")
        cmp_dir = compare(c, seeds, resume=resume, overwrite=False, progress=progress)
        if teacher is None:  # the smaller fractions distil from the largest fraction's teacher
            teacher = str(RunDir.of(seed_config(c, cmp_dir, c.seed, None)).checkpoint("teacher"))
        rows.append((f, size, cmp_dir, RunDir(cmp_dir).read_record("compare")))
    body = summarise(cfg, study.path, found, rows)
    body["warnings"] = teacher_warnings([(rows[0][3], "the teacher")])  # one, trained on the largest fraction
    body["seconds"] = time.perf_counter() - t0
    study.write_record("study", body)
    html = render_study_report(study.path)
    console.print(f"study report: {html}  ({time.perf_counter() - t0:.0f} s)")
    return study.path


def _values(methods: dict[str, Any], role: str, *keys: str) -> list[Any]:
    d: Any = methods.get(role) or {}
    for k in keys:
        d = (d or {}).get(k) if isinstance(d, dict) else None
    return list((d or {}).get("values") or []) if isinstance(d, dict) else []


def _paired_difference(a: list[Any], b: list[Any]) -> list[float]:
    """Per-seed ``a - b`` where both seeds have a value."""
    return [x - y for x, y in zip(a, b) if isinstance(x, (int, float)) and isinstance(y, (int, float))]


def summarise(
    cfg: RunConfig, out: Path, found: dict[str, str], rows: list[tuple[float, int, Path, dict[str, Any]]]
) -> dict[str, Any]:
    headline = rows[0][3]["headline"]  # the comparison's headline explainer (the first with agreement records)
    ex, metric = headline["explainer"], headline["metric"]
    hi = headline.get("higher_is_better", True) is not False  # superpixel_mse: lower agrees more
    kd, e2kd = found["hinton_kd"], found["e2kd"]
    fractions = []
    verdicts = []
    for f, size, cmp_dir, cmp in rows:
        methods = cmp["methods"]
        students = [s for s in cmp["students"]]
        label = fraction_label(f)
        per_student = {}
        for s in students:
            m = methods.get(s) or {}
            agreement = ((m.get("explanation_agreement") or {}).get(ex)) or {}
            per_student[s] = {
                "distiller": m.get("distiller"),
                "accuracy": m.get("accuracy"),
                "agreement": agreement.get(metric),
                CLOSER: agreement.get(CLOSER),
                "quality": (m.get("explanation_quality") or {}).get(ex) or {},
            }
        fractions.append(
            {
                "fraction": f,
                "label": label,
                "train_images": size,
                "student_epochs": student_epochs(cfg, size, rows[0][1]),
                "dir": str(cmp_dir.relative_to(out)),
                "teacher_accuracy": (methods.get("teacher") or {}).get("accuracy"),
                "students": per_student,
                "tests": {s: (methods.get(s) or {}).get("agreement_tests") for s in students},
            }
        )
        at = f" with {label} of the training data ({size} images)"
        verdicts += [
            judge(f"e2KD students' explanations agree more with the teacher's than KD students'{at}", "e2KD",
                  _values(methods, e2kd, "explanation_agreement", ex, metric), "KD",
                  _values(methods, kd, "explanation_agreement", ex, metric), higher=hi,
                  quantity=f"{metric} of the {ex} maps with the teacher's"),
            judge(f"The teacher's explanations are closer to e2KD students' than to KD students' (vs an independent "
                  f"student){at}", "e2KD", _values(methods, e2kd, "explanation_agreement", ex, CLOSER), "KD",
                  _values(methods, kd, "explanation_agreement", ex, CLOSER), higher=True,
                  quantity=f"share of images where the teacher's {ex} map is closer to the student's than to "
                  "the independent student's"),
            judge(f"e2KD students are less accurate than KD students{at} (the paper: equal or better)", "e2KD",
                  _values(methods, e2kd, "accuracy"), "KD", _values(methods, kd, "accuracy"), higher=False,
                  quantity="test accuracy"),
        ]  # fmt: skip
    if len(rows) >= 2:
        (f_hi, _, _, big), (f_lo, _, _, small) = rows[0], rows[-1]

        def gain(cmp: dict[str, Any], *keys: str) -> list[float]:
            return _paired_difference(_values(cmp["methods"], e2kd, *keys), _values(cmp["methods"], kd, *keys))

        for key, what in ((metric, f"{metric} of the {ex} maps with the teacher's"), (CLOSER, CLOSER)):
            verdicts.append(
                judge(
                    f"e2KD's advantage over KD in {what} grows with less data",
                    fraction_label(f_lo),
                    gain(small, "explanation_agreement", ex, key),
                    fraction_label(f_hi),
                    gain(big, "explanation_agreement", ex, key),
                    higher=hi if key == metric else True,  # e2KD minus KD: more negative is better when lower is
                    quantity=f"e2KD minus KD ({what}), per seed",
                )
            )
    return {
        "name": cfg.name,
        "study": "explanation-transfer",
        "seeds": rows[0][3]["seeds"],
        "explainer": ex,
        "metric": metric,
        "higher_is_better": hi,
        "roles": {"independent": found["scratch"], "kd": kd, "e2kd": e2kd},
        "fractions": fractions,
        "config": to_dict(cfg.study),
        "verdicts": [v.to_record() for v in verdicts],
        "seed_run_seconds": sum(float(r[3].get("seed_run_seconds") or 0.0) for r in rows),
        "links": [
            (f"{fr['dir']}/report.html", f"comparison with {fr['label']} of the training data") for fr in fractions
        ],
    }
