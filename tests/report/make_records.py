"""Write a synthetic but schema-complete run directory, for the report tests.

``make_run_dir(root)`` produces what the pipeline leaves behind after ``xkd run`` (records only, no
checkpoints): ``config.yaml``, ``metrics.json`` and ``records/`` with ``run.json``, ``models.json``,
``explanations.json``, ``samples.json`` and ``samples.safetensors``. The images are tiny seeded
shapes (one bright square per class at a class-specific place) so the maps and masks line up.

Run it as a script to get a folder to look at: ``python tests/report/make_records.py /tmp/run``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save as save_safetensors

from xkd.files import atomic_write_bytes, atomic_write_text, record, write_json

CLASSES = ("circle", "square", "triangle")
ROLES = ("teacher", "scratch", "kd")
EXPLAINERS = ("grad_cam", "feature_maps")


def teacher_layer_names(n: int) -> list[str]:
    """DenseNet-like module paths, long enough to need abbreviating."""
    names = ["features.conv0"]
    block, layer = 1, 1
    while len(names) < n:
        names.append(f"features.denseblock{block}.denselayer{layer}.conv{1 + (len(names) % 2)}")
        layer += len(names) % 2
        if layer > 6:
            block, layer = block + 1, 1
    return names[:n]


def _history(epochs: int, gen: torch.Generator, quality: float) -> list[dict]:
    rows = []
    for e in range(epochs):
        decay = 1.0 / (1.0 + e)
        noise = float(torch.rand((), generator=gen)) * 0.02
        rows.append(
            {
                "epoch": e,
                "train_loss": 1.2 * decay + 0.1 + noise,
                "terms": {"ce": 0.8 * decay + noise, "kd": 0.4 * decay},
                "train_accuracy": min(1.0, quality * (1 - 0.5 * decay) + noise),
                "val_loss": 1.1 * decay + 0.2 + noise,
                "val_accuracy": min(1.0, quality * (1 - 0.55 * decay) + noise),
                "val_macro_f1": min(1.0, quality * (1 - 0.6 * decay) + noise),
                "lr": 0.1 * 0.5**e,
                "seconds": 1.5 + noise,
            }
        )
    return rows


def make_run_dir(
    root: str | Path,
    *,
    name: str = "synthetic-run",
    classes: Sequence[str] = CLASSES,
    roles: Sequence[str] = ROLES,
    explainers: Sequence[str] = EXPLAINERS,
    image_size: int = 16,
    channels: int = 1,
    samples_per_class: int = 2,
    has_masks: bool = True,
    teacher_layers: int = 6,
    student_layers: int = 4,
    epochs: int = 5,
    skipped_files: Sequence[str] = ("raw/bad_0.png", "raw/bad_1.png"),
    seed: int = 0,
) -> Path:
    """Write a complete run directory under ``root`` and return it."""
    root = Path(root)
    gen = torch.Generator().manual_seed(seed)
    k, h = len(classes), image_size
    classes = list(classes)

    # --- samples: a bright square per class, at a class-specific position -----------------------
    labels = [c for c in range(k) for _ in range(samples_per_class)]
    s = len(labels)
    images = 0.2 * torch.rand(s, channels, h, h, generator=gen)
    masks = torch.zeros(s, h, h, dtype=torch.uint8)
    side = max(2, h // 4)
    for i, c in enumerate(labels):
        y0 = (c * h // max(k, 1)) % (h - side)
        x0 = ((c * 5) % (h - side)) if c else 1
        images[i, :, y0 : y0 + side, x0 : x0 + side] += 0.7
        masks[i, y0 : y0 + side, x0 : x0 + side] = 1
    images = images.clamp(0, 1)
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(h), indexing="ij")
    tensors: dict[str, torch.Tensor] = {"images": images.float().contiguous()}
    if has_masks:
        tensors["masks"] = masks
    predictions: dict[str, list[int]] = {}
    feature_layers: dict[str, list[str]] = {}
    for r, role in enumerate(roles):
        preds = list(labels)
        if r > 0 and s > r:  # each student gets one sample wrong
            preds[r] = (preds[r] + 1) % k
        predictions[role] = preds
        blur = 1.5 + r
        cy = torch.tensor([float(masks[i].nonzero()[:, 0].float().mean()) for i in range(s)]).view(s, 1, 1)
        cx = torch.tensor([float(masks[i].nonzero()[:, 1].float().mean()) for i in range(s)]).view(s, 1, 1)
        bump = torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * blur**2))
        for e, explainer in enumerate(explainers):
            noise = 0.1 * torch.rand(s, h, h, generator=gen)
            tensors[f"maps/{role}/{explainer}"] = (bump * (1 + 0.1 * e) + noise).float().contiguous()
        n_layers = teacher_layers if role == "teacher" else student_layers
        feature_layers[role] = (
            teacher_layer_names(n_layers) if role == "teacher" else [f"features.{3 * i}" for i in range(n_layers)]
        )
        for i in range(n_layers):
            depth = (i + 1) / n_layers
            fm = images.mean(1) * (1 - depth) + bump * depth + 0.05 * torch.rand(s, h, h, generator=gen)
            tensors[f"feature_maps/{role}/{i}"] = fm.float().contiguous()
    records = root / "records"
    atomic_write_bytes(records / "samples.safetensors", save_safetensors(tensors))
    indices = [3 * i + 1 for i in range(s)]
    write_json(
        records / "samples.json",
        record(
            "samples",
            {
                "indices": indices,
                "labels": labels,
                "class_names": classes,
                "predictions": predictions,
                "explainers": ["grad_cam"] if "grad_cam" in explainers else list(explainers[:1]),
                "feature_layers": feature_layers,
                "has_masks": has_masks,
                "config": {"samples_per_class": samples_per_class},
            },
        ),
    )

    # --- models --------------------------------------------------------------------------------
    models = {}
    for r, role in enumerate(roles):
        quality = 0.95 - 0.05 * r
        hist = _history(epochs, gen, quality)
        best = max(range(epochs), key=lambda e: hist[e]["val_accuracy"])
        cm = [[0] * k for _ in range(k)]
        for t in range(k):
            for p in range(k):
                cm[t][p] = 40 - 4 * r if t == p else r + (t + p) % 2
        models[role] = {
            "role": role,
            "model": "densenet121" if role == "teacher" else "kdfmv_cnn",
            "distiller": None if role == "teacher" else ("hinton_kd" if role != "scratch" else "scratch"),
            "distiller_params": {} if role in ("teacher", "scratch") else {"alpha": 0.7, "temperature": 4.0},
            "params": 6_964_106 if role == "teacher" else 1_234_567 - 1000 * r,
            "flops": 566.89e6 if role == "teacher" else 232.7e6 + 1e6 * r,
            "macs": 283.4e6 if role == "teacher" else 116.3e6 + 0.5e6 * r,
            "train": {
                "history": hist,
                "best_epoch": best,
                "seconds": 12.5 + r,
                "from_cache": role == "teacher",
                "checkpoint": f"checkpoints/{role}/best.pt",
            },
            "test": {
                "accuracy": 0.9312 - 0.0211 * r,
                "macro_f1": 0.9207 - 0.02 * r,
                "loss": 0.2345 + 0.05 * r,
                "confusion_matrix": cm,
            },
            "posthoc": None if role == "teacher" else {"accuracy": 0.9511 - 0.01 * r, "macro_f1": 0.9402 - 0.01 * r},
            "met": {ex: 0.0123 / (1 + r) + 0.001 * e for e, ex in enumerate(explainers)},
        }
    write_json(records / "models.json", record("models", {"roles": list(roles), "models": models}))

    # --- explanations ----------------------------------------------------------------------------
    ks = [1 * 4, 2 * 4, 3 * 4]
    per_model = {}
    for r, role in enumerate(roles):
        per_model[role] = {}
        for e, ex in enumerate(explainers):
            per_class = {
                c: {
                    "fidelity": 0.9 - 0.05 * r - 0.01 * i,
                    "retained_probability": 0.8 - 0.04 * r - 0.01 * e,
                    "n": 10 + i,
                }
                for i, c in enumerate(classes)
            }
            per_model[role][ex] = {
                "fidelity": {
                    "mean": 0.88 - 0.05 * r - 0.01 * e,
                    "retained_probability": 0.77 - 0.04 * r,
                    "retained_clipped": 0.75 - 0.04 * r,
                    "n": 10 * len(classes),
                    "keep": 0.2,
                    "per_class": per_class,
                },
                "deletion_auc": 0.21 + 0.03 * r + 0.01 * e,
                "insertion_auc": 0.71 - 0.03 * r - 0.01 * e,
                "road": {"road": 0.31 - 0.02 * r, "morf": [0.5, 0.3], "lerf": [0.8, 0.7], "percentages": [0.2, 0.5]},
                "sanity": {"verdict": "pass" if e == 0 else "fail", "final_rank_correlation": 0.1 + 0.6 * e},
                **({"label_sanity": {"verdict": "fail", "rank_correlation": 0.93}} if r == 1 else {}),
            }
            if has_masks:
                per_model[role][ex] |= {
                    "pointing_game": 0.9 - 0.1 * r,
                    "top_k": {
                        str(kk): {"iou": 0.5 - 0.05 * r + 0.01 * j, "dice": 0.66 - 0.04 * r + 0.01 * j}
                        for j, kk in enumerate(ks)
                    },
                    "top_k_iou": 0.51 - 0.05 * r,
                    "top_k_dice": 0.67 - 0.04 * r,
                    "mask_mass": 0.61 - 0.03 * r,
                }
    agreement = {
        role: {
            ex: {
                "map_pearson": 0.8 - 0.1 * r,
                "rank_correlation": 0.75 - 0.1 * r,
                "top_k_agreement": 0.6 - 0.1 * r + 0.01 * e,
                "superpixel_mse": 0.02 + 0.01 * r,
                "superpixel_sign_agreement": 0.7 - 0.05 * r,
            }
            for e, ex in enumerate(explainers)
        }
        for r, role in enumerate(roles)
        if role != "teacher"
    }
    transfer = {
        role: {
            "fss": 0.6 - 0.1 * r,
            "rs": {  # xkd.metrics.transfer.rs's record
                "rs": 0.03 + 0.01 * r,
                "rs_student": 0.37,
                "rs_teacher": 0.43,
                "rs_student_given_teacher": 0.03 + 0.01 * r,
                "rs_teacher_given_student": 0.23,
                "pdcor_student_target_given_teacher": 0.033,
                "fss": 0.6 - 0.1 * r,
                "fss_unbiased": 0.81,
                "target": "onehot",
                "n": 64,
            },
            "student_layer": "blocks.2.1",
            "teacher_layer": "layer3",
        }
        for r, role in enumerate(roles)
        if role != "teacher"
    }
    write_json(
        records / "explanations.json",
        record(
            "explanations",
            {
                "explainers": list(explainers),
                "num_images": 64,
                "fidelity_keep": 0.2,
                "agreement_top_k": 0.1,
                "class_names": classes,
                "per_model": per_model,
                "agreement": agreement,
                "transfer": transfer,
                "random_baseline": {
                    role: {
                        "fidelity": 0.4 + 0.01 * r,
                        "retained_probability": 0.35,
                        "deletion_auc": 0.45,
                        "insertion_auc": 0.44,
                        "road": 0.01,
                    }
                    for r, role in enumerate(roles)
                },
            },
        ),
    )

    # --- run -------------------------------------------------------------------------------------
    run = {
        "name": name,
        "seed": seed,
        "device": "cpu",
        "world_size": 1,
        "versions": {"python": "3.11.2", "torch": torch.__version__, "xkd": "0.1.0"},
        "started": "2024-05-01T10:00:00+00:00",
        "finished": "2024-05-01T10:03:25+00:00",
        "timing": {
            "total_seconds": 205.4,
            "train_seconds": 40.5,
            "per_model_train_seconds": {role: 12.5 + r for r, role in enumerate(roles)},
            "explain_seconds": 7.25,
        },
        "dataset": {
            "name": "synthetic_shapes",
            "class_names": classes,
            "image_shape": [channels, h, h],
            "sizes": {"train": 1200, "val": 300, "test": 150},
            "has_masks": has_masks,
            "skipped_files": list(skipped_files),
        },
    }
    write_json(records / "run.json", record("run", run))
    atomic_write_text(
        root / "config.yaml", f"name: {name}\nseed: {seed}\nevaluation:\n  samples_per_class: {samples_per_class}\n"
    )
    write_json(root / "metrics.json", {"note": "summary; the report must not read this"})
    return root


if __name__ == "__main__":
    print(make_run_dir(sys.argv[1] if len(sys.argv) > 1 else "/tmp/xkd-synthetic-run"))
