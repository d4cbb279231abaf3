"""``xkd run`` end to end: the pipeline writes the records, then the report is rendered from them.

The pipeline (:mod:`xkd.pipeline`) sits below the report in the package's layers and never draws;
this module, above both, joins them for the command line, ``xkd compare`` and the studies.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console

from xkd.config import RunConfig
from xkd.engine import distributed as D
from xkd.engine.callbacks import Callback
from xkd.files import is_writer
from xkd.pipeline import run as run_pipeline
from xkd.report.render import render_report


def run(
    cfg: RunConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    callbacks: Sequence[Callback] = (),
) -> Path:
    """Run the whole pipeline for ``cfg`` and return the run directory (holding ``report.html``);
    ``callbacks`` as in :func:`xkd.pipeline.run`."""
    t0 = time.perf_counter()
    run_dir = run_pipeline(cfg, resume=resume, overwrite=overwrite, progress=progress, callbacks=callbacks)
    if is_writer():
        html = render_report(run_dir)
        Console(stderr=True).print(f"report: {html}  ({time.perf_counter() - t0:.0f} s)")
    D.barrier()
    return run_dir
