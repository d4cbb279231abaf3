"""Training throughput, measured side by side in one run: xkd's engine against a bare hand-written
loop, a KD epoch against a scratch epoch (teacher logits cached, and the teacher run per batch), a
DKD epoch (cached) against scratch, bf16 autocast against fp32, on a GPU the fused optimiser against
torch's default, the tensor operators (kernel launches on a GPU) per step of the engine, of the
bare loop and of cached KD and DKD, and the engine's host time per step over the bare loop's on a
trivial model (compute negligible: the launch-bound case of small models on a GPU); with ``--distillers``, also the epochs of e2KD (live and with frozen
explanations), CAT-KD and CRD against scratch and against KD (the frozen e2KD's one-off pass over the
training images, done by its setup, is reported apart, as the teacher-logit cache is).

The models and budget of ``configs/default.yaml`` (ResNet-20 teacher, KD-FMV student, batch 128,
Adam) on its Fashion-MNIST training subset (10,000 images; scikit-learn's digits upsampled to
28 px when the Fashion-MNIST package is missing). The teacher is untrained: the cost of a step does
not depend on its weights. Every variant trains one epoch per repeat, the variants interleaved, and
the median epoch is reported; the engine's epoch time is its training loop (validation excluded, as
the bare loop has none).

Run: ``python bench/train_bench.py [--device cuda] [--repeats 3] [--distillers] [--config C --set K=V ...]``
(another config's models and budget, e.g. ``configs/kdfmv_gpu.yaml``). Writes ``bench/results/train.json``
with the device name.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # the profiler's "no GPU" error lines on a CUDA build without one

import torch  # noqa: E402
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from xkd.config import DataConfig, TrainConfig
from xkd.data import build_dataset
from xkd.data.base import TensorImageDataset
from xkd.distill import build_distiller
from xkd.distill.base import DistillContext
from xkd.engine.runtime import build_optimizer, predict_logits
from xkd.engine.trainer import Trainer
from xkd.errors import DataError
from xkd.files import library_versions, write_json
from xkd.models import build_model
from xkd.plan import load_config

ROOT = Path(__file__).resolve().parents[1]
OUT = Path(__file__).parent / "results" / "train.json"


def load_data(cfg_data: DataConfig):
    try:
        return build_dataset(cfg_data), cfg_data.name
    except DataError:
        fallback = DataConfig("digits", image_size=28)
        return build_dataset(fallback), "digits (28 px; Fashion-MNIST package missing)"


def bare_epoch(
    student: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    budget: TrainConfig,
    seed: int,
    steps: int | None = None,
) -> float:
    """One epoch (or its first ``steps``) of the plainest loop: data already on the device, no bookkeeping,
    the engine's optimiser (with ``fused: auto``: torch's fused one on a GPU, its default elsewhere)."""
    batch = budget.batch_size
    opt = build_optimizer(list(student.parameters()), budget, images.device)
    student.train()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed)).to(images.device)
    sync(images.device)
    t0 = time.perf_counter()
    for idx in order.split(batch)[:steps]:
        loss = F.cross_entropy(student(images[idx]), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    sync(images.device)
    return time.perf_counter() - t0


# Operators that launch no kernel (views, metadata, allocation) or are not a kernel (a host read).
NO_KERNEL = {
    "view", "slice", "select", "t", "transpose", "expand", "as_strided", "unsqueeze", "squeeze", "detach", "alias",
    "lift_fresh", "empty", "empty_strided", "empty_like", "_reshape_alias", "_unsafe_view", "permute", "split",
    "narrow", "unbind", "squeeze_", "unsqueeze_", "t_", "transpose_", "as_strided_", "_local_scalar_dense",
    "is_nonzero", "item", "resize_", "set_",
}  # fmt: skip


class _Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "aten" and func.overloadpacket.__name__ not in NO_KERNEL:
            self.n += 1
        return func(*args, **(kwargs or {}))


def operators(run) -> int:
    """How many tensor operators that launch a kernel ``run()`` calls, forward and backward: the
    operators torch dispatches to a device kernel, after composite operators are decomposed (a
    ``kl_div`` counts as its sub, exp, mul and sum, as it launches them), views, metadata and host
    reads left out."""
    with _Count() as count:
        run()
    return count.n


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Trivial(torch.nn.Module):
    """One 3x3 convolution and a linear layer on 1x4x4 images: a step whose compute is negligible, so its
    time is the host's (Python, dispatch, kernel launches) -- what bounds a small model's GPU step."""

    num_classes = 3

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 2, 3, padding=1)
        self.fc = torch.nn.Linear(2 * 16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).flatten(1))


def host_overhead(device: torch.device, repeats: int, steps: int = 400, batch: int = 8) -> dict[str, float]:
    """The engine's host time per step over the bare loop's on :class:`_Trivial` (batch 8, ``steps``
    steps per epoch, median of ``repeats`` interleaved epochs): the overhead of its bookkeeping and
    batching where launches, not compute, set the pace."""
    g = torch.Generator().manual_seed(0)
    images, labels = torch.rand(steps * batch, 1, 4, 4, generator=g), torch.randint(0, 3, (steps * batch,), generator=g)
    train = TensorImageDataset(images, labels)
    val = TensorImageDataset(images[:batch], labels[:batch])
    cfg = TrainConfig(epochs=1, batch_size=batch, amp="off")
    on_dev = images.to(device), labels.to(device)

    def engine() -> float:
        torch.manual_seed(0)
        d = build_distiller("scratch", _Trivial())
        return float(Trainer(d, train, val, cfg, device=device, progress=False).fit().history[0]["seconds"])

    def bare() -> float:
        torch.manual_seed(0)
        return bare_epoch(_Trivial().to(device), *on_dev, cfg, 0)

    times: dict[str, list[float]] = {"bare_loop": [], "engine": []}
    for _ in range(repeats):
        times["bare_loop"].append(bare())
        times["engine"].append(engine())
    us = {k: statistics.median(v) / steps * 1e6 for k, v in times.items()}
    return {
        "bare_loop_us_per_step": us["bare_loop"],
        "engine_us_per_step": us["engine"],
        "engine_overhead_us_per_step": us["engine"] - us["bare_loop"],
        "engine_over_bare_throughput": us["bare_loop"] / us["engine"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs/default.yaml"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--distillers", action="store_true", help="also e2kd (live, frozen), cat_kd and crd")
    ap.add_argument("--out", type=Path, default=OUT, help=f"result file (default {OUT.relative_to(ROOT)})")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, as in xkd run")
    args = ap.parse_args()
    cfg = load_config(args.config, args.set)
    device = torch.device(args.device)
    data, data_name = load_data(cfg.data)
    c, h, w = data.image_shape
    k = data.num_classes
    n = len(data.train)
    budget = TrainConfig(epochs=1, batch_size=cfg.train.batch_size, optimizer=cfg.train.optimizer, amp="off")
    mixed = TrainConfig(epochs=1, batch_size=cfg.train.batch_size, optimizer=cfg.train.optimizer, amp="bf16")
    teacher = build_model(cfg.teacher.model, k, c, (h, w)).to(device).eval()
    sample = torch.zeros(2, c, h, w)
    all_batch = data.train.batch(torch.arange(n))
    images, labels = all_batch.images.to(device), all_batch.labels.to(device)
    t0 = time.perf_counter()
    cached = predict_logits(teacher, data.train, device).to(device)
    cache_seconds = time.perf_counter() - t0

    def student():
        torch.manual_seed(0)
        return build_model(cfg.student_model, k, c, (h, w)).to(device)

    setup_seconds: dict[str, list[float]] = {}

    def engine(name: str, params: dict, use_cache: bool, train_cfg: TrainConfig = budget, label: str = "") -> float:
        context = DistillContext(sample=sample, train=data.train, device=device)
        t_setup = time.perf_counter()  # no cache_dir: a frozen e2KD computes its explanations every time
        d = build_distiller(name, student(), teacher if name != "scratch" else None, params, context)
        setup_seconds.setdefault(label or name, []).append(time.perf_counter() - t_setup)
        if use_cache:
            d.use_teacher_logits(cached, labels)
        trainer = Trainer(d, data.train, data.val, train_cfg, device=device, progress=False)
        return float(trainer.fit().history[0]["seconds"])

    variants = {
        "bare_loop": lambda r: bare_epoch(student(), images, labels, budget, r),
        "engine_scratch": lambda r: engine("scratch", {}, False),
        "engine_scratch_bf16": lambda r: engine("scratch", {}, False, mixed),
        "engine_kd_cached": lambda r: engine("hinton_kd", {"alpha": 0.7, "temperature": 5.0}, True),
        "engine_kd_teacher_forward": lambda r: engine("hinton_kd", {"alpha": 0.7, "temperature": 5.0}, False),
        "engine_dkd_cached": lambda r: engine("dkd", {}, True),
        "engine_at": lambda r: engine("at", {}, False),
    }
    if device.type == "cuda":  # on the CPU `fused: auto` is the default optimiser: nothing to compare
        unfused = replace(budget, optimizer=replace(budget.optimizer, fused=False))
        variants["engine_scratch_unfused"] = lambda r: engine("scratch", {}, False, unfused)
    if args.distillers:
        variants |= {
            "engine_e2kd": lambda r: engine("e2kd", {"temperature": 4.0, "exp_weight": 5.0}, False),
            "engine_e2kd_frozen": lambda r: engine(
                "e2kd", {"temperature": 4.0, "exp_weight": 5.0, "frozen_explanations": True}, False, label="e2kd_frozen"
            ),
            "engine_cat_kd": lambda r: engine("cat_kd", {}, False),
            "engine_crd": lambda r: engine("crd", {}, False),
        }

    # Launch cost, which bounds a small model's step on a GPU, measured on any device: the operators
    # (each at least one kernel) per step of the engine and of the bare loop, from the difference of a
    # 40-step and a 20-step run (which cancels what runs once: set-up, validation, first-step state;
    # fewer steps when the epoch is shorter).
    def engine_steps(steps: int, name: str = "scratch", params: dict | None = None) -> None:
        d = build_distiller(name, student(), teacher if name != "scratch" else None, params or {})
        if name != "scratch":
            d.use_teacher_logits(cached, labels)
        cfg = TrainConfig(
            epochs=1, batch_size=budget.batch_size, optimizer=budget.optimizer, amp="off", max_steps_per_epoch=steps
        )
        Trainer(d, data.train, data.val, cfg, device=device, progress=False).fit()

    def per_step(run) -> float:
        return (operators(lambda: run(hi)) - operators(lambda: run(lo))) / (hi - lo)

    hi = min(40, n // budget.batch_size)
    lo = hi // 2
    ops: dict[str, float | None] = dict.fromkeys(
        ("bare_loop", "engine_scratch", "engine_kd_cached", "engine_dkd_cached")
    )
    if lo >= 1:
        ops = {
            "bare_loop": per_step(lambda s: bare_epoch(student(), images, labels, budget, 0, s)),
            "engine_scratch": per_step(engine_steps),
            "engine_kd_cached": per_step(lambda s: engine_steps(s, "hinton_kd", {"alpha": 0.7, "temperature": 5.0})),
            "engine_dkd_cached": per_step(lambda s: engine_steps(s, "dkd")),
        }
        print("operators per step: " + ", ".join(f"{k} {v:.1f}" for k, v in ops.items()), flush=True)
    trivial = host_overhead(device, max(args.repeats, 5))
    print(
        f"trivial model: bare loop {trivial['bare_loop_us_per_step']:.0f} us/step, engine "
        f"{trivial['engine_us_per_step']:.0f} us/step ({trivial['engine_over_bare_throughput']:.2f}x)",
        flush=True,
    )
    times: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(args.repeats):
        for name, run in variants.items():
            times[name].append(run(r))
            print(f"repeat {r + 1}: {name:<26} {times[name][-1]:6.2f} s", flush=True)
    med = {v: statistics.median(t) for v, t in times.items()}
    ratios = {
        "engine_over_bare_throughput": med["bare_loop"] / med["engine_scratch"],
        "kd_cached_over_scratch_epoch": med["engine_kd_cached"] / med["engine_scratch"],
        "dkd_cached_over_scratch_epoch": med["engine_dkd_cached"] / med["engine_scratch"],
        "kd_teacher_forward_over_scratch_epoch": med["engine_kd_teacher_forward"] / med["engine_scratch"],
        "at_over_scratch_epoch": med["engine_at"] / med["engine_scratch"],
        "bf16_over_fp32_epoch": med["engine_scratch_bf16"] / med["engine_scratch"],
    }
    if "engine_scratch_unfused" in med:
        ratios["fused_over_unfused_optimizer_epoch"] = med["engine_scratch"] / med["engine_scratch_unfused"]
    for v in ("e2kd", "e2kd_frozen", "cat_kd", "crd"):
        if f"engine_{v}" in med:
            ratios[f"{v}_over_scratch_epoch"] = med[f"engine_{v}"] / med["engine_scratch"]
            ratios[f"{v}_over_kd_teacher_forward_epoch"] = med[f"engine_{v}"] / med["engine_kd_teacher_forward"]
            ratios[f"{v}_over_kd_cached_epoch"] = med[f"engine_{v}"] / med["engine_kd_cached"]
    for key, v in ratios.items():
        print(f"{key:<40} {v:5.2f}")
    write_json(
        args.out,
        {
            "device": torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else f"cpu ({torch.get_num_threads()} threads)",
            "config": os.path.relpath(Path(args.config).resolve(), ROOT),
            "overrides": args.set,
            "data": data_name,
            "train_images": n,
            "batch_size": budget.batch_size,
            "repeats": args.repeats,
            "median_epoch_seconds": med,
            "images_per_second": {v: n / t for v, t in med.items()},
            "teacher_logit_cache_seconds": cache_seconds,
            "setup_seconds_median": {k: statistics.median(v) for k, v in setup_seconds.items()},
            "ratios": ratios,
            "operators_per_step": ops,
            "trivial_model_host_time": trivial,
            "targets": {"engine_over_bare_throughput": ">= 0.9", "kd_cached_over_scratch_epoch": "<= 1.15"},
            "epoch_seconds": times,
            "versions": library_versions(),
        },
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
