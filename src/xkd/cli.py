"""The ``xkd`` command: thin argument parsing over :mod:`xkd.api` (no logic of its own)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.logging import RichHandler

from xkd.errors import ConfigError, XkdError

err = Console(stderr=True)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="xkd", description="Explainable knowledge distillation.")
    p.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="train the teacher, distil the students, explain, score and write the report")
    r.add_argument(
        "--config",
        "-c",
        help="YAML run config (default: the library defaults of xkd.config.RunConfig, "
        "full Fashion-MNIST; configs/default.yaml is the 5-minute demo)",
    )
    r.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.epochs=2 --set students.1.params.alpha=0.5",
    )
    r.add_argument("--resume", action="store_true", help="continue an interrupted run from its last checkpoints")
    r.add_argument("--overwrite", action="store_true", help="delete an existing run directory of this name first")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")

    c = sub.add_parser(
        "compare",
        help="train the configured students over several seeds and write one comparison report (mean ± std)",
    )
    c.add_argument("--config", "-c", required=True, help="YAML run config: its students are the methods compared")
    c.add_argument("--seeds", type=int, help="number of seeds (default: the config's compare.seeds, 3)")
    c.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config value"
    )
    c.add_argument("--resume", action="store_true", help="keep finished seeds and continue an interrupted one")
    c.add_argument("--overwrite", action="store_true", help="delete an existing comparison of this name first")
    c.add_argument("--no-progress", action="store_true", help="no progress bars")

    st = sub.add_parser(
        "study", help="re-measure a source's claim over several seeds: kd-vs-ls, capacity-gap or explanation-transfer"
    )
    st.add_argument("study", help="a registered study (`xkd list`): kd-vs-ls, capacity-gap or explanation-transfer")
    st.add_argument("--config", "-c", required=True, help="YAML run config with a `study:` section")
    st.add_argument("--seeds", type=int, help="number of seeds (default: the config's compare.seeds, 3)")
    st.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config value"
    )
    st.add_argument("--resume", action="store_true", help="keep finished runs and cached retrainings")
    st.add_argument("--overwrite", action="store_true", help="delete an existing study of this name first")
    st.add_argument("--no-progress", action="store_true", help="no progress bars")

    sw = sub.add_parser(
        "sweep",
        help="search the config's `sweep.params` with Optuna, each trial an xkd run; writes sweep.html and best.yaml",
    )
    sw.add_argument("--config", "-c", required=True, help="YAML run config with a `sweep:` section")
    sw.add_argument(
        "--trials", type=int, help="finished trials the study ends with (default: the config's sweep.trials)"
    )
    sw.add_argument(
        "--storage",
        help="SQLAlchemy URL of the study's database, e.g. postgresql://user:pass@host/db, shared by several "
        "workers (default: study.db in the sweep folder)",
    )
    sw.add_argument("--study", dest="study_name", help="the study's name in the storage (default: the config's name)")
    sw.add_argument("--timeout", type=float, help="ask for no new trial after this many seconds")
    sw.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config value"
    )
    sw.add_argument(
        "--resume", action="store_true", help="continue the sweep's study (also: add this process as a worker)"
    )
    sw.add_argument("--no-progress", action="store_true", help="no progress bars")

    e = sub.add_parser("explain", help="teacher and student maps for your own images")
    e.add_argument("--run", required=True, help="a finished run directory (runs/NAME)")
    e.add_argument("--images", required=True, nargs="+", help="image files (PNG, JPEG, ...), not folders")
    e.add_argument(
        "--explainer",
        default="grad_cam",
        help="an explainer of the run, by label (e.g. unicam_distilled) or name, or any registered explainer "
        "(default grad_cam)",
    )
    e.add_argument("--out", help="output folder (default RUN/explanations)")
    e.add_argument(
        "--device", default="auto", choices=["auto", "cpu", "cuda"], help="where the models run (auto: the GPU if any)"
    )

    rep = sub.add_parser(
        "report", help="re-render the report of RUN_DIR from its records (a run, a comparison or a study)"
    )
    rep.add_argument("run_dir")

    sub.add_parser("list", help="registered datasets, models, distillers, explainers and metrics")
    return p


def cmd_list(api: Any) -> None:
    for kind, reg in api.ALL_REGISTRIES.items():
        print(f"{kind}:")
        for name in reg.names():
            entry = reg.get(name)
            if isinstance(entry, api.MetricInfo):
                arrow = {True: "higher is better", False: "lower is better", None: "no direction"}
                needs = ", ".join(entry.needs) or "-"
                print(f"  {name:<28} {entry.category:<17} {arrow[entry.higher_is_better]:<17} needs: {needs}")
            else:
                print(f"  {name}")
        if kind == "explainers":
            print("  (any explainer + '+superpixel': its XDistillation superpixel form, e.g. grad_cam+superpixel)")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=err, show_path=False, show_time=False)],
    )
    # a library warning (UniCAM's one-class batch) is a log line like the others, not a source path
    warnings.showwarning = lambda message, *_, **__: logging.getLogger("xkd").warning("%s", message)
    # SIGTERM (`timeout`, `kill`, a scheduler) stops the command as Ctrl-C does: the last checkpoint is
    # kept and an open MLflow run is marked KILLED (the default action ended the process mid-write)
    previous = (
        signal.signal(signal.SIGTERM, _terminated) if threading.current_thread() is threading.main_thread() else None
    )
    try:
        # torch and every registry load here, not at import: `xkd --help` answers at once
        import xkd.api as api

        if args.command in ("compare", "study") and args.seeds is not None and args.seeds < 1:
            raise ConfigError(f"--seeds must be >= 1, got {args.seeds}")
        if args.command == "list":
            cmd_list(api)
        elif args.command == "run":
            cfg = api.load_config(args.config, args.overrides)
            api.run(cfg, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress)
        elif args.command == "compare":
            cfg = api.load_config(args.config, args.overrides)
            api.compare(cfg, args.seeds, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress)
        elif args.command == "study":
            run_study = api.STUDIES.get(args.study)
            cfg = api.load_config(args.config, args.overrides)
            run_study(cfg, args.seeds, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress)
        elif args.command == "sweep":
            cfg = api.load_config(args.config, args.overrides)
            api.sweep(
                cfg,
                args.trials,
                storage=args.storage,
                study_name=args.study_name,
                timeout=args.timeout,
                resume=args.resume,
                progress=not args.no_progress,
            )
        elif args.command == "report":  # a run, a comparison, a study, or a study over a comparison
            for page in api.render_dir(args.run_dir):
                print(page)
        elif args.command == "explain":
            print(api.explain_images(args.run, [Path(p) for p in args.images], args.explainer, args.out, args.device))
    except XkdError as e:
        # plain print: no line wrapping, and no markup parsing of "[0]" in key paths
        print(f"xkd: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print("xkd: interrupted; rerun with --resume to continue from the last checkpoint", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the command is, so that it unwinds as an interrupt does."""


def _terminated(signum: int, frame: Any) -> None:
    raise Terminated


if __name__ == "__main__":
    sys.exit(main())
