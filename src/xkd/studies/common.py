"""What the studies share: the students a study needs, found in its config by distiller, and the
study folder made ready (new, resumed or overwritten)."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from xkd.config import ConfigError, RunConfig
from xkd.errors import RunExistsError
from xkd.files import is_writer
from xkd.rundir import RunDir, not_this_kind
from xkd.studies.verdict import teacher_warning

log = logging.getLogger("xkd")


def students_by_distiller(cfg: RunConfig, required: Iterable[str], purpose: str, others: str) -> dict[str, str]:
    """The first student of each distiller of the config, by distiller name; one :class:`ConfigError`
    naming every ``required`` distiller the config lacks (``purpose``: what the study compares;
    ``others``: which further students it takes)."""
    found: dict[str, str] = {}
    for s in cfg.students:
        found.setdefault(s.distiller, s.name)
    missing = [d for d in required if d not in found]
    if missing:
        raise ConfigError(
            f"{purpose}: add students with distiller {', '.join(repr(m) for m in missing)} to the config ({others})"
        )
    return found


def teacher_warnings(comparisons: Iterable[tuple[dict, str]]) -> list[str]:
    """:func:`~xkd.studies.verdict.teacher_warning` of each ``(comparison record, teacher label)``,
    logged; the study record keeps them and its page shows them above the verdicts."""
    said = [w for cmp, label in comparisons if (w := teacher_warning(cmp, label))]
    for w in said:
        log.warning("%s", w)
    return said


def prepare_study_dir(study: RunDir, resume: bool, overwrite: bool, kind: str, marker: str) -> None:
    """Make the folder of study ``kind`` ready: new, continued (``resume``) or emptied (``overwrite``);
    a folder is this kind of study when it holds the ``marker`` subfolder (made here, first) or a
    study record, and any other non-empty folder is refused rather than written into or deleted."""
    out = study.path
    if study.is_empty():
        if resume:
            log.info("--resume: nothing to resume in %s (no %s study there yet); starting a new one", out, kind)
    else:
        # its marker, or its own study record: a kd-vs-ls study's record made a capacity-gap --resume
        # train into that folder and replace the kd-vs-ls verdicts
        recorded = study.read_record("study").get("study") if study.has_record("study") else None
        if not ((out / marker).is_dir() or recorded == kind):
            found = f"{recorded} study" if recorded else study.kind()
            raise not_this_kind(out, found, f"{kind} study", resume=resume, overwrite=overwrite)
        if overwrite:
            if is_writer():
                study.clear()
        elif not resume:
            raise RunExistsError(
                f"study directory {out} already exists; pass --resume to continue it (finished runs are kept), "
                "--overwrite to start over, or choose another name (--set name=NEW)"
            )
    if is_writer():
        (out / marker).mkdir(parents=True, exist_ok=True)
        study.records.mkdir(parents=True, exist_ok=True)
