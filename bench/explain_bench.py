"""Explaining the default run's WHOLE test set with every default explainer: does it fit the budget?

Builds the models of ``configs/default.yaml`` (teacher and every student; weights untrained: the cost
of explaining does not depend on them, except that the superpixel count depends on the images, so the
real test images are used), then explains every test image with every explainer of the config's
``evaluation.explainers`` for teacher and students (UniCAM for students only), exactly as a run
does, and reports the seconds per explainer and model and the total against the default run's
10-minute budget. Also reports the per-image cost of the scoring metrics on ``evaluation.num_images``.

Run: ``python bench/explain_bench.py`` (needs the Fashion-MNIST Debian package, see
``scripts/fashion_mnist.sh``; ``--quick`` explains 200 images). Writes
``bench/results/explain.json``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from xkd.data import build_dataset
from xkd.data.base import dataset_labels, fetch
from xkd.files import library_versions, write_json
from xkd.models import build_model
from xkd.plan import load_config, resolve

ROOT = Path(__file__).resolve().parents[1]
OUT = Path(__file__).parent / "results" / "explain.json"
BUDGET_SECONDS = 600.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs/default.yaml"))
    ap.add_argument("--quick", action="store_true", help="200 test images only (smoke run)")
    args = ap.parse_args()
    cfg = load_config(args.config)
    data = build_dataset(cfg.data)
    n = min(200, len(data.test)) if args.quick else len(data.test)
    batch = fetch(data.test, torch.arange(n))
    images, labels = batch.images, batch.labels
    c, h, w = data.image_shape
    torch.manual_seed(cfg.seed)
    teacher = build_model(cfg.teacher.model, data.num_classes, c, (h, w)).eval()
    students = {
        s.name: build_model(s.model or cfg.student_model, data.num_classes, c, (h, w)).eval() for s in cfg.students
    }
    models = {"teacher": teacher, **students}
    print(f"{n} test images ({len(dataset_labels(data.test))} in the split), torch threads {torch.get_num_threads()}")
    rows, total = [], 0.0
    for e in resolve(cfg).explainers:
        for role, model in models.items():
            if e.pair and role == "teacher":
                continue
            context = {"teacher": teacher} if e.pair else {}
            start = time.perf_counter()
            with e.build(model, **context) as ex:
                for s in range(0, n, cfg.evaluation.batch_size):
                    sl = slice(s, s + cfg.evaluation.batch_size)
                    ex.explain(images[sl], labels[sl])
            sec = time.perf_counter() - start
            total += sec
            rows.append({"explainer": e.key, "model": role, "seconds": sec, "ms_per_image": 1e3 * sec / n})
            print(f"{e.key:<24} {role:<10} {sec:7.1f} s  {1e3 * sec / n:7.2f} ms/image", flush=True)
    print(f"total {total:.1f} s for {n} images = {total / BUDGET_SECONDS:.2f} of the {BUDGET_SECONDS:.0f} s budget")
    write_json(
        OUT,
        {
            "config": str(Path(args.config).relative_to(ROOT)) if ROOT in Path(args.config).parents else args.config,
            "images": n,
            "threads": torch.get_num_threads(),
            "rows": rows,
            "total_seconds": total,
            "budget_seconds": BUDGET_SECONDS,
            "share_of_budget": total / BUDGET_SECONDS,
            "versions": library_versions(),
        },
    )
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
