"""What a run's trackers log: the scalars of an epoch and of the finished run (read from the records),
the config's hyper-parameters, and the heat-map grids of the report's sample images."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor

from xkd.config import RunConfig
from xkd.engine.checkpoint import load_checkpoint
from xkd.errors import CheckpointError
from xkd.rundir import LAST, RunDir
from xkd.schema import to_dict

HPARAM_SECTIONS_LEFT_OUT = "name output_dir cache_dir device evaluation compare study sweep tracking".split()
"""Config sections that are not hyper-parameters of the trained models (HPARAMS tab, MLflow params)."""
HPARAM_KEYS_LEFT_OUT = ("num_workers", "tensorboard")
GRID_COLUMNS = 16
"""At most this many sample images (columns) in a heat-map grid."""
GRID_CELL = 64
"""Small images are enlarged (nearest neighbour) to about this many pixels a side in the grid."""
GRID_WIDTH = 2048
"""Large images get fewer columns: the grid stays about this many pixels wide at most."""


# -- what is logged ---------------------------------------------------------------------------------


def _number(v: Any) -> float | None:
    """``v`` as a finite float, or None (missing, not a number, a bool, NaN or infinite)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


def epoch_scalars(stats: Mapping[str, Any]) -> dict[str, float]:
    """TensorBoard tags and values of one epoch's history entry."""
    out = {
        "loss/train": stats.get("train_loss"),
        "loss/val": stats.get("val_loss"),
        "accuracy/train": stats.get("train_accuracy"),
        "accuracy/val": stats.get("val_accuracy"),
        "macro_f1/val": stats.get("val_macro_f1"),
        "lr": stats.get("lr"),
        "epoch_seconds": stats.get("seconds"),
    }
    out |= {f"loss_terms/{k}": v for k, v in (stats.get("terms") or {}).items()}
    return {k: f for k, v in out.items() if (f := _number(v)) is not None}


def _column(source: Mapping[str, Any], column: Mapping[str, Any]) -> Any:
    """A declared metric column's value in a per-explainer record (fidelity and ROAD keep theirs
    under ``sub``)."""
    v = source.get(column["key"])
    if column.get("sub") is not None:
        return v.get(column["sub"]) if isinstance(v, dict) else None
    return v


def final_scalars(run_dir: RunDir) -> dict[str, dict[str, float]]:
    """Per role, the run's final numbers from its records: test accuracy, macro-F1 and loss (best
    checkpoint) and of the last epoch, post-hoc agreement with the teacher, cost, and per explainer
    its declared metrics (``explain/<explainer>/<metric>``) and agreement with the teacher's maps
    (``agreement/<explainer>/<metric>``), and FSS/RS."""
    models = run_dir.read_record("models")["models"]
    expl = run_dir.read_record("explanations") if run_dir.has_record("explanations") else {}
    own_cols, pair_cols = [], []
    for info in (expl.get("metric_info") or {}).values():
        if info.get("scope") == "model":
            own_cols += info.get("columns") or []
        elif info.get("scope") == "agreement":
            pair_cols += info.get("columns") or []
    out: dict[str, dict[str, float]] = {}
    for role, m in models.items():
        test, last, posthoc = m.get("test") or {}, m.get("test_last") or {}, m.get("posthoc") or {}
        raw: dict[str, Any] = {
            "test/accuracy": test.get("accuracy"),
            "test/macro_f1": test.get("macro_f1"),
            "test/loss": test.get("loss"),
            "test/accuracy_last_epoch": last.get("accuracy"),
            "test/macro_f1_last_epoch": last.get("macro_f1"),
            "posthoc/accuracy": posthoc.get("accuracy"),
            "posthoc/macro_f1": posthoc.get("macro_f1"),
            "cost/params": m.get("params"),
            "cost/flops": m.get("flops"),
            "cost/train_seconds": (m.get("train") or {}).get("seconds"),
        }
        raw |= {f"cost/explain_seconds/{ex}": v for ex, v in (m.get("met") or {}).items()}
        for ex, own in ((expl.get("per_model") or {}).get(role) or {}).items():
            raw |= {f"explain/{ex}/{c['key']}": _column(own or {}, c) for c in own_cols}
        for ex, pair in ((expl.get("agreement") or {}).get(role) or {}).items():
            raw |= {f"agreement/{ex}/{c['key']}": _column(pair or {}, c) for c in pair_cols}
        transfer = (expl.get("transfer") or {}).get(role) or {}
        raw["transfer/fss"] = transfer.get("fss")
        raw["transfer/rs"] = _column(transfer, {"key": "rs", "sub": "rs"})
        out[role] = {k: f for k, v in raw.items() if (f := _number(v)) is not None}
    return out


def _flatten(obj: Any, prefix: str, out: dict[str, bool | int | float | str]) -> None:
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k not in HPARAM_KEYS_LEFT_OUT:
                _flatten(v, f"{prefix}.{k}" if prefix else str(k), out)
    elif isinstance(obj, list) and any(isinstance(v, (dict, list)) for v in obj):
        for i, v in enumerate(obj):
            _flatten(v, f"{prefix}.{i}", out)
    elif isinstance(obj, (bool, int, float, str)):
        out[prefix] = obj
    else:  # None, a list of numbers (layer widths)
        out[prefix] = str(obj)


