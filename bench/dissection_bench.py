"""Network dissection of one layer of the default teacher over the concepts set: under a minute?

Builds the teacher of ``configs/default.yaml`` (ResNet-20) for 3x64x64 concept images (untrained:
the cost of dissecting does not depend on the weights) and dissects its default layer (``layer3``)
over the 2,000 images of the default ``concepts`` set, with the same passes a study runs (streaming
quantile, then IoU with all 19 concepts). Reports the seconds of each repeat beside the cost of the
two bare forward passes over the same images (the limit: dissection needs two passes), and the
ratio to the 60-second target.

Run: ``python bench/dissection_bench.py`` (offline). Writes ``bench/results/dissection.json``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from xkd.config import DataConfig
from xkd.data import build_dataset
from xkd.data.concepts import ConceptDataset
from xkd.files import library_versions, write_json
from xkd.metrics.dissection import concept_detectors
from xkd.models import build_model, default_layer
from xkd.plan import load_config

ROOT = Path(__file__).resolve().parents[1]
OUT = Path(__file__).parent / "results" / "dissection.json"
TARGET_SECONDS = 60.0
REPEATS = 2


def main() -> None:
    cfg = load_config(ROOT / "configs/default.yaml")
    data = build_dataset(DataConfig("concepts"))
    splits = (data.train, data.val, data.test)
    dataset = ConceptDataset(
        torch.cat([d.images for d in splits]), torch.cat([d.labels for d in splits]),
        torch.cat([d.concept_maps for d in splits]),
    )  # fmt: skip
    images = dataset.images
    torch.manual_seed(0)
    teacher = build_model(cfg.teacher.model, data.num_classes, 3, 64).eval()
    layer = default_layer(teacher)
    rows = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        with torch.no_grad():
            for s in range(0, len(images), 128):
                chunk = images[s : s + 128]
                teacher(chunk.float() / 255.0 if chunk.dtype == torch.uint8 else chunk)
        forward = time.perf_counter() - t0
        t0 = time.perf_counter()
        result = concept_detectors(teacher, dataset, layer=layer)
        seconds = time.perf_counter() - t0
        rows.append(
            {"seconds": seconds, "one_forward_pass_seconds": forward, "ratio_to_two_passes": seconds / (2 * forward)}
        )
        print(f"dissection {seconds:.1f} s, one forward pass {forward:.1f} s, {result['n_units']} units")
    best = min(r["seconds"] for r in rows)
    write_json(
        OUT,
        {
            "benchmark": "dissection",
            "model": cfg.teacher.model.name,
            "layer": layer,
            "images": len(dataset),
            "units": result["n_units"],
            "feature_size": result["feature_size"],
            "threads": torch.get_num_threads(),
            "load_average_1m": os.getloadavg()[0],
            "versions": library_versions(),
            "repeats": rows,
            "best_seconds": best,
            "ratio_to_target": best / TARGET_SECONDS,
        },
    )
    print(f"best {best:.1f} s = {best / TARGET_SECONDS:.2f} of the {TARGET_SECONDS:.0f} s target -> {OUT}")


if __name__ == "__main__":
    main()
