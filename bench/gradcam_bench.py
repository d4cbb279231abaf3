"""Grad-CAM speed: xkd's own backend vs captum LayerGradCam vs pytorch-grad-cam, same model, batch, layer.

Also times the bare forward pass (no autograd) and a full forward+backward (a training step's
autograd work: gradients of the selected logits for every parameter and the input). Grad-CAM needs
the forward plus a backward only down to the explained layer, so its floor lies between the two.
Repeats are interleaved (the method order rotates every round) and the median is reported.
The three implementations are checked to agree after per-image min-max normalisation
(pytorch-grad-cam normalises before resizing with OpenCV, the others upsample first, so it differs
by interpolation rounding at most).

Run: ``python bench/gradcam_bench.py`` (about a minute; ``--quick`` for a smoke run). Writes
``bench/results/gradcam.json``.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from captum.attr import LayerAttribution, LayerGradCam
from pytorch_grad_cam import GradCAM as PGCGradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from xkd.config import ModelConfig
from xkd.explain import GradCAM, normalize_maps
from xkd.models import build_model, default_layer, get_module
from xkd.report.records import library_versions, write_json

OUT = Path(__file__).parent / "results" / "gradcam.json"

# (label, model name, classes, channels, size, params)
CASES = [
    ("cifar_resnet (ResNet-20) 1x28x28", "cifar_resnet", 10, 1, 28, {}),
    ("kdfmv_cnn student 1x28x28", "kdfmv_cnn", 10, 1, 28, {}),
    ("resnet18 3x64x64", "resnet18", 10, 3, 64, {}),
]


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_case(label: str, name: str, classes: int, ch: int, size: int, params: dict, batch: int, repeats: int) -> dict:
    torch.manual_seed(0)
    model = build_model(ModelConfig(name, params=params), classes, ch, size).eval()
    layer = default_layer(model)
    module = get_module(model, layer)
    x = torch.rand(batch, ch, size, size)
    t = torch.randint(0, classes, (batch,))

    own = GradCAM(model, {"layer": layer, "batch_size": batch})
    lgc = LayerGradCam(model, module)
    pgc = PGCGradCAM(model=model, target_layers=[module])
    pgc_targets = [ClassifierOutputTarget(int(c)) for c in t]

    def run_captum() -> torch.Tensor:
        cam = lgc.attribute(x, target=t, relu_attributions=True)
        return LayerAttribution.interpolate(cam.detach(), (size, size), interpolate_mode="bilinear")[:, 0]

    def forward() -> None:
        with torch.no_grad():
            model(x)

    def forward_backward() -> None:
        xi = x.detach().requires_grad_(True)
        out = model(xi).gather(1, t[:, None]).sum()
        torch.autograd.grad(out, [xi, *model.parameters()])

    methods: dict[str, Callable[[], object]] = {
        "xkd": lambda: own.explain(x, t),
        "captum": run_captum,
        "pytorch-grad-cam": lambda: pgc(input_tensor=x, targets=pgc_targets),
        "forward": forward,
        "forward+backward": forward_backward,
    }
    maps = {
        "xkd": own.explain(x, t).maps,
        "captum": run_captum(),
        "pytorch-grad-cam": torch.from_numpy(np.asarray(pgc(input_tensor=x, targets=pgc_targets))),
    }
    ref = normalize_maps(maps["xkd"])
    agreement = {
        "captum_raw_max_abs_diff": float((maps["xkd"] - maps["captum"]).abs().max()),
        "captum_normalised_max_abs_diff": float((ref - normalize_maps(maps["captum"])).abs().max()),
        "pytorch_grad_cam_normalised_max_abs_diff": float((ref - maps["pytorch-grad-cam"]).abs().max()),
        "raw_scale": float(maps["xkd"].abs().max()),
    }
    names = list(methods)
    times: dict[str, list[float]] = {k: [] for k in names}
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for k in order:
            times[k].append(timed(methods[k]))
    pgc.activations_and_grads.release()
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "case": label,
        "model": name,
        "layer": layer,
        "batch": batch,
        "input": [ch, size, size],
        "repeats": repeats,
        "median_seconds": med,
        "images_per_second": {k: batch / v for k, v in med.items()},
        "ratios": {
            "xkd/captum": med["xkd"] / med["captum"],
            "xkd/pytorch-grad-cam": med["xkd"] / med["pytorch-grad-cam"],
            "xkd/forward": med["xkd"] / med["forward"],
            "xkd/forward+backward": med["xkd"] / med["forward+backward"],
        },
        "agreement": agreement,
        "param_grads_left_by_pytorch_grad_cam": any(p.grad is not None for p in model.parameters()),
    }


def machine() -> dict:
    versions = library_versions()
    try:
        versions["grad-cam"] = md.version("grad-cam")
    except md.PackageNotFoundError:
        pass
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1m": os.getloadavg()[0],
        "versions": versions,
    }


def print_table(results: list[dict]) -> None:
    cols = ["xkd", "captum", "pytorch-grad-cam", "forward", "forward+backward"]
    print(f"{'case':34s} " + " ".join(f"{c:>17s}" for c in cols) + "   (ms per batch | images/s)")
    for r in results:
        cells = [f"{1000 * r['median_seconds'][c]:7.1f} |{r['images_per_second'][c]:7.0f}" for c in cols]
        print(f"{r['case']:34s} " + " ".join(f"{c:>17s}" for c in cells))
    print()
    for r in results:
        ratios = "  ".join(f"{k} = {v:.2f}" for k, v in r["ratios"].items())
        a = r["agreement"]
        print(f"{r['case']}: {ratios}")
        print(
            f"  agreement: captum raw {a['captum_raw_max_abs_diff']:.2e} (scale {a['raw_scale']:.2e}), "
            f"normalised {a['captum_normalised_max_abs_diff']:.2e}; "
            f"pytorch-grad-cam normalised {a['pytorch_grad_cam_normalised_max_abs_diff']:.2e}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=15, help="timed rounds for the 28x28 cases")
    parser.add_argument("--repeats-large", type=int, default=5, help="timed rounds for resnet18 3x64x64")
    parser.add_argument("--no-large", action="store_true", help="skip resnet18 3x64x64")
    parser.add_argument("--quick", action="store_true", help="3 rounds, no resnet18 (smoke run)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.no_large = 3, True
    start = time.perf_counter()
    results = []
    for label, name, classes, ch, size, params in CASES:
        large = size > 32
        if large and args.no_large:
            continue
        reps = args.repeats_large if large else args.repeats
        results.append(bench_case(label, name, classes, ch, size, params, args.batch, reps))
    info = machine()
    info["load_average_1m_after"] = os.getloadavg()[0]
    payload = {"benchmark": "gradcam", "machine": info, "results": results, "wall_seconds": time.perf_counter() - start}
    print_table(results)
    print(
        f"\nmachine: {info['cpu_count']} CPUs, {info['torch_threads']} torch threads, load {info['load_average_1m']:.2f}"
        f" -> {info['load_average_1m_after']:.2f}; torch {info['versions'].get('torch')}; "
        f"wall {payload['wall_seconds']:.0f} s"
    )
    write_json(args.out, payload)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