def hyperparameters(cfg: RunConfig) -> dict[str, bool | int | float | str]:
    """The config's training settings by config path (``train.optimizer.lr``,
    ``students.1.params.alpha``): seed, data, models, students and both training budgets (not the
    evaluation, where files go, or the comparison, study and sweep sections)."""
    raw = {k: v for k, v in to_dict(cfg).items() if k not in HPARAM_SECTIONS_LEFT_OUT}
    out: dict[str, bool | int | float | str] = {}
    _flatten(raw, "", out)
    return out


# -- the explanation grid ---------------------------------------------------------------------------


def jet(x: Tensor) -> Tensor:
    """The jet colour map of values in [0, 1]: (..., 3) RGB in [0, 1] (blue -> cyan -> yellow -> red)."""
    x = x.clamp(0, 1)[..., None]
    return (1.5 - (4 * x - torch.tensor([3.0, 2.0, 1.0])).abs()).clamp(0, 1)


def _normalise(m: Tensor) -> Tensor:
    """One map scaled to [0, 1] for display (a constant map becomes zeros), as the report shows it."""
    m = torch.nan_to_num(m.float(), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = m.min(), m.max()
    return (m - lo) / (hi - lo) if hi > lo else torch.zeros_like(m)


def _rgb(image: Tensor) -> Tensor:
    """(C, H, W) in [0, 1] -> (H, W, 3): gray replicated, RGB as is, other channel counts averaged."""
    image = torch.nan_to_num(image.float()).clamp(0, 1)
    if image.shape[0] == 3:
        return image.permute(1, 2, 0)
    return image.mean(0)[..., None].expand(*image.shape[1:], 3)


def explanation_grids(run_dir: RunDir, alpha: float = 0.5) -> dict[str, tuple[Tensor, str]]:
    """Per explainer, a heat-map grid of the report's sample images as an (H, W, 3) image in [0, 1]
    and its legend (markdown): the first row the images, then one row per model (teacher first), each
    map normalised to [0, 1] and drawn in the jet colour map at ``alpha`` over the image. Read from
    ``records/samples.safetensors``; empty when the run has no sample maps."""
    if not run_dir.samples_tensors.is_file() or not run_dir.has_record("samples"):
        return {}
    tensors = load_file(str(run_dir.samples_tensors))
    samples = run_dir.read_record("samples")
    roles = run_dir.read_record("models")["roles"]
    images = tensors.get("images")
    if images is None or images.ndim != 4 or len(images) == 0:
        return {}
    n, _, h, w = images.shape
    scale = max(1, GRID_CELL // max(h, w))
    k = max(2, min(GRID_COLUMNS, GRID_WIDTH // (w * scale + 2)))
    cols = sorted({round(i * (n - 1) / (k - 1)) for i in range(k)}) if n > k else list(range(n))
    labels, indices = samples.get("labels") or [], samples.get("indices") or list(range(n))
    names, preds = samples.get("class_names") or [], samples.get("predictions") or {}
    grids = {}
    for ex in samples.get("explainers") or []:
        rows = [r for r in roles if f"maps/{r}/{ex}" in tensors]
        if not rows:
            continue
        cells = []
        for r in [None, *rows]:
            row = []
            for c in cols:
                base = _rgb(images[c])
                if r is not None:
                    base = (1 - alpha) * base + alpha * jet(_normalise(tensors[f"maps/{r}/{ex}"][c]))
                row.append(base.repeat_interleave(scale, 0).repeat_interleave(scale, 1))
            cells.append(row)
        grids[ex] = (_tile(cells), _legend(ex, rows, cols, labels, indices, names, preds))
    return grids


def _tile(cells: list[list[Tensor]], pad: int = 2) -> Tensor:
    """Equal-sized (h, w, 3) cells laid out row by row with ``pad`` white pixels between them."""
    h, w, _ = cells[0][0].shape
    n_rows, n_cols = len(cells), len(cells[0])
    out = torch.ones(n_rows * (h + pad) + pad, n_cols * (w + pad) + pad, 3)
    for i, row in enumerate(cells):
        for j, cell in enumerate(row):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            out[y : y + h, x : x + w] = cell
    return out


def _legend(ex: str, rows: list[str], cols: list[int], labels: list, indices: list, names: list, preds: dict) -> str:
    def name(k: Any) -> str:
        return str(names[k]) if isinstance(k, int) and 0 <= k < len(names) else str(k)

    head = "| row | " + " | ".join(f"#{indices[c]}" if c < len(indices) else str(c) for c in cols) + " |"
    lines = [f"**{ex}** maps (jet, normalised per map) over the test images.", "", head]
    lines.append("|---" * (len(cols) + 1) + "|")
    lines.append(
        "| image (true class) | " + " | ".join(name(labels[c]) if c < len(labels) else "" for c in cols) + " |"
    )
    for r in rows:
        p = preds.get(r) or []
        lines.append(f"| {r} (prediction) | " + " | ".join(name(p[c]) if c < len(p) else "" for c in cols) + " |")
    return "\n".join(lines)


def full_history(run_dir: RunDir, role: str, history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The longest known history of ``role``: its record's, or that of the run's own ``last.pt``
    when longer (a teacher loaded from the cache on ``--resume`` records the history of its best
    epoch only, while this run trained it further)."""
    last = run_dir.checkpoint(role, LAST)
    if last.is_file():
        try:
            kept = load_checkpoint(last).get("history") or []
        except CheckpointError:
            kept = []
        if isinstance(kept, list) and len(kept) > len(history):
            return kept
    return history
